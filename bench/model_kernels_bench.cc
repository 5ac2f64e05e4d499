// Benchmark of the model's fused decode-step kernels (common/model/cuda/torch_model_kernels.h), CUDA
// LibTorch only:
//   1. Gemv against at::linear (cuBLAS) for rows 1, 4 and 8 and the Llama-3-8B projections
//      (N x K: 6144 x 4096 qkv, 4096 x 4096 o, 28672 x 4096 gate_up, 4096 x 14336 down,
//      128256 x 4096 lm head): time, the bandwidth of the bytes read and written, and that
//      bandwidth against a device-to-device copy's (read + write) measured in the same run;
//   2. the elementwise kernels (AddRmsNorm, RopeAppend, SiluMul, ArgmaxRows) against the LibTorch
//      ops of common/model/model.cc they replace, at rows 1 and 8.
//
// Timing: CUDA events around each repeat, median of --reps after --warmup; the repeats are
// queued behind a spin kernel so that host launch overhead does not reach the GPU timeline; the
// weights rotate among enough copies to exceed the L2 several times, so that every repeat reads
// its weight from HBM.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "bench/cuda_timing.h"
#include "common/model/cuda/torch_model_kernels.h"

ABSL_FLAG(int64_t, reps, lychee::bench::Repeats{}.reps, "timed repeats of each kernel (the median is shown)");
ABSL_FLAG(int64_t, warmup, lychee::bench::Repeats{}.warmup, "untimed repeats before them");
ABSL_FLAG(bool, quick, false, "fewer Gemv shapes");

namespace {

#define CUDA_OK LYCHEE_BENCH_CUDA_OK

lychee::bench::Repeats g_repeats;

cudaStream_t Stream() { return lychee::bench::CurrentStream(); }

// Median milliseconds of fn(i), i counting warm-ups and repeats.
double TimeMs(const std::function<void(int)>& fn) { return lychee::bench::TimeMs(fn, g_repeats); }

using lychee::bench::CopyBandwidthGBs;

at::TensorOptions Bf16() { return at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA); }

struct GemvShape {
  const char* name;
  int64_t n, k;
};

void BenchGemv(double copy_gbs, int64_t l2_bytes, bool quick) {
  const std::vector<GemvShape> shapes = {{"qkv", 6144, 4096},
                                         {"o", 4096, 4096},
                                         {"gate_up", 28672, 4096},
                                         {"down", 4096, 14336},
                                         {"lm_head", 128256, 4096}};
  std::printf("\nGemv against at::linear (cuBLAS), bf16, Llama-3-8B shapes. us = median time; GB/s = (weight + x + y "
              "bytes) / time;\n%%copy = GB/s / device-to-device copy bandwidth; err = max |gemv - linear| / max |linear|\n");
  std::printf("%-8s %6s %6s %4s %5s | %9s %8s %6s | %9s %8s %6s | %7s %8s\n", "shape", "N", "K", "rows", "copies",
              "gemv us", "GB/s", "%copy", "linear us", "GB/s", "%copy", "speedup", "err");
  for (const GemvShape& s : shapes) {
    const int64_t w_bytes = s.n * s.k * 2;
    // Enough copies that each is read again only after 4 L2 sizes of other weights have streamed.
    const int copies = static_cast<int>(std::max<int64_t>(2, (4 * l2_bytes + w_bytes - 1) / w_bytes + 1));
    std::vector<at::Tensor> weights;
    for (int c = 0; c < copies; ++c) weights.push_back(at::randn({s.n, s.k}, Bf16()) * 0.02);
    for (int64_t rows : {1, 4, 8}) {
      if (quick && rows == 4) continue;
      const at::Tensor x = at::randn({rows, s.k}, Bf16());
      at::Tensor y = at::empty({rows, s.n}, Bf16());
      const double gemv_ms = TimeMs([&](int i) { lychee::cuda::GemvOut(x, weights[i % copies], at::Tensor(), y); });
      const double linear_ms = TimeMs([&](int i) { (void)at::linear(x, weights[i % copies]); });
      const at::Tensor ref = at::linear(x, weights[0]).to(at::kFloat);
      const double err = (lychee::cuda::Gemv(x, weights[0], at::Tensor()).to(at::kFloat) - ref).abs().max().item<double>() /
                         ref.abs().max().item<double>();
      const double bytes = static_cast<double>(w_bytes) + 2.0 * rows * (s.n + s.k);
      const double gemv_gbs = bytes / (gemv_ms * 1e-3) / 1e9, linear_gbs = bytes / (linear_ms * 1e-3) / 1e9;
      std::printf("%-8s %6lld %6lld %4lld %5d | %9.1f %8.0f %5.1f%% | %9.1f %8.0f %5.1f%% | %6.2fx %8.1e\n", s.name,
                  static_cast<long long>(s.n), static_cast<long long>(s.k), static_cast<long long>(rows), copies,
                  gemv_ms * 1e3, gemv_gbs, 100.0 * gemv_gbs / copy_gbs, linear_ms * 1e3, linear_gbs,
                  100.0 * linear_gbs / copy_gbs, linear_ms / gemv_ms, err);
    }
  }
}

// The LibTorch formulas of common/model/model.cc that the elementwise kernels replace.
at::Tensor RmsNormRef(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor x32 = x.to(at::kFloat);
  at::Tensor normed = x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * normed.to(x.scalar_type());
}
at::Tensor RotateHalfRef(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

void BenchElementwise() {
  const int64_t hidden = 4096, hq = 32, hkv = 8, d = 128, inter = 14336, vocab = 128256;
  const int64_t pages = 1024, page_size = 64;
  std::printf("\nElementwise kernels against the LibTorch ops they replace (Llama-3-8B shapes), us, median\n");
  std::printf("%-32s %4s | %8s %8s %7s\n", "op", "rows", "fused", "libtorch", "speedup");
  const at::Tensor norm_w = at::randn({hidden}, Bf16());
  const at::Tensor inv_freq =
      (1.0 / at::pow(500000.0, at::arange(0, d, 2, at::kLong).to(at::kFloat) / static_cast<double>(d))).to(at::kCUDA);
  at::Tensor k_pool = at::zeros({hkv, pages, page_size, d}, Bf16()), v_pool = at::zeros_like(k_pool);
  for (int64_t rows : {1, 8}) {
    auto row = [&](const char* name, double fused_ms, double ref_ms) {
      std::printf("%-32s %4lld | %8.2f %8.2f %6.2fx\n", name, static_cast<long long>(rows), fused_ms * 1e3,
                  ref_ms * 1e3, ref_ms / fused_ms);
    };
    at::Tensor residual = at::randn({rows, hidden}, Bf16());
    const at::Tensor x = at::randn({rows, hidden}, Bf16());
    at::Tensor out = at::empty({rows, hidden}, Bf16());
    row("AddRmsNorm (residual += x; norm)",
        TimeMs([&](int) { lychee::cuda::AddRmsNorm(x, residual, norm_w, 1e-5, out); }),
        TimeMs([&](int) {
          residual = residual + x;
          (void)RmsNormRef(residual, norm_w, 1e-5);
        }));

    const at::Tensor qkv = at::randn({rows, (hq + 2 * hkv) * d}, Bf16());
    const at::Tensor positions = at::randint(0, 131072, {rows}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA));
    const at::Tensor slots = at::arange(rows, at::TensorOptions().dtype(at::kInt).device(at::kCUDA)) * 97 + 64;
    const at::Tensor slots64 = slots.to(at::kLong);
    row("RopeAppend (cos/sin, q, k, v)",
        TimeMs([&](int) {
          (void)lychee::cuda::RopeAppend(qkv, positions, inv_freq, at::Tensor(), at::Tensor(), 1e-5, hq, slots, k_pool,
                                         v_pool);
        }),
        TimeMs([&](int) {
          at::Tensor freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq;
          at::Tensor angles = at::cat({freqs, freqs}, -1);
          const at::Tensor cos = angles.cos().to(at::kBFloat16).unsqueeze(1), sin = angles.sin().to(at::kBFloat16).unsqueeze(1);
          at::Tensor q = qkv.narrow(1, 0, hq * d).view({rows, hq, d});
          at::Tensor k = qkv.narrow(1, hq * d, hkv * d).view({rows, hkv, d});
          at::Tensor v = qkv.narrow(1, (hq + hkv) * d, hkv * d).view({rows, hkv, d});
          q = q * cos + RotateHalfRef(q) * sin;
          k = k * cos + RotateHalfRef(k) * sin;
          k_pool.view({hkv, pages * page_size, d}).index_copy_(1, slots64, k.transpose(0, 1));
          v_pool.view({hkv, pages * page_size, d}).index_copy_(1, slots64, v.transpose(0, 1));
        }));

    const at::Tensor gate_up = at::randn({rows, 2 * inter}, Bf16());
    row("SiluMul", TimeMs([&](int) { (void)lychee::cuda::SiluMul(gate_up); }),
        TimeMs([&](int) { (void)(at::silu(gate_up.narrow(1, 0, inter)) * gate_up.narrow(1, inter, inter)); }));

    const at::Tensor logits = at::randn({rows, vocab}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));
    row("ArgmaxRows (V 128256)", TimeMs([&](int) { (void)lychee::cuda::ArgmaxRows(logits); }),
        TimeMs([&](int) { (void)at::argmax(logits, 1); }));
  }
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("usage: model_kernels_bench [flags]");
  g_repeats = lychee::bench::ParseBenchFlags(argc, argv, __FILE__, FLAGS_reps, FLAGS_warmup);
  const bool quick = absl::GetFlag(FLAGS_quick);
  if (!at::hasCUDA()) {
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  const c10::cuda::CUDAGuard guard(0);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const double copy_gbs = CopyBandwidthGBs();
  std::printf("device: %s, %d SMs, L2 %d MB; device-to-device copy: %.0f GB/s (read + write); median of %d after %d "
              "warm-ups\n",
              prop->name, prop->multiProcessorCount, prop->l2CacheSize >> 20, copy_gbs, g_repeats.reps, g_repeats.warmup);
  BenchGemv(copy_gbs, prop->l2CacheSize, quick);
  BenchElementwise();
  return 0;
}
