// LibTorch entry points of the selection policies' CUDA kernels (policy_decode.h), for one layer
// of one sequence: tensors are checked (dtype, device, shapes, 16-byte rows) and the kernels run
// on the current CUDA stream with no host synchronization. Built only with a CUDA LibTorch.
//
// Shapes: queries [H_q, D] bf16; one sequence's cache of one layer as a KvCache (contiguous, or
// pages of a KV pool read through the sequence's page table).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#include "kernels/cuda/policy_decode.h"

namespace lychee {
namespace cuda {

// What each KV head keeps: int32 entries [H_kv, capacity] of which counts[h] (int32 [H_kv], on
// the device) are valid. Entries are block indices or cache positions.
struct HeadLists {
  at::Tensor entries;
  at::Tensor counts;
};

// One sequence's cache of one layer, bf16 with the last dimension contiguous, other strides
// multiples of 8 elements, data 16-byte aligned, on the device of the queries:
//   contiguous  keys and values [H_kv, >= length, D] (views of a larger cache are fine);
//   paged       the layer's KV-pool tensors [H_kv, pool pages, pool page size, D]
//               (KvPool::keys(layer), values(layer); a power-of-two page size) and the
//               sequence's page table: int32 [>= ceil(length / pool page size)], contiguous, on
//               the pool's device (a row of DecodeStep::page_table), listing the pool pages of
//               its positions 0, page size, 2 page size, ... The kernels read the positions they
//               attend through it; nothing is gathered.
struct KvCache {
  at::Tensor keys, values;
  at::Tensor page_table;  // undefined for a contiguous cache
  int64_t length = 0;

  static KvCache Contiguous(at::Tensor keys, at::Tensor values, int64_t length) {
    return {std::move(keys), std::move(values), at::Tensor(), length};
  }
  static KvCache Paged(at::Tensor pool_keys, at::Tensor pool_values, at::Tensor page_table, int64_t length) {
    return {std::move(pool_keys), std::move(pool_values), std::move(page_table), length};
  }
  bool paged() const { return page_table.defined(); }
  int64_t num_kv_heads() const { return keys.size(0); }
  int64_t head_dim() const { return keys.size(-1); }
};

// Quest: writes the bounds of Quest pages [first_page, ceil(length / quest_page_size)) into
// bounds, bf16 [H_kv, >= those Quest pages, 2, D] (maximum, then minimum, per dimension). Quest's
// pages are its selection unit over positions, independent of a KV pool's pages.
void QuestPageBounds(const KvCache& kv, int64_t quest_page_size, int64_t first_page, at::Tensor& bounds);
// The same over a contiguous cache [H_kv, >= length, D].
void QuestPageBounds(const at::Tensor& keys, int64_t length, int64_t quest_page_size, int64_t first_page,
                     at::Tensor& bounds);
// Quest: float32 [H_kv, num_pages], the group's highest sum_d max(q_d * kmax_d, q_d * kmin_d)
// per Quest page.
at::Tensor QuestPageScores(const at::Tensor& queries, const at::Tensor& bounds, int64_t num_pages);

// The sink and recent blocks, then the highest scores (float32 [H_kv, >= blocks]) up to the budget.
HeadLists SelectBlocks(const at::Tensor& scores, int64_t length, const BlockSelectionConfig& config);

// PrHS: float32 [H_kv, num_blocks] priorities from the previous step's and the previous layer's
// block masses (float32 [H_kv, known], -1 where not attended; either may be undefined).
at::Tensor PrhsPriority(const at::Tensor& previous_step, const at::Tensor& previous_layer, int64_t num_blocks,
                        int64_t enlargement, int64_t num_kv_heads, at::Device device);
// PrHS: drops from `blocks` what is neither mandatory nor proposed (priority >= 0).
void DropUnproposedBlocks(HeadLists& blocks, const at::Tensor& priority, int64_t length,
                          const BlockSelectionConfig& config);

// Double-P's clusters of one layer, every KV head padded to the same capacity.
struct ClusterTensors {
  at::Tensor centroids;    // float32 [H_kv, C, D]
  at::Tensor log_sizes;    // float32 [H_kv, C]
  at::Tensor value_means;  // float32 [H_kv, C, D]
  at::Tensor counts;       // int32 [H_kv]
};
struct ClusterClasses {
  at::Tensor exact;         // uint8 [H_kv, C]
  HeadLists approximated;   // cluster indices, ascending
};
ClusterClasses DoublePClassify(const at::Tensor& queries, const ClusterTensors& clusters, double scale, double p1,
                               double p2);
// Positions [0, first), the exact clusters' members in [first, end) (assignment int32 [H_kv, end -
// first]), and [end, length); ascending.
HeadLists DoublePExactPositions(const at::Tensor& assignment, const at::Tensor& exact, int64_t first, int64_t end,
                                int64_t length);

// What a gather decode attends to: `tokens` as whole blocks of block_size (0: as positions), at
// most max_entries token entries per head; optionally `approximated` clusters of `clusters`.
struct GatherInput {
  const HeadLists* tokens = nullptr;
  int64_t block_size = 0;
  int64_t max_entries = 0;
  const ClusterTensors* clusters = nullptr;
  const HeadLists* approximated = nullptr;
  bool keep_logits = false;  // for BlockMass
  // bf16 [H_q, D] to write the output into (a row of a batch's output); made when undefined.
  at::Tensor out;
};
struct GatherOutput {
  at::Tensor out;     // bf16 [H_q, D]
  at::Tensor lse;     // float32 [H_q], with keep_logits
  at::Tensor logits;  // float32 [H_kv, G * max_entries], with keep_logits
};
// scale 0 means 1 / sqrt(D).
GatherOutput GatherDecode(const at::Tensor& queries, const KvCache& kv, const GatherInput& input, double scale);
// The same over contiguous keys and values [H_kv, >= length, D].
GatherOutput GatherDecode(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values, int64_t length,
                          const GatherInput& input, double scale);

// PrHS: float32 [H_kv, num_blocks], each block's attention mass in `gathered` (a gather over the
// blocks of `input` with keep_logits), -1 where not attended.
at::Tensor BlockMass(const GatherInput& input, const GatherOutput& gathered, int64_t group, int64_t length,
                     int64_t num_blocks);

}  // namespace cuda
}  // namespace lychee
