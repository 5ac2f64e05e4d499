#include "common/model/cuda/torch_model_kernels.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "common/model/cuda/cuda_check.h"

namespace lychee {
namespace cuda {
namespace {

cudaStream_t Stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()); }

void CheckTensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(t.defined() && t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
}

bool Aligned16(const at::Tensor& t) { return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0; }

// A tensor [..., width] seen as rows: its leading dimensions must collapse into one with a single
// stride (size-1 dimensions are ignored), the last dimension contiguous.
struct Rows {
  int64_t rows = 0;
  int64_t width = 0;
  int64_t stride = 0;  // elements between rows; width when there is at most one
};

Rows RowsOf(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 1, name, " must have at least one dimension");
  Rows r;
  r.width = t.size(-1);
  TORCH_CHECK(t.stride(-1) == 1 || r.width <= 1, name, ": the last dimension must be contiguous, strides ",
              t.strides());
  r.rows = 1;
  r.stride = r.width;
  int64_t outer_stride = -1;  // the stride the next leading dimension must have
  for (int64_t d = t.dim() - 2; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (outer_stride < 0) {
      r.stride = t.stride(d);
    } else {
      TORCH_CHECK(t.stride(d) == outer_stride, name, ": the leading dimensions of ", t.sizes(), " with strides ",
                  t.strides(), " cannot be seen as one row index");
    }
    outer_stride = t.stride(d) * t.size(d);
    r.rows *= t.size(d);
  }
  TORCH_CHECK(r.rows <= INT_MAX && r.width <= INT_MAX, name, " is too large: ", t.sizes());
  return r;
}

// Rows read or written as 16-byte vectors: width and row stride multiples of 8 elements (bf16),
// data 16-byte aligned.
Rows VectorRowsOf(const at::Tensor& t, const char* name) {
  const Rows r = RowsOf(t, name);
  TORCH_CHECK(r.width % 8 == 0, name, ": the width must be a multiple of 8, got ", r.width);
  TORCH_CHECK(r.rows <= 1 || r.stride % 8 == 0, name, ": the row stride must be a multiple of 8 elements, got ",
              r.stride);
  TORCH_CHECK(Aligned16(t), name, ": data must be 16-byte aligned");
  return r;
}

void CheckVector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t size, const at::Tensor& like) {
  CheckTensor(t, name, dtype, like);
  TORCH_CHECK(t.numel() == size && t.is_contiguous(), name, ": contiguous [", size, "] expected, got ", t.sizes());
}

std::vector<int64_t> WithLast(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes.back() = last;
  return sizes;
}

}  // namespace

void AddRmsNorm(const at::Tensor& x_or_undefined, at::Tensor& residual, const at::Tensor& weight, double eps,
                at::Tensor& out, bool overlap_previous) {
  const c10::cuda::CUDAGuard guard(residual.device());
  CheckTensor(residual, "residual", at::kBFloat16, residual);
  const Rows res = VectorRowsOf(residual, "residual");
  TORCH_CHECK(res.width <= kMaxRmsNormWidth, "residual: width ", res.width, " above ", kMaxRmsNormWidth);
  Rows xs;
  if (x_or_undefined.defined()) {
    CheckTensor(x_or_undefined, "x", at::kBFloat16, residual);
    xs = VectorRowsOf(x_or_undefined, "x");
    TORCH_CHECK(xs.rows == res.rows && xs.width == res.width, "x ", x_or_undefined.sizes(), " must match residual ",
                residual.sizes());
  }
  CheckVector(weight, "weight", at::kBFloat16, res.width, residual);
  TORCH_CHECK(Aligned16(weight), "weight: data must be 16-byte aligned");
  CheckTensor(out, "out", at::kBFloat16, residual);
  const Rows os = VectorRowsOf(out, "out");
  TORCH_CHECK(os.rows == res.rows && os.width == res.width, "out ", out.sizes(), " must match residual ",
              residual.sizes());
  TORCH_CHECK(out.data_ptr() != residual.data_ptr(), "out must not be residual");
  LYCHEE_CUDA_CHECK(
      LaunchAddRmsNorm(x_or_undefined.defined() ? x_or_undefined.data_ptr() : nullptr, xs.stride, residual.data_ptr(),
                       res.stride, weight.data_ptr(), static_cast<float>(eps), static_cast<int>(res.rows),
                       static_cast<int>(res.width), out.data_ptr(), os.stride, Stream(residual), overlap_previous),
      "AddRmsNorm");
}

at::Tensor AddRmsNorm(const at::Tensor& x_or_undefined, at::Tensor& residual, const at::Tensor& weight, double eps,
                      bool overlap_previous) {
  TORCH_CHECK(residual.defined(), "residual must be defined");
  at::Tensor out = at::empty(residual.sizes(), residual.options());
  AddRmsNorm(x_or_undefined, residual, weight, eps, out, overlap_previous);
  return out;
}

void RopeAppendOut(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& inv_freq,
                   const at::Tensor& q_norm, const at::Tensor& k_norm, double eps, int64_t num_q_heads,
                   const at::Tensor& slots, at::Tensor& k_pool, at::Tensor& v_pool, at::Tensor& q_out,
                   bool overlap_previous) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  CheckTensor(qkv, "qkv", at::kBFloat16, qkv);
  CheckTensor(k_pool, "k_pool", at::kBFloat16, qkv);
  CheckTensor(v_pool, "v_pool", at::kBFloat16, qkv);
  TORCH_CHECK(k_pool.dim() == 4 && k_pool.is_contiguous(), "k_pool: contiguous [Hkv, pages, page size, D] expected, got ",
              k_pool.sizes());
  TORCH_CHECK(v_pool.sizes() == k_pool.sizes() && v_pool.is_contiguous(), "v_pool ", v_pool.sizes(),
              " must be contiguous and match k_pool ", k_pool.sizes());
  const int64_t num_kv_heads = k_pool.size(0), head_dim = k_pool.size(3);
  const int64_t pool_tokens = k_pool.size(1) * k_pool.size(2);
  TORCH_CHECK(head_dim >= 2 && head_dim % 2 == 0 && head_dim <= kMaxRopeHeadDim, "head_dim must be even, 2 to ",
              kMaxRopeHeadDim, ", got ", head_dim);
  TORCH_CHECK(num_q_heads >= 1 && num_kv_heads >= 1 && num_q_heads + 2 * num_kv_heads <= INT_MAX / head_dim,
              "bad head counts ", num_q_heads, " and ", num_kv_heads);
  TORCH_CHECK(pool_tokens <= INT_MAX, "the pool holds ", pool_tokens, " positions per head, above ", INT_MAX);
  const Rows in = RowsOf(qkv, "qkv");
  TORCH_CHECK(in.width == (num_q_heads + 2 * num_kv_heads) * head_dim, "qkv: width ", in.width, " expected (",
              num_q_heads, " + 2 x ", num_kv_heads, ") x ", head_dim);
  CheckVector(positions, "positions", at::kInt, in.rows, qkv);
  CheckVector(slots, "slots", at::kInt, in.rows, qkv);
  CheckVector(inv_freq, "inv_freq", at::kFloat, head_dim / 2, qkv);
  TORCH_CHECK(q_norm.defined() == k_norm.defined(), "q_norm and k_norm: both or neither");
  if (q_norm.defined()) {
    CheckVector(q_norm, "q_norm", at::kBFloat16, head_dim, qkv);
    CheckVector(k_norm, "k_norm", at::kBFloat16, head_dim, qkv);
  }
  CheckTensor(q_out, "q_out", at::kBFloat16, qkv);
  TORCH_CHECK(q_out.dim() == 3 && q_out.size(0) == in.rows && q_out.size(1) == num_q_heads &&
                  q_out.size(2) == head_dim && q_out.stride(2) == 1 && (q_out.stride(1) == head_dim || num_q_heads == 1),
              "q_out: [", in.rows, ", ", num_q_heads, ", ", head_dim, "] with each row's heads contiguous expected, got ",
              q_out.sizes(), " with strides ", q_out.strides());
  RopeAppendArgs a;
  a.qkv = qkv.data_ptr();
  a.qkv_stride = in.stride;
  a.positions = positions.data_ptr<int32_t>();
  a.inv_freq = inv_freq.data_ptr<float>();
  a.q_norm = q_norm.defined() ? q_norm.data_ptr() : nullptr;
  a.k_norm = k_norm.defined() ? k_norm.data_ptr() : nullptr;
  a.eps = static_cast<float>(eps);
  a.q_out = q_out.data_ptr();
  a.q_out_stride = q_out.stride(0);
  a.k_pool = k_pool.data_ptr();
  a.v_pool = v_pool.data_ptr();
  a.pool_tokens = pool_tokens;
  a.slots = slots.data_ptr<int32_t>();
  a.rows = static_cast<int>(in.rows);
  a.num_q_heads = static_cast<int>(num_q_heads);
  a.num_kv_heads = static_cast<int>(num_kv_heads);
  a.head_dim = static_cast<int>(head_dim);
  LYCHEE_CUDA_CHECK(LaunchRopeAppend(a, Stream(qkv), overlap_previous), "RopeAppend");
}

at::Tensor RopeAppend(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& inv_freq,
                      const at::Tensor& q_norm, const at::Tensor& k_norm, double eps, int64_t num_q_heads,
                      const at::Tensor& slots, at::Tensor& k_pool, at::Tensor& v_pool, bool overlap_previous) {
  TORCH_CHECK(qkv.defined() && qkv.dim() >= 1 && k_pool.defined() && k_pool.dim() == 4,
              "qkv [rows, width] and k_pool [Hkv, pages, page size, D] expected");
  at::Tensor q_out = at::empty({qkv.numel() / std::max<int64_t>(1, qkv.size(-1)), num_q_heads, k_pool.size(3)},
                               qkv.options());
  RopeAppendOut(qkv, positions, inv_freq, q_norm, k_norm, eps, num_q_heads, slots, k_pool, v_pool, q_out,
                overlap_previous);
  return q_out;
}

void SiluMulOut(const at::Tensor& gate_up, at::Tensor& out, bool overlap_previous) {
  const c10::cuda::CUDAGuard guard(gate_up.device());
  CheckTensor(gate_up, "gate_up", at::kBFloat16, gate_up);
  const Rows in = VectorRowsOf(gate_up, "gate_up");
  TORCH_CHECK(in.width % 16 == 0, "gate_up: width ", in.width, " must be 2 x a multiple of 8");
  CheckTensor(out, "out", at::kBFloat16, gate_up);
  const Rows os = VectorRowsOf(out, "out");
  TORCH_CHECK(os.rows == in.rows && os.width == in.width / 2, "out ", out.sizes(), " must be gate_up ",
              gate_up.sizes(), " with half the width");
  LYCHEE_CUDA_CHECK(
      LaunchSiluMul(gate_up.data_ptr(), in.stride, static_cast<int>(in.rows), static_cast<int>(in.width / 2),
                    out.data_ptr(), os.stride, Stream(gate_up), overlap_previous),
      "SiluMul");
}

at::Tensor SiluMul(const at::Tensor& gate_up, bool overlap_previous) {
  TORCH_CHECK(gate_up.defined() && gate_up.dim() >= 1, "gate_up [..., 2 I] expected");
  at::Tensor out = at::empty(WithLast(gate_up, gate_up.size(-1) / 2), gate_up.options());
  SiluMulOut(gate_up, out, overlap_previous);
  return out;
}

void ArgmaxRowsOut(const at::Tensor& logits, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(logits.device());
  CheckTensor(logits, "logits", at::kFloat, logits);
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 1, "logits: [rows, V] or [V] expected, got ", logits.sizes());
  const Rows in = RowsOf(logits, "logits");
  TORCH_CHECK(in.width >= 1, "logits: empty rows");
  TORCH_CHECK((in.rows <= 1 || in.stride % 4 == 0) && Aligned16(logits),
              "logits: rows must be 16-byte aligned (row stride a multiple of 4)");
  CheckVector(out, "out", at::kInt, in.rows, logits);
  LYCHEE_CUDA_CHECK(LaunchArgmaxRows(logits.data_ptr<float>(), in.rows <= 1 ? 0 : in.stride, static_cast<int>(in.rows),
                                     static_cast<int>(in.width), out.data_ptr<int32_t>(), Stream(logits)),
                    "ArgmaxRows");
}

at::Tensor ArgmaxRows(const at::Tensor& logits) {
  TORCH_CHECK(logits.defined() && logits.dim() >= 1, "logits [rows, V] expected");
  at::Tensor out = at::empty({logits.dim() == 1 ? 1 : logits.size(0)}, logits.options().dtype(at::kInt));
  ArgmaxRowsOut(logits, out);
  return out;
}

void GemvOut(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual_or_undefined, at::Tensor& out,
             bool overlap_previous) {
  const c10::cuda::CUDAGuard guard(x.device());
  CheckTensor(x, "x", at::kBFloat16, x);
  const Rows xs = VectorRowsOf(x, "x");
  CheckTensor(weight, "weight", at::kBFloat16, x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == xs.width, "weight: [N, ", xs.width, "] expected, got ",
              weight.sizes());
  TORCH_CHECK(weight.stride(1) == 1 && (weight.stride(0) % 8 == 0 || weight.size(0) == 1) && Aligned16(weight),
              "weight: rows contiguous and 16-byte aligned expected, strides ", weight.strides());
  const int64_t n = weight.size(0);
  TORCH_CHECK(n >= 1 && n <= INT_MAX, "weight: bad row count ", n);
  const int64_t w_stride = weight.size(0) == 1 ? xs.width : weight.stride(0);
  Rows rs;
  if (residual_or_undefined.defined()) {
    CheckTensor(residual_or_undefined, "residual", at::kBFloat16, x);
    rs = RowsOf(residual_or_undefined, "residual");
    TORCH_CHECK(rs.rows == xs.rows && rs.width == n, "residual ", residual_or_undefined.sizes(), " must be [",
                xs.rows, ", ", n, "]");
  }
  CheckTensor(out, "out", at::kBFloat16, x);
  const Rows os = RowsOf(out, "out");
  TORCH_CHECK(os.rows == xs.rows && os.width == n, "out ", out.sizes(), " must be [", xs.rows, ", ", n, "]");
  TORCH_CHECK(out.data_ptr() != x.data_ptr() && out.data_ptr() != weight.data_ptr(), "out must not be x or weight");
  LYCHEE_CUDA_CHECK(LaunchGemv(x.data_ptr(), xs.stride, weight.data_ptr(), w_stride,
                               residual_or_undefined.defined() ? residual_or_undefined.data_ptr() : nullptr, rs.stride,
                               static_cast<int>(xs.rows), static_cast<int>(n), static_cast<int>(xs.width),
                               out.data_ptr(), os.stride, Stream(x), overlap_previous),
                    "Gemv");
}

at::Tensor Gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual_or_undefined,
                bool overlap_previous) {
  TORCH_CHECK(x.defined() && x.dim() >= 1 && weight.defined() && weight.dim() == 2, "x [..., K], weight [N, K] expected");
  at::Tensor out = at::empty(WithLast(x, weight.size(0)), x.options());
  GemvOut(x, weight, residual_or_undefined, out, overlap_previous);
  return out;
}

}  // namespace cuda
}  // namespace lychee
