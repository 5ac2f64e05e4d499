#include "kernels/hybrid_attention.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "kernels/dense_attention.h"

namespace lychee {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

std::vector<int64_t> MandatoryBlocks(int64_t length, const SelectionParams& params) {
  const int64_t num_blocks = CeilDiv(length, params.block_size);
  const int64_t sink_blocks = std::min(num_blocks, CeilDiv(params.sink_tokens, params.block_size));
  const int64_t recent_start = std::min(length - 1, std::max<int64_t>(0, length - params.recent_tokens));
  std::vector<int64_t> blocks(sink_blocks);
  std::iota(blocks.begin(), blocks.end(), 0);
  for (int64_t block = std::max(sink_blocks, recent_start / params.block_size); block < num_blocks; ++block) {
    blocks.push_back(block);
  }
  return blocks;
}

at::Tensor BlockScores(const at::Tensor& keys, const at::Tensor& pooled_query, int64_t block_size) {
  const int64_t length = keys.size(0);
  const int64_t num_blocks = CeilDiv(length, block_size);
  at::Tensor scores = at::mv(keys.to(at::kFloat), pooled_query.to(at::kFloat));
  at::Tensor padded = at::full({num_blocks * block_size}, -std::numeric_limits<float>::infinity(), scores.options());
  padded.narrow(0, 0, length).copy_(scores);
  return std::get<0>(padded.view({num_blocks, block_size}).max(1));
}

std::vector<int64_t> SelectBlocks(const at::Tensor& block_scores, int64_t length, const SelectionParams& params) {
  const int64_t num_blocks = CeilDiv(length, params.block_size);
  std::vector<int64_t> selected(num_blocks);
  std::iota(selected.begin(), selected.end(), 0);
  if (num_blocks <= params.budget_blocks()) return selected;

  std::vector<bool> taken(num_blocks, false);
  for (int64_t block : MandatoryBlocks(length, params)) taken[block] = true;
  at::Tensor cpu_scores = block_scores.to(at::kCPU, at::kFloat).contiguous();
  return SelectUnits(std::move(taken), cpu_scores.data_ptr<float>(), params.budget_blocks());
}

at::Tensor BlockPositions(const std::vector<int64_t>& blocks, int64_t length, int64_t block_size) {
  std::vector<int64_t> positions;
  positions.reserve(blocks.size() * block_size);
  for (int64_t block : blocks) {
    for (int64_t p = block * block_size; p < std::min(length, (block + 1) * block_size); ++p) positions.push_back(p);
  }
  return at::tensor(positions, at::kLong);
}

absl::Status CheckHybridFits(const HeadPartition& partition, const ModelConfig& config) {
  LYCHEE_RETURN_IF_ERROR(partition.ValidateFor(config));
  if (config.sliding_window) {
    return absl::FailedPreconditionError("hybrid attention does not support models with a sliding window");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const HybridAttentionBackend>> HybridAttentionBackend::Create(
    std::shared_ptr<const HeadPartition> partition, const ModelConfig& config, int64_t audit_every) {
  LYCHEE_RETURN_IF_ERROR(CheckHybridFits(*partition, config));
  return std::shared_ptr<const HybridAttentionBackend>(new HybridAttentionBackend(std::move(partition), audit_every));
}

std::unique_ptr<SequenceAttentionState> HybridAttentionBackend::NewSequenceState() const {
  auto state = std::make_unique<HybridSequenceState>(audit_every_);
  state->selected_blocks.resize(partition_->num_kv_heads());
  return state;
}

at::Tensor HybridAttentionBackend::Attend(const AttentionInput& input) const {
  if (input.queries.size(1) > 1) {
    return DenseAttention(input.queries, input.keys, input.values, input.scale);
  }
  auto& state = static_cast<HybridSequenceState&>(*input.state);
  // Layer 0 is all retrieval heads and opens every step, so selections never leak across steps.
  if (input.layer == 0) {
    for (auto& blocks : state.selected_blocks) blocks.clear();
  }
  const SelectionParams& params = partition_->selection();
  const int64_t num_kv_heads = input.keys.size(0);
  const int64_t group = input.queries.size(0) / num_kv_heads;
  const int64_t length = input.keys.size(1);
  const int64_t bytes_per_position = KvBytesPerPosition(input.keys);
  CountDecodeStep(&state, input.layer);
  std::vector<at::Tensor> outputs;
  for (int64_t head = 0; head < num_kv_heads; ++head) {
    at::Tensor queries = input.queries.narrow(0, head * group, group);  // [G, 1, D]
    at::Tensor keys = input.keys.narrow(0, head, 1);                   // [1, L, D]
    at::Tensor values = input.values.narrow(0, head, 1);
    std::vector<int64_t>& selection = state.selected_blocks[head];
    if (partition_->role(input.layer, head) == HeadRole::kRetrieval) {
      outputs.push_back(DenseAttention(queries, keys, values, input.scale));
      at::Tensor pooled_query = queries.to(at::kFloat).mean(0).squeeze(0);
      selection = SelectBlocks(BlockScores(keys[0], pooled_query, params.block_size), length, params);
      AccountHead(&state, input.layer, head, num_kv_heads, length, bytes_per_position);
      AuditDense(&state, group);
    } else {
      const std::vector<int64_t>& blocks = selection.empty() ? MandatoryBlocks(length, params) : selection;
      at::Tensor positions = UnitPositions(blocks, params.block_size, length, keys.device());
      outputs.push_back(DenseAttention(queries, keys.index_select(1, positions), values.index_select(1, positions),
                                       input.scale));
      AccountHead(&state, input.layer, head, num_kv_heads, positions.numel(), bytes_per_position);
      AuditDroppedMass(&state, queries, keys[0], positions, input.scale);
    }
  }
  return at::cat(outputs, 0);
}

}  // namespace lychee
