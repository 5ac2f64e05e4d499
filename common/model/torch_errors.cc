#include "common/model/torch_errors.h"

#include <c10/util/Exception.h>

#include <new>

#include "absl/strings/str_cat.h"

namespace lychee {
namespace {

// The message of `error`, without LibTorch's backtrace.
const char* Message(const std::exception& error) {
  const auto* torch_error = dynamic_cast<const c10::Error*>(&error);
  return torch_error != nullptr ? torch_error->what_without_backtrace() : error.what();
}

}  // namespace

absl::Status StatusFromException(const std::exception& error, absl::string_view step) {
  const char* cause = Message(error);
  if (dynamic_cast<const c10::OutOfMemoryError*>(&error) != nullptr ||
      dynamic_cast<const std::bad_alloc*>(&error) != nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat(step, " ran out of memory: ", cause));
  }
  if (dynamic_cast<const CollectiveError*>(&error) != nullptr) {
    return absl::UnavailableError(absl::StrCat(step, " lost a rank of its process group: ", cause));
  }
  return absl::InternalError(absl::StrCat(step, " failed: ", cause));
}

CollectiveError CollectiveFailure(const std::exception& cause, absl::string_view name, int rank, int world_size) {
  return CollectiveError(absl::StrCat(name, " on rank ", rank, " of ", world_size, ": ", Message(cause)));
}

}  // namespace lychee
