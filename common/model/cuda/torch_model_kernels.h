// LibTorch entry points of the fused decode-step kernels (model_kernels.h, where the rounding of
// each is spelled out). Tensors are checked (CUDA, dtype, shapes, last dimension contiguous,
// 16-byte rows where the kernel reads 16-byte vectors) and the kernels run on the current CUDA
// stream of the tensors' device with no host synchronization, so every function can be called
// inside a CUDA graph capture; outputs the caller does not give are made with at::empty. With
// overlap_previous, the kernel is an overlapped launch (model_kernels.h): for a chain of these
// kernels in one step. Built only with a CUDA LibTorch.
//
// "Rows" tensors are [..., width] with the leading dimensions viewable as one (a [N, 1, H] hidden
// state is N rows); outputs keep the leading dimensions of their input.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/model/cuda/model_kernels.h"

namespace lychee {
namespace cuda {

// With x defined: residual += x (bf16, in place). Then out = Model::RmsNorm(residual, weight), eps
// as the model's rms_norm_eps. x, residual, out: bf16 rows [..., H]; weight bf16 [H]. out may be x.
void AddRmsNorm(const at::Tensor& x_or_undefined, at::Tensor& residual, const at::Tensor& weight, double eps,
                at::Tensor& out, bool overlap_previous = false);
at::Tensor AddRmsNorm(const at::Tensor& x_or_undefined, at::Tensor& residual, const at::Tensor& weight, double eps,
                      bool overlap_previous = false);

// The attention inputs of one layer for one decode step: qkv bf16 [rows, (Hq + 2 Hkv) * D] (the
// fused projection's output, bias included); positions int32 [rows]; inv_freq float32 [D / 2];
// q_norm and k_norm bf16 [D] (Qwen3) or both undefined, with eps; k_pool and v_pool the layer's
// pool tensors bf16 [Hkv, pool pages, page size, D] (KvPool::keys(layer), values(layer)); slots
// int32 [rows] (page * page size + offset; a slot outside the pool writes nothing). Writes the
// rotated keys and the values into the pools and returns the rotated queries bf16 [rows, Hq, D]
// (or writes them into q_out, [rows, Hq, D] with each row's heads contiguous).
at::Tensor RopeAppend(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& inv_freq,
                      const at::Tensor& q_norm, const at::Tensor& k_norm, double eps, int64_t num_q_heads,
                      const at::Tensor& slots, at::Tensor& k_pool, at::Tensor& v_pool, bool overlap_previous = false);
void RopeAppendOut(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& inv_freq,
                   const at::Tensor& q_norm, const at::Tensor& k_norm, double eps, int64_t num_q_heads,
                   const at::Tensor& slots, at::Tensor& k_pool, at::Tensor& v_pool, at::Tensor& q_out,
                   bool overlap_previous = false);

// silu(gate) * up of gate_up bf16 [..., 2 I] (gate, then up): bf16 [..., I].
at::Tensor SiluMul(const at::Tensor& gate_up, bool overlap_previous = false);
void SiluMulOut(const at::Tensor& gate_up, at::Tensor& out, bool overlap_previous = false);

// The first index of each row's maximum of logits float32 [rows, V] (NaN above all, as at::argmax):
// int32 [rows].
at::Tensor ArgmaxRows(const at::Tensor& logits);
void ArgmaxRowsOut(const at::Tensor& logits, at::Tensor& out);

// at::linear(x, weight) for x bf16 [..., K] of at most a few rows (any count works; each 8 rows read
// the weight once), weight bf16 [N, K] (rows contiguous, 16-byte aligned): bf16 [..., N], float32
// accumulation. With residual (bf16 [..., N]) defined: bf16(residual + x weight^T) with one rounding.
// out may be residual.
at::Tensor Gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual_or_undefined,
                bool overlap_previous = false);
void GemvOut(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual_or_undefined, at::Tensor& out,
             bool overlap_previous = false);

}  // namespace cuda
}  // namespace lychee
