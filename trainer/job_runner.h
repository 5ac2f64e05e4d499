// The real CalibrationRunner: a job's session loads its model, tokenizer and corpus once, runs
// RunCalibration for each target and, for a sweep, validates each partition against dense on
// prompts built once (common/eval/partition_validation.h). A job of N > 1 data-parallel ranks runs
// each calibration as rank 0 in the job's thread, with ranks 1..N-1 as calibration workers
// (RunCalibrationWorker) in processes of their own. Only job_runner.cc sees LibTorch; this header
// does not.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "trainer/job_manager.h"

namespace lychee {

// `device` is "cpu" (fp32) or "cuda" (bf16); anything else is INVALID_ARGUMENT.
// `intra_op_threads` > 0 sets LibTorch's intra-op threads of each job, and of each of its workers;
// 0 keeps LibTorch's default (OMP_NUM_THREADS, else 1 with Debian's build). Threads beyond the free
// cores cost dearly: on 2 cores shared with other work, 2 threads made a step about 10 times slower
// than 1.
// `worker_program` is what a data-parallel job's ranks 1..N-1 run: lychee-trainer, re-executed
// with the hidden flag kCalibrationWorkerFlag; empty: this process's own binary.
absl::StatusOr<CalibrationRunner> MakeCalibrationRunner(const std::string& device, int intra_op_threads = 0,
                                                        std::string worker_program = "");

// "--calibration-worker FILE" makes lychee-trainer a calibration worker rather than a server.
inline constexpr char kCalibrationWorkerFlag[] = "calibration-worker";

// A data-parallel calibration worker from start to end: reads the calibration that rank 0 wrote to
// `job_file`, joins its group (Gloo, or NCCL on cuda) at `rendezvous_file` as `rank`, loads the model and runs every
// step with the other ranks. It has no cancellation of its own: rank 0 kills it.
absl::Status RunCalibrationWorker(const std::string& job_file, int rank, const std::string& rendezvous_file);

}  // namespace lychee
