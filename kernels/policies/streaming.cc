// DuoAttention-style streaming heads: a head partition's retrieval heads attend densely, its
// sparse heads only the sink and the most recent tokens, token_budget positions in all.
#include "kernels/dense_attention.h"
#include "kernels/policies/accounting.h"
#include "kernels/policies/policies.h"

namespace lychee {
namespace {

class StreamingBackend : public AttentionBackend {
 public:
  StreamingBackend(const PolicySpec& spec, std::shared_ptr<const HeadPartition> partition)
      : spec_(spec), partition_(std::move(partition)) {}

  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override {
    return std::make_unique<AccountedState>(spec_.AuditPeriod());
  }

  at::Tensor Attend(const AttentionInput& input) const override {
    if (input.queries.size(1) > 1) return DenseAttention(input.queries, input.keys, input.values, input.scale);
    auto* state = static_cast<AccountedState*>(input.state);
    CountDecodeStep(state, input.layer);
    const int64_t num_kv_heads = input.keys.size(0);
    const int64_t group = input.queries.size(0) / num_kv_heads;
    const int64_t length = input.keys.size(1);
    const int64_t bytes_per_position = KvBytesPerPosition(input.keys);
    at::Tensor streaming_positions =
        at::tensor(SinkAndRecentPositions(length, spec_.sink_tokens, spec_.token_budget - spec_.sink_tokens), at::kLong)
            .to(input.keys.device());
    std::vector<at::Tensor> outputs;
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      at::Tensor queries = input.queries.narrow(0, head * group, group);
      at::Tensor keys = input.keys[head];
      at::Tensor values = input.values[head];
      if (partition_->role(input.layer, head) == HeadRole::kRetrieval || length <= spec_.token_budget) {
        outputs.push_back(DenseAttention(queries, keys.unsqueeze(0), values.unsqueeze(0), input.scale));
        AccountHead(state, input.layer, head, num_kv_heads, length, bytes_per_position);
        AuditDense(state, group);
      } else {
        outputs.push_back(AttendPositions(queries, keys, values, streaming_positions, input.scale));
        AccountHead(state, input.layer, head, num_kv_heads, streaming_positions.numel(), bytes_per_position);
        AuditDroppedMass(state, queries, keys, streaming_positions, input.scale);
      }
    }
    return at::cat(outputs, 0);
  }

 private:
  PolicySpec spec_;
  std::shared_ptr<const HeadPartition> partition_;
};

}  // namespace

std::shared_ptr<const AttentionBackend> MakeStreamingBackend(const PolicySpec& spec,
                                                             std::shared_ptr<const HeadPartition> partition) {
  return std::make_shared<StreamingBackend>(spec, std::move(partition));
}

}  // namespace lychee
