// The real CalibrationRunner: a job's session loads its model, tokenizer and corpus once, runs
// RunCalibration for each target and, for a sweep, validates each partition against dense on
// prompts built once (common/eval/partition_validation.h). Only job_runner.cc sees LibTorch; this
// header does not.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "trainer/job_manager.h"

namespace lychee {

// `device` is "cpu" (fp32) or "cuda" (bf16); anything else is INVALID_ARGUMENT.
// `intra_op_threads` > 0 sets LibTorch's intra-op threads of each job; 0 keeps LibTorch's default
// (OMP_NUM_THREADS, else 1 with Debian's build). Threads beyond the free cores cost dearly: on 2
// cores shared with other work, 2 threads made a step about 10 times slower than 1.
absl::StatusOr<CalibrationRunner> MakeCalibrationRunner(const std::string& device, int intra_op_threads = 0);

}  // namespace lychee
