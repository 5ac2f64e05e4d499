// Exact causal attention over the whole cache, written from matmul and softmax so that it runs
// on LibTorch 1.13 and 2.x alike. The reference every other backend is measured against.
#pragma once

#include "common/attention.h"

namespace lychee {

// Attention of queries [num_heads, T, D] over keys and values [num_kv_heads, L, D], query t at
// position L - T + t, causal, optionally within a sliding window; GQA by grouping the query heads
// of each KV head. Splits the queries so that no score block exceeds max_score_elements
// (256 MiB of float32 by default).
at::Tensor DenseAttention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                          double scale, std::optional<int64_t> sliding_window = std::nullopt,
                          int64_t max_score_elements = int64_t{64} << 20);

class DenseAttentionBackend : public AttentionBackend {
 public:
  at::Tensor Attend(const AttentionInput& input) const override;
};

}  // namespace lychee
