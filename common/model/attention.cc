#include "common/model/attention.h"

#include "common/model/kv_pool.h"

namespace lychee {

std::unique_ptr<DecodeWorkspace> AttentionBackend::NewDecodeWorkspace(const KvPool&, const DecodeCapacity&) const {
  return std::make_unique<DecodeWorkspace>();
}

absl::Status AttentionBackend::PlanDecodeStep(const DecodeStep&, DecodeWorkspace&) const { return absl::OkStatus(); }

at::Tensor AttentionBackend::AttendDecode(int layer, const at::Tensor& queries, const DecodeStep& step,
                                          DecodeWorkspace&) const {
  std::vector<AttentionInput> inputs;
  for (int64_t row = 0; row < step.batch(); ++row) {
    AttentionInput input;
    input.layer = layer;
    input.queries = queries[row].unsqueeze(1);  // [heads, 1, D]
    input.keys = step.pool->GatherKeys(layer, *step.pages[row], step.lengths[row]);
    input.values = step.pool->GatherValues(layer, *step.pages[row], step.lengths[row]);
    input.scale = step.scale;
    input.sliding_window = step.sliding_window;
    input.state = step.states[row];
    inputs.push_back(std::move(input));
  }
  at::Tensor out = at::stack(AttendBatch(inputs)).squeeze(2);  // [batch, heads, D]
  if (out.size(0) == queries.size(0)) return out;
  return at::cat({out, at::zeros_like(queries.narrow(0, out.size(0), queries.size(0) - out.size(0)))});
}

}  // namespace lychee
