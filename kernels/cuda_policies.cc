// Quest, PrHS and Double-P decode on the CUDA kernels of kernels/cuda/torch_policy_decode.h: the
// same functions as their references in kernels/policies, one sequence at a time, with the
// selection state kept on the device. Prefill is the exact matmul attention of DenseAttention.
#include <algorithm>
#include <optional>
#include <vector>

#include "kernels/cuda/torch_hybrid_decode.h"
#include "kernels/cuda/torch_policy_decode.h"
#include "kernels/cuda_attention.h"
#include "kernels/dense_attention.h"
#include "kernels/policies/policies.h"

namespace lychee {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool IsPrefill(const AttentionInput& input) { return input.queries.size(1) != 1; }

// The decode query of each head: [H_q, D].
at::Tensor DecodeQueries(const AttentionInput& input) { return input.queries.select(1, 0); }

at::Tensor AsAttentionOutput(const at::Tensor& out) { return out.unsqueeze(1); }  // [H_q, 1, D]

cuda::BlockSelectionConfig SelectionOf(int64_t unit, int64_t budget, int64_t sink, int64_t recent) {
  return {static_cast<int>(unit), static_cast<int>(budget), static_cast<int>(sink), static_cast<int>(recent)};
}

template <typename LayerState>
struct PerLayerState : SequenceAttentionState {
  std::vector<LayerState> layers;
  LayerState& At(int layer) {
    if (static_cast<int64_t>(layers.size()) <= layer) layers.resize(layer + 1);
    return layers[layer];
  }
};

// ---- Quest ----------------------------------------------------------------------------------

struct QuestLayer {
  at::Tensor bounds;  // bf16 [H_kv, capacity in pages, 2, D]
  int64_t complete_pages = 0;  // pages whose bounds no later position changes
};

class CudaQuestAttention : public AttentionBackend {
 public:
  explicit CudaQuestAttention(const PolicySpec& spec)
      : spec_(spec), selection_(SelectionOf(spec.page_size, spec.token_budget, spec.sink_tokens, spec.recent_tokens)) {}

  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override {
    return std::make_unique<PerLayerState<QuestLayer>>();
  }

  at::Tensor Attend(const AttentionInput& input) const override {
    if (IsPrefill(input)) return DenseAttention(input.queries, input.keys, input.values, input.scale);
    const int64_t length = input.keys.size(1);
    at::Tensor queries = DecodeQueries(input);
    if (input.layer < spec_.quest_dense_layers) {
      cuda::HybridDecodeOptions options;
      options.scale = input.scale;
      // Spelled out: a braced {input.keys} would pick the batched-cache overload.
      const std::vector<at::Tensor> keys = {input.keys}, values = {input.values};
      return AsAttentionOutput(cuda::DenseDecodeAttention(queries.unsqueeze(0), keys, values, {length}, options)[0]);
    }
    QuestLayer& layer = static_cast<PerLayerState<QuestLayer>&>(*input.state).At(input.layer);
    const int64_t num_pages = CeilDiv(length, spec_.page_size);
    if (!layer.bounds.defined() || layer.bounds.size(1) < num_pages) {
      // Grow by doubling; the bounds of complete pages carry over.
      const int64_t capacity = std::max<int64_t>(num_pages, layer.bounds.defined() ? 2 * layer.bounds.size(1) : 0);
      at::Tensor grown = at::empty({input.keys.size(0), capacity, 2, input.keys.size(2)}, input.keys.options());
      if (layer.complete_pages > 0) {
        grown.narrow(1, 0, layer.complete_pages).copy_(layer.bounds.narrow(1, 0, layer.complete_pages));
      }
      layer.bounds = grown;
    }
    cuda::QuestPageBounds(input.keys, length, spec_.page_size, std::min(layer.complete_pages, num_pages),
                          layer.bounds);
    layer.complete_pages = length / spec_.page_size;
    const at::Tensor scores = cuda::QuestPageScores(queries, layer.bounds, num_pages);
    const cuda::HeadLists pages = cuda::SelectBlocks(scores, length, selection_);
    cuda::GatherInput gather;
    gather.tokens = &pages;
    gather.block_size = spec_.page_size;
    gather.max_entries = std::min<int64_t>(num_pages, selection_.budget_blocks()) * spec_.page_size;
    return AsAttentionOutput(cuda::GatherDecode(queries, input.keys, input.values, length, gather, input.scale).out);
  }

 private:
  PolicySpec spec_;
  cuda::BlockSelectionConfig selection_;
};

// ---- PrHS -----------------------------------------------------------------------------------

struct PrhsSequence : SequenceAttentionState {
  // [layer]: float32 [H_kv, blocks] block masses of the latest step there, -1 where not attended.
  std::vector<at::Tensor> previous_mass;
  // The block masses of `mass_layer` in the current step, for the next layer.
  at::Tensor layer_mass;
  int mass_layer = -1;

  at::Tensor& Previous(int layer) {
    if (static_cast<int64_t>(previous_mass.size()) <= layer) previous_mass.resize(layer + 1);
    return previous_mass[layer];
  }
};

class CudaPrhsAttention : public AttentionBackend {
 public:
  explicit CudaPrhsAttention(const PolicySpec& spec)
      : spec_(spec),
        selection_(SelectionOf(spec.block_size, spec.token_budget, spec.sink_tokens,
                               spec.prhs_selectors.recency ? std::max(spec.recent_tokens, spec.prhs_window)
                                                           : spec.recent_tokens)) {}

  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override {
    return std::make_unique<PrhsSequence>();
  }

  at::Tensor Attend(const AttentionInput& input) const override {
    auto& state = static_cast<PrhsSequence&>(*input.state);
    const int64_t num_kv_heads = input.keys.size(0);
    const int64_t length = input.keys.size(1);
    const int64_t num_blocks = CeilDiv(length, spec_.block_size);
    if (IsPrefill(input)) {
      // The last prompt position's dense attention gives the first decode step its temporal set.
      const at::Tensor every_block =
          at::arange(num_blocks, input.keys.options().dtype(at::kInt)).unsqueeze(0).expand({num_kv_heads, num_blocks});
      const cuda::HeadLists all{every_block.contiguous(),
                                at::full({num_kv_heads}, num_blocks, input.keys.options().dtype(at::kInt))};
      state.Previous(input.layer) =
          GatherWithMass(input.queries.select(1, input.queries.size(1) - 1), input, all, num_blocks).second;
      return DenseAttention(input.queries, input.keys, input.values, input.scale);
    }
    const at::Tensor& previous = state.Previous(input.layer);
    const bool cross_layer = spec_.prhs_selectors.cross_layer && state.mass_layer == input.layer - 1 &&
                             state.layer_mass.defined();
    const at::Tensor priority = cuda::PrhsPriority(spec_.prhs_selectors.temporal ? previous : at::Tensor(),
                                                   cross_layer ? state.layer_mass : at::Tensor(), num_blocks,
                                                   spec_.prhs_enlargement, num_kv_heads, input.keys.device());
    cuda::HeadLists blocks = cuda::SelectBlocks(priority, length, selection_);
    cuda::DropUnproposedBlocks(blocks, priority, length, selection_);
    auto [out, mass] = GatherWithMass(DecodeQueries(input), input, blocks, num_blocks);
    state.Previous(input.layer) = mass;
    state.layer_mass = mass;
    state.mass_layer = input.layer;
    return AsAttentionOutput(out);
  }

 private:
  // Attention of queries [H_q, D] over `blocks`, and each block's attention mass.
  std::pair<at::Tensor, at::Tensor> GatherWithMass(const at::Tensor& queries, const AttentionInput& input,
                                                   const cuda::HeadLists& blocks, int64_t num_blocks) const {
    const int64_t length = input.keys.size(1);
    cuda::GatherInput gather;
    gather.tokens = &blocks;
    gather.block_size = spec_.block_size;
    gather.max_entries = blocks.entries.size(1) * spec_.block_size;
    gather.keep_logits = true;
    const cuda::GatherOutput gathered = cuda::GatherDecode(queries, input.keys, input.values, length, gather, input.scale);
    const int64_t group = queries.size(0) / input.keys.size(0);
    return {gathered.out, cuda::BlockMass(gather, gathered, group, length, num_blocks)};
  }

  PolicySpec spec_;
  cuda::BlockSelectionConfig selection_;
};

// ---- Double-P -------------------------------------------------------------------------------

struct DoublePLayer {
  std::vector<std::optional<KeyClusters>> heads;
  // The heads' clusters packed for the kernels, rebuilt when the clusters change.
  cuda::ClusterTensors table;
  at::Tensor assignment;  // int32 [H_kv, end - first]
  int64_t first = 0, end = 0, packed_clusters = -1;
};

class CudaDoublePAttention : public AttentionBackend {
 public:
  explicit CudaDoublePAttention(const PolicySpec& spec) : spec_(spec) {}

  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override {
    return std::make_unique<PerLayerState<DoublePLayer>>();
  }

  at::Tensor Attend(const AttentionInput& input) const override {
    if (IsPrefill(input)) return DenseAttention(input.queries, input.keys, input.values, input.scale);
    const int64_t num_kv_heads = input.keys.size(0);
    const int64_t length = input.keys.size(1);
    DoublePLayer& layer = static_cast<PerLayerState<DoublePLayer>&>(*input.state).At(input.layer);
    layer.heads.resize(num_kv_heads);
    int64_t total_clusters = 0;
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      total_clusters +=
          UpdateDoublePClusters(layer.heads[head], input.keys[head], input.values[head], spec_).sizes.size(0);
    }
    if (total_clusters != layer.packed_clusters || layer.heads[0]->end != layer.end) Pack(layer);
    if (layer.table.centroids.size(1) > cuda::kMaxClustersPerHead) return ReferenceAttend(input, layer);

    const at::Tensor queries = DecodeQueries(input);
    const cuda::ClusterClasses classes = cuda::DoublePClassify(queries, layer.table, input.scale, spec_.p1, spec_.p2);
    const cuda::HeadLists exact =
        cuda::DoublePExactPositions(layer.assignment, classes.exact, layer.first, layer.end, length);
    cuda::GatherInput gather;
    gather.tokens = &exact;
    gather.max_entries = length;
    gather.clusters = &layer.table;
    gather.approximated = &classes.approximated;
    return AsAttentionOutput(cuda::GatherDecode(queries, input.keys, input.values, length, gather, input.scale).out);
  }

 private:
  // A long generation's appended tail clusters can outgrow the scoring kernel's table: the heads
  // then run the reference through ATen on the device.
  at::Tensor ReferenceAttend(const AttentionInput& input, const DoublePLayer& layer) const {
    const int64_t num_kv_heads = input.keys.size(0);
    const int64_t group = input.queries.size(0) / num_kv_heads;
    std::vector<at::Tensor> outputs;
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      outputs.push_back(DoublePHeadAttention(input.queries.narrow(0, head * group, group), input.keys[head],
                                             input.values[head], *layer.heads[head], input.scale, spec_)
                            .output);
    }
    return at::cat(outputs, 0);
  }

  static void Pack(DoublePLayer& layer) {
    const int64_t num_kv_heads = static_cast<int64_t>(layer.heads.size());
    const KeyClusters& any = *layer.heads[0];
    const int64_t dim = any.centroids.size(1);
    int64_t capacity = 1, total = 0;
    for (const auto& head : layer.heads) {
      capacity = std::max(capacity, head->sizes.size(0));
      total += head->sizes.size(0);
    }
    const auto options = any.centroids.options();
    layer.table.centroids = at::zeros({num_kv_heads, capacity, dim}, options);
    layer.table.value_means = at::zeros({num_kv_heads, capacity, dim}, options);
    layer.table.log_sizes = at::zeros({num_kv_heads, capacity}, options);
    std::vector<int32_t> counts;
    std::vector<at::Tensor> assignments;
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      const KeyClusters& clusters = *layer.heads[head];
      const int64_t count = clusters.sizes.size(0);
      counts.push_back(static_cast<int32_t>(count));
      if (count > 0) {
        layer.table.centroids[head].narrow(0, 0, count).copy_(clusters.centroids);
        layer.table.value_means[head].narrow(0, 0, count).copy_(clusters.value_sums / clusters.sizes.unsqueeze(1));
        layer.table.log_sizes[head].narrow(0, 0, count).copy_(clusters.sizes.log());
      }
      assignments.push_back(clusters.assignment.to(at::kInt));
    }
    layer.table.counts = at::tensor(counts, at::kInt).to(options.device());
    layer.assignment = at::stack(assignments).contiguous();
    layer.first = any.first;
    layer.end = any.end;
    layer.packed_clusters = total;
  }

  PolicySpec spec_;
};

}  // namespace

std::shared_ptr<const AttentionBackend> MakeCudaQuestAttention(const PolicySpec& spec) {
  return std::make_shared<CudaQuestAttention>(spec);
}

std::shared_ptr<const AttentionBackend> MakeCudaPrhsAttention(const PolicySpec& spec) {
  return std::make_shared<CudaPrhsAttention>(spec);
}

std::shared_ptr<const AttentionBackend> MakeCudaDoublePAttention(const PolicySpec& spec) {
  return std::make_shared<CudaDoublePAttention>(spec);
}

}  // namespace lychee
