#include "common/model/kv_pool.h"

#include <c10/util/Exception.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"

namespace lychee {
namespace {

bool IsPowerOfTwo(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

// Whether `pages` are p, p + 1, p + 2, ...: the sequence's positions are then one strided view.
bool Consecutive(absl::Span<const int32_t> pages) {
  for (size_t i = 1; i < pages.size(); ++i) {
    if (pages[i] != pages[0] + static_cast<int32_t>(i)) return false;
  }
  return true;
}

at::Tensor PageIndex(absl::Span<const int32_t> pages, at::Device device) {
  return at::tensor(std::vector<int64_t>(pages.begin(), pages.end()), at::kLong).to(device);
}

}  // namespace

int64_t KvPool::BytesPerPage(const ModelConfig& config, at::ScalarType dtype, int64_t page_size) {
  return 2 * config.num_layers * config.num_kv_heads * page_size * config.head_dim *
         static_cast<int64_t>(at::elementSize(dtype));
}

absl::StatusOr<std::shared_ptr<KvPool>> KvPool::Create(const ModelConfig& config, at::TensorOptions tensor_options,
                                                       Options options) {
  if (!IsPowerOfTwo(options.page_size) || options.page_size < 16 || options.page_size > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("the KV page size must be a power of two from 16 to 1024 positions, got ", options.page_size));
  }
  if (options.num_pages < 1) {
    return absl::InvalidArgumentError(absl::StrCat("a KV pool needs at least one page, got ", options.num_pages));
  }
  const int64_t bytes_per_page =
      BytesPerPage(config, c10::typeMetaToScalarType(tensor_options.dtype()), options.page_size);
  std::shared_ptr<KvPool> pool(new KvPool(options.page_size, bytes_per_page));
  pool->growable_ = options.growable;
  pool->keys_.resize(config.num_layers);
  pool->values_.resize(config.num_layers);
  try {
    for (int64_t layer = 0; layer < config.num_layers; ++layer) {
      for (at::Tensor* tensor : {&pool->keys_[layer], &pool->values_[layer]}) {
        *tensor = at::empty({config.num_kv_heads, 1 + options.num_pages, options.page_size, config.head_dim},
                            tensor_options);
      }
    }
  } catch (const c10::Error& error) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate a KV pool of ", options.num_pages, " pages (",
                                                     options.num_pages * bytes_per_page, " bytes) on ",
                                                     tensor_options.device().str(), ": ",
                                                     error.what_without_backtrace()));
  }
  absl::MutexLock lock(&pool->mutex_);
  pool->num_pages_ = options.num_pages;
  for (int64_t page = options.num_pages; page >= 1; --page) pool->free_.push_back(static_cast<int32_t>(page));
  return pool;
}

int64_t KvPool::num_pages() const {
  absl::MutexLock lock(&mutex_);
  return num_pages_;
}

int64_t KvPool::free_pages() const {
  absl::MutexLock lock(&mutex_);
  return static_cast<int64_t>(free_.size());
}

int64_t KvPool::generation() const {
  absl::MutexLock lock(&mutex_);
  return generation_;
}

absl::StatusOr<std::vector<int32_t>> KvPool::Allocate(int64_t count) {
  absl::MutexLock lock(&mutex_);
  if (allocation_fault_) LYCHEE_RETURN_IF_ERROR(allocation_fault_(count));
  if (count > static_cast<int64_t>(free_.size())) {
    if (!growable_) {
      return absl::ResourceExhaustedError(absl::StrCat("the KV pool has ", free_.size(), " free pages of ", num_pages_,
                                                       " (", page_size_, " positions each); ", count, " are needed"));
    }
    if (absl::Status grown = Grow(num_pages_ + count - static_cast<int64_t>(free_.size())); !grown.ok()) return grown;
  }
  std::vector<int32_t> pages(free_.end() - count, free_.end());
  std::reverse(pages.begin(), pages.end());
  free_.resize(free_.size() - count);
  return pages;
}

void KvPool::SetAllocationFault(std::function<absl::Status(int64_t count)> fault) {
  absl::MutexLock lock(&mutex_);
  allocation_fault_ = std::move(fault);
}

void KvPool::Free(absl::Span<const int32_t> pages) {
  absl::MutexLock lock(&mutex_);
  // Pushed in reverse, so that the next Allocate hands them out in their old order.
  for (auto it = pages.rbegin(); it != pages.rend(); ++it) free_.push_back(*it);
}

absl::Status KvPool::Grow(int64_t min_pages) {
  const int64_t pages = std::max(min_pages, 2 * num_pages_);
  try {
    for (std::vector<at::Tensor>* kind : {&keys_, &values_}) {
      for (at::Tensor& tensor : *kind) {
        at::Tensor grown = at::empty({tensor.size(0), 1 + pages, tensor.size(2), tensor.size(3)}, tensor.options());
        grown.narrow(1, 0, 1 + num_pages_).copy_(tensor);
        tensor = std::move(grown);
      }
    }
  } catch (const c10::Error& error) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot grow the KV pool to ", pages, " pages: ",
                                                     error.what_without_backtrace()));
  }
  // Under the free ones, descending, so that the lowest new page is handed out first after them.
  std::vector<int32_t> free;
  for (int64_t page = pages; page > num_pages_; --page) free.push_back(static_cast<int32_t>(page));
  free.insert(free.end(), free_.begin(), free_.end());
  free_ = std::move(free);
  num_pages_ = pages;
  ++generation_;
  return absl::OkStatus();
}

void KvPool::Write(int layer, absl::Span<const int32_t> pages, int64_t start, const at::Tensor& keys,
                   const at::Tensor& values) {
  const int64_t count = keys.size(1);
  const int64_t first_page = start / page_size_;
  const int64_t end_page = PagesFor(start + count);
  const absl::Span<const int32_t> touched = pages.subspan(first_page, end_page - first_page);
  if (Consecutive(touched)) {
    // One copy into the run of pages seen as one stretch of positions.
    const int64_t offset = start - first_page * page_size_;
    for (auto [pool, source] : {std::pair{&keys_[layer], &keys}, std::pair{&values_[layer], &values}}) {
      pool->narrow(1, touched[0], touched.size())
          .view({pool->size(0), static_cast<int64_t>(touched.size()) * page_size_, pool->size(3)})
          .narrow(1, offset, count)
          .copy_(*source);
    }
    return;
  }
  for (int64_t done = 0; done < count;) {
    const int64_t position = start + done;
    const int64_t page = pages[position / page_size_];
    const int64_t offset = position % page_size_;
    const int64_t n = std::min(count - done, page_size_ - offset);
    keys_[layer].select(1, page).narrow(1, offset, n).copy_(keys.narrow(1, done, n));
    values_[layer].select(1, page).narrow(1, offset, n).copy_(values.narrow(1, done, n));
    done += n;
  }
}

at::Tensor KvPool::Gather(const at::Tensor& pool, absl::Span<const int32_t> pages, int64_t length) const {
  const int64_t used = PagesFor(length);
  const absl::Span<const int32_t> table = pages.subspan(0, used);
  const int64_t heads = pool.size(0), dim = pool.size(3);
  at::Tensor paged = Consecutive(table) ? pool.narrow(1, table[0], used)
                                        : pool.index_select(1, PageIndex(table, pool.device()));
  return paged.reshape({heads, used * page_size_, dim}).narrow(1, 0, length);
}

at::Tensor KvPool::GatherKeys(int layer, absl::Span<const int32_t> pages, int64_t length) const {
  return Gather(keys_[layer], pages, length);
}

at::Tensor KvPool::GatherValues(int layer, absl::Span<const int32_t> pages, int64_t length) const {
  return Gather(values_[layer], pages, length);
}

std::pair<at::Tensor, at::Tensor> KvPool::GatherRange(int layer, absl::Span<const int32_t> pages, int64_t first,
                                                      int64_t count) const {
  const at::Tensor& keys = keys_[layer];
  if (count <= 0) {
    const at::Tensor none = at::empty({keys.size(0), 0, keys.size(3)}, keys.options());
    return {none, none};
  }
  // The pages from the one holding `first` on, read as a sequence of its own from that page's start.
  const absl::Span<const int32_t> from = pages.subspan(first / page_size_);
  const int64_t offset = first % page_size_;
  return {Gather(keys, from, offset + count).narrow(1, offset, count),
          Gather(values_[layer], from, offset + count).narrow(1, offset, count)};
}

void KvPool::Copy(absl::Span<const int32_t> from, absl::Span<const int32_t> to, int64_t length) {
  const int64_t used = PagesFor(length);
  if (used == 0) return;
  const at::Device device = keys_[0].device();
  const at::Tensor source = PageIndex(from.subspan(0, used), device);
  const at::Tensor target = PageIndex(to.subspan(0, used), device);
  for (std::vector<at::Tensor>* kind : {&keys_, &values_}) {
    for (at::Tensor& tensor : *kind) tensor.index_copy_(1, target, tensor.index_select(1, source));
  }
}

}  // namespace lychee
