// What a failed CUDA call in a kernel's LibTorch entry point becomes, down to the status a client
// sees. Needs the CUDA runtime library, not a device: error names and descriptions are host-side.
#include "tests/torch_catch.h"

#include "common/model/cuda/cuda_check.h"

#include <string>

#include "common/model/torch_errors.h"

namespace lychee {
namespace {

cudaError_t FailingLaunch(cudaError_t error) { return error; }

TEST_CASE("LYCHEE_CUDA_CHECK names the check, the call, where, and the cause") {
  const int line = __LINE__ + 2;
  try {
    LYCHEE_CUDA_CHECK(FailingLaunch(cudaErrorInvalidValue), "gather decode");
    FAIL("the check did not throw");
  } catch (const c10::Error& error) {
    const std::string message = error.what_without_backtrace();
    CHECK(message.find("CUDA check failed: gather decode: FailingLaunch(cudaErrorInvalidValue) at ") !=
          std::string::npos);
    CHECK(message.find("cuda_check_test.cc:" + std::to_string(line) + ": cudaErrorInvalidValue (invalid argument)") !=
          std::string::npos);
    CHECK(dynamic_cast<const c10::OutOfMemoryError*>(&error) == nullptr);
    const absl::Status status = StatusFromException(error, "decode step");
    CHECK(status.code() == absl::StatusCode::kInternal);
    CHECK(std::string(status.message()).rfind("decode step failed: CUDA check failed: gather decode", 0) == 0);
  }
}

TEST_CASE("a failed CUDA allocation is out of memory, RESOURCE_EXHAUSTED at the boundary") {
  try {
    LYCHEE_CUDA_CHECK(FailingLaunch(cudaErrorMemoryAllocation), "workspace");
    FAIL("the check did not throw");
  } catch (const c10::OutOfMemoryError& error) {
    const absl::Status status = StatusFromException(error, "prefill");
    CHECK(status.code() == absl::StatusCode::kResourceExhausted);
    CHECK(std::string(status.message()).find("prefill ran out of memory: CUDA check failed: workspace") !=
          std::string::npos);
    CHECK(std::string(status.message()).find("cudaErrorMemoryAllocation") != std::string::npos);
  }
}

TEST_CASE("a successful call passes the check") {
  CHECK_NOTHROW([] { LYCHEE_CUDA_CHECK(FailingLaunch(cudaSuccess), "nothing"); }());
}

}  // namespace
}  // namespace lychee
