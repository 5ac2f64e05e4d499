// Host API of the CUDA kernels of the selection policies other than lychee (kernels/policy.h):
// Quest's page bounds and page scores, PrHS's pre-hoc block priorities and block masses,
// Double-P's cluster scoring with top-p, and one gather decode that attends to any list of
// cache positions and, for Double-P, to cluster centroids in the same softmax. Plain C++ with
// no device code; device code is in policy_decode.cuh, the launchers in policy_decode.cu.
//
// Every launch covers all KV heads of one layer of one sequence. Counts that depend on the data
// (how many blocks, positions or clusters a head keeps) stay on the device: a kernel that reads
// them takes a pointer, so a decode step never waits for the host. Keys and values are bf16
// with 16-byte rows, last dimension contiguous, strides in elements: either one sequence's
// contiguous cache [H_kv, >= length, D], or a KV pool's pages read through the sequence's page
// table (KvView).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/hybrid_decode.h"

namespace lychee {
namespace cuda {

struct PolicyDecodeShape {
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 128;  // 64 or 128
  int group() const { return num_q_heads / num_kv_heads; }
};

// Queries [H_q, D] bf16.
struct QueryView {
  const void* q = nullptr;
  int64_t head_stride = 0;
};

// One sequence's cache of one layer, in one of two modes (the kernels turn a position into an
// address in one device helper, KvRowOffset in policy_decode.cuh):
//   contiguous (page_table null): position p of KV head h at
//       k + h * k_head_stride + p * k_token_stride;
//   paged (a KV pool, common/model/kv_pool.h): k and v are the layer's pool tensors [H_kv, pool pages,
//       pool page size, D], page_table the sequence's pool pages on the device (at least
//       ceil(length / pool page size) entries), and position p of KV head h at
//       k + h * k_head_stride + page_table[p >> log2_page_size] * k_page_stride
//         + (p & (pool page size - 1)) * k_token_stride,
//   v likewise with its own strides. The pool's pages are storage only: Quest's pages and the
//   gather's blocks (below) are units of selection over positions and need not match them.
struct KvView {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_head_stride = 0, k_token_stride = 0;
  int64_t v_head_stride = 0, v_token_stride = 0;
  int length = 0;
  // Paged mode; page_table null for a contiguous cache.
  const int32_t* page_table = nullptr;
  int log2_page_size = 0;  // log2 of the pool's page size (positions)
  int64_t k_page_stride = 0, v_page_stride = 0;
};

// Quest: per Quest page of `quest_page_size` positions (Quest's selection unit, whatever the KV
// pool's page size) the per-dimension maxima and minima of the keys, written for Quest pages
// [first_page, end_page) as bf16 bounds [H_kv][Quest page][2][D] (maximum, then minimum); a Quest
// page that the cache fills only in part is bounded over what it holds.
cudaError_t LaunchQuestPageBounds(const KvView& kv, const PolicyDecodeShape& shape, int quest_page_size,
                                  int first_page, int end_page, void* bounds, int64_t bounds_head_stride,
                                  cudaStream_t stream);

// Quest: scores [H_kv][Quest page] float32, the highest over the group's queries of
// sum_d max(q_d * kmax_d, q_d * kmin_d), for Quest pages [0, num_pages).
cudaError_t LaunchQuestPageScores(const QueryView& queries, const PolicyDecodeShape& shape, const void* bounds,
                                  int64_t bounds_head_stride, int num_pages, float* scores, int64_t score_head_stride,
                                  cudaStream_t stream);

// The blocks each KV head keeps, by the rule of LycheeDecode's retrieval heads (block_topk.cuh):
// the sink and recent blocks, then the highest scores up to the budget, ties to the lower index.
// indices [H_kv][>= budget_blocks] int32 in no particular order, counts [H_kv].
cudaError_t LaunchHeadBlockSelect(const float* scores, int64_t score_head_stride, int length,
                                  const BlockSelectionConfig& config, int num_kv_heads, int32_t* indices,
                                  int64_t index_head_stride, int32_t* counts, cudaStream_t stream);

// PrHS: the pre-hoc priority [H_kv][block] of each of `num_blocks` blocks, the largest carried-over
// mass within `enlargement` blocks of it, over two sources (either may be null): the previous
// step's masses at this layer and the previous layer's in this step, each [H_kv][known blocks]
// with -1 where a block was not attended. -1 where no source knows a nearby block.
struct BlockMassSource {
  const float* mass = nullptr;
  int64_t head_stride = 0;
  int known_blocks = 0;
};
cudaError_t LaunchPrhsPriority(const BlockMassSource& previous_step, const BlockMassSource& previous_layer,
                               int num_blocks, int enlargement, int num_kv_heads, float* priority,
                               int64_t priority_head_stride, cudaStream_t stream);

// PrHS: removes from each head's selection the blocks that are neither mandatory (sink, recent)
// nor proposed (score >= 0); the kept blocks stay in order.
cudaError_t LaunchDropUnproposedBlocks(const float* scores, int64_t score_head_stride, int length,
                                       const BlockSelectionConfig& config, int num_kv_heads, int32_t* indices,
                                       int64_t index_head_stride, int32_t* counts, cudaStream_t stream);

// Double-P stage 1 and 2 for each KV head: over its counts[h] clusters (centroids float32
// [H_kv][C][D], log sizes float32 [H_kv][C]), the mass of each cluster is the mean over the
// group's queries of softmax_c(q . centroid_c * scale + log size_c); clusters ranked by mass
// (ties: lower index first); with `above` the mass ranked above a cluster, it is dropped when
// p1 < 1 and above >= p1, else attended exactly when p2 >= 1 or above < p2, else approximated.
// exact [H_kv][C] uint8 (1 for exact), approximated [H_kv][C] int32 ascending, with
// approximated_counts [H_kv]. At most 4096 clusters per head.
struct ClusterTable {
  const float* centroids = nullptr;
  const float* log_sizes = nullptr;
  const float* value_means = nullptr;  // [H_kv][C][D], for the gather decode
  const int32_t* counts = nullptr;     // [H_kv]
  int capacity = 0;                    // C: the row stride, in clusters
};
constexpr int kMaxClustersPerHead = 4096;
cudaError_t LaunchDoublePClassify(const QueryView& queries, const PolicyDecodeShape& shape, const ClusterTable& clusters,
                                  float scale, double p1, double p2, uint8_t* exact, int32_t* approximated,
                                  int32_t* approximated_counts, cudaStream_t stream);

// Double-P's exactly attended positions of each head, ascending: [0, first), the positions p of
// [first, end) whose cluster assignment[h][p - first] is exact, and [end, length).
// positions [H_kv][>= length] int32, counts [H_kv].
cudaError_t LaunchDoublePExactPositions(const int32_t* assignment, int64_t assignment_head_stride, const uint8_t* exact,
                                        int exact_head_stride, int first, int end, int length, int num_kv_heads,
                                        int32_t* positions, int64_t position_head_stride, int32_t* counts,
                                        cudaStream_t stream);

// What a gather decode attends to, per KV head: cache positions, given as whole blocks (block
// indices; positions past the cache's end skipped) or one by one; and, optionally, clusters each
// as one entry of key centroid, logit bias log size and value mean.
struct GatherEntries {
  const int32_t* blocks = nullptr;     // [H_kv][stride] block indices, or null
  const int32_t* positions = nullptr;  // [H_kv][stride] positions, or null
  int64_t head_stride = 0;
  const int32_t* counts = nullptr;  // [H_kv]: blocks or positions
  int block_size = 0;               // a power of two, with `blocks`
  const int32_t* clusters = nullptr;  // [H_kv][table.capacity] cluster indices, or null
  const int32_t* cluster_counts = nullptr;
  ClusterTable table;
  int max_entries = 0;  // per head, an upper bound: splits the work
};

// Optional outputs of a gather decode: the log-sum-exp of each query head's logits [H_q], and
// each entry's logit (scaled, biased) [H_kv][G][logit_head_stride / G], entries in list order.
struct GatherExtras {
  float* lse = nullptr;
  float* logits = nullptr;
  int64_t logit_head_stride = 0;  // >= G * max_entries
};

// Bytes of workspace a gather decode needs.
size_t GatherWorkspaceBytes(const PolicyDecodeShape& shape, const GatherEntries& entries, int num_sms);

// Exact attention of every query head over its KV head's entries, one softmax, reading keys and
// values through `kv` in either mode; out [H_q][D] bf16 with `out_head_stride`. scale 0 means
// 1 / sqrt(D).
cudaError_t LaunchGatherDecode(const QueryView& queries, const KvView& kv, const PolicyDecodeShape& shape,
                               const GatherEntries& entries, float scale, void* out, int64_t out_head_stride,
                               const GatherExtras& extras, void* workspace, int num_sms, cudaStream_t stream);

// PrHS: from a gather over whole blocks with `extras` (lse and logits), the attention mass of each
// block, the mean over the group of its positions' softmax weights; mass [H_kv][num_blocks],
// -1 for blocks not attended.
cudaError_t LaunchBlockMass(const GatherEntries& entries, const GatherExtras& extras, int num_kv_heads, int group,
                            int length, int num_blocks, float* mass, int64_t mass_head_stride, cudaStream_t stream);

}  // namespace cuda
}  // namespace lychee
