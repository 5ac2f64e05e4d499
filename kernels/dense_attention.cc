#include "kernels/dense_attention.h"

#include <algorithm>
#include <limits>

#include "kernels/policies/accounting.h"

namespace lychee {
at::Tensor DenseAttention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                          double scale, std::optional<int64_t> sliding_window,
                          int64_t max_score_elements) {
  const int64_t num_heads = queries.size(0);
  const int64_t num_queries = queries.size(1);
  const int64_t head_dim = queries.size(2);
  const int64_t num_kv_heads = keys.size(0);
  const int64_t length = keys.size(1);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t first_position = length - num_queries;

  at::Tensor grouped = queries.reshape({num_kv_heads, group, num_queries, head_dim});
  // The group's queries are stacked into one matrix per KV head, so that bmm reads each cached
  // key and value once; a broadcast over the group would copy the cache group-fold first.
  at::Tensor keys_t = keys.transpose(-1, -2);  // [kv, D, L]
  const int64_t rows_per_chunk = std::max<int64_t>(1, max_score_elements / std::max<int64_t>(1, num_heads * length));

  std::vector<at::Tensor> outputs;
  for (int64_t start = 0; start < num_queries; start += rows_per_chunk) {
    const int64_t rows = std::min(rows_per_chunk, num_queries - start);
    at::Tensor stacked = grouped.narrow(2, start, rows).reshape({num_kv_heads, group * rows, head_dim});
    at::Tensor scores =
        at::bmm(stacked, keys_t).to(at::kFloat).mul_(scale).view({num_kv_heads, group, rows, length});
    const bool causal = rows > 1 || first_position + start + rows < length;
    if (causal || sliding_window) {
      at::Tensor query_positions =
          at::arange(first_position + start, first_position + start + rows, at::TensorOptions().dtype(at::kLong).device(keys.device()))
              .unsqueeze(1);
      at::Tensor key_positions = at::arange(length, at::TensorOptions().dtype(at::kLong).device(keys.device())).unsqueeze(0);
      at::Tensor hidden = key_positions > query_positions;
      if (sliding_window) hidden = hidden.logical_or(key_positions <= query_positions - *sliding_window);
      scores.masked_fill_(hidden, -std::numeric_limits<float>::infinity());
    }
    at::Tensor weights = at::softmax(scores, -1).to(values.scalar_type()).view({num_kv_heads, group * rows, length});
    outputs.push_back(at::bmm(weights, values).view({num_kv_heads, group, rows, head_dim}));
  }
  at::Tensor out = outputs.size() == 1 ? outputs[0] : at::cat(outputs, 2);
  return out.reshape({num_heads, num_queries, head_dim});
}

std::unique_ptr<SequenceAttentionState> DenseAttentionBackend::NewSequenceState() const {
  return std::make_unique<AccountedState>(audit_every_);
}

at::Tensor DenseAttentionBackend::Attend(const AttentionInput& input) const {
  if (input.queries.size(1) == 1) {
    // Other backends delegate to this one with their own states; only ours carry the account.
    auto* state = dynamic_cast<AccountedState*>(input.state);
    CountDecodeStep(state, input.layer);
    const int64_t num_kv_heads = input.keys.size(0);
    const int64_t length = input.keys.size(1);
    const int64_t attended = input.sliding_window ? std::min(length, *input.sliding_window) : length;
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      AccountHead(state, input.layer, head, num_kv_heads, attended, KvBytesPerPosition(input.keys));
    }
    AuditDense(state, input.queries.size(0));
  }
  return DenseAttention(input.queries, input.keys, input.values, input.scale, input.sliding_window);
}

}  // namespace lychee
