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

}  // namespace cuda
}  // namespace lychee
