// Quest: query-aware page selection from per-page key bounds; the first layers dense.
#include <algorithm>
#include <limits>
#include <numeric>

#include "kernels/dense_attention.h"
#include "kernels/policies/accounting.h"
#include "kernels/policies/policies.h"

namespace lychee {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

class QuestBackend : public AttentionBackend {
 public:
  explicit QuestBackend(const PolicySpec& spec) : spec_(spec) {}

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
    if (input.layer < spec_.quest_dense_layers) {
      for (int64_t head = 0; head < num_kv_heads; ++head) {
        AccountHead(state, input.layer, head, num_kv_heads, length, bytes_per_position);
        AuditDense(state, group);
      }
      return DenseAttention(input.queries, input.keys, input.values, input.scale);
    }
    const int64_t num_pages = CeilDiv(length, spec_.page_size);
    // A real Quest keeps the bounds beside the cache: reading them costs a key's worth per bound.
    const int64_t bounds_bytes = 2 * input.keys.size(2) * static_cast<int64_t>(input.keys.element_size());
    std::vector<at::Tensor> outputs;
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      at::Tensor queries = input.queries.narrow(0, head * group, group);  // [G, 1, D]
      at::Tensor keys = input.keys[head];
      at::Tensor values = input.values[head];
      if (num_pages * spec_.page_size <= spec_.token_budget) {
        outputs.push_back(DenseAttention(queries, keys.unsqueeze(0), values.unsqueeze(0), input.scale));
        AccountHead(state, input.layer, head, num_kv_heads, length, bytes_per_position);
        AuditDense(state, group);
        continue;
      }
      const std::vector<int64_t> pages =
          QuestSelectPages(QuestPageScores(queries.squeeze(1), keys, spec_.page_size), length, spec_);
      at::Tensor positions = UnitPositions(pages, spec_.page_size, length, keys.device());
      outputs.push_back(AttendPositions(queries, keys, values, positions, input.scale));
      AccountHead(state, input.layer, head, num_kv_heads, positions.numel(), bytes_per_position,
                  num_pages * bounds_bytes);
      AuditDroppedMass(state, queries, keys, positions, input.scale);
    }
    return at::cat(outputs, 0);
  }

 private:
  PolicySpec spec_;
};

}  // namespace

at::Tensor QuestPageScores(const at::Tensor& queries, const at::Tensor& keys, int64_t page_size) {
  const int64_t length = keys.size(0);
  const int64_t dim = keys.size(1);
  const int64_t num_pages = CeilDiv(length, page_size);
  at::Tensor keys32 = keys.to(at::kFloat);
  // Pad the last page with copies of its last key, which changes neither bound.
  at::Tensor padded = at::cat({keys32, keys32.narrow(0, length - 1, 1).expand({num_pages * page_size - length, dim})});
  at::Tensor pages = padded.view({num_pages, page_size, dim});
  at::Tensor key_max = std::get<0>(pages.max(1));  // [P, D]
  at::Tensor key_min = std::get<0>(pages.min(1));
  at::Tensor q = queries.to(at::kFloat).unsqueeze(1);  // [G, 1, D]
  return at::maximum(q * key_max.unsqueeze(0), q * key_min.unsqueeze(0)).sum(-1);  // [G, P]
}

std::vector<int64_t> QuestSelectPages(const at::Tensor& group_page_scores, int64_t length, const PolicySpec& spec) {
  const int64_t num_pages = CeilDiv(length, spec.page_size);
  const int64_t budget_pages = spec.token_budget / spec.page_size;
  std::vector<int64_t> pages(num_pages);
  std::iota(pages.begin(), pages.end(), 0);
  if (num_pages <= budget_pages) return pages;

  std::vector<bool> taken(num_pages, false);
  for (int64_t position : SinkAndRecentPositions(length, spec.sink_tokens, spec.recent_tokens)) {
    taken[position / spec.page_size] = true;
  }
  at::Tensor best = std::get<0>(group_page_scores.to(at::kCPU, at::kFloat).max(0)).contiguous();
  return SelectUnits(std::move(taken), best.data_ptr<float>(), budget_pages);
}

std::vector<int64_t> SinkAndRecentPositions(int64_t length, int64_t sink_tokens, int64_t recent_tokens) {
  std::vector<int64_t> positions;
  const int64_t sink_end = std::min(length, sink_tokens);
  for (int64_t p = 0; p < sink_end; ++p) positions.push_back(p);
  const int64_t recent_begin = std::max(sink_end, std::min(length - 1, length - recent_tokens));
  for (int64_t p = recent_begin; p < length; ++p) positions.push_back(p);
  return positions;
}

std::shared_ptr<const AttentionBackend> MakeQuestBackend(const PolicySpec& spec) {
  return std::make_shared<QuestBackend>(spec);
}

}  // namespace lychee
