// The engine's one pool of KV pages: how large it is made, and the page arithmetic the scheduler
// plans with. Sequences take pages as they grow (Model::Prefill and Model::Decode take them for
// the positions they write) and give them back when destroyed, so a sequence that has written n
// positions holds PagesFor(n) pages. LibTorch stays in the .cc file.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lychee {

class KvPool;
class Model;

class KvCacheManager {
 public:
  // A pool of `kv_cache_fraction` (0 < F <= 1) of the device's free memory once the model is
  // loaded, or of `kv_cache_bytes` when the fraction is 0; pages of kDefaultPageSize positions. A
  // tensor-parallel rank's pages hold its own KV heads, so the bytes are each rank's.
  // INVALID_ARGUMENT for a fraction outside (0, 1], a fraction on the CPU, or a size that holds no
  // page; RESOURCE_EXHAUSTED when the memory cannot be allocated.
  static absl::StatusOr<std::unique_ptr<KvCacheManager>> Create(const Model& model, int64_t kv_cache_bytes,
                                                                double kv_cache_fraction);

  const std::shared_ptr<KvPool>& pool() const { return pool_; }
  int64_t page_size() const { return page_size_; }
  int64_t bytes_per_page() const { return bytes_per_page_; }
  int64_t num_pages() const { return num_pages_; }
  // Thread-safe, as the pool is.
  int64_t free_pages() const;
  int64_t used_pages() const { return num_pages_ - free_pages(); }
  int64_t PagesFor(int64_t tokens) const { return (tokens + page_size_ - 1) / page_size_; }

  // RESOURCE_EXHAUSTED, with the sizes, when a sequence of `tokens` positions needs more pages than
  // the whole pool has: it could never finish, however long it waited or whatever it preempted.
  absl::Status CheckFitsPool(int64_t tokens) const;

 private:
  KvCacheManager(std::shared_ptr<KvPool> pool, int64_t page_size, int64_t bytes_per_page, int64_t num_pages)
      : pool_(std::move(pool)), page_size_(page_size), bytes_per_page_(bytes_per_page), num_pages_(num_pages) {}

  const std::shared_ptr<KvPool> pool_;
  const int64_t page_size_;
  const int64_t bytes_per_page_;
  const int64_t num_pages_;
};

}  // namespace lychee
