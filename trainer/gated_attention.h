// The student's attention during calibration. Each KV head's output mixes dense attention and a
// token-level sparse approximation by its gate z in [0, 1]: z * dense + (1 - z) * sparse. The
// sparse side keeps, for every query, the top share of tokens by the previous layer's unscaled
// q·k of the same head, plus the sink and recent tokens. Layer 0 stays dense.
#pragma once

#include "common/model/attention.h"

namespace lychee {

struct SparseTrainingParams {
  double keep_ratio = 0.3;
  int64_t sink_tokens = 128;
  int64_t recent_tokens = 256;
  // Query rows are attended in chunks whose score block holds at most this many elements, so that
  // the transient masks and top-k indices of a long sample stay a fraction of one layer's scores.
  int64_t chunk_score_elements = int64_t{1} << 28;
};

// Per-sample state: the gates of this step and the scores the next layer selects from.
struct GatedSequenceState : SequenceAttentionState {
  at::Tensor gates;            // [num_layers, num_kv_heads], differentiable
  at::Tensor previous_scores;  // [kv_heads, group, T, T] unscaled q·k of the layer attended last, detached
};

class GatedTrainingAttention : public AttentionBackend {
 public:
  explicit GatedTrainingAttention(SparseTrainingParams params) : params_(params) {}

  // A state whose gates the caller sets before each forward.
  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override;
  // Whole-sequence attention only (queries and keys of the same T positions), in chunks of query
  // rows so that only the softmax weights autograd keeps grow with T x T.
  at::Tensor Attend(const AttentionInput& input) const override;

 private:
  SparseTrainingParams params_;
};

}  // namespace lychee
