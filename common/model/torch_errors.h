// What a failed LibTorch or CUDA step becomes at a boundary: out of memory (LibTorch's allocator,
// a CUDA allocation, the host's) is RESOURCE_EXHAUSTED, a failed tensor-parallel collective (a rank
// gone) UNAVAILABLE, anything else (a kernel's check, a failed CUDA call) INTERNAL; the message names the step and the
// cause without LibTorch's backtrace. The header is free of LibTorch.
#pragma once

#include <exception>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/model/tensor_parallel.h"

namespace lychee {

absl::Status StatusFromException(const std::exception& error, absl::string_view step);

// What a process group throws when its collective `name` failed on `rank` of `world_size` with `cause`.
CollectiveError CollectiveFailure(const std::exception& cause, absl::string_view name, int rank, int world_size);

}  // namespace lychee
