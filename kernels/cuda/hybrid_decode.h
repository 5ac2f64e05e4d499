// Host API of the CUDA decode-attention kernels (LycheeDecode hybrid-head sparse attention):
// plain C++ with no device code, so that any translation unit can plan and launch.
//
// One decode step of one layer for a batch of sequences, each with L_b cached positions (the new
// token already appended). Every KV head of the layer has a mode:
//   kDense      exact attention over all L_b positions (the dense baseline; selects nothing),
//   kRetrieval  exact attention over all L_b positions, plus block scoring fused in the same pass
//               (score_j = max over the block's positions p of mean_g(q_g) . k_p) and selection
//               of the best blocks within the budget, always with the sink and recent blocks;
//               the selection is written to the selection buffer at (sequence, KV-head index),
//   kSparse     attention over only the blocks of the selection buffer at (sequence, KV-head
//               index), made by the latest retrieval head at that index earlier in this step;
//               where none has run yet (has_selection false) the sink and recent blocks only.
//
// Use: PlanHybridDecode (host, from the known lengths) -> copy HybridPlan::words to the device ->
// LaunchHybridDecode (one main launch over a single pool of work items in which dense heads get
// proportionally more splits, then one small launch that merges split partials and selects the
// blocks of the retrieval heads). No host synchronization.
//
// The kernels read how many items there are from the plan's header on the device, and a plan may
// be laid out for fixed capacities (PlanCapacity): launches then cover the capacities whatever the
// step needs, so that a launch captured in a CUDA graph stays right when later steps write new
// plans of other sizes into the same buffer. Caches are contiguous per sequence, or pages of a
// shared pool read through each sequence's page table.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lychee {
namespace cuda {

enum class KvHeadMode : uint8_t { kDense = 0, kRetrieval = 1, kSparse = 2 };

// Most blocks (chunks) one work item covers; the plan keeps under it.
constexpr int kMaxItemChunks = 512;

struct BlockSelectionConfig {
  int block_size = 64;      // tokens per block: a power of two, 16 to 1024
  int token_budget = 4096;  // most tokens a sparse head attends to
  int sink_tokens = 64;     // always kept from the start
  int recent_tokens = 64;   // always kept from the end (the current partial block always)
  int budget_blocks() const { return token_budget / block_size; }
};

// The rule, for host code and tests: blocks of a context of `length` tokens.
int64_t NumBlocks(int64_t length, int block_size);
// The sink blocks then the recent blocks, ascending (as the CPU reference's MandatoryBlocks).
std::vector<int32_t> MandatoryBlocks(int64_t length, const BlockSelectionConfig& config);
// How many blocks a selection holds: every block when they fit the budget, else budget_blocks.
int64_t SelectedBlockCount(int64_t length, const BlockSelectionConfig& config);
// Cached positions one KV head of `mode` attends to in a context of `length`: all of them for dense
// and retrieval heads; for a sparse head, those of its selection's blocks (has_selection: a retrieval
// head at its index ran earlier in the step), else of the mandatory blocks. Exact from the lengths
// alone, since every selected block is full but the last, which is always selected.
int64_t HeadPositionsAttended(int64_t length, KvHeadMode mode, bool has_selection, const BlockSelectionConfig& config);

// Work descriptors, as the kernels read them (int32 words).
struct WorkItem {
  int32_t batch, kv_head, length, chunk_begin, chunk_end, flags, out_index, score_offset;
};
struct MergeItem {
  int32_t batch, kv_head, first_partial, num_splits;
};
struct SelectItem {
  int32_t batch, kv_head, length, score_offset;
};
enum WorkFlags : int32_t {
  kWorkScore = 1,     // retrieval head: write block scores
  kWorkSparse = 2,    // chunks are entries of the selection buffer
  kWorkFallback = 4,  // sparse with no selection yet: chunks are the mandatory blocks
  kWorkFinal = 8,     // the only split of its head: write the output directly
  kWorkLseOnly = 16,  // only the head's lse is wanted (the audit's dense twin): the tensor-core
                      // kernel reads no values, and the output is undefined
};

struct HybridDecodeShape {
  int batch = 1;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 128;  // 64 or 128
};

// Words before the items: num_work, num_merge, num_select, 0.
constexpr int kPlanHeaderWords = 4;

// Room a plan is laid out for; 0 means exactly what it needs.
struct PlanCapacity {
  int work = 0;
  int merge = 0;
  int select = 0;
  int partials = 0;
  int64_t scores = 0;
};

struct HybridPlan {
  // The header, then work items, merge items and select items, each section at its capacity.
  std::vector<int32_t> words;
  int num_work = 0;
  int num_merge = 0;   // (sequence, KV head) pairs with more than one split
  int num_select = 0;  // (sequence, retrieval KV head) pairs
  int num_partials = 0;
  int64_t num_scores = 0;     // float32 block scores of the retrieval heads
  int64_t total_chunks = 0;   // blocks read by all heads together
  int64_t total_tokens = 0;   // positions attended by all KV heads together (bytes = 4 D x this)
  int chunks_per_item = 0;
  bool reads_selection = false;  // some sparse head reads the selection buffer, or a head selects
  PlanCapacity capacity;         // every field set: the counts, or the fixed layout's room
  int merge_offset() const { return kPlanHeaderWords + capacity.work * 8; }
  int select_offset() const { return merge_offset() + capacity.merge * 4; }
  size_t plan_bytes() const { return words.size() * sizeof(int32_t); }
};

struct PlanOptions {
  int num_sms = 132;
  int ctas_per_sm = 2;  // work items per multiprocessor aimed at (one resident wave)
  int min_chunks_per_item = 2;
};

// Builds the plan. lengths: [batch], each >= 1. modes: [num_kv_heads], this layer's. has_selection:
// [num_kv_heads], whether a retrieval head at that index ran earlier in this step (only read for
// sparse heads; may be null = none). `capacity` null: laid out exactly; else at that room (an error
// when the plan needs more). Returns an empty string, or what is wrong.
std::string PlanHybridDecode(const HybridDecodeShape& shape, const BlockSelectionConfig& config,
                             const int64_t* lengths, const KvHeadMode* modes, const bool* has_selection,
                             const PlanOptions& options, HybridPlan* plan, const PlanCapacity* capacity = nullptr);

// The room that a plan of any step of up to `max_batch` sequences of at most `max_length`
// positions needs, for PlanHybridDecode's `capacity`.
PlanCapacity HybridPlanCapacity(const HybridDecodeShape& max_shape, const BlockSelectionConfig& config,
                                int64_t max_length, const PlanOptions& options);

// Pointers and strides (in elements). Queries [B, H_q, D], output [B, H_q, D], caches per sequence
// [H_kv, capacity, D], all bf16 with the last dimension contiguous. The caches are given either as
// a batched base pointer with a batch stride, as device arrays of per-sequence pointers (then the
// batch stride is unused and the head stride may be per sequence, through *_head_strides), or as
// the pages of a pool (page_table set): k and v are a layer's pool [H_kv, pages, page_size, D], and
// position p of sequence b, head h is at k + h * k_head_stride + page_table[b * page_table_stride +
// p / page_size] * k_page_stride + (p % page_size) * k_token_stride.
struct HybridDecodeArgs {
  const void* q = nullptr;
  int64_t q_batch_stride = 0, q_head_stride = 0;
  void* out = nullptr;
  int64_t out_batch_stride = 0, out_head_stride = 0;

  const void* k = nullptr;  // batched base, or null when k_ptrs is given
  const void* v = nullptr;
  const void* const* k_ptrs = nullptr;  // device array [B], or null
  const void* const* v_ptrs = nullptr;
  const int64_t* k_head_strides = nullptr;  // device array [B], or null: k_head_stride for all
  const int64_t* v_head_strides = nullptr;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_token_stride = 0;
  int64_t v_batch_stride = 0, v_head_stride = 0, v_token_stride = 0;
  const int32_t* page_table = nullptr;  // device int32 [B, page_table_stride], or null
  int64_t page_table_stride = 0;
  int page_size = 0;  // a power of two >= 16, with page_table
  int64_t k_page_stride = 0, v_page_stride = 0;

  // Selection buffer: int32 indices [B, H_kv, >= budget_blocks] and counts [B, H_kv].
  int32_t* sel_indices = nullptr;
  int32_t* sel_counts = nullptr;
  int64_t sel_batch_stride = 0, sel_head_stride = 0;  // of sel_indices
  int64_t sel_count_batch_stride = 0;                 // of sel_counts (head stride 1)

  // Optional float32 [B, H_q] (head stride 1): each query head's log2 softmax denominator over the
  // positions it attended, in units of scale * log2(e) scores, for the sampled audit.
  float* lse = nullptr;
  int64_t lse_batch_stride = 0;

  void* workspace = nullptr;  // HybridWorkspaceBytes(plan, shape), 256-byte aligned
  const int32_t* plan = nullptr;  // device copy of HybridPlan::words
  // Launch the capacities' CTAs (extra ones exit at once) rather than the plan's counts.
  bool launch_capacity = false;

  float scale = 0;  // softmax scale; 0 means 1/sqrt(head_dim)
  bool use_pdl = true;  // programmatic dependent launch of the second kernel (Hopper)
  // Main kernel: 0 tensor cores (mma.sync; the default), 1 CUDA cores with one 16-byte vector of a
  // row per lane, 2 CUDA cores with two (G <= 4 only; else as 1). Kept for comparison and tests.
  int kernel_variant = 0;
  bool skip_post_for_benchmark = false;  // time the main kernel alone (outputs then incomplete)
};

size_t HybridWorkspaceBytes(const HybridPlan& plan, const HybridDecodeShape& shape);

// Enqueues the decode on `stream`. Returns the first CUDA error (launch configuration included).
cudaError_t LaunchHybridDecode(const HybridDecodeArgs& args, const HybridPlan& plan, const HybridDecodeShape& shape,
                               const BlockSelectionConfig& config, cudaStream_t stream);

// The sampled audit of one layer: the mass that each sparse head's attended positions leave out of
// its dense softmax, from two launches' lse of the same queries (LaunchHybridDecode's with the
// layer's modes, and its dense twin's): delta = 1 - 2^(lse - dense_lse), clamped to [0, 1], for
// the query heads of the KV heads whose bit is set in `sparse_kv_heads`. For each of `rows` rows
// with a target (device array of double*, null to skip a row), adds the row's sum of deltas to
// target[0] and raises target[1] to their max.
cudaError_t LaunchAuditDroppedMass(const float* lse, const float* dense_lse, int64_t lse_batch_stride, int rows,
                                   int num_q_heads, int group, uint64_t sparse_kv_heads, double* const* targets,
                                   cudaStream_t stream);

// CTAs of the main kernel that fit on one multiprocessor for this shape (occupancy), or 0.
int HybridDecodeMaxCtasPerSm(int head_dim, int group);

// The block selection alone (the second kernel's selection part), for tests and the benchmark:
// scores float32 at items[i].score_offset ([ceil(length / block_size)] each), selections written
// like LaunchHybridDecode does. `items` is a device array of SelectItem.
cudaError_t LaunchBlockSelect(const float* scores, const SelectItem* items, int num_items, int32_t* sel_indices,
                              int32_t* sel_counts, int64_t sel_batch_stride, int64_t sel_head_stride,
                              int64_t sel_count_batch_stride, const BlockSelectionConfig& config, cudaStream_t stream);

}  // namespace cuda
}  // namespace lychee
