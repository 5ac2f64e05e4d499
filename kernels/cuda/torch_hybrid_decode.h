// LibTorch entry points of the CUDA hybrid decode kernels (built only with a CUDA LibTorch:
// CMake's LYCHEE_TORCH_CUDA). Tensors are checked (bf16, CUDA, device, shapes, strides) and the
// kernels run on the current CUDA stream with no host synchronization.
//
// A decode step of a batch runs the layers in order; the caller keeps one HybridSelectionState per
// batch, calls BeginStep() before the step's first layer, and passes the same state to every layer:
// retrieval heads write the selection at their KV-head index, and sparse heads of later layers read
// the latest selection at theirs (sink + recent blocks until one exists in this step).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/cuda/hybrid_decode.h"

namespace lychee {
namespace cuda {

struct HybridDecodeOptions {
  BlockSelectionConfig selection;  // block_size 64, token_budget 4096, sink 64, recent 64
  double scale = 0;                // softmax scale; 0 means 1/sqrt(head_dim)
  int ctas_per_sm = 2;             // work items per multiprocessor (capped by occupancy)
  bool use_pdl = true;             // overlap the merge kernel's launch with the main kernel's tail
};

class HybridSelectionState {
 public:
  HybridSelectionState(int64_t batch, int64_t num_kv_heads, const BlockSelectionConfig& selection,
                       at::Device device);

  // Forgets the selections: until a retrieval head runs at an index, sparse heads there attend to
  // the sink and recent blocks only.
  void BeginStep();

  int64_t batch() const { return batch_; }
  int64_t num_kv_heads() const { return num_kv_heads_; }
  const BlockSelectionConfig& selection() const { return selection_; }
  bool has_selection(int64_t kv_head) const { return has_selection_[kv_head] != 0; }
  // int32 [batch, num_kv_heads, budget_blocks]: the selected block indices, counts()[b][h] valid.
  const at::Tensor& indices() const { return indices_; }
  // int32 [batch, num_kv_heads].
  const at::Tensor& counts() const { return counts_; }

 private:
  friend class HybridDecodeRunner;
  int64_t batch_, num_kv_heads_;
  BlockSelectionConfig selection_;
  at::Tensor indices_, counts_;
  std::vector<uint8_t> has_selection_;  // bool as bytes, so that data() works
};

// One layer of one decode step. queries [B, H_q, D] bf16 (RoPE applied); key_caches and
// value_caches: one tensor per sequence, [H_kv, >= lengths[b], D] bf16 on the queries' device with
// the last dimension contiguous (views of larger caches are fine; strides may differ between
// sequences except the token stride); lengths: cached positions per sequence, the new one included;
// modes: this layer's [H_kv] head modes. Returns [B, H_q, D] bf16. The selection options must match
// the state's.
at::Tensor HybridDecodeAttention(const at::Tensor& queries, const std::vector<at::Tensor>& key_caches,
                                 const std::vector<at::Tensor>& value_caches, const std::vector<int64_t>& lengths,
                                 const std::vector<KvHeadMode>& modes, HybridSelectionState& state,
                                 const HybridDecodeOptions& options = {});

// The same with batched caches [B, H_kv, capacity, D].
at::Tensor HybridDecodeAttention(const at::Tensor& queries, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const std::vector<int64_t>& lengths, const std::vector<KvHeadMode>& modes,
                                 HybridSelectionState& state, const HybridDecodeOptions& options = {});

// Exact split-KV flash-decode of every head (no selection, no state).
at::Tensor DenseDecodeAttention(const at::Tensor& queries, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const std::vector<int64_t>& lengths, const HybridDecodeOptions& options = {});
at::Tensor DenseDecodeAttention(const at::Tensor& queries, const std::vector<at::Tensor>& key_caches,
                                const std::vector<at::Tensor>& value_caches, const std::vector<int64_t>& lengths,
                                const HybridDecodeOptions& options = {});

// The CUDA side of a paged decode step (common/model/attention.h's DecodeWorkspace for the dense and
// hybrid backends): every layer reads its KV pool through the step's page tables. Made for at
// most `max_batch` sequences of at most `max_pages` pages; holds the plan of every distinct layer
// pattern (modes, and which sparse heads have a selection to read) at a fixed layout, the split
// partials and block scores, the selection, and the output. Plan() does the host work of a step
// and one copy to the device; Attend() only enqueues the kernels on buffers of this object, so a
// step can be captured in a CUDA graph and replayed after later Plan() calls.
//
// With `audit`, a step whose Plan() names audit targets is an audited step: after each layer with
// sparse heads, the layer runs again with every head dense (its twin, over the audited rows only),
// and LaunchAuditDroppedMass adds what the sparse heads dropped to the rows' targets. An audited
// step enqueues more work than a plain one, so it is captured in a graph of its own.
class PagedHybridDecode {
 public:
  // layer_modes: [layers][num_kv_heads]. launch_capacity: launches cover the capacity (for graphs).
  PagedHybridDecode(int64_t num_q_heads, int64_t head_dim, std::vector<std::vector<KvHeadMode>> layer_modes,
                    const HybridDecodeOptions& options, int64_t max_batch, int64_t max_pages, int64_t page_size,
                    bool launch_capacity, at::Device device, bool audit = false);

  // Plans every layer pattern for sequences of `lengths` positions (this step's token included).
  // audit_targets (with `audit`; empty or one per row): the device double[2] (sum, max) that the
  // row's dropped mass goes to, or null where the row is not audited in this step.
  void Plan(const std::vector<int64_t>& lengths, const std::vector<double*>& audit_targets = {});
  // Whether the planned step is audited.
  bool audits_step() const { return audits_step_; }
  // Layer `layer` of the planned step. queries [rows, num_q_heads, head_dim] bf16 (rows past the
  // planned batch are padding); key_pages and value_pages: the layer's pool [num_kv_heads, pages,
  // page_size, head_dim]; page_table int32 [rows, >= pages of the longest sequence]. Returns the
  // output [rows, num_q_heads, head_dim], a buffer of this object that the next layer overwrites.
  at::Tensor Attend(int layer, const at::Tensor& queries, const at::Tensor& key_pages, const at::Tensor& value_pages,
                    const at::Tensor& page_table);

 private:
  // The dense twin's plan over the rows with a target, and the targets, into `host` (the staging
  // of plans_).
  void PlanAudit(const std::vector<int64_t>& lengths, const std::vector<double*>& targets, int32_t* host);

  struct Pattern {
    std::vector<KvHeadMode> modes;
    std::unique_ptr<bool[]> has_selection;
    HybridPlan plan;  // the latest step's, for the launch
  };

  HybridDecodeShape shape_;  // batch: the capacity
  HybridDecodeOptions options_;
  PlanOptions plan_options_;
  PlanCapacity capacity_;
  int64_t page_size_;
  bool launch_capacity_;
  int64_t batch_ = 0;  // of the planned step
  std::vector<Pattern> patterns_;
  std::vector<int> layer_pattern_;
  int64_t slot_words_ = 0;  // one pattern's plan
  // int32 on the device: [patterns * slot_words], then with `audit` the dense twin's plan
  // [slot_words] and the audit targets (int64 [max_batch]) at targets_offset_.
  at::Tensor plans_;
  at::Tensor workspace_, sel_indices_, sel_counts_, out_;

  bool audit_ = false;
  bool audits_step_ = false;
  HybridPlan dense_plan_;                    // the audited rows, every head dense
  std::vector<uint64_t> layer_sparse_mask_;  // bit h: KV head h of the layer is sparse
  int64_t targets_offset_ = 0;
  at::Tensor lse_, dense_lse_, dense_out_;
};

}  // namespace cuda
}  // namespace lychee
