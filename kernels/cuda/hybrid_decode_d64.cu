// Instantiations of the decode kernels for head_dim 64 (GQA groups 1..8).
#include "kernels/cuda/hybrid_decode_launch.cuh"

namespace lychee {
namespace cuda {
namespace device {

cudaError_t LaunchDecode64(const DecodeParams& p, int group, int post_ctas, bool pdl, cudaStream_t stream) {
  return LaunchDecodeD<64>(p, group, post_ctas, pdl, stream);
}

int MaxCtasPerSm64(int group) { return MaxCtasPerSmD<64>(group); }

}  // namespace device
}  // namespace cuda
}  // namespace lychee
