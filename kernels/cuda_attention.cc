#include "kernels/cuda_attention.h"

#include <c10/util/Exception.h>

#include "absl/strings/str_cat.h"
#include "common/kv_pool.h"
#include "common/status_macros.h"
#include "kernels/cuda/torch_hybrid_decode.h"
#include "kernels/dense_attention.h"
#include "kernels/hybrid_attention.h"
#include "kernels/policies/accounting.h"

namespace lychee {
namespace {

struct CudaDecodeWorkspace : DecodeWorkspace {
  explicit CudaDecodeWorkspace(cuda::PagedHybridDecode decode_in) : decode(std::move(decode_in)) {}
  cuda::PagedHybridDecode decode;
};

// Dense and hybrid decode on the paged kernels, one batched launch per layer planned once per
// step; their difference is the heads' modes. Prefill (and any call of Attend) is the exact matmul
// attention over the gathered cache: LycheeDecode prefills densely.
class CudaPagedAttention : public AttentionBackend {
 public:
  // `layer_modes` [layers][kv heads]; empty: every head of every layer dense. `group`: query heads
  // per KV head.
  CudaPagedAttention(std::vector<std::vector<cuda::KvHeadMode>> layer_modes, const cuda::BlockSelectionConfig& selection,
                     int64_t group)
      : layer_modes_(std::move(layer_modes)), group_(group) {
    options_.selection = selection;
  }

  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override {
    return std::make_unique<AccountedState>(/*audit=*/false);
  }

  at::Tensor Attend(const AttentionInput& input) const override {
    return DenseAttention(input.queries, input.keys, input.values, input.scale, input.sliding_window);
  }

  std::unique_ptr<DecodeWorkspace> NewDecodeWorkspace(const KvPool& pool, const DecodeCapacity& capacity) const override {
    const at::Tensor& keys = pool.keys(0);  // [kv heads, pages, page size, D]
    std::vector<std::vector<cuda::KvHeadMode>> modes = layer_modes_;
    if (modes.empty()) {
      modes.assign(pool.num_layers(), std::vector<cuda::KvHeadMode>(keys.size(0), cuda::KvHeadMode::kDense));
    }
    return std::make_unique<CudaDecodeWorkspace>(cuda::PagedHybridDecode(
        keys.size(0) * group_, keys.size(3), std::move(modes), options_, capacity.max_batch, capacity.max_pages,
        pool.page_size(), capacity.for_graph, keys.device()));
  }

  absl::Status PlanDecodeStep(const DecodeStep& step, DecodeWorkspace& workspace) const override {
    if (step.sliding_window) {
      return absl::FailedPreconditionError("the CUDA decode kernels do not take a sliding window");
    }
    try {
      static_cast<CudaDecodeWorkspace&>(workspace).decode.Plan(step.lengths);
    } catch (const c10::Error& error) {
      return absl::InternalError(error.what_without_backtrace());
    }
    Account(step);
    return absl::OkStatus();
  }

  at::Tensor AttendDecode(int layer, const at::Tensor& queries, const DecodeStep& step,
                          DecodeWorkspace& workspace) const override {
    return static_cast<CudaDecodeWorkspace&>(workspace).decode.Attend(
        layer, queries, step.pool->keys(layer), step.pool->values(layer), step.page_table);
  }

  bool CapturesDecode() const override { return true; }

 private:
  // Each row's reads in its sequence's telemetry, as the CPU references count them. What every head
  // attends to follows from the row's length, so the count needs no device work and no
  // synchronization, and it holds for replayed graphs alike.
  void Account(const DecodeStep& step) const {
    const at::Tensor& keys = step.pool->keys(0);
    const int64_t num_kv_heads = keys.size(0);
    const int64_t bytes_per_position = KvBytesPerPosition(keys);
    for (int64_t row = 0; row < step.batch(); ++row) {
      auto* state = static_cast<AccountedState*>(step.states[row]);
      if (state == nullptr) continue;
      CountDecodeStep(state, /*layer=*/0);
      std::vector<bool> has_selection(num_kv_heads, false);
      for (int layer = 0; layer < step.pool->num_layers(); ++layer) {
        for (int64_t head = 0; head < num_kv_heads; ++head) {
          const cuda::KvHeadMode mode = layer_modes_.empty() ? cuda::KvHeadMode::kDense : layer_modes_[layer][head];
          AccountHead(state, layer, head, num_kv_heads,
                      cuda::HeadPositionsAttended(step.lengths[row], mode, has_selection[head], options_.selection),
                      bytes_per_position);
        }
        for (int64_t head = 0; head < num_kv_heads && !layer_modes_.empty(); ++head) {
          if (layer_modes_[layer][head] == cuda::KvHeadMode::kRetrieval) has_selection[head] = true;
        }
      }
    }
  }

  std::vector<std::vector<cuda::KvHeadMode>> layer_modes_;
  cuda::HybridDecodeOptions options_;
  int64_t group_;
};

std::shared_ptr<const AttentionBackend> MakePaged(std::vector<std::vector<cuda::KvHeadMode>> modes,
                                                  const cuda::BlockSelectionConfig& selection, const ModelConfig& config) {
  return std::make_shared<CudaPagedAttention>(std::move(modes), selection,
                                              config.num_attention_heads / config.num_kv_heads);
}

}  // namespace

std::shared_ptr<const AttentionBackend> MakeCudaDenseAttention(const ModelConfig& config) {
  return MakePaged({}, cuda::BlockSelectionConfig(), config);
}

absl::StatusOr<std::shared_ptr<const AttentionBackend>> MakeCudaHybridAttention(
    std::shared_ptr<const HeadPartition> partition, const ModelConfig& config) {
  LYCHEE_RETURN_IF_ERROR(CheckHybridFits(*partition, config));
  const SelectionParams& s = partition->selection();
  if (s.block_size < 16 || s.block_size > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("the CUDA kernels take block sizes from 16 to 1024 tokens, the partition has ", s.block_size));
  }
  std::vector<std::vector<cuda::KvHeadMode>> modes(partition->num_layers());
  for (int64_t layer = 0; layer < partition->num_layers(); ++layer) {
    for (int64_t head = 0; head < partition->num_kv_heads(); ++head) {
      modes[layer].push_back(partition->role(layer, head) == HeadRole::kRetrieval ? cuda::KvHeadMode::kRetrieval
                                                                                  : cuda::KvHeadMode::kSparse);
    }
  }
  const cuda::BlockSelectionConfig selection{static_cast<int>(s.block_size), static_cast<int>(s.token_budget),
                                             static_cast<int>(s.sink_tokens), static_cast<int>(s.recent_tokens)};
  return MakePaged(std::move(modes), selection, config);
}

}  // namespace lychee
