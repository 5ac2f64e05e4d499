// Host API of the fused CUDA kernels of the model's decode step (common/model/model.cc on CUDA, bf16):
// the residual add with RMSNorm, RoPE with the KV-pool append, SiLU times up, the argmax of the
// logits, and a small-batch matrix-vector product that reads the weight at memory speed. Plain C++
// with no device code; kernels and launchers are in model_kernels.cu, the LibTorch entry points in
// torch_model_kernels.h.
//
// Every kernel reproduces the rounding of the LibTorch ops it replaces (Model::RmsNorm,
// Model::RopeCosSin, RotateHalf, at::silu; bf16 storage, float32 arithmetic), so that the fused
// step matches the op-by-op one to the last bf16 bit except where a float32 sum is reduced in a
// different order. bf16 tensors are passed as void pointers, strides in elements; nothing here
// waits for the device, so every launcher can run inside a CUDA graph capture. A launcher returns
// cudaErrorInvalidValue for arguments it cannot take (checked before anything is launched), else
// the launch's error.
//
// Overlapped launches: a launcher called with overlap_previous launches its kernel as a
// programmatic dependent launch (Hopper; an ordinary launch on earlier GPUs): the kernel's CTAs
// may be scheduled while the previous kernel of the stream still runs, once every CTA of that one
// has started, and they wait for its completion before they read anything but their weights or
// write anything (common/model/cuda/dependent_launch.cuh). A decode step's kernels thus start
// without the launch gap between them, and the GEMV reads the start of its weight into L2 while
// the previous kernel finishes. Every kernel here but the argmax lets the next one start that way
// once its own CTAs have all started. Under stream capture the overlap becomes a programmatic edge of the graph.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lychee {
namespace cuda {

// ---- AddRmsNorm ----------------------------------------------------------------------------------
// For each of `rows` rows of width `hidden` (a multiple of 8, at most kMaxRmsNormWidth):
//   with x:    residual = bf16(float(residual) + float(x))          (written back in place)
//   then       normed   = bf16(float(residual) * rsqrt(mean(float(residual)^2) + eps))
//              out      = bf16(float(weight) * float(normed))
// which is Model::RmsNorm(residual + x, weight) (the mean as at::mean: the float32 sum times
// 1/hidden). x null: residual is only read. out may be x (each element is read before it is
// written, by the same thread) but not residual. Rows 16-byte aligned (pointers 16-byte aligned,
// strides multiples of 8). One CTA per row.
constexpr int kMaxRmsNormWidth = 32768;
cudaError_t LaunchAddRmsNorm(const void* x, int64_t x_stride, void* residual, int64_t residual_stride,
                             const void* weight, float eps, int rows, int hidden, void* out, int64_t out_stride,
                             cudaStream_t stream, bool overlap_previous = false);

// ---- RopeAppend ------------------------------------------------------------------------------------
// One decode step's attention inputs of one layer, from the fused projection qkv [rows][(Hq + 2 Hkv) * D]
// (queries, then keys, then values; row stride `qkv_stride`):
//   - optional q_norm / k_norm (bf16 [D], both or neither; Qwen3): each query and key head goes
//     through Model::RmsNorm over its D elements (eps `eps`) before RoPE;
//   - RoPE of queries and keys as Model::RopeCosSin + RotateHalf: angle_i = float(position) *
//     inv_freq[i mod D/2] in float32, c = bf16(cosf(angle)), s = bf16(sinf(angle)),
//       out_i = bf16(bf16(q_i * c_i) + bf16(rot_i * s_i)),  rot = cat(-q[D/2:], q[:D/2]);
//   - the rotated queries go to q_out [rows][Hq][D] (row stride `q_out_stride`, heads contiguous);
//   - the rotated keys and the values (unchanged) go into one layer's KV pool, k_pool and v_pool
//     [Hkv][pool pages][page size][D] contiguous, at position slots[r] (page * page size + offset)
//     of every KV head: element (h, slot, d) at (h * pool_tokens + slot) * D + d, pool_tokens =
//     pool pages * page size. A row whose slot lies outside [0, pool_tokens) writes no keys or
//     values.
// positions and slots int32 [rows]; inv_freq float32 [D / 2]. D even, 2 to kMaxRopeHeadDim.
constexpr int kMaxRopeHeadDim = 256;
struct RopeAppendArgs {
  const void* qkv = nullptr;
  int64_t qkv_stride = 0;
  const int32_t* positions = nullptr;
  const float* inv_freq = nullptr;
  const void* q_norm = nullptr;  // null: no per-head norm
  const void* k_norm = nullptr;
  float eps = 1e-6f;
  void* q_out = nullptr;
  int64_t q_out_stride = 0;
  void* k_pool = nullptr;
  void* v_pool = nullptr;
  int64_t pool_tokens = 0;
  const int32_t* slots = nullptr;
  int rows = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 128;
};
cudaError_t LaunchRopeAppend(const RopeAppendArgs& args, cudaStream_t stream, bool overlap_previous = false);

// ---- SiluMul ---------------------------------------------------------------------------------------
// out[r][i] = bf16(float(bf16(silu(float(gate)))) * float(up)) with gate = gate_up[r][i],
// up = gate_up[r][inter + i], silu(g) = g / (1 + expf(-g)) as at::silu computes it (then
// at::silu(gate) * up). inter a multiple of 8; rows 16-byte aligned.
cudaError_t LaunchSiluMul(const void* gate_up, int64_t gate_up_stride, int rows, int inter, void* out,
                          int64_t out_stride, cudaStream_t stream, bool overlap_previous = false);

// ---- ArgmaxRows ------------------------------------------------------------------------------------
// out[r] = the first index of the largest of logits[r][0, vocab) (float32), as at::argmax: NaN counts
// as the largest (the first NaN wins), -0 equals +0. Rows 16-byte aligned (stride a multiple of 4).
// One CTA per row.
cudaError_t LaunchArgmaxRows(const float* logits, int64_t stride, int rows, int vocab, int32_t* out,
                             cudaStream_t stream);

// ---- Gemv ------------------------------------------------------------------------------------------
// y[r][n] = bf16(acc) or, with residual, bf16(float(residual[r][n]) + acc), acc = sum_k x[r][k] * w[n][k]
// in float32 (bf16 inputs), for rows 1..kMaxGemvRows per pass (more rows run in passes of 8, each
// reading the weight again). k a multiple of 8; x, w, y and residual rows 16-byte aligned; w row
// stride `w_stride` (k for a contiguous weight). y may be residual (in place); y must not overlap
// x or w. Tensor cores (mma.sync m16n8k16) with the rows as the narrow side: each CTA owns 16
// weight rows and its warps split k; the weight is streamed once with 16-byte loads.
constexpr int kMaxGemvRows = 8;
cudaError_t LaunchGemv(const void* x, int64_t x_stride, const void* w, int64_t w_stride, const void* residual,
                       int64_t residual_stride, int rows, int n, int k, void* y, int64_t y_stride, cudaStream_t stream,
                       bool overlap_previous = false);

}  // namespace cuda
}  // namespace lychee
