#include "trainer/gated_attention.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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
  const bool sparse_side = input.layer > 0 && state.previous_scores.defined();
  const int64_t keep = std::min(length, std::max<int64_t>(1, static_cast<int64_t>(std::ceil(params_.keep_ratio * length))));
  const int64_t chunk_rows = std::clamp<int64_t>(params_.chunk_score_elements / (num_heads * length), 1, length);

  at::Tensor grouped = input.queries.reshape({num_kv_heads, group, length, head_dim});
  at::Tensor transposed_keys = input.keys.unsqueeze(1).transpose(-1, -2);
  at::Tensor values = input.values.unsqueeze(1);
  at::Tensor key_positions =
      at::arange(length, at::TensorOptions().dtype(at::kLong).device(input.queries.device())).unsqueeze(0);
  at::Tensor z = sparse_side ? state.gates[input.layer].view({num_kv_heads, 1, 1, 1}) : at::Tensor();
  at::Tensor scores_of_layer;  // the next layer selects from these
  {
    at::NoGradGuard no_grad;
    scores_of_layer = at::empty({num_kv_heads, group, length, length}, input.queries.options());
  }
  std::vector<at::Tensor> outputs;
  for (int64_t first = 0; first < length; first += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, length - first);
    at::Tensor scores = at::matmul(grouped.narrow(2, first, rows), transposed_keys);  // [kv, G, rows, T]
    {
      at::NoGradGuard no_grad;
      scores_of_layer.narrow(2, first, rows).copy_(scores);
    }
    at::Tensor query_positions = key_positions.view({length, 1}).narrow(0, first, rows);
    at::Tensor causal = key_positions <= query_positions;  // [rows, T]
    at::Tensor scaled = scores * input.scale;
    at::Tensor dense = at::matmul(at::softmax(scaled.masked_fill(causal.logical_not(), minus_infinity), -1), values);
    if (!sparse_side) {
      outputs.push_back(dense);
      continue;
    }
    at::Tensor kept;
    {
      at::NoGradGuard no_grad;
      at::Tensor ranked = state.previous_scores.narrow(2, first, rows).masked_fill(causal.logical_not(), minus_infinity);
      kept = at::zeros_like(ranked, at::TensorOptions().dtype(at::kBool));
      kept.scatter_(-1, std::get<1>(ranked.topk(keep, -1)), true);
      at::Tensor always = (key_positions < params_.sink_tokens)
                              .logical_or(key_positions > query_positions - params_.recent_tokens);
      kept = kept.logical_or(always).logical_and(causal);
    }
    at::Tensor sparse = at::matmul(at::softmax(scaled.masked_fill(kept.logical_not(), minus_infinity), -1), values);
    outputs.push_back(z * dense + (1.0 - z) * sparse);
  }
  state.previous_scores = scores_of_layer;
  at::Tensor output = outputs.size() == 1 ? outputs[0] : at::cat(outputs, 2);
  return output.reshape({num_heads, length, head_dim});
}

}  // namespace lychee
