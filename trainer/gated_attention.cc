#include "trainer/gated_attention.h"

#include <cmath>
#include <limits>

namespace lychee {

std::unique_ptr<SequenceAttentionState> GatedTrainingAttention::NewSequenceState() const {
  return std::make_unique<GatedSequenceState>();
}

at::Tensor GatedTrainingAttention::Attend(const AttentionInput& input) const {
  auto& state = static_cast<GatedSequenceState&>(*input.state);
  const int64_t num_heads = input.queries.size(0);
  const int64_t length = input.queries.size(1);
  const int64_t head_dim = input.queries.size(2);
  const int64_t num_kv_heads = input.keys.size(0);
  const int64_t group = num_heads / num_kv_heads;
  const float minus_infinity = -std::numeric_limits<float>::infinity();

  at::Tensor grouped = input.queries.reshape({num_kv_heads, group, length, head_dim});
  at::Tensor scores = at::matmul(grouped, input.keys.unsqueeze(1).transpose(-1, -2));  // [kv, G, T, T]
  at::Tensor positions = at::arange(length, at::TensorOptions().dtype(at::kLong).device(scores.device()));
  at::Tensor query_positions = positions.unsqueeze(1);
  at::Tensor key_positions = positions.unsqueeze(0);
  at::Tensor causal = key_positions <= query_positions;
  at::Tensor values = input.values.unsqueeze(1);
  at::Tensor dense = at::matmul(at::softmax((scores * input.scale).masked_fill(causal.logical_not(), minus_infinity), -1),
                                values);

  at::Tensor output = dense;
  if (input.layer > 0 && state.previous_scores.defined()) {
    const int64_t keep = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(params_.keep_ratio * length)));
    at::Tensor ranked = state.previous_scores.masked_fill(causal.logical_not(), minus_infinity);
    at::Tensor kept = at::zeros_like(ranked, at::TensorOptions().dtype(at::kBool));
    kept.scatter_(-1, std::get<1>(ranked.topk(std::min(keep, length), -1)), true);
    at::Tensor always = (key_positions < params_.sink_tokens).logical_or(key_positions > query_positions - params_.recent_tokens);
    kept = kept.logical_or(always).logical_and(causal);
    at::Tensor sparse =
        at::matmul(at::softmax((scores * input.scale).masked_fill(kept.logical_not(), minus_infinity), -1), values);
    at::Tensor z = state.gates[input.layer].view({num_kv_heads, 1, 1, 1});
    output = z * dense + (1.0 - z) * sparse;
  }
  state.previous_scores = scores.detach();
  return output.reshape({num_heads, length, head_dim});
}

}  // namespace lychee
