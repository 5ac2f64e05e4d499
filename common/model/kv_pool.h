// The KV memory of a model as a pool of pages. Every layer keeps its keys and values in one tensor
// per kind, [num_kv_heads, num_pages, page_size, head_dim]; a sequence owns a page table (the
// pages holding its positions 0, page_size, 2 page_size, ...), takes pages as it grows and gives
// them back when it ends, so that sequences of any length share one fixed allocation. Page 0 is
// never handed out: the padding rows of a batched decode step write there.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/base/model_config.h"

namespace lychee {

// Positions per page unless a caller chooses otherwise: the hybrid selection's block size, so
// that a selected block is one page.
constexpr int64_t kDefaultPageSize = 64;

class KvPool {
 public:
  struct Options {
    int64_t page_size = kDefaultPageSize;  // a power of two, 16 to 1024
    int64_t num_pages = 16;                // pages that can be handed out (page 0 comes on top)
    // A growable pool doubles when it runs out (a single sequence's own pool); a fixed one refuses.
    bool growable = false;
  };

  // INVALID_ARGUMENT for a bad page size or count; RESOURCE_EXHAUSTED when the memory cannot be
  // allocated, with the sizes.
  static absl::StatusOr<std::shared_ptr<KvPool>> Create(const ModelConfig& config, at::TensorOptions tensor_options,
                                                        Options options);
  // Key and value bytes of one page across all layers.
  static int64_t BytesPerPage(const ModelConfig& config, at::ScalarType dtype, int64_t page_size);

  int64_t page_size() const { return page_size_; }
  int num_layers() const { return static_cast<int>(keys_.size()); }
  int64_t num_pages() const;
  int64_t free_pages() const;
  int64_t bytes_per_page() const { return bytes_per_page_; }
  // Increases whenever a growable pool moves to larger tensors: what was captured of the old ones
  // (pointers in CUDA graphs) is stale.
  int64_t generation() const;
  // Pages needed for `tokens` positions.
  int64_t PagesFor(int64_t tokens) const { return (tokens + page_size_ - 1) / page_size_; }

  // [num_kv_heads, 1 + num_pages, page_size, head_dim] of `layer`.
  const at::Tensor& keys(int layer) const { return keys_[layer]; }
  const at::Tensor& values(int layer) const { return values_[layer]; }

  // `count` pages, or RESOURCE_EXHAUSTED naming the counts (taking none) when a fixed pool has
  // fewer free.
  absl::StatusOr<std::vector<int32_t>> Allocate(int64_t count);
  void Free(absl::Span<const int32_t> pages);
  // Fault injection for tests, inert unless set: every Allocate asks `fault` first, and an error it
  // returns is Allocate's (taking no page), as a failed device allocation would be. Null clears it.
  void SetAllocationFault(std::function<absl::Status(int64_t count)> fault);

  // Writes keys and values [num_kv_heads, T, head_dim] of `layer` at positions [start, start + T)
  // of the sequence whose page table is `pages`.
  void Write(int layer, absl::Span<const int32_t> pages, int64_t start, const at::Tensor& keys,
             const at::Tensor& values);
  // Positions [0, length) of one sequence, read through its page table: [num_kv_heads, length,
  // head_dim] of `layer`'s keys (or values); a view when the pages are consecutive, else a copy.
  at::Tensor GatherKeys(int layer, absl::Span<const int32_t> pages, int64_t length) const;
  at::Tensor GatherValues(int layer, absl::Span<const int32_t> pages, int64_t length) const;
  // Positions [first, first + count) of one sequence, read through its page table: `layer`'s keys
  // and values [num_kv_heads, count, head_dim] (views when those positions lie in consecutive
  // pages, else copies of just the pages that hold them).
  std::pair<at::Tensor, at::Tensor> GatherRange(int layer, absl::Span<const int32_t> pages, int64_t first,
                                                int64_t count) const;
  // Copies positions [0, length) of `from` into the pages `to`.
  void Copy(absl::Span<const int32_t> from, absl::Span<const int32_t> to, int64_t length);

 private:
  KvPool(int64_t page_size, int64_t bytes_per_page) : page_size_(page_size), bytes_per_page_(bytes_per_page) {}
  absl::Status Grow(int64_t min_pages) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  at::Tensor Gather(const at::Tensor& pool, absl::Span<const int32_t> pages, int64_t length) const;

  const int64_t page_size_;
  const int64_t bytes_per_page_;
  bool growable_ = false;
  // Replaced only by Grow, which a growable pool's single owner calls from Allocate.
  std::vector<at::Tensor> keys_, values_;

  mutable absl::Mutex mutex_;
  std::vector<int32_t> free_ ABSL_GUARDED_BY(mutex_);  // a stack: the last freed page is reused first
  int64_t num_pages_ ABSL_GUARDED_BY(mutex_) = 0;
  int64_t generation_ ABSL_GUARDED_BY(mutex_) = 0;
  std::function<absl::Status(int64_t)> allocation_fault_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace lychee
