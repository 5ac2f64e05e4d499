#include "kernels/cuda_attention.h"

#include <stdexcept>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cuda/torch_hybrid_decode.h"
#include "kernels/dense_attention.h"
#include "kernels/hybrid_attention.h"

namespace lychee {
namespace {

bool IsPrefill(const std::vector<AttentionInput>& inputs) {
  for (const AttentionInput& input : inputs) {
    if (input.queries.size(1) != 1) return true;
  }
  return false;
}

std::vector<at::Tensor> DensePrefill(const std::vector<AttentionInput>& inputs) {
  std::vector<at::Tensor> outputs;
  for (const AttentionInput& input : inputs) {
    outputs.push_back(DenseAttention(input.queries, input.keys, input.values, input.scale));
  }
  return outputs;
}

at::Tensor StackQueries(const std::vector<AttentionInput>& inputs) {
  std::vector<at::Tensor> queries;
  for (const AttentionInput& input : inputs) queries.push_back(input.queries.select(1, 0));
  return at::stack(queries);  // [B, H_q, D]
}

std::vector<at::Tensor> Unstack(const at::Tensor& output) {
  std::vector<at::Tensor> outputs;
  for (int64_t i = 0; i < output.size(0); ++i) outputs.push_back(output[i].unsqueeze(1));  // [H_q, 1, D]
  return outputs;
}

std::vector<int64_t> Lengths(const std::vector<AttentionInput>& inputs) {
  std::vector<int64_t> lengths;
  for (const AttentionInput& input : inputs) lengths.push_back(input.keys.size(1));
  return lengths;
}

class CudaDenseAttention : public AttentionBackend {
 public:
  at::Tensor Attend(const AttentionInput& input) const override { return AttendBatch({input})[0]; }

  std::vector<at::Tensor> AttendBatch(const std::vector<AttentionInput>& inputs) const override {
    if (IsPrefill(inputs)) return DensePrefill(inputs);
    std::vector<at::Tensor> keys, values;
    for (const AttentionInput& input : inputs) {
      keys.push_back(input.keys);
      values.push_back(input.values);
    }
    cuda::HybridDecodeOptions options;
    options.scale = inputs[0].scale;
    return Unstack(cuda::DenseDecodeAttention(StackQueries(inputs), keys, values, Lengths(inputs), options));
  }
};

// The selection state of a batch lives for one decode step: layer 0 (all retrieval heads) opens
// it, and every sequence of the batch points at it with its row.
struct CudaHybridSequenceState : SequenceAttentionState {
  std::shared_ptr<cuda::HybridSelectionState> step;
  int64_t row = 0;
};

class CudaHybridAttention : public AttentionBackend {
 public:
  explicit CudaHybridAttention(std::shared_ptr<const HeadPartition> partition) : partition_(std::move(partition)) {
    const SelectionParams& s = partition_->selection();
    options_.selection = {static_cast<int>(s.block_size), static_cast<int>(s.token_budget),
                          static_cast<int>(s.sink_tokens), static_cast<int>(s.recent_tokens)};
  }

  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override {
    return std::make_unique<CudaHybridSequenceState>();
  }

  at::Tensor Attend(const AttentionInput& input) const override { return AttendBatch({input})[0]; }

  std::vector<at::Tensor> AttendBatch(const std::vector<AttentionInput>& inputs) const override {
    if (IsPrefill(inputs)) return DensePrefill(inputs);
    const int layer = inputs[0].layer;
    std::shared_ptr<cuda::HybridSelectionState> step;
    if (layer == 0) {
      step = std::make_shared<cuda::HybridSelectionState>(static_cast<int64_t>(inputs.size()),
                                                          partition_->num_kv_heads(), options_.selection,
                                                          inputs[0].queries.device());
      step->BeginStep();
    }
    std::vector<at::Tensor> keys, values;
    for (size_t i = 0; i < inputs.size(); ++i) {
      auto& state = static_cast<CudaHybridSequenceState&>(*inputs[i].state);
      if (layer == 0) {
        state.step = step;
        state.row = static_cast<int64_t>(i);
      } else if (state.step != static_cast<CudaHybridSequenceState&>(*inputs[0].state).step ||
                 state.row != static_cast<int64_t>(i)) {
        // A batch keeps its members and their order through the layers of one step.
        throw std::logic_error("hybrid decode: the batch changed between layers of one step");
      }
      keys.push_back(inputs[i].keys);
      values.push_back(inputs[i].values);
    }
    std::vector<cuda::KvHeadMode> modes;
    for (int64_t head = 0; head < partition_->num_kv_heads(); ++head) {
      modes.push_back(partition_->role(layer, head) == HeadRole::kRetrieval ? cuda::KvHeadMode::kRetrieval
                                                                            : cuda::KvHeadMode::kSparse);
    }
    cuda::HybridDecodeOptions options = options_;
    options.scale = inputs[0].scale;
    auto& step_state = *static_cast<CudaHybridSequenceState&>(*inputs[0].state).step;
    return Unstack(cuda::HybridDecodeAttention(StackQueries(inputs), keys, values, Lengths(inputs), modes,
                                               step_state, options));
  }

 private:
  std::shared_ptr<const HeadPartition> partition_;
  cuda::HybridDecodeOptions options_;
};

}  // namespace

std::shared_ptr<const AttentionBackend> MakeCudaDenseAttention() { return std::make_shared<CudaDenseAttention>(); }

absl::StatusOr<std::shared_ptr<const AttentionBackend>> MakeCudaHybridAttention(
    std::shared_ptr<const HeadPartition> partition, const ModelConfig& config) {
  LYCHEE_RETURN_IF_ERROR(CheckHybridFits(*partition, config));
  const SelectionParams& s = partition->selection();
  if (s.block_size < 16 || s.block_size > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("the CUDA kernels take block sizes from 16 to 1024 tokens, the partition has ", s.block_size));
  }
  return std::shared_ptr<const AttentionBackend>(std::make_shared<CudaHybridAttention>(std::move(partition)));
}

}  // namespace lychee
