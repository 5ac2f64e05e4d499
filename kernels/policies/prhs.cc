// PrHS: pre-hoc sparse decode attention. Each (layer, KV head) chooses its blocks before any
// score of the step is computed, from what earlier computations already saw: the block masses of
// its own previous step (temporal; the first decode step takes them from the last prompt
// position's dense attention), enlarged to the neighbouring blocks; the block masses of the
// previous layer in this step (cross-layer), enlarged the same way; and a recency window. The
// mass of what it drops can be audited against dense scores (spec.audit).
#include <algorithm>
#include <numeric>

#include "kernels/dense_attention.h"
#include "kernels/policies/accounting.h"
#include "kernels/policies/policies.h"

namespace lychee {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct PrhsState : AccountedState {
  using AccountedState::AccountedState;
  // [layer][kv head]: float32 block masses (mean over the group's queries) of the latest step,
  // -1 for blocks not attended.
  std::vector<std::vector<at::Tensor>> previous_mass;
  // [kv head]: the block masses of `mass_layer` in the current step, for the next layer.
  std::vector<at::Tensor> layer_mass;
  int mass_layer = -1;

  at::Tensor& Previous(int layer, int64_t head, int64_t num_kv_heads) {
    if (static_cast<int64_t>(previous_mass.size()) <= layer) previous_mass.resize(layer + 1);
    if (previous_mass[layer].empty()) previous_mass[layer].resize(num_kv_heads);
    return previous_mass[layer][head];
  }
};

// Mean over the group of `weights` [G, n] (softmax over `positions`), summed per block; -1 for
// blocks holding none of the positions.
at::Tensor BlockMass(const at::Tensor& weights, const at::Tensor& positions, int64_t num_blocks, int64_t block_size) {
  at::Tensor blocks = at::floor_divide(positions, block_size).cpu();
  at::Tensor mass = at::full({num_blocks}, -1.0f, at::kFloat);
  mass.index_fill_(0, blocks, 0.0f);
  return mass.index_add_(0, blocks, weights.mean(0).to(at::kCPU, at::kFloat));
}

class PrhsBackend : public AttentionBackend {
 public:
  explicit PrhsBackend(const PolicySpec& spec) : spec_(spec) {}

  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override {
    return std::make_unique<PrhsState>(spec_.AuditPeriod());
  }

  at::Tensor Attend(const AttentionInput& input) const override {
    auto& state = static_cast<PrhsState&>(*input.state);
    const int64_t num_kv_heads = input.keys.size(0);
    const int64_t group = input.queries.size(0) / num_kv_heads;
    const int64_t length = input.keys.size(1);
    const int64_t num_blocks = CeilDiv(length, spec_.block_size);
    if (input.queries.size(1) > 1) {
      ObservePrefill(input, state);
      return DenseAttention(input.queries, input.keys, input.values, input.scale);
    }
    CountDecodeStep(&state, input.layer);
    const int64_t bytes_per_position = KvBytesPerPosition(input.keys);
    const at::Tensor* cross_layer = state.mass_layer == input.layer - 1 && !state.layer_mass.empty()
                                        ? state.layer_mass.data()
                                        : nullptr;
    std::vector<at::Tensor> this_layer_mass(num_kv_heads);
    std::vector<at::Tensor> outputs;
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      at::Tensor queries = input.queries.narrow(0, head * group, group);
      at::Tensor keys = input.keys[head];
      at::Tensor values = input.values[head];
      at::Tensor& previous = state.Previous(input.layer, head, num_kv_heads);
      const std::vector<int64_t> blocks =
          SelectBlocks(length, previous, cross_layer != nullptr ? cross_layer[head] : at::Tensor());
      at::Tensor positions = UnitPositions(blocks, spec_.block_size, length, keys.device());
      at::Tensor weights = at::softmax(
          at::mm(queries.squeeze(1).to(at::kFloat), keys.index_select(0, positions).to(at::kFloat).t()) * input.scale,
          -1);
      outputs.push_back(
          at::mm(weights, values.index_select(0, positions).to(at::kFloat)).unsqueeze(1).to(queries.scalar_type()));
      previous = BlockMass(weights, positions, num_blocks, spec_.block_size);
      this_layer_mass[head] = previous;
      AccountHead(&state, input.layer, head, num_kv_heads, positions.numel(), bytes_per_position);
      AuditDroppedMass(&state, queries, keys, positions, input.scale);
    }
    state.layer_mass = std::move(this_layer_mass);
    state.mass_layer = input.layer;
    return at::cat(outputs, 0);
  }

 private:
  // The last prompt position's dense attention gives the first decode step its temporal set.
  void ObservePrefill(const AttentionInput& input, PrhsState& state) const {
    const int64_t num_kv_heads = input.keys.size(0);
    const int64_t group = input.queries.size(0) / num_kv_heads;
    const int64_t length = input.keys.size(1);
    at::Tensor all = at::arange(length, at::TensorOptions().dtype(at::kLong).device(input.keys.device()));
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      at::Tensor last_queries = input.queries.narrow(0, head * group, group).select(1, input.queries.size(1) - 1);
      at::Tensor weights =
          at::softmax(at::mm(last_queries.to(at::kFloat), input.keys[head].to(at::kFloat).t()) * input.scale, -1);
      state.Previous(input.layer, head, num_kv_heads) =
          BlockMass(weights, all, CeilDiv(length, spec_.block_size), spec_.block_size);
    }
  }

  // The mandatory blocks (sink, recent, recency window), then the proposed blocks by priority
  // (ties: lower index first) up to the budget. Ascending.
  std::vector<int64_t> SelectBlocks(int64_t length, const at::Tensor& previous, const at::Tensor& cross_layer) const {
    const int64_t num_blocks = CeilDiv(length, spec_.block_size);
    std::vector<int64_t> all(num_blocks);
    std::iota(all.begin(), all.end(), 0);
    const int64_t budget_blocks = spec_.token_budget / spec_.block_size;
    if (num_blocks <= budget_blocks) return all;

    std::vector<bool> taken(num_blocks, false);
    const int64_t window = spec_.prhs_selectors.recency ? std::max(spec_.recent_tokens, spec_.prhs_window)
                                                        : spec_.recent_tokens;
    for (int64_t position : SinkAndRecentPositions(length, spec_.sink_tokens, window)) {
      taken[position / spec_.block_size] = true;
    }
    at::Tensor priority = at::full({num_blocks}, -1.0f, at::kFloat);
    if (spec_.prhs_selectors.temporal && previous.defined()) {
      priority = at::maximum(priority, EnlargedPriority(previous, num_blocks, spec_.prhs_enlargement));
    }
    if (spec_.prhs_selectors.cross_layer && cross_layer.defined()) {
      priority = at::maximum(priority, EnlargedPriority(cross_layer, num_blocks, spec_.prhs_enlargement));
    }
    priority = priority.contiguous();
    return SelectUnits(std::move(taken), priority.data_ptr<float>(), budget_blocks, /*proposed_only=*/true);
  }

  PolicySpec spec_;
};

}  // namespace

at::Tensor EnlargedPriority(const at::Tensor& block_mass, int64_t num_blocks, int64_t enlargement) {
  at::Tensor mass = at::full({num_blocks}, -1.0f, at::kFloat);
  const int64_t known = std::min<int64_t>(num_blocks, block_mass.size(0));
  mass.narrow(0, 0, known).copy_(block_mass.narrow(0, 0, known));
  at::Tensor priority = mass.clone();
  for (int64_t shift = 1; shift <= enlargement && shift < num_blocks; ++shift) {
    const int64_t overlap = num_blocks - shift;
    priority.narrow(0, 0, overlap).copy_(at::maximum(priority.narrow(0, 0, overlap), mass.narrow(0, shift, overlap)));
    priority.narrow(0, shift, overlap).copy_(at::maximum(priority.narrow(0, shift, overlap), mass.narrow(0, 0, overlap)));
  }
  return priority;
}

std::shared_ptr<const AttentionBackend> MakePrhsBackend(const PolicySpec& spec) {
  return std::make_shared<PrhsBackend>(spec);
}

}  // namespace lychee
