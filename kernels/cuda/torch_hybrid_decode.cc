#include "kernels/cuda/torch_hybrid_decode.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

#include "common/model/cuda/cuda_check.h"
#include "kernels/cuda/torch_checks.h"

namespace lychee {
namespace cuda {
namespace {

bool SameSelection(const BlockSelectionConfig& a, const BlockSelectionConfig& b) {
  return a.block_size == b.block_size && a.token_budget == b.token_budget && a.sink_tokens == b.sink_tokens &&
         a.recent_tokens == b.recent_tokens;
}

size_t Align16(size_t x) { return (x + 15) & ~size_t{15}; }

}  // namespace

HybridSelectionState::HybridSelectionState(int64_t batch, int64_t num_kv_heads, const BlockSelectionConfig& selection,
                                           at::Device device)
    : batch_(batch), num_kv_heads_(num_kv_heads), selection_(selection), has_selection_(num_kv_heads, 0) {
  TORCH_CHECK(batch >= 1 && num_kv_heads >= 1, "HybridSelectionState: batch and num_kv_heads must be positive");
  TORCH_CHECK(selection.block_size > 0 && selection.budget_blocks() >= 1,
              "HybridSelectionState: the budget must hold at least one block");
  TORCH_CHECK(device.is_cuda(), "HybridSelectionState: the device must be CUDA, got ", device);
  const auto options = at::TensorOptions().dtype(at::kInt).device(device);
  indices_ = at::zeros({batch, num_kv_heads, selection.budget_blocks()}, options);
  counts_ = at::zeros({batch, num_kv_heads}, options);
}

void HybridSelectionState::BeginStep() { std::fill(has_selection_.begin(), has_selection_.end(), 0); }

class HybridDecodeRunner {
 public:
  // Exactly one of (key_cache, value_cache) defined, or the per-sequence lists non-empty.
  static at::Tensor Run(const at::Tensor& queries, const at::Tensor* key_cache, const at::Tensor* value_cache,
                        const std::vector<at::Tensor>* key_caches, const std::vector<at::Tensor>* value_caches,
                        const std::vector<int64_t>& lengths, const std::vector<KvHeadMode>& modes,
                        HybridSelectionState* state, const HybridDecodeOptions& options) {
    TORCH_CHECK(queries.defined() && queries.is_cuda(), "queries must be a CUDA tensor");
    TORCH_CHECK(queries.scalar_type() == at::kBFloat16, "queries must be bfloat16, got ", queries.scalar_type());
    TORCH_CHECK(queries.dim() == 3, "queries must be [batch, num_q_heads, head_dim], got ", queries.sizes());
    CheckVectorizable(queries, "queries");
    const int64_t batch = queries.size(0), num_q_heads = queries.size(1), head_dim = queries.size(2);
    TORCH_CHECK(head_dim == 64 || head_dim == 128, "head_dim must be 64 or 128, got ", head_dim);
    TORCH_CHECK(static_cast<int64_t>(lengths.size()) == batch, "lengths has ", lengths.size(), " entries for a batch of ",
                batch);
    const at::Device device = queries.device();
    const c10::cuda::CUDAGuard guard(device);

    HybridDecodeArgs args;
    int64_t num_kv_heads = 0;
    std::vector<const void*> k_ptrs, v_ptrs;
    std::vector<int64_t> k_head_strides, v_head_strides;
    bool per_sequence_strides = false;
    auto check_cache = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK(t.defined() && t.device() == device, name, " must be on ", device);
      TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16, got ", t.scalar_type());
      CheckVectorizable(t, name);
    };
    if (key_cache != nullptr) {
      const at::Tensor& k = *key_cache;
      const at::Tensor& v = *value_cache;
      check_cache(k, "key_cache");
      check_cache(v, "value_cache");
      TORCH_CHECK(k.dim() == 4 && k.size(0) == batch && k.size(3) == head_dim,
                  "key_cache must be [batch, num_kv_heads, capacity, head_dim], got ", k.sizes());
      TORCH_CHECK(v.sizes() == k.sizes(), "value_cache ", v.sizes(), " must match key_cache ", k.sizes());
      num_kv_heads = k.size(1);
      for (int64_t b = 0; b < batch; ++b) {
        TORCH_CHECK(lengths[b] >= 1 && lengths[b] <= k.size(2), "length ", lengths[b], " of sequence ", b,
                    " is outside the cache's 1..", k.size(2));
      }
      args.k = k.data_ptr();
      args.v = v.data_ptr();
      args.k_batch_stride = k.stride(0), args.k_head_stride = k.stride(1), args.k_token_stride = k.stride(2);
      args.v_batch_stride = v.stride(0), args.v_head_stride = v.stride(1), args.v_token_stride = v.stride(2);
    } else {
      TORCH_CHECK(static_cast<int64_t>(key_caches->size()) == batch &&
                      static_cast<int64_t>(value_caches->size()) == batch,
                  "need one key and one value cache per sequence, got ", key_caches->size(), " and ",
                  value_caches->size(), " for a batch of ", batch);
      for (int64_t b = 0; b < batch; ++b) {
        const at::Tensor& k = (*key_caches)[b];
        const at::Tensor& v = (*value_caches)[b];
        check_cache(k, "key_caches[b]");
        check_cache(v, "value_caches[b]");
        TORCH_CHECK(k.dim() == 3 && k.size(2) == head_dim,
                    "key_caches[b] must be [num_kv_heads, capacity, head_dim], got ", k.sizes());
        TORCH_CHECK(v.dim() == 3 && v.size(0) == k.size(0) && v.size(2) == head_dim, "value_caches[b] ", v.sizes(),
                    " must match key_caches[b] ", k.sizes());
        if (b == 0) {
          num_kv_heads = k.size(0);
          args.k_head_stride = k.stride(0), args.k_token_stride = k.stride(1);
          args.v_head_stride = v.stride(0), args.v_token_stride = v.stride(1);
        }
        TORCH_CHECK(k.size(0) == num_kv_heads, "every cache must have ", num_kv_heads, " KV heads");
        TORCH_CHECK(lengths[b] >= 1 && lengths[b] <= k.size(1) && lengths[b] <= v.size(1), "length ", lengths[b],
                    " of sequence ", b, " is outside its cache's 1..", std::min(k.size(1), v.size(1)));
        TORCH_CHECK(k.stride(1) == args.k_token_stride && v.stride(1) == args.v_token_stride,
                    "every sequence's cache must have the same token stride");
        per_sequence_strides |= k.stride(0) != args.k_head_stride || v.stride(0) != args.v_head_stride;
        k_ptrs.push_back(k.data_ptr());
        v_ptrs.push_back(v.data_ptr());
        k_head_strides.push_back(k.stride(0));
        v_head_strides.push_back(v.stride(0));
      }
    }
    TORCH_CHECK(num_kv_heads >= 1 && num_q_heads % num_kv_heads == 0 && num_q_heads / num_kv_heads <= 8,
                "num_q_heads ", num_q_heads, " must be 1 to 8 times num_kv_heads ", num_kv_heads);
    TORCH_CHECK(static_cast<int64_t>(modes.size()) == num_kv_heads, "modes has ", modes.size(), " entries for ",
                num_kv_heads, " KV heads");
    std::unique_ptr<bool[]> has_selection(new bool[num_kv_heads]);
    for (int64_t h = 0; h < num_kv_heads; ++h) has_selection[h] = state != nullptr && state->has_selection(h);
    const bool needs_state =
        std::any_of(modes.begin(), modes.end(), [](KvHeadMode m) { return m != KvHeadMode::kDense; });
    if (needs_state) {
      TORCH_CHECK(state != nullptr, "retrieval and sparse heads need a HybridSelectionState");
      TORCH_CHECK(state->batch() == batch && state->num_kv_heads() == num_kv_heads, "the selection state is for ",
                  state->batch(), " sequences of ", state->num_kv_heads(), " KV heads, not ", batch, " of ",
                  num_kv_heads);
      TORCH_CHECK(SameSelection(state->selection(), options.selection),
                  "the options' selection parameters differ from the state's");
      TORCH_CHECK(state->indices().device() == device, "the selection state is on ", state->indices().device(),
                  ", the queries on ", device);
    }

    HybridDecodeShape shape;
    shape.batch = static_cast<int>(batch);
    shape.num_q_heads = static_cast<int>(num_q_heads);
    shape.num_kv_heads = static_cast<int>(num_kv_heads);
    shape.head_dim = static_cast<int>(head_dim);
    const int group = shape.num_q_heads / shape.num_kv_heads;
    PlanOptions plan_options;
    plan_options.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int occupancy = HybridDecodeMaxCtasPerSm(shape.head_dim, group);
    plan_options.ctas_per_sm = std::max(1, occupancy > 0 ? std::min(options.ctas_per_sm, occupancy) : options.ctas_per_sm);
    HybridPlan plan;
    const std::string error = PlanHybridDecode(shape, options.selection, lengths.data(), modes.data(),
                                               has_selection.get(), plan_options, &plan);
    TORCH_CHECK(error.empty(), "hybrid decode: ", error);

    // One pinned staging buffer, one asynchronous copy: pointer arrays, head strides, plan.
    const size_t ptr_bytes = k_ptrs.empty() ? 0 : Align16(batch * sizeof(void*));
    const size_t stride_bytes = per_sequence_strides ? Align16(batch * sizeof(int64_t)) : 0;
    const size_t plan_at = 2 * ptr_bytes + 2 * stride_bytes;
    const size_t staging_bytes = plan_at + plan.plan_bytes();
    at::Tensor staging = at::empty({static_cast<int64_t>(staging_bytes)},
                                   at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    uint8_t* host = staging.data_ptr<uint8_t>();
    if (ptr_bytes > 0) {
      std::memcpy(host, k_ptrs.data(), batch * sizeof(void*));
      std::memcpy(host + ptr_bytes, v_ptrs.data(), batch * sizeof(void*));
    }
    if (stride_bytes > 0) {
      std::memcpy(host + 2 * ptr_bytes, k_head_strides.data(), batch * sizeof(int64_t));
      std::memcpy(host + 2 * ptr_bytes + stride_bytes, v_head_strides.data(), batch * sizeof(int64_t));
    }
    std::memcpy(host + plan_at, plan.words.data(), plan.plan_bytes());
    const at::Tensor staged = staging.to(at::TensorOptions().device(device), /*non_blocking=*/true);
    const uint8_t* dev = staged.data_ptr<uint8_t>();
    if (ptr_bytes > 0) {
      args.k_ptrs = reinterpret_cast<const void* const*>(dev);
      args.v_ptrs = reinterpret_cast<const void* const*>(dev + ptr_bytes);
    }
    if (stride_bytes > 0) {
      args.k_head_strides = reinterpret_cast<const int64_t*>(dev + 2 * ptr_bytes);
      args.v_head_strides = reinterpret_cast<const int64_t*>(dev + 2 * ptr_bytes + stride_bytes);
    }
    args.plan = reinterpret_cast<const int32_t*>(dev + plan_at);

    at::Tensor out = at::empty({batch, num_q_heads, head_dim}, queries.options());
    at::Tensor workspace = at::empty({static_cast<int64_t>(HybridWorkspaceBytes(plan, shape))},
                                     queries.options().dtype(at::kByte));
    args.q = queries.data_ptr();
    args.q_batch_stride = queries.stride(0), args.q_head_stride = queries.stride(1);
    args.out = out.data_ptr();
    args.out_batch_stride = out.stride(0), args.out_head_stride = out.stride(1);
    if (state != nullptr) {
      args.sel_indices = state->indices_.data_ptr<int32_t>();
      args.sel_counts = state->counts_.data_ptr<int32_t>();
      args.sel_batch_stride = state->indices_.stride(0), args.sel_head_stride = state->indices_.stride(1);
      args.sel_count_batch_stride = state->counts_.stride(0);
    }
    args.workspace = workspace.data_ptr();
    args.scale = static_cast<float>(options.scale);
    args.use_pdl = options.use_pdl;
    LYCHEE_CUDA_CHECK(
        LaunchHybridDecode(args, plan, shape, options.selection, c10::cuda::getCurrentCUDAStream(device.index())),
        "hybrid decode launch");
    if (state != nullptr) {
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        if (modes[h] == KvHeadMode::kRetrieval) state->has_selection_[h] = 1;
      }
    }
    return out;
  }
};

at::Tensor HybridDecodeAttention(const at::Tensor& queries, const std::vector<at::Tensor>& key_caches,
                                 const std::vector<at::Tensor>& value_caches, const std::vector<int64_t>& lengths,
                                 const std::vector<KvHeadMode>& modes, HybridSelectionState& state,
                                 const HybridDecodeOptions& options) {
  return HybridDecodeRunner::Run(queries, nullptr, nullptr, &key_caches, &value_caches, lengths, modes, &state,
                                 options);
}

at::Tensor HybridDecodeAttention(const at::Tensor& queries, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const std::vector<int64_t>& lengths, const std::vector<KvHeadMode>& modes,
                                 HybridSelectionState& state, const HybridDecodeOptions& options) {
  return HybridDecodeRunner::Run(queries, &key_cache, &value_cache, nullptr, nullptr, lengths, modes, &state, options);
}

at::Tensor DenseDecodeAttention(const at::Tensor& queries, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const std::vector<int64_t>& lengths, const HybridDecodeOptions& options) {
  TORCH_CHECK(key_cache.dim() == 4, "key_cache must be [batch, num_kv_heads, capacity, head_dim]");
  const std::vector<KvHeadMode> modes(key_cache.size(1), KvHeadMode::kDense);
  return HybridDecodeRunner::Run(queries, &key_cache, &value_cache, nullptr, nullptr, lengths, modes, nullptr, options);
}

at::Tensor DenseDecodeAttention(const at::Tensor& queries, const std::vector<at::Tensor>& key_caches,
                                const std::vector<at::Tensor>& value_caches, const std::vector<int64_t>& lengths,
                                const HybridDecodeOptions& options) {
  TORCH_CHECK(!key_caches.empty() && key_caches[0].dim() == 3, "key_caches must be [num_kv_heads, capacity, head_dim]");
  const std::vector<KvHeadMode> modes(key_caches[0].size(0), KvHeadMode::kDense);
  return HybridDecodeRunner::Run(queries, nullptr, nullptr, &key_caches, &value_caches, lengths, modes, nullptr,
                                 options);
}

namespace {

bool SameModes(const std::vector<KvHeadMode>& a, const bool* a_has, const std::vector<KvHeadMode>& b,
               const bool* b_has) {
  if (a != b) return false;
  for (size_t h = 0; h < a.size(); ++h) {
    if (a[h] == KvHeadMode::kSparse && a_has[h] != b_has[h]) return false;
  }
  return true;
}

}  // namespace

PagedHybridDecode::PagedHybridDecode(int64_t num_q_heads, int64_t head_dim,
                                     std::vector<std::vector<KvHeadMode>> layer_modes,
                                     const HybridDecodeOptions& options, int64_t max_batch, int64_t max_pages,
                                     int64_t page_size, bool launch_capacity, at::Device device, bool audit)
    : options_(options), page_size_(page_size), launch_capacity_(launch_capacity), audit_(audit) {
  TORCH_CHECK(!layer_modes.empty() && !layer_modes[0].empty(), "paged decode: no layers");
  TORCH_CHECK(device.is_cuda(), "paged decode: the device must be CUDA, got ", device);
  TORCH_CHECK(page_size >= 16 && (page_size & (page_size - 1)) == 0, "paged decode: the page size must be a power of ",
              "two of at least 16, got ", page_size);
  const int64_t num_kv_heads = static_cast<int64_t>(layer_modes[0].size());
  shape_ = {static_cast<int>(max_batch), static_cast<int>(num_q_heads), static_cast<int>(num_kv_heads),
            static_cast<int>(head_dim)};
  const c10::cuda::CUDAGuard guard(device);
  plan_options_.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int occupancy = HybridDecodeMaxCtasPerSm(shape_.head_dim, shape_.num_q_heads / shape_.num_kv_heads);
  plan_options_.ctas_per_sm =
      std::max(1, occupancy > 0 ? std::min(options.ctas_per_sm, occupancy) : options.ctas_per_sm);
  capacity_ = HybridPlanCapacity(shape_, options.selection, max_pages * page_size, plan_options_);

  // Layers whose modes, and whose sparse heads' selections, are alike share one plan.
  std::vector<uint8_t> has(num_kv_heads, 0);
  for (const std::vector<KvHeadMode>& modes : layer_modes) {
    TORCH_CHECK(static_cast<int64_t>(modes.size()) == num_kv_heads, "paged decode: every layer needs ", num_kv_heads,
                " head modes");
    std::unique_ptr<bool[]> flags(new bool[num_kv_heads]);
    for (int64_t h = 0; h < num_kv_heads; ++h) flags[h] = has[h] != 0;
    auto same = std::find_if(patterns_.begin(), patterns_.end(), [&](const Pattern& pattern) {
      return SameModes(pattern.modes, pattern.has_selection.get(), modes, flags.get());
    });
    if (same == patterns_.end()) {
      patterns_.push_back(Pattern{modes, std::move(flags), HybridPlan()});
      same = patterns_.end() - 1;
    }
    layer_pattern_.push_back(static_cast<int>(same - patterns_.begin()));
    for (int64_t h = 0; h < num_kv_heads; ++h) has[h] |= modes[h] == KvHeadMode::kRetrieval;
  }
  HybridPlan layout;
  layout.capacity = capacity_;
  slot_words_ = layout.select_offset() + 4 * capacity_.select;  // a multiple of 4: slots stay 16-byte aligned
  const auto on_device = at::TensorOptions().device(device);
  int64_t plan_words = static_cast<int64_t>(patterns_.size()) * slot_words_;
  if (audit_) {
    TORCH_CHECK(num_kv_heads <= 64, "paged decode: the audit takes at most 64 KV heads, got ", num_kv_heads);
    for (const std::vector<KvHeadMode>& modes : layer_modes) {
      uint64_t mask = 0;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        if (modes[h] == KvHeadMode::kSparse) mask |= uint64_t{1} << h;
      }
      layer_sparse_mask_.push_back(mask);
    }
    targets_offset_ = plan_words + slot_words_;
    plan_words = targets_offset_ + 2 * max_batch;
    const auto floats = on_device.dtype(at::kFloat);
    lse_ = at::zeros({max_batch, num_q_heads}, floats);
    dense_lse_ = at::zeros({max_batch, num_q_heads}, floats);
    dense_out_ = at::zeros({max_batch, num_q_heads, head_dim}, on_device.dtype(at::kBFloat16));
  }
  plans_ = at::zeros({plan_words}, on_device.dtype(at::kInt));
  workspace_ = at::empty({static_cast<int64_t>(HybridWorkspaceBytes(layout, shape_))}, on_device.dtype(at::kByte));
  sel_indices_ = at::zeros({max_batch, num_kv_heads, options.selection.budget_blocks()}, on_device.dtype(at::kInt));
  sel_counts_ = at::zeros({max_batch, num_kv_heads}, on_device.dtype(at::kInt));
  out_ = at::zeros({max_batch, num_q_heads, head_dim}, on_device.dtype(at::kBFloat16));
}

void PagedHybridDecode::Plan(const std::vector<int64_t>& lengths, const std::vector<double*>& audit_targets) {
  TORCH_CHECK(!lengths.empty() && static_cast<int64_t>(lengths.size()) <= shape_.batch, "paged decode: a step of ",
              lengths.size(), " sequences on a workspace for ", shape_.batch);
  TORCH_CHECK(audit_targets.empty() || (audit_ && audit_targets.size() == lengths.size()),
              "paged decode: audit targets need a workspace made for the audit and one target per row");
  batch_ = static_cast<int64_t>(lengths.size());
  HybridDecodeShape shape = shape_;
  shape.batch = static_cast<int>(batch_);
  // A new pinned buffer every step: the caching host allocator hands it out again only once the
  // copy that reads it is done.
  at::Tensor staging = at::empty({plans_.numel()}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  int32_t* host = staging.data_ptr<int32_t>();
  for (size_t i = 0; i < patterns_.size(); ++i) {
    Pattern& pattern = patterns_[i];
    const std::string error = PlanHybridDecode(shape, options_.selection, lengths.data(), pattern.modes.data(),
                                               pattern.has_selection.get(), plan_options_, &pattern.plan, &capacity_);
    TORCH_CHECK(error.empty(), "paged decode: ", error);
    std::memcpy(host + i * slot_words_, pattern.plan.words.data(), pattern.plan.plan_bytes());
  }
  audits_step_ = false;
  if (audit_) PlanAudit(lengths, audit_targets, host);
  plans_.copy_(staging, /*non_blocking=*/true);
}

void PagedHybridDecode::PlanAudit(const std::vector<int64_t>& lengths, const std::vector<double*>& targets,
                                  int32_t* host) {
  auto* host_targets = reinterpret_cast<int64_t*>(host + targets_offset_);
  std::vector<int64_t> audited_lengths;
  std::vector<int32_t> audited_rows;
  for (int64_t row = 0; row < shape_.batch; ++row) {
    double* target = row < static_cast<int64_t>(targets.size()) ? targets[row] : nullptr;
    host_targets[row] = reinterpret_cast<int64_t>(target);
    if (target == nullptr) continue;
    audited_rows.push_back(static_cast<int32_t>(row));
    audited_lengths.push_back(lengths[row]);
  }
  const bool any_sparse =
      std::any_of(layer_sparse_mask_.begin(), layer_sparse_mask_.end(), [](uint64_t mask) { return mask != 0; });
  if (audited_rows.empty() || !any_sparse) return;  // nothing can be dropped: no twin to run
  HybridDecodeShape shape = shape_;
  shape.batch = static_cast<int>(audited_rows.size());
  const std::vector<KvHeadMode> dense(shape_.num_kv_heads, KvHeadMode::kDense);
  const std::string error = PlanHybridDecode(shape, options_.selection, audited_lengths.data(), dense.data(), nullptr,
                                             plan_options_, &dense_plan_, &capacity_);
  TORCH_CHECK(error.empty(), "paged decode, audit: ", error);
  // Planned as a batch of the audited rows alone; its items name those rows' places in the step,
  // and want only the lse (the tensor-core kernel then reads keys alone: half the twin's bytes).
  int32_t* words = dense_plan_.words.data();
  for (int i = 0; i < dense_plan_.num_work; ++i) {
    int32_t* item = words + kPlanHeaderWords + 8 * i;
    item[0] = audited_rows[item[0]];
    item[5] |= kWorkLseOnly;
  }
  for (int i = 0; i < dense_plan_.num_merge; ++i) {
    int32_t& batch = words[dense_plan_.merge_offset() + 4 * i];
    batch = audited_rows[batch];
  }
  std::memcpy(host + patterns_.size() * slot_words_, words, dense_plan_.plan_bytes());
  audits_step_ = true;
}

at::Tensor PagedHybridDecode::Attend(int layer, const at::Tensor& queries, const at::Tensor& key_pages,
                                     const at::Tensor& value_pages, const at::Tensor& page_table) {
  TORCH_CHECK(layer >= 0 && layer < static_cast<int>(layer_pattern_.size()), "paged decode: no layer ", layer);
  TORCH_CHECK(batch_ > 0, "paged decode: Attend before Plan");
  TORCH_CHECK(queries.scalar_type() == at::kBFloat16 && queries.dim() == 3 && queries.size(0) >= batch_ &&
                  queries.size(0) <= shape_.batch && queries.size(1) == shape_.num_q_heads &&
                  queries.size(2) == shape_.head_dim && queries.device() == out_.device(),
              "paged decode: queries must be bf16 [", batch_, "..", shape_.batch, ", ", shape_.num_q_heads, ", ",
              shape_.head_dim, "] on ", out_.device(), ", got ", queries.sizes(), " ", queries.scalar_type());
  CheckVectorizable(queries, "queries");
  for (const at::Tensor* pages : {&key_pages, &value_pages}) {
    TORCH_CHECK(pages->scalar_type() == at::kBFloat16 && pages->dim() == 4 && pages->size(0) == shape_.num_kv_heads &&
                    pages->size(2) == page_size_ && pages->size(3) == shape_.head_dim && pages->is_contiguous() &&
                    pages->device() == out_.device(),
                "paged decode: the KV pool must be contiguous bf16 [", shape_.num_kv_heads, ", pages, ", page_size_,
                ", ", shape_.head_dim, "], got ", pages->sizes());
  }
  TORCH_CHECK(page_table.scalar_type() == at::kInt && page_table.dim() == 2 && page_table.size(0) >= batch_ &&
                  page_table.stride(1) == 1 && page_table.device() == out_.device(),
              "paged decode: the page table must be int32 [rows, width] on ", out_.device());
  const Pattern& pattern = patterns_[layer_pattern_[layer]];
  HybridDecodeArgs args;
  args.q = queries.data_ptr();
  args.q_batch_stride = queries.stride(0), args.q_head_stride = queries.stride(1);
  args.out = out_.data_ptr();
  args.out_batch_stride = out_.stride(0), args.out_head_stride = out_.stride(1);
  args.k = key_pages.data_ptr();
  args.v = value_pages.data_ptr();
  args.k_head_stride = key_pages.stride(0), args.k_page_stride = key_pages.stride(1);
  args.k_token_stride = key_pages.stride(2);
  args.v_head_stride = value_pages.stride(0), args.v_page_stride = value_pages.stride(1);
  args.v_token_stride = value_pages.stride(2);
  args.page_table = page_table.data_ptr<int32_t>();
  args.page_table_stride = page_table.stride(0);
  args.page_size = static_cast<int>(page_size_);
  args.sel_indices = sel_indices_.data_ptr<int32_t>();
  args.sel_counts = sel_counts_.data_ptr<int32_t>();
  args.sel_batch_stride = sel_indices_.stride(0), args.sel_head_stride = sel_indices_.stride(1);
  args.sel_count_batch_stride = sel_counts_.stride(0);
  args.workspace = workspace_.data_ptr();
  args.plan = plans_.data_ptr<int32_t>() + layer_pattern_[layer] * slot_words_;
  args.launch_capacity = launch_capacity_;
  args.scale = static_cast<float>(options_.scale);
  args.use_pdl = options_.use_pdl;
  const bool audited_layer = audits_step_ && layer_sparse_mask_[layer] != 0;
  if (audited_layer) {
    args.lse = lse_.data_ptr<float>();
    args.lse_batch_stride = lse_.stride(0);
  }
  const c10::cuda::CUDAGuard guard(out_.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out_.device().index());
  LYCHEE_CUDA_CHECK(LaunchHybridDecode(args, pattern.plan, shape_, options_.selection, stream),
                    "paged hybrid decode launch");
  if (audited_layer) {
    HybridDecodeArgs twin = args;
    twin.out = dense_out_.data_ptr();
    twin.lse = dense_lse_.data_ptr<float>();
    twin.plan = plans_.data_ptr<int32_t>() + patterns_.size() * slot_words_;
    LYCHEE_CUDA_CHECK(LaunchHybridDecode(twin, dense_plan_, shape_, options_.selection, stream),
                      "paged decode, the audit's dense twin");
    LYCHEE_CUDA_CHECK(
        LaunchAuditDroppedMass(lse_.data_ptr<float>(), dense_lse_.data_ptr<float>(), lse_.stride(0), shape_.batch,
                               shape_.num_q_heads, shape_.num_q_heads / shape_.num_kv_heads, layer_sparse_mask_[layer],
                               reinterpret_cast<double* const*>(plans_.data_ptr<int32_t>() + targets_offset_), stream),
        "paged decode, the audit's reduction");
  }
  return out_.narrow(0, 0, queries.size(0));
}

}  // namespace cuda
}  // namespace lychee
