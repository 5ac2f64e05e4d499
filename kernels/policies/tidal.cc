// TidalDecode-style layer-shared selection: layers before the first selection layer attend
// densely; a selection layer attends densely and picks, per KV head, the tokens of highest
// attention weight; every later layer attends, at the same KV-head index, to the latest pick.
#include <algorithm>

#include "kernels/dense_attention.h"
#include "kernels/policies/accounting.h"
#include "kernels/policies/policies.h"

namespace lychee {
namespace {

struct TidalState : AccountedState {
  using AccountedState::AccountedState;
  std::vector<at::Tensor> selected_positions;  // per KV head, from this step's latest selection layer
};

class TidalBackend : public AttentionBackend {
 public:
  TidalBackend(const PolicySpec& spec, int64_t num_layers)
      : spec_(spec), selection_layers_(TidalSelectionLayers(spec, num_layers)) {}

  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override {
    return std::make_unique<TidalState>(spec_.AuditPeriod());
  }

  at::Tensor Attend(const AttentionInput& input) const override {
    if (input.queries.size(1) > 1) return DenseAttention(input.queries, input.keys, input.values, input.scale);
    auto& state = static_cast<TidalState&>(*input.state);
    CountDecodeStep(&state, input.layer);
    const int64_t num_kv_heads = input.keys.size(0);
    const int64_t group = input.queries.size(0) / num_kv_heads;
    const int64_t length = input.keys.size(1);
    const int64_t bytes_per_position = KvBytesPerPosition(input.keys);
    const bool selects =
        std::find(selection_layers_.begin(), selection_layers_.end(), input.layer) != selection_layers_.end();
    const bool dense = selection_layers_.empty() || input.layer < selection_layers_.front() || selects;
    if (selects) state.selected_positions.assign(num_kv_heads, at::Tensor());
    std::vector<at::Tensor> outputs;
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      at::Tensor queries = input.queries.narrow(0, head * group, group);
      at::Tensor keys = input.keys[head];
      at::Tensor values = input.values[head];
      if (dense) {
        outputs.push_back(DenseAttention(queries, keys.unsqueeze(0), values.unsqueeze(0), input.scale));
        AccountHead(&state, input.layer, head, num_kv_heads, length, bytes_per_position);
        AuditDense(&state, group);
        if (selects) state.selected_positions[head] = TidalSelectTokens(queries.squeeze(1), keys, input.scale, spec_);
        continue;
      }
      const at::Tensor& positions = state.selected_positions[head];
      outputs.push_back(AttendPositions(queries, keys, values, positions, input.scale));
      AccountHead(&state, input.layer, head, num_kv_heads, positions.numel(), bytes_per_position);
      AuditDroppedMass(&state, queries, keys, positions, input.scale);
    }
    return at::cat(outputs, 0);
  }

 private:
  PolicySpec spec_;
  std::vector<int64_t> selection_layers_;
};

}  // namespace

at::Tensor TidalSelectTokens(const at::Tensor& queries, const at::Tensor& keys, double scale, const PolicySpec& spec) {
  const int64_t length = keys.size(0);
  if (length <= spec.token_budget) return at::arange(length, at::TensorOptions().dtype(at::kLong).device(keys.device()));
  at::Tensor weights =
      at::softmax(at::mm(queries.to(at::kFloat), keys.to(at::kFloat).t()) * scale, -1).mean(0).cpu().contiguous();
  std::vector<bool> taken(length, false);
  for (int64_t position : SinkAndRecentPositions(length, spec.sink_tokens, spec.recent_tokens)) taken[position] = true;
  return at::tensor(SelectUnits(std::move(taken), weights.data_ptr<float>(), spec.token_budget), at::kLong)
      .to(keys.device());
}

std::shared_ptr<const AttentionBackend> MakeTidalBackend(const PolicySpec& spec, int64_t num_layers) {
  return std::make_shared<TidalBackend>(spec, num_layers);
}

}  // namespace lychee
