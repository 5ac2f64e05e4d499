// Launch helpers shared by the per-head-dim translation units (hybrid_decode_d64.cu and
// hybrid_decode_d128.cu compile in parallel). Host code around the kernels of
// decode_attention.cuh.
#pragma once

#include <atomic>

#include "kernels/cuda/decode_attention.cuh"

namespace lychee {
namespace cuda {
namespace device {

// Raises a kernel's dynamic shared memory limit (and asks for the largest shared-memory carveout)
// once per device. Tag makes the flag per kernel: every kernel's pointer has the same type.
template <typename Tag, typename Kernel>
cudaError_t EnsureSmemLimit(Kernel kernel, size_t bytes) {
  static std::atomic<uint64_t> done{0};  // one bit per device (up to 64)
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if (done.load(std::memory_order_acquire) & bit) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  }
  if (err == cudaSuccess) done.fetch_or(bit, std::memory_order_acq_rel);
  return err;
}

template <int D, int G, int NV>
struct CudaCoreTag {};
template <int D, int G>
struct MmaTag {};

// variant 0: tensor cores; 1, 2: CUDA cores with that many 16-byte vectors per lane (2 needs G <= 4).
template <int D, int G>
cudaError_t LaunchMainKernel(const DecodeParams& p, cudaStream_t stream) {
  cudaError_t err;
  if (p.kernel_variant == 0) {
    constexpr size_t smem = MmaConfig<D>::kSmemBytes;
    err = EnsureSmemLimit<MmaTag<D, G>>(HybridDecodeMmaKernel<D, G>, smem);
    if (err != cudaSuccess) return err;
    HybridDecodeMmaKernel<D, G><<<p.main_ctas, kDecodeThreads, smem, stream>>>(p);
  } else if (G <= 4 && p.kernel_variant == 2) {
    constexpr int NV = G <= 4 ? 2 : 1;
    err = EnsureSmemLimit<CudaCoreTag<D, G, NV>>(HybridDecodeKernel<D, G, NV>, DecodeSmemBytes());
    if (err != cudaSuccess) return err;
    HybridDecodeKernel<D, G, NV><<<p.main_ctas, kDecodeThreads, DecodeSmemBytes(), stream>>>(p);
  } else {
    err = EnsureSmemLimit<CudaCoreTag<D, G, 1>>(HybridDecodeKernel<D, G, 1>, DecodeSmemBytes());
    if (err != cudaSuccess) return err;
    HybridDecodeKernel<D, G, 1><<<p.main_ctas, kDecodeThreads, DecodeSmemBytes(), stream>>>(p);
  }
  return cudaGetLastError();
}

template <int D, int G>
cudaError_t LaunchDecodeGD(const DecodeParams& p, int post_ctas, bool pdl, cudaStream_t stream) {
  if (p.main_ctas > 0) {
    const cudaError_t err = LaunchMainKernel<D, G>(p, stream);
    if (err != cudaSuccess) return err;
  }
  if (post_ctas == 0 || p.skip_post) return cudaSuccess;
  return LaunchKernel(HybridPostKernel<D>, dim3(post_ctas), dim3(kPostThreads), 0, stream, pdl && p.main_ctas > 0, p,
                      G);
}

// Occupancy of the default (tensor-core) main kernel.
template <int D, int G>
int MaxCtasPerSmGD() {
  int n = 0;
  constexpr size_t smem = MmaConfig<D>::kSmemBytes;
  if (EnsureSmemLimit<MmaTag<D, G>>(HybridDecodeMmaKernel<D, G>, smem) != cudaSuccess) return 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, HybridDecodeMmaKernel<D, G>, kDecodeThreads, smem) !=
      cudaSuccess) {
    return 0;
  }
  return n;
}

template <int D>
cudaError_t LaunchDecodeD(const DecodeParams& p, int group, int post_ctas, bool pdl, cudaStream_t stream) {
  switch (group) {
    case 1: return LaunchDecodeGD<D, 1>(p, post_ctas, pdl, stream);
    case 2: return LaunchDecodeGD<D, 2>(p, post_ctas, pdl, stream);
    case 3: return LaunchDecodeGD<D, 3>(p, post_ctas, pdl, stream);
    case 4: return LaunchDecodeGD<D, 4>(p, post_ctas, pdl, stream);
    case 5: return LaunchDecodeGD<D, 5>(p, post_ctas, pdl, stream);
    case 6: return LaunchDecodeGD<D, 6>(p, post_ctas, pdl, stream);
    case 7: return LaunchDecodeGD<D, 7>(p, post_ctas, pdl, stream);
    case 8: return LaunchDecodeGD<D, 8>(p, post_ctas, pdl, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <int D>
int MaxCtasPerSmD(int group) {
  switch (group) {
    case 1: return MaxCtasPerSmGD<D, 1>();
    case 2: return MaxCtasPerSmGD<D, 2>();
    case 3: return MaxCtasPerSmGD<D, 3>();
    case 4: return MaxCtasPerSmGD<D, 4>();
    case 5: return MaxCtasPerSmGD<D, 5>();
    case 6: return MaxCtasPerSmGD<D, 6>();
    case 7: return MaxCtasPerSmGD<D, 7>();
    case 8: return MaxCtasPerSmGD<D, 8>();
    default: return 0;
  }
}

// Defined in hybrid_decode_d64.cu and hybrid_decode_d128.cu.
cudaError_t LaunchDecode64(const DecodeParams& p, int group, int post_ctas, bool pdl, cudaStream_t stream);
cudaError_t LaunchDecode128(const DecodeParams& p, int group, int post_ctas, bool pdl, cudaStream_t stream);
int MaxCtasPerSm64(int group);
int MaxCtasPerSm128(int group);

}  // namespace device
}  // namespace cuda
}  // namespace lychee
