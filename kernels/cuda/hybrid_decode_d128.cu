// Instantiations of the decode kernels for head_dim 128 (GQA groups 1..8).
#include "kernels/cuda/hybrid_decode_launch.cuh"

namespace lychee {
namespace cuda {
namespace device {

cudaError_t LaunchDecode128(const DecodeParams& p, int group, int post_ctas, bool pdl, cudaStream_t stream) {
  return LaunchDecodeD<128>(p, group, post_ctas, pdl, stream);
}

int MaxCtasPerSm128(int group) { return MaxCtasPerSmD<128>(group); }

}  // namespace device
}  // namespace cuda
}  // namespace lychee
