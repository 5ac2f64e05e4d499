#include "common/model/torch_errors.h"

#include <c10/util/Exception.h>

#include <new>

#include "absl/strings/str_cat.h"
#include "common/model/tensor_parallel.h"

namespace lychee {

absl::Status StatusFromException(const std::exception& error, absl::string_view step) {
  const auto* torch_error = dynamic_cast<const c10::Error*>(&error);
  const char* cause = torch_error != nullptr ? torch_error->what_without_backtrace() : error.what();
  if (dynamic_cast<const c10::OutOfMemoryError*>(&error) != nullptr ||
      dynamic_cast<const std::bad_alloc*>(&error) != nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat(step, " ran out of memory: ", cause));
  }
  if (dynamic_cast<const CollectiveError*>(&error) != nullptr) {
    return absl::UnavailableError(absl::StrCat(step, " lost a rank of its process group: ", cause));
  }
  return absl::InternalError(absl::StrCat(step, " failed: ", cause));
}

}  // namespace lychee
