#include "kernels/cuda_attention.h"

#include <c10/util/Exception.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/model/kv_pool.h"
#include "kernels/cuda/torch_hybrid_decode.h"
#include "kernels/dense_attention.h"
#include "kernels/hybrid_attention.h"
#include "kernels/policies/accounting.h"

namespace lychee {
namespace {

struct CudaDecodeWorkspace : DecodeWorkspace {
  explicit CudaDecodeWorkspace(cuda::PagedHybridDecode decode_in) : decode(std::move(decode_in)) {}
  int graph_variant() const override { return decode.audits_step() ? 1 : 0; }
  cuda::PagedHybridDecode decode;
};

// A sequence's account, and with the audit its dropped mass (sum, max) accumulated on the device
// and copied only when the telemetry is read.
class CudaAuditedState : public AccountedState {
 public:
  using AccountedState::AccountedState;

  const AttentionTelemetry* telemetry() const override {
    read_ = *AccountedState::telemetry();
    if (dropped_.defined()) {
      const at::Tensor host = dropped_.cpu();
      read_.sum_dropped_mass += host[0].item<double>();
      read_.max_dropped_mass = std::max(read_.max_dropped_mass, host[1].item<double>());
    }
    return &read_;
  }

  // Where the device adds this sequence's dropped mass: double [2] (sum, max) on `device`.
  double* DroppedMassTarget(at::Device device) {
    if (!dropped_.defined()) dropped_ = at::zeros({2}, at::TensorOptions().dtype(at::kDouble).device(device));
    return dropped_.data_ptr<double>();
  }

 private:
  at::Tensor dropped_;
  mutable AttentionTelemetry read_;
};

// Dense and hybrid decode on the paged kernels, one batched launch per layer planned once per
// step; their difference is the heads' modes. Prefill (and any call of Attend) is the exact matmul
// attention over the gathered cache: LycheeDecode prefills densely.
class CudaPagedAttention : public AttentionBackend {
 public:
  // `layer_modes` [layers][kv heads]; empty: every head of every layer dense. `group`: query heads
  // per KV head.
  CudaPagedAttention(std::vector<std::vector<cuda::KvHeadMode>> layer_modes,
                     const cuda::BlockSelectionConfig& selection, int64_t group, int64_t audit_every)
      : layer_modes_(std::move(layer_modes)), group_(group), audit_every_(audit_every) {
    options_.selection = selection;
  }

  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override {
    return std::make_unique<CudaAuditedState>(audit_every_);
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
        pool.page_size(), capacity.for_graph, keys.device(), /*audit=*/audit_every_ > 0));
  }

  absl::Status PlanDecodeStep(const DecodeStep& step, DecodeWorkspace& workspace) const override {
    if (step.sliding_window) {
      return absl::FailedPreconditionError("the CUDA decode kernels do not take a sliding window");
    }
    const std::vector<double*> audit_targets = Account(step);
    try {
      static_cast<CudaDecodeWorkspace&>(workspace).decode.Plan(step.lengths, audit_targets);
    } catch (const c10::Error& error) {
      return absl::InternalError(error.what_without_backtrace());
    }
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
  // synchronization, and it holds for replayed graphs alike. So does the number of heads an audited
  // step audits (every query head of every layer; dense and retrieval heads drop nothing), while
  // what they dropped accumulates on the device. Returns the audit targets of the step's rows
  // (empty when the backend does not audit).
  std::vector<double*> Account(const DecodeStep& step) const {
    const at::Tensor& keys = step.pool->keys(0);
    const int64_t num_kv_heads = keys.size(0);
    const int64_t bytes_per_position = KvBytesPerPosition(keys);
    std::vector<double*> audit_targets;
    if (audit_every_ > 0) audit_targets.assign(step.batch(), nullptr);
    for (int64_t row = 0; row < step.batch(); ++row) {
      auto* state = static_cast<CudaAuditedState*>(step.states[row]);
      if (state == nullptr) continue;
      CountDecodeStep(state, /*layer=*/0);
      if (audit_every_ > 0 && state->audit()) {
        audit_targets[row] = state->DroppedMassTarget(keys.device());
        AttentionTelemetry& account = state->account();
        account.audited = true;
        account.audited_heads += step.pool->num_layers() * num_kv_heads * group_;
      }
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
    return audit_targets;
  }

  std::vector<std::vector<cuda::KvHeadMode>> layer_modes_;
  cuda::HybridDecodeOptions options_;
  int64_t group_;
  int64_t audit_every_;
};

std::shared_ptr<const AttentionBackend> MakePaged(std::vector<std::vector<cuda::KvHeadMode>> modes,
                                                  const cuda::BlockSelectionConfig& selection,
                                                  const ModelConfig& config, int64_t audit_every) {
  return std::make_shared<CudaPagedAttention>(std::move(modes), selection,
                                              config.num_attention_heads / config.num_kv_heads, audit_every);
}

}  // namespace

std::shared_ptr<const AttentionBackend> MakeCudaDenseAttention(const ModelConfig& config, int64_t audit_every) {
  return MakePaged({}, cuda::BlockSelectionConfig(), config, audit_every);
}

absl::StatusOr<std::shared_ptr<const AttentionBackend>> MakeCudaHybridAttention(
    std::shared_ptr<const HeadPartition> partition, const ModelConfig& config, int64_t audit_every) {
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
  return MakePaged(std::move(modes), selection, config, audit_every);
}

}  // namespace lychee
