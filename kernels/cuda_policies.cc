// Quest, PrHS and Double-P decode on the CUDA kernels of kernels/cuda/torch_policy_decode.h: the
// same functions as their references in kernels/policies, one sequence at a time, with the
// selection state kept on the device. Prefill is the exact matmul attention of DenseAttention.
//
// Each backend's decode of one sequence is one function (DecodeRow), run two ways:
//   Attend        over a contiguous cache [H_kv, L, D] (callers without a decode step);
//   paged decode  for every row of a step in turn, over the KV pool read through the row's page
//                 table (a row of DecodeStep::page_table): the kernels address each position they
//                 read in its pool page, and nothing gathers a sequence's cache. Double-P's
//                 clustering (host code) reads only the positions it clusters.
// The selection is planned on the host per layer and row (buffer sizes from the lengths, Double-P's
// clusters), and the kernels' outputs are sized from it: these backends run eagerly, so
// CapturesDecode() stays false.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/model/kv_pool.h"
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

at::TensorOptions IntOptions(const at::Tensor& like) { return like.options().dtype(at::kInt); }

cuda::BlockSelectionConfig SelectionOf(int64_t unit, int64_t budget, int64_t sink, int64_t recent) {
  return {static_cast<int>(unit), static_cast<int>(budget), static_cast<int>(sink), static_cast<int>(recent)};
}

// Telemetry of a backend whose kernels decide how many positions each head reads: the counts
// accumulate on the device, with no synchronization per step, and are copied once, when the
// telemetry is read (at the end of a request). What the host knows (steps, summary bytes) is
// counted on the host.
class DeviceAccountedState : public SequenceAttentionState {
 public:
  const AttentionTelemetry* telemetry() const override {
    read_ = host_;
    if (positions_.defined()) {
      const at::Tensor positions = positions_.cpu();
      const int64_t num_kv_heads = positions.size(1);
      const int64_t* counts = positions.data_ptr<int64_t>();
      for (int64_t layer = 0; layer < positions.size(0); ++layer) {
        for (int64_t head = 0; head < num_kv_heads; ++head) {
          read_.AddTokens(layer, head, num_kv_heads, counts[layer * num_kv_heads + head]);
        }
      }
      read_.kv_bytes_read += positions.sum().item<int64_t>() * bytes_per_position_ + summary_bytes_.item<int64_t>();
    }
    return &read_;
  }

  void CountStep(int layer) {
    if (layer == 0) ++host_.decode_steps;
  }
  // Every head of `layer` read `positions` cached positions (int64 [H_kv] on the device).
  void AddPositions(int layer, const at::Tensor& positions, int64_t bytes_per_position) {
    bytes_per_position_ = bytes_per_position;
    if (!positions_.defined()) {
      positions_ = at::zeros({layer + 1, positions.size(0)}, positions.options());
      summary_bytes_ = at::zeros({}, positions.options());
    } else if (positions_.size(0) <= layer) {
      positions_ = at::cat({positions_, at::zeros({layer + 1 - positions_.size(0), positions_.size(1)},
                                                  positions_.options())});
    }
    positions_[layer].add_(positions);
  }
  // One head's count, known on the host.
  void AddPositions(int layer, int64_t head, int64_t num_kv_heads, int64_t positions, int64_t bytes_per_position) {
    host_.AddTokens(layer, head, num_kv_heads, positions);
    host_.kv_bytes_read += positions * bytes_per_position;
  }
  void AddSummaryBytes(int64_t bytes) { host_.kv_bytes_read += bytes; }
  // Summary bytes the device counts (int64, one element); needs a call of AddPositions first.
  void AddSummaryBytes(const at::Tensor& bytes) { summary_bytes_.add_(bytes.sum()); }

 private:
  AttentionTelemetry host_;
  at::Tensor positions_;      // int64 [layers seen, H_kv] on the device
  at::Tensor summary_bytes_;  // int64 [] on the device
  int64_t bytes_per_position_ = 0;
  mutable AttentionTelemetry read_;
};

// Positions each KV head of `lists` covers: `unit`-position blocks cut at `length` (unit 0: the
// entries are positions). int64 [H_kv] on the device.
at::Tensor ListedPositions(const cuda::HeadLists& lists, int64_t unit, int64_t length) {
  const at::Tensor counts = lists.counts.to(at::kLong);
  const at::Tensor listed = at::arange(lists.entries.size(1), counts.options()).unsqueeze(0) < counts.unsqueeze(1);
  if (unit == 0) return listed.sum(1);
  const at::Tensor sizes = (length - lists.entries.to(at::kLong) * unit).clamp(0, unit);
  return (sizes * listed).sum(1);
}

// A key's (or a centroid's) bytes; a cached position's are a key and a value.
int64_t BytesPerVector(const cuda::KvCache& kv) { return kv.head_dim() * static_cast<int64_t>(kv.keys.element_size()); }
int64_t BytesPerPosition(const cuda::KvCache& kv) { return 2 * BytesPerVector(kv); }

template <typename LayerState>
struct PerLayerState : DeviceAccountedState {
  std::vector<LayerState> layers;
  LayerState& At(int layer) {
    if (static_cast<int64_t>(layers.size()) <= layer) layers.resize(layer + 1);
    return layers[layer];
  }
};

// One sequence's decode at one layer: what a backend's DecodeRow reads and where it writes.
struct RowDecode {
  int layer = 0;
  at::Tensor queries;  // bf16 [H_q, D]
  cuda::KvCache kv;    // contiguous (Attend) or paged (AttendDecode)
  double scale = 1.0;
  SequenceAttentionState* state = nullptr;
  at::Tensor out;  // bf16 [H_q, D], the row of the step's output; undefined under Attend
  // Paged rows: the pool and the row's page table on the host, for host code that reads positions.
  const KvPool* pool = nullptr;
  const std::vector<int32_t>* pages = nullptr;
};

RowDecode ContiguousRow(const AttentionInput& input) {
  RowDecode row;
  row.layer = input.layer;
  row.queries = DecodeQueries(input);
  row.kv = cuda::KvCache::Contiguous(input.keys, input.values, input.keys.size(1));
  row.scale = input.scale;
  row.state = input.state;
  return row;
}

// The row's output: `result`, copied into row.out unless a kernel wrote it there already.
at::Tensor Deliver(const RowDecode& row, const at::Tensor& result) {
  if (!row.out.defined() || result.is_same(row.out)) return result;
  row.out.copy_(result);
  return row.out;
}

// What PlanDecodeStep leaves for the layers of a step: each row's page table, a view of the step's
// device table cut to the pages its length uses.
struct PolicyDecodeWorkspace : DecodeWorkspace {
  std::vector<at::Tensor> page_rows;
};

// The paged decode of the three backends: every layer of a step runs DecodeRow for each row, in
// order, with the kernels reading the pool through that row's page table and writing its output
// row. Prefill and callers without a step use Attend.
class PagedPolicyBackend : public AttentionBackend {
 public:
  std::unique_ptr<DecodeWorkspace> NewDecodeWorkspace(const KvPool&, const DecodeCapacity&) const override {
    return std::make_unique<PolicyDecodeWorkspace>();
  }

  absl::Status PlanDecodeStep(const DecodeStep& step, DecodeWorkspace& workspace) const override {
    auto* planned = dynamic_cast<PolicyDecodeWorkspace*>(&workspace);
    if (planned == nullptr) return absl::InvalidArgumentError("the decode workspace was made by another backend");
    if (step.pool == nullptr) return absl::InvalidArgumentError("a paged decode step needs its KV pool");
    if (step.sliding_window) {
      return absl::FailedPreconditionError("the CUDA policy kernels do not take a sliding window");
    }
    const int64_t batch = step.batch();
    if (static_cast<int64_t>(step.states.size()) != batch || static_cast<int64_t>(step.pages.size()) != batch) {
      return absl::InvalidArgumentError(absl::StrCat("a decode step of ", batch, " rows has ", step.states.size(),
                                                     " states and ", step.pages.size(), " page tables"));
    }
    const at::Tensor& table = step.page_table;
    if (!table.defined() || table.scalar_type() != at::kInt || table.dim() != 2 || table.size(0) < batch ||
        table.stride(1) != 1 || table.device() != step.pool->keys(0).device()) {
      return absl::InvalidArgumentError(absl::StrCat("the step's page table must be int32 [>= ", batch,
                                                     ", width] with contiguous rows on the pool's device"));
    }
    planned->page_rows.clear();
    for (int64_t row = 0; row < batch; ++row) {
      const int64_t length = step.lengths[row];
      const int64_t pages = step.pool->PagesFor(length);
      if (length < 1 || length > std::numeric_limits<int32_t>::max()) {
        return absl::InvalidArgumentError(absl::StrCat("row ", row, " has length ", length));
      }
      if (step.states[row] == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("row ", row, " has no attention state"));
      }
      if (step.pages[row] == nullptr || static_cast<int64_t>(step.pages[row]->size()) < pages ||
          table.size(1) < pages) {
        return absl::InvalidArgumentError(
            absl::StrCat("row ", row, " needs ", pages, " pages for ", length, " positions; its page table has ",
                         step.pages[row] == nullptr ? 0 : step.pages[row]->size(), ", the step's ", table.size(1)));
      }
      planned->page_rows.push_back(table[row].narrow(0, 0, pages));
    }
    return absl::OkStatus();
  }

  at::Tensor AttendDecode(int layer, const at::Tensor& queries, const DecodeStep& step,
                          DecodeWorkspace& workspace) const override {
    auto* planned = dynamic_cast<PolicyDecodeWorkspace*>(&workspace);
    TORCH_CHECK(planned != nullptr && static_cast<int64_t>(planned->page_rows.size()) == step.batch(),
                "AttendDecode of a step that PlanDecodeStep did not plan into this workspace");
    TORCH_CHECK(queries.dim() == 3 && queries.size(0) >= step.batch(), "queries [rows >= ", step.batch(),
                ", H_q, D] expected, got ", queries.sizes());
    at::Tensor out = at::empty(queries.sizes(), queries.options());
    for (int64_t r = 0; r < step.batch(); ++r) {
      RowDecode row;
      row.layer = layer;
      row.queries = queries[r];
      row.kv = cuda::KvCache::Paged(step.pool->keys(layer), step.pool->values(layer), planned->page_rows[r],
                                    step.lengths[r]);
      row.scale = step.scale;
      row.state = step.states[r];
      row.out = out[r];
      row.pool = step.pool;
      row.pages = step.pages[r];
      DecodeRow(row);
    }
    // Padding rows: their output is undefined by the interface; zeros keep it finite.
    if (out.size(0) > step.batch()) out.narrow(0, step.batch(), out.size(0) - step.batch()).zero_();
    return out;
  }

  // The selection is planned on the host per layer and the launches sized from it: eager only.
  bool CapturesDecode() const override { return false; }

 protected:
  // One sequence's decode at one layer; returns its output [H_q, D], row.out when that is defined.
  virtual at::Tensor DecodeRow(const RowDecode& row) const = 0;
};

// ---- Quest ----------------------------------------------------------------------------------
//
// Quest's pages (spec.page_size positions, 16 by default) are its selection unit: each has key
// bounds and a score, and the budget is counted in them. They are not the KV pool's pages (64
// positions by default), which only store positions; the kernels map each position they read
// through the pool's page table whatever the two sizes are.

struct QuestLayer {
  at::Tensor bounds;           // bf16 [H_kv, capacity in Quest pages, 2, D]
  int64_t complete_pages = 0;  // Quest pages whose bounds no later position changes
};

class CudaQuestAttention : public PagedPolicyBackend {
 public:
  explicit CudaQuestAttention(const PolicySpec& spec)
      : spec_(spec), selection_(SelectionOf(spec.page_size, spec.token_budget, spec.sink_tokens, spec.recent_tokens)) {}

  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override {
    return std::make_unique<PerLayerState<QuestLayer>>();
  }

  at::Tensor Attend(const AttentionInput& input) const override {
    if (IsPrefill(input)) return DenseAttention(input.queries, input.keys, input.values, input.scale);
    return AsAttentionOutput(DecodeRow(ContiguousRow(input)));
  }

 protected:
  at::Tensor DecodeRow(const RowDecode& row) const override {
    const int64_t length = row.kv.length;
    const int64_t num_kv_heads = row.kv.num_kv_heads();
    const int64_t quest_pages = CeilDiv(length, spec_.page_size);
    auto& account = static_cast<DeviceAccountedState&>(*row.state);
    account.CountStep(row.layer);
    // As the reference: layers before quest_dense_layers, and contexts within the budget, read
    // everything; it attends to them exactly, which the selection of every page does here too.
    if (row.layer < spec_.quest_dense_layers || quest_pages * spec_.page_size <= spec_.token_budget) {
      for (int64_t head = 0; head < num_kv_heads; ++head) {
        account.AddPositions(row.layer, head, num_kv_heads, length, BytesPerPosition(row.kv));
      }
    }
    if (row.layer < spec_.quest_dense_layers) {
      if (!row.kv.paged()) {
        cuda::HybridDecodeOptions options;
        options.scale = row.scale;
        // Spelled out: a braced {row.kv.keys} would pick the batched-cache overload.
        const std::vector<at::Tensor> keys = {row.kv.keys}, values = {row.kv.values};
        return cuda::DenseDecodeAttention(row.queries.unsqueeze(0), keys, values, {length}, options)[0];
      }
      // Paged: exact attention over every Quest page, read through the page table.
      const cuda::HeadLists every_page{
          at::arange(quest_pages, IntOptions(row.kv.keys)).unsqueeze(0).expand({num_kv_heads, quest_pages}),
          at::full({num_kv_heads}, quest_pages, IntOptions(row.kv.keys))};
      cuda::GatherInput gather;
      gather.tokens = &every_page;
      gather.block_size = spec_.page_size;
      gather.max_entries = quest_pages * spec_.page_size;
      gather.out = row.out;
      return Deliver(row, cuda::GatherDecode(row.queries, row.kv, gather, row.scale).out);
    }
    QuestLayer& layer = static_cast<PerLayerState<QuestLayer>&>(*row.state).At(row.layer);
    if (!layer.bounds.defined() || layer.bounds.size(1) < quest_pages) {
      // Grow by doubling; the bounds of complete Quest pages carry over.
      const int64_t capacity = std::max<int64_t>(quest_pages, layer.bounds.defined() ? 2 * layer.bounds.size(1) : 0);
      at::Tensor grown = at::empty({num_kv_heads, capacity, 2, row.kv.head_dim()}, row.kv.keys.options());
      if (layer.complete_pages > 0) {
        grown.narrow(1, 0, layer.complete_pages).copy_(layer.bounds.narrow(1, 0, layer.complete_pages));
      }
      layer.bounds = grown;
    }
    cuda::QuestPageBounds(row.kv, spec_.page_size, std::min(layer.complete_pages, quest_pages), layer.bounds);
    layer.complete_pages = length / spec_.page_size;
    const at::Tensor scores = cuda::QuestPageScores(row.queries, layer.bounds, quest_pages);
    const cuda::HeadLists selected = cuda::SelectBlocks(scores, length, selection_);
    if (quest_pages * spec_.page_size > spec_.token_budget) {
      account.AddPositions(row.layer, ListedPositions(selected, spec_.page_size, length), BytesPerPosition(row.kv));
      // A real Quest keeps the bounds beside the cache: reading them costs a key's worth per bound.
      account.AddSummaryBytes(num_kv_heads * quest_pages * BytesPerPosition(row.kv));
    }
    cuda::GatherInput gather;
    gather.tokens = &selected;
    gather.block_size = spec_.page_size;
    gather.max_entries = std::min<int64_t>(quest_pages, selection_.budget_blocks()) * spec_.page_size;
    gather.out = row.out;
    return Deliver(row, cuda::GatherDecode(row.queries, row.kv, gather, row.scale).out);
  }

 private:
  PolicySpec spec_;
  cuda::BlockSelectionConfig selection_;  // in Quest pages
};

// ---- PrHS -----------------------------------------------------------------------------------

struct PrhsSequence : DeviceAccountedState {
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

class CudaPrhsAttention : public PagedPolicyBackend {
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
    if (!IsPrefill(input)) return AsAttentionOutput(DecodeRow(ContiguousRow(input)));
    auto& state = static_cast<PrhsSequence&>(*input.state);
    const int64_t num_kv_heads = input.keys.size(0);
    const int64_t length = input.keys.size(1);
    const int64_t num_blocks = CeilDiv(length, spec_.block_size);
    // The last prompt position's dense attention gives the first decode step its temporal set.
    const at::Tensor every_block =
        at::arange(num_blocks, input.keys.options().dtype(at::kInt)).unsqueeze(0).expand({num_kv_heads, num_blocks});
    const cuda::HeadLists all{every_block.contiguous(),
                              at::full({num_kv_heads}, num_blocks, input.keys.options().dtype(at::kInt))};
    state.Previous(input.layer) =
        GatherWithMass(input.queries.select(1, input.queries.size(1) - 1),
                       cuda::KvCache::Contiguous(input.keys, input.values, length), all, num_blocks, input.scale,
                       at::Tensor())
            .second;
    return DenseAttention(input.queries, input.keys, input.values, input.scale);
  }

 protected:
  at::Tensor DecodeRow(const RowDecode& row) const override {
    auto& state = static_cast<PrhsSequence&>(*row.state);
    const int64_t num_kv_heads = row.kv.num_kv_heads();
    const int64_t length = row.kv.length;
    const int64_t num_blocks = CeilDiv(length, spec_.block_size);
    const at::Tensor& previous = state.Previous(row.layer);
    const bool cross_layer =
        spec_.prhs_selectors.cross_layer && state.mass_layer == row.layer - 1 && state.layer_mass.defined();
    const at::Tensor priority = cuda::PrhsPriority(spec_.prhs_selectors.temporal ? previous : at::Tensor(),
                                                   cross_layer ? state.layer_mass : at::Tensor(), num_blocks,
                                                   spec_.prhs_enlargement, num_kv_heads, row.kv.keys.device());
    cuda::HeadLists blocks = cuda::SelectBlocks(priority, length, selection_);
    cuda::DropUnproposedBlocks(blocks, priority, length, selection_);
    state.CountStep(row.layer);
    state.AddPositions(row.layer, ListedPositions(blocks, spec_.block_size, length), BytesPerPosition(row.kv));
    auto [out, mass] = GatherWithMass(row.queries, row.kv, blocks, num_blocks, row.scale, row.out);
    state.Previous(row.layer) = mass;
    state.layer_mass = mass;
    state.mass_layer = row.layer;
    return Deliver(row, out);
  }

 private:
  // Attention of queries [H_q, D] over `blocks` (into `out` when defined), and each block's
  // attention mass.
  std::pair<at::Tensor, at::Tensor> GatherWithMass(const at::Tensor& queries, const cuda::KvCache& kv,
                                                   const cuda::HeadLists& blocks, int64_t num_blocks, double scale,
                                                   const at::Tensor& out) const {
    cuda::GatherInput gather;
    gather.tokens = &blocks;
    gather.block_size = spec_.block_size;
    gather.max_entries = blocks.entries.size(1) * spec_.block_size;
    gather.keep_logits = true;
    gather.out = out;
    const cuda::GatherOutput gathered = cuda::GatherDecode(queries, kv, gather, scale);
    const int64_t group = queries.size(0) / kv.num_kv_heads();
    return {gathered.out, cuda::BlockMass(gather, gathered, group, kv.length, num_blocks)};
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

// Keys and values of the positions Double-P's clustering (host code) asks for, per KV head [count,
// D]: slices of a contiguous cache, or, paged, just those positions gathered through the page
// table, once for all heads (the heads of a layer cluster the same range).
class ClusterRangeReader {
 public:
  explicit ClusterRangeReader(const RowDecode& row) : row_(row) {}

  std::pair<at::Tensor, at::Tensor> Read(int64_t head, int64_t first, int64_t count) {
    if (!row_.kv.paged()) {
      return {row_.kv.keys[head].narrow(0, first, count), row_.kv.values[head].narrow(0, first, count)};
    }
    if (!range_ || range_first_ != first || range_count_ != count) {
      range_ = row_.pool->GatherRange(row_.layer, *row_.pages, first, count);
      range_first_ = first;
      range_count_ = count;
    }
    return {range_->first[head], range_->second[head]};
  }

 private:
  const RowDecode& row_;
  std::optional<std::pair<at::Tensor, at::Tensor>> range_;  // [H_kv, count, D] each
  int64_t range_first_ = 0, range_count_ = 0;
};

class CudaDoublePAttention : public PagedPolicyBackend {
 public:
  explicit CudaDoublePAttention(const PolicySpec& spec) : spec_(spec) {}

  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override {
    return std::make_unique<PerLayerState<DoublePLayer>>();
  }

  at::Tensor Attend(const AttentionInput& input) const override {
    if (IsPrefill(input)) return DenseAttention(input.queries, input.keys, input.values, input.scale);
    return AsAttentionOutput(DecodeRow(ContiguousRow(input)));
  }

 protected:
  at::Tensor DecodeRow(const RowDecode& row) const override {
    const int64_t num_kv_heads = row.kv.num_kv_heads();
    const int64_t length = row.kv.length;
    auto& state = static_cast<PerLayerState<DoublePLayer>&>(*row.state);
    state.CountStep(row.layer);
    DoublePLayer& layer = state.At(row.layer);
    layer.heads.resize(num_kv_heads);
    ClusterRangeReader reader(row);
    int64_t total_clusters = 0;
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      const KvRangeReader read = [&](int64_t first, int64_t count) { return reader.Read(head, first, count); };
      total_clusters += UpdateDoublePClusters(layer.heads[head], length, row.kv.head_dim(), row.kv.keys.device(),
                                              read, spec_)
                            .sizes.size(0);
    }
    if (total_clusters != layer.packed_clusters || layer.heads[0]->end != layer.end) Pack(layer);
    // Scoring reads every centroid, as in the reference; each approximated cluster's value mean too.
    const int64_t bytes_per_vector = BytesPerVector(row.kv);
    state.AddSummaryBytes(total_clusters * bytes_per_vector);
    if (layer.table.centroids.size(1) > cuda::kMaxClustersPerHead) {
      return Deliver(row, ReferenceAttend(row, layer, state));
    }

    const cuda::ClusterClasses classes = cuda::DoublePClassify(row.queries, layer.table, row.scale, spec_.p1, spec_.p2);
    const cuda::HeadLists exact =
        cuda::DoublePExactPositions(layer.assignment, classes.exact, layer.first, layer.end, length);
    state.AddPositions(row.layer, ListedPositions(exact, 0, length), BytesPerPosition(row.kv));
    state.AddSummaryBytes(classes.approximated.counts.to(at::kLong) * bytes_per_vector);
    cuda::GatherInput gather;
    gather.tokens = &exact;
    gather.max_entries = length;
    gather.clusters = &layer.table;
    gather.approximated = &classes.approximated;
    gather.out = row.out;
    return Deliver(row, cuda::GatherDecode(row.queries, row.kv, gather, row.scale).out);
  }

 private:
  // A long generation's appended tail clusters can outgrow the scoring kernel's table: the heads
  // then run the reference through ATen on the device, over the whole cache (gathered from the
  // pool in paged mode: this fallback alone reads it all).
  at::Tensor ReferenceAttend(const RowDecode& row, const DoublePLayer& layer, DeviceAccountedState& state) const {
    const int64_t num_kv_heads = row.kv.num_kv_heads();
    const int64_t group = row.queries.size(0) / num_kv_heads;
    const at::Tensor keys = row.kv.paged() ? row.pool->GatherKeys(row.layer, *row.pages, row.kv.length)
                                           : row.kv.keys.narrow(1, 0, row.kv.length);
    const at::Tensor values = row.kv.paged() ? row.pool->GatherValues(row.layer, *row.pages, row.kv.length)
                                             : row.kv.values.narrow(1, 0, row.kv.length);
    std::vector<at::Tensor> outputs;
    const int64_t bytes_per_vector = BytesPerVector(row.kv);
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      DoublePHeadResult result = DoublePHeadAttention(row.queries.narrow(0, head * group, group).unsqueeze(1),
                                                      keys[head], values[head], *layer.heads[head], row.scale, spec_);
      outputs.push_back(result.output);
      state.AddPositions(row.layer, head, num_kv_heads, result.exact_positions.numel(), BytesPerPosition(row.kv));
      state.AddSummaryBytes(result.approximated_clusters * bytes_per_vector);
    }
    return at::cat(outputs, 0).squeeze(1);  // [H_q, D]
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
