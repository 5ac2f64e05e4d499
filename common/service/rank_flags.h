// The hidden flags with which RankWorkers (common/model/rank_workers.h) starts a binary as worker
// rank 1..N-1 of a process group, defined once here for every binary that runs as ranks with
// Abseil flags (lychee-inference, lychee-trainer, model_bench, calibration_bench). A binary that
// links this file's object shows them in its usage text as "not for users".
#pragma once

#include <string>

namespace lychee {

struct WorkerRankFlags {
  int rank = 0;                 // 0: not started as a worker
  std::string rendezvous_file;  // where the ranks meet; empty for rank 0
};

// The values of --tensor-parallel-rank and --tensor-parallel-rendezvous, after flag parsing.
WorkerRankFlags WorkerRankFromFlags();

}  // namespace lychee
