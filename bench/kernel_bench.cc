// Decode-attention kernel benchmark (CUDA LibTorch only): the dense split-KV kernel, the hybrid
// LycheeDecode launch (1 retrieval KV head of 8, or none), the block selection alone, and PyTorch's
// scaled_dot_product_attention (flash backend) in the same process, for the Llama-3-8B attention
// shape (32 query heads, 8 KV heads, head_dim 128) and the bundled model's (6, 2, 64), batch 1 and 8,
// contexts 4K, 32K, 128K, bf16. Also the device-to-device copy bandwidth of this run.
//
// Timing: CUDA events around each repeat, after warm-up, median of many; the repeats are queued
// behind a spin kernel so that host launch overhead does not reach the GPU timeline; KV buffers
// rotate so that no repeat finds its data in L2.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "bench/cuda_timing.h"
#include "kernels/cuda/hybrid_decode.h"

ABSL_FLAG(int64_t, reps, lychee::bench::Repeats{}.reps, "timed repeats of each launch (the median is shown)");
ABSL_FLAG(int64_t, warmup, lychee::bench::Repeats{}.warmup, "untimed repeats before them");
ABSL_FLAG(bool, quick, false, "only context 128K at batch 1");
ABSL_FLAG(bool, sweep, false, "also time the split-KV variants and CTAs per SM of each launch at context 128K");
ABSL_FLAG(bool, profile, false, "one launch of each kind at 128K, batch 1, Llama shape, for a profiler; nothing timed");

namespace {

using lychee::cuda::BlockSelectionConfig;
using lychee::cuda::HybridDecodeArgs;
using lychee::cuda::HybridDecodeShape;
using lychee::cuda::HybridPlan;
using lychee::cuda::KvHeadMode;

#define CUDA_OK LYCHEE_BENCH_CUDA_OK

lychee::bench::Repeats g_repeats;

cudaStream_t Stream() { return lychee::bench::CurrentStream(); }

// Median milliseconds of fn(i), i counting warm-ups and repeats.
double TimeMs(const std::function<void(int)>& fn) { return lychee::bench::TimeMs(fn, g_repeats); }

using lychee::bench::CopyBandwidthGBs;

struct Shape {
  const char* name;
  int hq, hkv, d;
};

// One configuration of the hybrid launch: plan on the device, workspace, selection buffers.
struct Launch {
  HybridPlan plan;
  at::Tensor plan_dev, workspace;
  HybridDecodeShape shape;
  BlockSelectionConfig cfg;
  bool pdl = true;
  int nv = 0;
  bool main_only = false;

  Launch(const HybridDecodeShape& s, const BlockSelectionConfig& c, const std::vector<int64_t>& lengths,
         const std::vector<KvHeadMode>& modes, const std::vector<bool>& has_selection, int ctas_per_sm, bool use_pdl,
         int variant = 0)
      : shape(s), cfg(c), pdl(use_pdl), nv(variant) {
    lychee::cuda::PlanOptions opts;
    opts.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int occ = lychee::cuda::HybridDecodeMaxCtasPerSm(s.head_dim, s.num_q_heads / s.num_kv_heads);
    opts.ctas_per_sm = std::max(1, std::min(ctas_per_sm, occ > 0 ? occ : ctas_per_sm));
    std::unique_ptr<bool[]> has(new bool[s.num_kv_heads]);
    for (int h = 0; h < s.num_kv_heads; ++h) has[h] = has_selection[h];
    const std::string err =
        lychee::cuda::PlanHybridDecode(s, c, lengths.data(), modes.data(), has.get(), opts, &plan);
    if (!err.empty()) {
      std::fprintf(stderr, "plan: %s\n", err.c_str());
      std::exit(1);
    }
    plan_dev = at::empty({static_cast<int64_t>(plan.words.size())}, at::TensorOptions().dtype(at::kInt));
    std::memcpy(plan_dev.data_ptr<int32_t>(), plan.words.data(), plan.plan_bytes());
    plan_dev = plan_dev.to(at::kCUDA);
    workspace = at::empty({static_cast<int64_t>(lychee::cuda::HybridWorkspaceBytes(plan, s))},
                          at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
  }

  void Run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& sel,
           at::Tensor& counts) const {
    HybridDecodeArgs a;
    a.q = q.data_ptr(), a.q_batch_stride = q.stride(0), a.q_head_stride = q.stride(1);
    a.out = out.data_ptr(), a.out_batch_stride = out.stride(0), a.out_head_stride = out.stride(1);
    a.k = k.data_ptr(), a.v = v.data_ptr();
    a.k_batch_stride = k.stride(0), a.k_head_stride = k.stride(1), a.k_token_stride = k.stride(2);
    a.v_batch_stride = v.stride(0), a.v_head_stride = v.stride(1), a.v_token_stride = v.stride(2);
    a.sel_indices = sel.data_ptr<int32_t>(), a.sel_counts = counts.data_ptr<int32_t>();
    a.sel_batch_stride = sel.stride(0), a.sel_head_stride = sel.stride(1), a.sel_count_batch_stride = counts.stride(0);
    a.workspace = workspace.data_ptr();
    a.plan = plan_dev.data_ptr<int32_t>();
    a.use_pdl = pdl;
    a.kernel_variant = nv;
    a.skip_post_for_benchmark = main_only;
    CUDA_OK(lychee::cuda::LaunchHybridDecode(a, plan, shape, cfg, Stream()));
  }
};

struct Row {
  std::string shape;
  int batch;
  int64_t ctx;
  double dense_ms, dense_gbs, score_ms, hyb1_ms, hyb0_ms, select_ms, sdpa_ms;
  double hyb1_floor_ms, hyb0_floor_ms, hyb1_main_ms, hyb0_main_ms;
  double err_vs_sdpa;
  std::string hyb1_label;
};

bool ForceFlashSdpa() {
  try {
    auto& ctx = at::globalContext();
    ctx.setSDPUseFlash(true);
    ctx.setSDPUseMemEfficient(false);
    ctx.setSDPUseMath(false);
    ctx.setSDPUseCuDNN(false);
    return true;
  } catch (const std::exception& e) {
    std::printf("could not restrict SDPA to flash: %s\n", e.what());
    return false;
  }
}

Row Bench(const Shape& shape, int batch, int64_t ctx, double copy_gbs, bool sweep) {
  const int64_t B = batch, HQ = shape.hq, HKV = shape.hkv, D = shape.d;
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  BlockSelectionConfig cfg;  // block 64, budget 4096, sink 64, recent 64
  const double kv_bytes = 2.0 * B * HKV * ctx * D * 2;
  // Rotate enough buffer sets that the smallest read (all sparse) far exceeds L2 in the rotation.
  const double min_read = 2.0 * B * HKV * std::min<int64_t>(ctx, cfg.token_budget) * D * 2;
  const int64_t max_sets = std::max<int64_t>(1, static_cast<int64_t>(16e9 / kv_bytes));
  const int64_t sets = std::clamp<int64_t>(static_cast<int64_t>(std::ceil(400e6 / min_read)), 2, max_sets);
  std::vector<at::Tensor> ks, vs, qs;
  for (int64_t i = 0; i < sets; ++i) {
    ks.push_back(at::randn({B, HKV, ctx, D}, bf16));
    vs.push_back(at::randn({B, HKV, ctx, D}, bf16));
    qs.push_back(at::randn({B, HQ, D}, bf16));
  }
  at::Tensor out = at::empty({B, HQ, D}, bf16);
  at::Tensor sel = at::zeros({B, HKV, cfg.budget_blocks()}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA));
  at::Tensor counts = at::zeros({B, HKV}, sel.options());
  const std::vector<int64_t> lengths(B, ctx);
  const HybridDecodeShape hs{batch, shape.hq, shape.hkv, shape.d};
  auto rotate = [&](const Launch& l) {
    return [&, lp = &l](int i) { lp->Run(qs[i % sets], ks[i % sets], vs[i % sets], out, sel, counts); };
  };

  Row row;
  row.shape = shape.name, row.batch = batch, row.ctx = ctx;
  const std::vector<bool> none(HKV, false), all(HKV, true);
  const Launch dense(hs, cfg, lengths, std::vector<KvHeadMode>(HKV, KvHeadMode::kDense), none, 2, true);
  row.dense_ms = TimeMs(rotate(dense));
  row.dense_gbs = kv_bytes / (row.dense_ms * 1e-3) / 1e9;
  const Launch score(hs, cfg, lengths, std::vector<KvHeadMode>(HKV, KvHeadMode::kRetrieval), none, 2, true);
  row.score_ms = TimeMs(rotate(score));  // also leaves a full selection in `sel` for the sparse heads
  // 1 retrieval head of 8 (Llama shape); 1 of 2 for the bundled model's 2 KV heads.
  std::vector<KvHeadMode> one(HKV, KvHeadMode::kSparse);
  one[0] = KvHeadMode::kRetrieval;
  row.hyb1_label = "1/" + std::to_string(HKV) + "R";
  Launch hyb1(hs, cfg, lengths, one, all, 2, true);
  row.hyb1_ms = TimeMs(rotate(hyb1));
  Launch hyb0(hs, cfg, lengths, std::vector<KvHeadMode>(HKV, KvHeadMode::kSparse), all, 2, true);
  row.hyb0_ms = TimeMs(rotate(hyb0));
  hyb1.main_only = hyb0.main_only = true;
  row.hyb1_main_ms = TimeMs(rotate(hyb1));
  row.hyb0_main_ms = TimeMs(rotate(hyb0));
  const double sparse_tokens = std::min<double>(ctx, cfg.token_budget);
  row.hyb1_floor_ms = 2.0 * B * (ctx + (HKV - 1) * sparse_tokens) * D * 2 / (copy_gbs * 1e9) * 1e3;
  row.hyb0_floor_ms = 2.0 * B * HKV * sparse_tokens * D * 2 / (copy_gbs * 1e9) * 1e3;

  // The selection alone: one retrieval head per sequence, random scores.
  {
    const int64_t nb = (ctx + cfg.block_size - 1) / cfg.block_size;
    at::Tensor scores = at::randn({B * nb}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));
    std::vector<int32_t> items;
    for (int b = 0; b < batch; ++b) {
      items.insert(items.end(), {b, 0, static_cast<int32_t>(ctx), static_cast<int32_t>(b * nb)});
    }
    at::Tensor items_dev = at::tensor(items, at::kInt).to(at::kCUDA);
    row.select_ms = TimeMs([&](int) {
      CUDA_OK(lychee::cuda::LaunchBlockSelect(
          scores.data_ptr<float>(), reinterpret_cast<const lychee::cuda::SelectItem*>(items_dev.data_ptr<int32_t>()),
          batch, sel.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), sel.stride(0), sel.stride(1), counts.stride(0),
          cfg, Stream()));
    });
  }

  // PyTorch SDPA decode (flash backend), and a check of the dense kernel against it.
  row.sdpa_ms = NAN;
  row.err_vs_sdpa = NAN;
  try {
    auto sdpa = [&](int i) {
      return at::scaled_dot_product_attention(qs[i % sets].unsqueeze(2), ks[i % sets], vs[i % sets], std::nullopt, 0.0,
                                              false, std::nullopt, /*enable_gqa=*/true);
    };
    const at::Tensor ref = sdpa(0).squeeze(2).to(at::kFloat);
    dense.Run(qs[0], ks[0], vs[0], out, sel, counts);
    row.err_vs_sdpa = ((out.to(at::kFloat) - ref).norm() / ref.norm()).item<double>();
    row.sdpa_ms = TimeMs([&](int i) { (void)sdpa(i); });
  } catch (const std::exception& e) {
    std::printf("SDPA failed for %s B=%d ctx=%lld: %.300s\n", shape.name, batch, static_cast<long long>(ctx), e.what());
  }

  if (sweep) {
    for (int nv : {0, 1, 2}) {
      for (int cps : {2, 3}) {
        const Launch d(hs, cfg, lengths, std::vector<KvHeadMode>(HKV, KvHeadMode::kDense), none, cps, true, nv);
        const Launch h1(hs, cfg, lengths, one, all, cps, true, nv);
        const Launch h0(hs, cfg, lengths, std::vector<KvHeadMode>(HKV, KvHeadMode::kSparse), all, cps, true, nv);
        std::printf("  sweep %s B=%d ctx=%lld variant=%d ctas/SM=%d: dense %.1f us (%d items, cpi %d), %s %.1f us (%d "
                    "items), none %.1f us (%d items)\n",
                    shape.name, batch, static_cast<long long>(ctx), nv, cps, TimeMs(rotate(d)) * 1e3,
                    d.plan.num_work, d.plan.chunks_per_item, row.hyb1_label.c_str(), TimeMs(rotate(h1)) * 1e3,
                    h1.plan.num_work, TimeMs(rotate(h0)) * 1e3, h0.plan.num_work);
      }
    }
  }
  CUDA_OK(cudaDeviceSynchronize());
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("usage: kernel_bench [flags]");
  g_repeats = lychee::bench::ParseBenchFlags(argc, argv, __FILE__, FLAGS_reps, FLAGS_warmup);
  const bool quick = absl::GetFlag(FLAGS_quick), sweep = absl::GetFlag(FLAGS_sweep),
             profile = absl::GetFlag(FLAGS_profile);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  const c10::cuda::CUDAGuard guard(0);
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  if (profile) {
    // One launch of each kind at 128K, batch 1, Llama shape, for a profiler: all-retrieval (fills
    // the selection), dense, 1 of 8 retrieval, all sparse.
    const int64_t ctx = 131072, B = 1, HKV = 8;
    const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
    const at::Tensor k = at::randn({B, HKV, ctx, 128}, bf16), v = at::randn({B, HKV, ctx, 128}, bf16);
    const at::Tensor q = at::randn({B, 32, 128}, bf16);
    at::Tensor out = at::empty({B, 32, 128}, bf16);
    BlockSelectionConfig cfg;
    at::Tensor sel = at::zeros({B, HKV, cfg.budget_blocks()}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA));
    at::Tensor counts = at::zeros({B, HKV}, sel.options());
    const HybridDecodeShape hs{1, 32, 8, 128};
    const std::vector<int64_t> lengths(B, ctx);
    const std::vector<bool> none(HKV, false), all(HKV, true);
    std::vector<KvHeadMode> one(HKV, KvHeadMode::kSparse);
    one[0] = KvHeadMode::kRetrieval;
    Launch(hs, BlockSelectionConfig{}, lengths, std::vector<KvHeadMode>(HKV, KvHeadMode::kRetrieval), none, 2, true)
        .Run(q, k, v, out, sel, counts);
    Launch(hs, cfg, lengths, std::vector<KvHeadMode>(HKV, KvHeadMode::kDense), none, 2, true).Run(q, k, v, out, sel, counts);
    Launch(hs, cfg, lengths, one, all, 2, true).Run(q, k, v, out, sel, counts);
    Launch(hs, cfg, lengths, std::vector<KvHeadMode>(HKV, KvHeadMode::kSparse), all, 2, true)
        .Run(q, k, v, out, sel, counts);
    CUDA_OK(cudaDeviceSynchronize());
    std::printf("profile launches done\n");
    return 0;
  }
  const bool flash_only = ForceFlashSdpa();
  const double copy_gbs = CopyBandwidthGBs();
  std::printf("device: %s, %d SMs, L2 %d MB; device-to-device copy: %.0f GB/s (read + write); SDPA %s\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_gbs,
              flash_only ? "restricted to the flash backend" : "with default backends");

  const std::vector<Shape> shapes = {{"llama3-8b", 32, 8, 128}, {"bundled", 6, 2, 64}};
  std::vector<int64_t> contexts = {4096, 32768, 131072};
  std::vector<int> batches = {1, 8};
  if (quick) contexts = {131072}, batches = {1};
  std::vector<Row> rows;
  for (const Shape& shape : shapes) {
    for (int batch : batches) {
      for (int64_t ctx : contexts) {
        rows.push_back(Bench(shape, batch, ctx, copy_gbs, sweep && ctx == 131072));
        const Row& r = rows.back();
        std::printf("done %s B=%d ctx=%lld\n", r.shape.c_str(), r.batch, static_cast<long long>(r.ctx));
        std::fflush(stdout);
      }
    }
  }
  std::printf("\nTimes in microseconds (median of %d); BW = KV bytes / time; %%copy = BW / copy bandwidth;\n"
              "hybrid: budget 4096, block 64, sink 64, recent 64; xD = dense / hybrid, xS = SDPA / hybrid;\n"
              "floor = bytes the hybrid launch must read / copy bandwidth.\n",
              g_repeats.reps);
  std::printf("%-10s %2s %7s | %8s %6s %5s | %8s | %5s %8s %7s %6s %5s %5s | %8s %7s %6s %5s %5s | %6s | %8s %6s | %7s\n",
              "shape", "B", "ctx", "dense", "GB/s", "%copy", "dense+sc", "hyb", "1R", "(main)", "floor", "xD", "xS",
              "noneR", "(main)", "floor", "xD", "xS", "select", "SDPA", "GB/s", "err");
  for (const Row& r : rows) {
    const double kv = 2.0 * r.batch * (r.shape == "bundled" ? 2 : 8) * r.ctx * (r.shape == "bundled" ? 64 : 128) * 2;
    std::printf(
        "%-10s %2d %7lld | %8.1f %6.0f %4.0f%% | %8.1f | %5s %8.1f %7.1f %6.1f %5.2f %5.2f | %8.1f %7.1f %6.1f %5.2f "
        "%5.2f | %6.1f | %8.1f %6.0f | %7.1e\n",
        r.shape.c_str(), r.batch, static_cast<long long>(r.ctx), r.dense_ms * 1e3, r.dense_gbs,
        100.0 * r.dense_gbs / copy_gbs, r.score_ms * 1e3, r.hyb1_label.c_str(), r.hyb1_ms * 1e3, r.hyb1_main_ms * 1e3,
        r.hyb1_floor_ms * 1e3, r.dense_ms / r.hyb1_ms, r.sdpa_ms / r.hyb1_ms, r.hyb0_ms * 1e3, r.hyb0_main_ms * 1e3,
        r.hyb0_floor_ms * 1e3, r.dense_ms / r.hyb0_ms,
        r.sdpa_ms / r.hyb0_ms, r.select_ms * 1e3, r.sdpa_ms * 1e3, kv / (r.sdpa_ms * 1e-3) / 1e9, r.err_vs_sdpa);
  }
  return 0;
}
