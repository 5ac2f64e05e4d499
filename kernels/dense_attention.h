// Exact causal attention over the whole cache, written from matmul and softmax so that it runs
// on LibTorch 1.13 and 2.x alike. The reference every other backend is measured against.
#pragma once

#include "common/model/attention.h"

namespace lychee {

// Attention of queries [num_heads, T, D] over keys and values [num_kv_heads, L, D], query t at
// position L - T + t, causal, optionally within a sliding window; GQA by grouping the query heads
// of each KV head. Splits the queries so that no score block exceeds max_score_elements
// (256 MiB of float32 by default).
at::Tensor DenseAttention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                          double scale, std::optional<int64_t> sliding_window = std::nullopt,
                          int64_t max_score_elements = int64_t{64} << 20);

// Accounts its decode reads in its sequences' telemetry; with `audit`, records a dropped mass of
// zero for every query (nothing is dropped), so that audited runs of every policy compare.
class DenseAttentionBackend : public AttentionBackend {
 public:
  // audit_every: as AccountedState's.
  explicit DenseAttentionBackend(int64_t audit_every = 0) : audit_every_(audit_every) {}
  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override;
  at::Tensor Attend(const AttentionInput& input) const override;

 private:
  int64_t audit_every_;
};

}  // namespace lychee
