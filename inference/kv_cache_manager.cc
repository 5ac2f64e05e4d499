#include "inference/kv_cache_manager.h"

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/model/cuda_support.h"
#include "common/model/kv_pool.h"
#include "common/model/model.h"

namespace lychee {

absl::StatusOr<std::unique_ptr<KvCacheManager>> KvCacheManager::Create(const Model& model, int64_t kv_cache_bytes,
                                                                       double kv_cache_fraction) {
  const int64_t page_size = kDefaultPageSize;
  const int64_t bytes_per_page = KvPool::BytesPerPage(model.shard_config(), model.options().dtype, page_size);
  int64_t bytes = kv_cache_bytes;
  std::string sized_by = absl::StrCat("--kv-cache-mib (", kv_cache_bytes, " bytes)");
  if (kv_cache_fraction != 0) {
    if (!(kv_cache_fraction > 0 && kv_cache_fraction <= 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("the KV cache fraction must be in (0, 1], got ", kv_cache_fraction));
    }
    if (!model.options().device.is_cuda()) {
      return absl::InvalidArgumentError(
          "--kv-cache-fraction sizes the KV cache from a CUDA device's free memory; on the CPU give --kv-cache-mib");
    }
    LYCHEE_ASSIGN_OR_RETURN(const int64_t free_bytes, FreeCudaMemoryBytes());
    bytes = static_cast<int64_t>(kv_cache_fraction * static_cast<double>(free_bytes));
    sized_by = absl::StrCat("--kv-cache-fraction ", kv_cache_fraction, " of ", free_bytes, " free bytes");
  }
  const int64_t num_pages = bytes / bytes_per_page;
  if (num_pages < 1) {
    return absl::InvalidArgumentError(absl::StrCat("the KV cache sized by ", sized_by, " holds no page of ", page_size,
                                                   " positions (", bytes_per_page, " bytes)"));
  }
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<KvPool> pool, model.NewKvPool(num_pages, page_size));
  return std::unique_ptr<KvCacheManager>(new KvCacheManager(std::move(pool), page_size, bytes_per_page, num_pages));
}

int64_t KvCacheManager::free_pages() const { return pool_->free_pages(); }

absl::Status KvCacheManager::CheckFitsPool(int64_t tokens) const {
  const int64_t pages = PagesFor(tokens);
  if (pages <= num_pages_) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(pages, " pages of ", page_size_, " positions (",
                                                   pages * bytes_per_page_,
                                                   " bytes), more than the server's whole KV cache of ", num_pages_,
                                                   " pages (", num_pages_ * bytes_per_page_, " bytes)"));
}

}  // namespace lychee
