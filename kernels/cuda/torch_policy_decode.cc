#include "kernels/cuda/torch_policy_decode.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "common/model/cuda/cuda_check.h"
#include "kernels/cuda/torch_checks.h"

namespace lychee {
namespace cuda {
namespace {

cudaStream_t Stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()); }

int NumSms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

void CheckRows(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.defined() && t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  CheckVectorizable(t, name);
}

PolicyDecodeShape ShapeOf(const at::Tensor& queries, const at::Tensor& keys) {
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 3 && queries.size(1) == keys.size(2),
              "queries [H_q, D] and keys [H_kv, L, D] expected, got ", queries.sizes(), " and ", keys.sizes());
  PolicyDecodeShape shape;
  shape.num_q_heads = static_cast<int>(queries.size(0));
  shape.num_kv_heads = static_cast<int>(keys.size(0));
  shape.head_dim = static_cast<int>(queries.size(1));
  TORCH_CHECK(shape.head_dim == 64 || shape.head_dim == 128, "head_dim must be 64 or 128, got ", shape.head_dim);
  TORCH_CHECK(shape.num_q_heads % shape.num_kv_heads == 0 && shape.group() >= 1 && shape.group() <= 8, "num_q_heads ",
              shape.num_q_heads, " must be 1 to 8 times num_kv_heads ", shape.num_kv_heads);
  return shape;
}

QueryView QueriesOf(const at::Tensor& queries) {
  CheckRows(queries, "queries", at::kBFloat16);
  return {queries.data_ptr(), queries.stride(0)};
}

KvView KvOf(const at::Tensor& keys, const at::Tensor& values, int64_t length) {
  CheckRows(keys, "keys", at::kBFloat16);
  CheckRows(values, "values", at::kBFloat16);
  TORCH_CHECK(keys.dim() == 3 && values.dim() == 3 && values.size(0) == keys.size(0) && values.size(2) == keys.size(2),
              "keys and values [H_kv, L, D] expected, got ", keys.sizes(), " and ", values.sizes());
  TORCH_CHECK(values.device() == keys.device(), "values on ", values.device(), ", keys on ", keys.device());
  TORCH_CHECK(length >= 1 && length <= keys.size(1) && length <= values.size(1), "length ", length,
              " is outside the cache's 1..", std::min(keys.size(1), values.size(1)));
  return {keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
          static_cast<int>(length)};
}

// The layer's pool tensors [H_kv, pool pages, page size, D] and the sequence's page table.
KvView PagedKvOf(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& page_table, int64_t length) {
  CheckRows(keys, "pool keys", at::kBFloat16);
  CheckRows(values, "pool values", at::kBFloat16);
  TORCH_CHECK(keys.dim() == 4 && values.sizes() == keys.sizes(),
              "pool keys and values [H_kv, pages, page size, D] of one shape expected, got ", keys.sizes(), " and ",
              values.sizes());
  TORCH_CHECK(values.device() == keys.device(), "pool values on ", values.device(), ", keys on ", keys.device());
  const int64_t page_size = keys.size(2);
  TORCH_CHECK(page_size >= 1 && (page_size & (page_size - 1)) == 0,
              "the pool's page size must be a power of two, got ", page_size);
  TORCH_CHECK(page_table.defined() && page_table.is_cuda() && page_table.device() == keys.device() &&
                  page_table.scalar_type() == at::kInt && page_table.dim() == 1 && page_table.stride(0) == 1,
              "page table: a contiguous int32 row on ", keys.device(), " expected");
  TORCH_CHECK(length >= 1 && length <= std::numeric_limits<int32_t>::max(), "length ", length, " out of range");
  const int64_t pages = (length + page_size - 1) / page_size;
  TORCH_CHECK(page_table.size(0) >= pages, "the page table lists ", page_table.size(0), " pages, ", length,
              " positions need ", pages);
  KvView kv{keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(2), values.stride(0), values.stride(2),
            static_cast<int>(length)};
  kv.page_table = page_table.data_ptr<int32_t>();
  int log2 = 0;
  while ((int64_t{1} << log2) < page_size) ++log2;
  kv.log2_page_size = log2;
  kv.k_page_stride = keys.stride(1);
  kv.v_page_stride = values.stride(1);
  return kv;
}

KvView KvViewOf(const KvCache& kv) {
  return kv.paged() ? PagedKvOf(kv.keys, kv.values, kv.page_table, kv.length) : KvOf(kv.keys, kv.values, kv.length);
}

at::TensorOptions IntOptions(const at::Tensor& like) { return like.options().dtype(at::kInt); }
at::TensorOptions FloatOptions(const at::Tensor& like) { return like.options().dtype(at::kFloat); }

void CheckLists(const HeadLists& lists, int64_t num_kv_heads, const char* name) {
  TORCH_CHECK(lists.entries.defined() && lists.entries.is_cuda() && lists.entries.scalar_type() == at::kInt &&
                  lists.entries.dim() == 2 && lists.entries.size(0) == num_kv_heads && lists.entries.stride(1) == 1,
              name, ": int32 [", num_kv_heads, ", n] entries expected");
  TORCH_CHECK(lists.counts.defined() && lists.counts.is_cuda() && lists.counts.scalar_type() == at::kInt &&
                  lists.counts.numel() == num_kv_heads && lists.counts.is_contiguous(),
              name, ": int32 [", num_kv_heads, "] counts expected");
}

ClusterTable TableOf(const ClusterTensors& c, int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK(c.centroids.defined() && c.centroids.is_contiguous() && c.centroids.scalar_type() == at::kFloat &&
                  c.centroids.dim() == 3 && c.centroids.size(0) == num_kv_heads && c.centroids.size(2) == head_dim,
              "centroids: contiguous float32 [", num_kv_heads, ", C, ", head_dim, "] expected, got ",
              c.centroids.sizes());
  TORCH_CHECK(c.value_means.sizes() == c.centroids.sizes() && c.value_means.is_contiguous() &&
                  c.value_means.scalar_type() == at::kFloat,
              "value_means must match the centroids");
  TORCH_CHECK(c.log_sizes.is_contiguous() && c.log_sizes.scalar_type() == at::kFloat && c.log_sizes.dim() == 2 &&
                  c.log_sizes.size(0) == num_kv_heads && c.log_sizes.size(1) == c.centroids.size(1),
              "log_sizes: contiguous float32 [H_kv, C] expected");
  TORCH_CHECK(c.counts.is_contiguous() && c.counts.scalar_type() == at::kInt && c.counts.numel() == num_kv_heads,
              "cluster counts: int32 [H_kv] expected");
  TORCH_CHECK(c.centroids.size(1) >= 1 && c.centroids.size(1) <= kMaxClustersPerHead, "clusters per head: 1 to ",
              kMaxClustersPerHead, ", got ", c.centroids.size(1));
  ClusterTable table;
  table.centroids = c.centroids.data_ptr<float>();
  table.log_sizes = c.log_sizes.data_ptr<float>();
  table.value_means = c.value_means.data_ptr<float>();
  table.counts = c.counts.data_ptr<int32_t>();
  table.capacity = static_cast<int>(c.centroids.size(1));
  return table;
}

BlockMassSource SourceOf(const at::Tensor& mass, int64_t num_kv_heads, const char* name) {
  if (!mass.defined()) return {};
  TORCH_CHECK(mass.is_cuda() && mass.scalar_type() == at::kFloat && mass.dim() == 2 && mass.size(0) == num_kv_heads &&
                  mass.stride(1) == 1,
              name, ": float32 [", num_kv_heads, ", blocks] expected");
  return {mass.data_ptr<float>(), mass.stride(0), static_cast<int>(mass.size(1))};
}

}  // namespace

void QuestPageBounds(const KvCache& cache, int64_t quest_page_size, int64_t first_page, at::Tensor& bounds) {
  TORCH_CHECK(cache.keys.defined() && (cache.keys.dim() == 3 || cache.keys.dim() == 4),
              "keys: [H_kv, L, D] or a pool's [H_kv, pages, page size, D] expected");
  const c10::cuda::CUDAGuard guard(cache.keys.device());
  // Only keys are read: the view's values are the keys too.
  const KvView kv = cache.paged() ? PagedKvOf(cache.keys, cache.keys, cache.page_table, cache.length)
                                  : KvOf(cache.keys, cache.keys, cache.length);
  TORCH_CHECK(quest_page_size >= 1, "the Quest page size must be positive");
  const int64_t num_pages = (cache.length + quest_page_size - 1) / quest_page_size;
  TORCH_CHECK(first_page >= 0, "first Quest page ", first_page);
  TORCH_CHECK(bounds.defined() && bounds.is_contiguous() && bounds.scalar_type() == at::kBFloat16 &&
                  bounds.device() == cache.keys.device() && bounds.dim() == 4 &&
                  bounds.size(0) == cache.num_kv_heads() && bounds.size(1) >= num_pages && bounds.size(2) == 2 &&
                  bounds.size(3) == cache.head_dim(),
              "bounds: contiguous bf16 [H_kv, >= ", num_pages, ", 2, D] expected, got ", bounds.sizes());
  PolicyDecodeShape shape;
  shape.num_q_heads = shape.num_kv_heads = static_cast<int>(cache.num_kv_heads());
  shape.head_dim = static_cast<int>(cache.head_dim());
  LYCHEE_CUDA_CHECK(
      LaunchQuestPageBounds(kv, shape, static_cast<int>(quest_page_size), static_cast<int>(first_page),
                            static_cast<int>(num_pages), bounds.data_ptr(), bounds.stride(0), Stream(cache.keys)),
      "Quest page bounds");
}

void QuestPageBounds(const at::Tensor& keys, int64_t length, int64_t quest_page_size, int64_t first_page,
                     at::Tensor& bounds) {
  QuestPageBounds(KvCache::Contiguous(keys, keys, length), quest_page_size, first_page, bounds);
}

at::Tensor QuestPageScores(const at::Tensor& queries, const at::Tensor& bounds, int64_t num_pages) {
  const c10::cuda::CUDAGuard guard(queries.device());
  TORCH_CHECK(bounds.dim() == 4 && bounds.is_contiguous() && bounds.size(1) >= num_pages, "bounds too small");
  const PolicyDecodeShape shape = ShapeOf(queries, bounds.select(2, 0));
  at::Tensor scores = at::empty({shape.num_kv_heads, num_pages}, FloatOptions(queries));
  LYCHEE_CUDA_CHECK(
      LaunchQuestPageScores(QueriesOf(queries), shape, bounds.data_ptr(), bounds.stride(0), static_cast<int>(num_pages),
                            scores.data_ptr<float>(), scores.stride(0), Stream(queries)),
      "Quest page scores");
  return scores;
}

HeadLists SelectBlocks(const at::Tensor& scores, int64_t length, const BlockSelectionConfig& config) {
  const c10::cuda::CUDAGuard guard(scores.device());
  TORCH_CHECK(scores.is_cuda() && scores.scalar_type() == at::kFloat && scores.dim() == 2 && scores.stride(1) == 1,
              "scores: float32 [H_kv, blocks] expected");
  const int64_t num_blocks = (length + config.block_size - 1) / config.block_size;
  TORCH_CHECK(scores.size(1) >= num_blocks, "scores has ", scores.size(1), " blocks, the cache ", num_blocks);
  HeadLists selection{at::empty({scores.size(0), std::max(1, config.budget_blocks())}, IntOptions(scores)),
                      at::empty({scores.size(0)}, IntOptions(scores))};
  LYCHEE_CUDA_CHECK(
      LaunchHeadBlockSelect(scores.data_ptr<float>(), scores.stride(0), static_cast<int>(length), config,
                            static_cast<int>(scores.size(0)), selection.entries.data_ptr<int32_t>(),
                            selection.entries.stride(0), selection.counts.data_ptr<int32_t>(), Stream(scores)),
      "block selection");
  return selection;
}

at::Tensor PrhsPriority(const at::Tensor& previous_step, const at::Tensor& previous_layer, int64_t num_blocks,
                        int64_t enlargement, int64_t num_kv_heads, at::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor priority = at::empty({num_kv_heads, num_blocks}, at::TensorOptions().dtype(at::kFloat).device(device));
  LYCHEE_CUDA_CHECK(
      LaunchPrhsPriority(SourceOf(previous_step, num_kv_heads, "previous step's mass"),
                         SourceOf(previous_layer, num_kv_heads, "previous layer's mass"), static_cast<int>(num_blocks),
                         static_cast<int>(std::min<int64_t>(enlargement, num_blocks)), static_cast<int>(num_kv_heads),
                         priority.data_ptr<float>(), priority.stride(0),
                         c10::cuda::getCurrentCUDAStream(device.index())),
      "PrHS priority");
  return priority;
}

void DropUnproposedBlocks(HeadLists& blocks, const at::Tensor& priority, int64_t length,
                          const BlockSelectionConfig& config) {
  const c10::cuda::CUDAGuard guard(priority.device());
  CheckLists(blocks, priority.size(0), "blocks");
  LYCHEE_CUDA_CHECK(
      LaunchDropUnproposedBlocks(priority.data_ptr<float>(), priority.stride(0), static_cast<int>(length), config,
                                 static_cast<int>(priority.size(0)), blocks.entries.data_ptr<int32_t>(),
                                 blocks.entries.stride(0), blocks.counts.data_ptr<int32_t>(), Stream(priority)),
      "PrHS block filter");
}

ClusterClasses DoublePClassify(const at::Tensor& queries, const ClusterTensors& clusters, double scale, double p1,
                               double p2) {
  const c10::cuda::CUDAGuard guard(queries.device());
  const PolicyDecodeShape shape = ShapeOf(queries, clusters.centroids);
  const ClusterTable table = TableOf(clusters, shape.num_kv_heads, shape.head_dim);
  ClusterClasses classes;
  classes.exact = at::empty({shape.num_kv_heads, table.capacity}, queries.options().dtype(at::kByte));
  classes.approximated = {at::empty({shape.num_kv_heads, table.capacity}, IntOptions(queries)),
                          at::empty({shape.num_kv_heads}, IntOptions(queries))};
  LYCHEE_CUDA_CHECK(
      LaunchDoublePClassify(QueriesOf(queries), shape, table, static_cast<float>(scale), p1, p2,
                            classes.exact.data_ptr<uint8_t>(), classes.approximated.entries.data_ptr<int32_t>(),
                            classes.approximated.counts.data_ptr<int32_t>(), Stream(queries)),
      "Double-P cluster classification");
  return classes;
}

HeadLists DoublePExactPositions(const at::Tensor& assignment, const at::Tensor& exact, int64_t first, int64_t end,
                                int64_t length) {
  const c10::cuda::CUDAGuard guard(exact.device());
  const int64_t num_kv_heads = exact.size(0);
  TORCH_CHECK(exact.is_contiguous() && exact.scalar_type() == at::kByte && exact.dim() == 2, "exact: uint8 [H_kv, C]");
  TORCH_CHECK(end >= first && end <= length, "clusters [", first, ", ", end, ") outside the cache of ", length);
  if (end > first) {
    TORCH_CHECK(assignment.scalar_type() == at::kInt && assignment.dim() == 2 && assignment.size(0) == num_kv_heads &&
                    assignment.size(1) == end - first && assignment.stride(1) == 1,
                "assignment: int32 [", num_kv_heads, ", ", end - first, "] expected");
  }
  HeadLists positions{at::empty({num_kv_heads, length}, IntOptions(exact)), at::empty({num_kv_heads}, IntOptions(exact))};
  LYCHEE_CUDA_CHECK(
      LaunchDoublePExactPositions(
          end > first ? assignment.data_ptr<int32_t>() : nullptr, end > first ? assignment.stride(0) : 0,
          exact.data_ptr<uint8_t>(), static_cast<int>(exact.size(1)), static_cast<int>(first), static_cast<int>(end),
          static_cast<int>(length), static_cast<int>(num_kv_heads), positions.entries.data_ptr<int32_t>(),
          positions.entries.stride(0), positions.counts.data_ptr<int32_t>(), Stream(exact)),
      "Double-P exact positions");
  return positions;
}

GatherOutput GatherDecode(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values, int64_t length,
                          const GatherInput& input, double scale) {
  return GatherDecode(queries, KvCache::Contiguous(keys, values, length), input, scale);
}

GatherOutput GatherDecode(const at::Tensor& queries, const KvCache& cache, const GatherInput& input, double scale) {
  const c10::cuda::CUDAGuard guard(queries.device());
  TORCH_CHECK(cache.keys.defined() && (cache.keys.dim() == 3 || cache.keys.dim() == 4),
              "keys: [H_kv, L, D] or a pool's [H_kv, pages, page size, D] expected");
  TORCH_CHECK(cache.keys.device() == queries.device(), "the cache is on ", cache.keys.device(), ", the queries on ",
              queries.device());
  // [H_kv, ., D] in either mode: a pool's page dimension aside.
  const PolicyDecodeShape shape = ShapeOf(queries, cache.keys.dim() == 4 ? cache.keys.select(1, 0) : cache.keys);
  const KvView kv = KvViewOf(cache);
  TORCH_CHECK(input.tokens != nullptr && input.max_entries >= 1, "a gather needs its token lists");
  CheckLists(*input.tokens, shape.num_kv_heads, "tokens");
  GatherEntries entries;
  if (input.block_size > 0) {
    entries.blocks = input.tokens->entries.data_ptr<int32_t>();
  } else {
    entries.positions = input.tokens->entries.data_ptr<int32_t>();
  }
  entries.head_stride = input.tokens->entries.stride(0);
  entries.counts = input.tokens->counts.data_ptr<int32_t>();
  entries.block_size = static_cast<int>(input.block_size);
  entries.max_entries = static_cast<int>(input.max_entries);
  if (input.clusters != nullptr) {
    TORCH_CHECK(input.approximated != nullptr, "clusters without the list of approximated ones");
    entries.table = TableOf(*input.clusters, shape.num_kv_heads, shape.head_dim);
    CheckLists(*input.approximated, shape.num_kv_heads, "approximated clusters");
    TORCH_CHECK(input.approximated->entries.size(1) == entries.table.capacity &&
                    input.approximated->entries.stride(0) == entries.table.capacity,
                "the approximated clusters' rows must be the table's");
    entries.clusters = input.approximated->entries.data_ptr<int32_t>();
    entries.cluster_counts = input.approximated->counts.data_ptr<int32_t>();
    entries.max_entries += entries.table.capacity;
  }
  GatherOutput output;
  if (input.out.defined()) {
    CheckRows(input.out, "out", at::kBFloat16);
    TORCH_CHECK(input.out.device() == queries.device() && input.out.dim() == 2 &&
                    input.out.size(0) == shape.num_q_heads && input.out.size(1) == shape.head_dim,
                "out: bf16 [", shape.num_q_heads, ", ", shape.head_dim, "] on ", queries.device(), " expected, got ",
                input.out.sizes());
    output.out = input.out;
  } else {
    output.out = at::empty({shape.num_q_heads, shape.head_dim}, queries.options());
  }
  GatherExtras extras;
  if (input.keep_logits) {
    output.lse = at::empty({shape.num_q_heads}, FloatOptions(queries));
    output.logits = at::empty({shape.num_kv_heads, static_cast<int64_t>(shape.group()) * entries.max_entries},
                              FloatOptions(queries));
    extras = {output.lse.data_ptr<float>(), output.logits.data_ptr<float>(), output.logits.stride(0)};
  }
  const int num_sms = NumSms();
  at::Tensor workspace = at::empty({static_cast<int64_t>(GatherWorkspaceBytes(shape, entries, num_sms))},
                                   queries.options().dtype(at::kByte));
  LYCHEE_CUDA_CHECK(
      LaunchGatherDecode(QueriesOf(queries), kv, shape, entries, static_cast<float>(scale), output.out.data_ptr(),
                         output.out.stride(0), extras, workspace.data_ptr(), num_sms, Stream(queries)),
      "gather decode");
  return output;
}

at::Tensor BlockMass(const GatherInput& input, const GatherOutput& gathered, int64_t group, int64_t length,
                     int64_t num_blocks) {
  TORCH_CHECK(input.tokens != nullptr && input.block_size > 0 && input.clusters == nullptr && input.keep_logits &&
                  gathered.logits.defined(),
              "block masses need a gather over whole blocks that kept its logits");
  const c10::cuda::CUDAGuard guard(gathered.logits.device());
  const int64_t num_kv_heads = gathered.logits.size(0);
  GatherEntries entries;
  entries.blocks = input.tokens->entries.data_ptr<int32_t>();
  entries.head_stride = input.tokens->entries.stride(0);
  entries.counts = input.tokens->counts.data_ptr<int32_t>();
  entries.block_size = static_cast<int>(input.block_size);
  entries.max_entries = static_cast<int>(input.max_entries);
  const GatherExtras extras{gathered.lse.data_ptr<float>(), gathered.logits.data_ptr<float>(),
                            gathered.logits.stride(0)};
  at::Tensor mass = at::empty({num_kv_heads, num_blocks}, FloatOptions(gathered.logits));
  LYCHEE_CUDA_CHECK(LaunchBlockMass(entries, extras, static_cast<int>(num_kv_heads), static_cast<int>(group),
                                    static_cast<int>(length), static_cast<int>(num_blocks), mass.data_ptr<float>(),
                                    mass.stride(0), Stream(mass)),
                    "block mass");
  return mass;
}

}  // namespace cuda
}  // namespace lychee
