// The fused decode-step kernels (common/model/cuda/torch_model_kernels.h) against the LibTorch formulas
// of common/model/model.cc on the GPU, on random inputs of real shapes (Llama-3-8B: H 4096, 32 query and
// 8 KV heads of 128, I 14336, V 128256; the bundled model: H 384, 6 and 2 heads of 64, I 1024,
// V 8192), rows 1, 3 and 8. Each case prints its largest difference in bf16 ulps (the number of
// bf16 values between). What is checked: purely elementwise results (residual add, RoPE without a
// norm, the KV values) bit for bit; SiluMul within one ulp; results after an RMSNorm (AddRmsNorm,
// RoPE with Qwen3's q/k norm) exact up to the one rounding that a float32 sum added in another
// order can flip (RmsNormMatches), so within 2 ulps; the KV pool untouched outside the written
// slots; the argmax exact; the GEMV within a relative 1e-2 of at::linear in float32; and a chain of
// the kernels replayed from a CUDA graph equal to its eager run. Needs a GPU; says SKIPPED where
// none.
#include "tests/torch_catch.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/model/cuda/torch_model_kernels.h"
#include "common/model/cuda_support.h"

namespace lychee {
namespace cuda {
namespace {

bool NoGpu() {
  if (at::hasCUDA()) return false;
  std::printf("SKIPPED: no CUDA device: the model's CUDA kernels run on the GPU host only\n");
  WARN("SKIPPED: no CUDA device");
  return true;
}

at::TensorOptions Bf16() { return at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA); }
at::TensorOptions Int32() { return at::TensorOptions().dtype(at::kInt).device(at::kCUDA); }
at::TensorOptions Float32() { return at::TensorOptions().dtype(at::kFloat).device(at::kCUDA); }

// ---- the reference formulas of common/model/model.cc ----

// Model::RmsNorm.
at::Tensor RmsNormRef(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor x32 = x.to(at::kFloat);
  at::Tensor normed = x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * normed.to(x.scalar_type());
}

// RotateHalf of model.cc.
at::Tensor RotateHalfRef(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

// Model::RopeCosSin for int32 positions [rows]: bf16 cos and sin [rows, D].
std::pair<at::Tensor, at::Tensor> RopeCosSinRef(const at::Tensor& positions, const at::Tensor& inv_freq) {
  at::Tensor freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq;
  at::Tensor angles = at::cat({freqs, freqs}, -1);
  return {angles.cos().to(at::kBFloat16), angles.sin().to(at::kBFloat16)};
}

// Model::Attention's queries or keys of one head group, [rows, heads, D], normed (optional) and rotated.
at::Tensor RopeRef(at::Tensor x, const at::Tensor& norm, double eps, const at::Tensor& cos, const at::Tensor& sin) {
  if (norm.defined()) x = RmsNormRef(x, norm, eps);
  return x * cos.unsqueeze(1) + RotateHalfRef(x) * sin.unsqueeze(1);
}

// As transformers computes them (RopeInverseFrequencies of model.cc without scaling).
at::Tensor InvFreq(int64_t head_dim, double theta) {
  at::Tensor exponents = at::arange(0, head_dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(head_dim);
  return (1.0 / at::pow(theta, exponents)).to(at::kCUDA);
}

// ---- comparisons ----

// bf16 bit patterns as integers in the order of their values (+0 and -0 both 0): the difference of
// two is the number of bf16 steps between the values.
at::Tensor OrderedBf16(const at::Tensor& t) {
  at::Tensor bits = t.contiguous().view(at::kShort).to(at::kInt);  // sign-extended
  return at::where(bits < 0, -bits.bitwise_and(0x7fff), bits);
}

// The bf16 values `steps` bf16 steps above (below, for negative steps) those of t.
at::Tensor StepBf16(const at::Tensor& t, int steps) {
  const at::Tensor key = OrderedBf16(t) + steps;
  return at::where(key < 0, -key - 32768, key).to(at::kShort).view(at::kBFloat16);
}

int64_t MaxUlps(const at::Tensor& got, const at::Tensor& want) {
  REQUIRE(got.sizes() == want.sizes());
  REQUIRE(got.scalar_type() == at::kBFloat16);
  REQUIRE(want.scalar_type() == at::kBFloat16);
  if (got.numel() == 0) return 0;
  REQUIRE(at::isfinite(got.to(at::kFloat)).all().item<bool>());
  return (OrderedBf16(got) - OrderedBf16(want)).abs().max().item<int>();
}

int64_t CountOverOneUlp(const at::Tensor& got, const at::Tensor& want) {
  return (OrderedBf16(got) - OrderedBf16(want)).abs().gt(1).sum().item<int64_t>();
}

double MaxAbsDiff(const at::Tensor& got, const at::Tensor& want) {
  return (got.to(at::kFloat) - want.to(at::kFloat)).abs().max().item<double>();
}

// Model::RmsNorm's normalised value before the weight: float32, rounded to bf16.
at::Tensor NormedRef(const at::Tensor& x, double eps) {
  at::Tensor x32 = x.to(at::kFloat);
  return (x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps)).to(x.scalar_type());
}

// The exact check of a fused RMSNorm. Its float32 sum of squares is added in another order than
// LibTorch's, so a normalised value that lies within about 1e-7 (relative) of a bf16 rounding
// boundary can round to the neighbouring bf16 (some 1e-5 of the elements), and the product with the
// weight then moves up to 2 ulps. Everything else must be exact: each element of `got` must be
// bf16(weight * n) for n the reference's normalised bf16 value or one of its two neighbours.
at::Tensor RmsNormMatches(const at::Tensor& got, const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor normed = NormedRef(x, eps);
  at::Tensor ok = at::zeros(got.sizes(), got.options().dtype(at::kBool));
  for (int step : {-1, 0, 1}) ok = ok.logical_or(got.eq(weight * StepBf16(normed, step)));
  return ok;
}

// The exact check of RopeAppend's queries or keys (see RmsNormMatches): without a norm, the
// reference's bits; with one, the rotation of weight * n for n within one bf16 step of the
// reference's normalised value, for the element and for its rotate_half partner independently.
at::Tensor RopeMatches(const at::Tensor& got, const at::Tensor& x, const at::Tensor& norm, double eps,
                       const at::Tensor& cos, const at::Tensor& sin) {
  if (!norm.defined()) return got.eq(RopeRef(x, norm, eps, cos, sin));
  const at::Tensor normed = NormedRef(x, eps);
  std::vector<at::Tensor> weighted;
  for (int step : {-1, 0, 1}) weighted.push_back(norm * StepBf16(normed, step));
  at::Tensor ok = at::zeros(got.sizes(), got.options().dtype(at::kBool));
  for (const at::Tensor& own : weighted) {
    for (const at::Tensor& partner : weighted) {
      ok = ok.logical_or(got.eq(own * cos.unsqueeze(1) + RotateHalfRef(partner) * sin.unsqueeze(1)));
    }
  }
  return ok;
}

// ---- AddRmsNorm ----

TEST_CASE("AddRmsNorm: residual + x in bf16, then Model::RmsNorm up to the sum's rounding", "[cuda]") {
  if (NoGpu()) return;
  at::manual_seed(1);
  const double eps = 1e-5;
  for (int64_t hidden : {4096, 384, 16384}) {
    for (int64_t rows : {1, 3, 8}) {
      for (int with_x = 0; with_x < 2; ++with_x) {
        // Rows of a wider buffer, so that the row stride is not the width.
        at::Tensor residual = (at::randn({rows, hidden + 64}, Bf16()) * 3).narrow(1, 0, hidden);
        at::Tensor x = with_x ? at::randn({rows, hidden}, Bf16()) : at::Tensor();
        const at::Tensor weight = (1 + 0.2 * at::randn({hidden}, Bf16())).to(at::kBFloat16);
        const at::Tensor hidden_ref = with_x ? residual + x : residual.clone();
        const at::Tensor want = RmsNormRef(hidden_ref, weight, eps);
        at::Tensor out = at::empty({rows, hidden}, Bf16());
        AddRmsNorm(x, residual, weight, eps, out);
        const int64_t ulps = MaxUlps(out, want);
        std::printf("AddRmsNorm H %ld rows %ld x %d: max %ld ulp (%ld elements over 1), max |diff| %g\n",
                    static_cast<long>(hidden), static_cast<long>(rows), with_x, static_cast<long>(ulps),
                    static_cast<long>(CountOverOneUlp(out, want)), MaxAbsDiff(out, want));
        INFO("hidden " << hidden << " rows " << rows << " x " << with_x << ": max " << ulps << " ulp");
        CHECK(at::equal(residual, hidden_ref));
        CHECK(RmsNormMatches(out, hidden_ref, weight, eps).all().item<bool>());
        CHECK(ulps <= 2);
      }
    }
  }
}

TEST_CASE("AddRmsNorm: [N, 1, H] states, out in place of x, and the allocating form", "[cuda]") {
  if (NoGpu()) return;
  at::manual_seed(2);
  const double eps = 1e-6;
  at::Tensor residual = at::randn({5, 1, 4096}, Bf16());
  at::Tensor x = at::randn({5, 1, 4096}, Bf16());
  const at::Tensor weight = at::randn({4096}, Bf16());
  const at::Tensor hidden_ref = residual + x;
  const at::Tensor want = RmsNormRef(hidden_ref, weight, eps);
  AddRmsNorm(x, residual, weight, eps, x);  // out = x
  CHECK(at::equal(residual, hidden_ref));
  CHECK(RmsNormMatches(x, hidden_ref, weight, eps).all().item<bool>());
  CHECK(MaxUlps(x, want) <= 2);
  const at::Tensor again = AddRmsNorm(at::Tensor(), residual, weight, eps);
  CHECK(again.sizes() == residual.sizes());
  CHECK(RmsNormMatches(again, hidden_ref, weight, eps).all().item<bool>());
}

// ---- RopeAppend ----

struct RopeCase {
  int64_t hq, hkv, d;
  bool qk_norm;
  double theta;
};

TEST_CASE("RopeAppend: queries, keys and values as Model::Attention makes them, into the KV pool", "[cuda]") {
  if (NoGpu()) return;
  at::manual_seed(3);
  std::mt19937 rng(3);
  const double eps = 1e-6;
  const int64_t pages = 40, page_size = 16;  // page 0 plus 39
  for (const RopeCase& c : {RopeCase{32, 8, 128, false, 500000.0}, RopeCase{32, 8, 128, true, 1000000.0},
                            RopeCase{6, 2, 64, false, 500000.0}, RopeCase{6, 2, 64, true, 10000.0}}) {
    for (int64_t rows : {1, 3, 8}) {
      const int64_t width = (c.hq + 2 * c.hkv) * c.d;
      // A wider buffer: the row stride is not the width.
      const at::Tensor qkv = at::randn({rows, width + 24}, Bf16()).narrow(1, 0, width);
      // Positions up to 131071 (the first row's is the largest), one at 10^6 when there are 8 rows.
      std::vector<int32_t> pos(rows), slot(rows);
      std::uniform_int_distribution<int32_t> any_pos(0, 131071);
      for (int64_t r = 0; r < rows; ++r) pos[r] = r == 0 ? 131071 : any_pos(rng);
      if (rows == 8) pos[5] = 1000000, pos[6] = 0;
      // Distinct pages in no order, random offsets; with 3 rows the last one writes nowhere (-1).
      std::vector<int32_t> page_ids(pages);
      std::iota(page_ids.begin(), page_ids.end(), 0);
      std::shuffle(page_ids.begin(), page_ids.end(), rng);
      std::uniform_int_distribution<int32_t> any_offset(0, page_size - 1);
      for (int64_t r = 0; r < rows; ++r) slot[r] = page_ids[r] * page_size + any_offset(rng);
      if (rows == 3) slot[2] = -1;
      const at::Tensor positions = at::tensor(pos, at::kInt).to(at::kCUDA);
      const at::Tensor slots = at::tensor(slot, at::kInt).to(at::kCUDA);
      const at::Tensor inv_freq = InvFreq(c.d, c.theta);
      at::Tensor q_norm, k_norm;
      if (c.qk_norm) {
        q_norm = (1 + 0.3 * at::randn({c.d}, Bf16())).to(at::kBFloat16);
        k_norm = (1 + 0.3 * at::randn({c.d}, Bf16())).to(at::kBFloat16);
      }
      at::Tensor k_pool = at::randn({c.hkv, pages, page_size, c.d}, Bf16());
      at::Tensor v_pool = at::randn({c.hkv, pages, page_size, c.d}, Bf16());
      const at::Tensor k_before = k_pool.clone(), v_before = v_pool.clone();

      const at::Tensor q = RopeAppend(qkv, positions, inv_freq, q_norm, k_norm, eps, c.hq, slots, k_pool, v_pool);

      // The reference: Model::Attention's q, k, v for one new position, written as DecodeForward does.
      auto [cos, sin] = RopeCosSinRef(positions, inv_freq);
      const at::Tensor q_in = qkv.narrow(1, 0, c.hq * c.d).view({rows, c.hq, c.d});
      const at::Tensor k_in = qkv.narrow(1, c.hq * c.d, c.hkv * c.d).reshape({rows, c.hkv, c.d});
      const at::Tensor q_ref = RopeRef(q_in, q_norm, eps, cos, sin);
      const at::Tensor k_ref = RopeRef(k_in, k_norm, eps, cos, sin);
      const at::Tensor v_ref = qkv.narrow(1, (c.hq + c.hkv) * c.d, c.hkv * c.d).reshape({rows, c.hkv, c.d});
      const int64_t tokens = pages * page_size;
      std::vector<int64_t> written_rows, written_slots;
      for (int64_t r = 0; r < rows; ++r) {
        if (slot[r] >= 0) written_rows.push_back(r), written_slots.push_back(slot[r]);
      }
      const at::Tensor row_index = at::tensor(written_rows, at::kLong).to(at::kCUDA);
      const at::Tensor slot_index = at::tensor(written_slots, at::kLong).to(at::kCUDA);
      at::Tensor k_want = k_before.clone(), v_want = v_before.clone();
      k_want.view({c.hkv, tokens, c.d}).index_copy_(1, slot_index, k_ref.index_select(0, row_index).transpose(0, 1));
      v_want.view({c.hkv, tokens, c.d}).index_copy_(1, slot_index, v_ref.index_select(0, row_index).transpose(0, 1));
      at::Tensor untouched = at::ones({tokens}, at::TensorOptions().dtype(at::kBool).device(at::kCUDA));
      untouched.index_fill_(0, slot_index, false);

      const at::Tensor k_got = k_pool.view({c.hkv, tokens, c.d}), v_got = v_pool.view({c.hkv, tokens, c.d});
      const at::Tensor k_exp = k_want.view({c.hkv, tokens, c.d}), v_exp = v_want.view({c.hkv, tokens, c.d});
      const at::Tensor k_written = k_got.index_select(1, slot_index).transpose(0, 1);  // [written rows, Hkv, D]
      const int64_t q_ulps = MaxUlps(q, q_ref);
      const int64_t k_ulps = MaxUlps(k_written, k_exp.index_select(1, slot_index).transpose(0, 1));
      std::printf("RopeAppend Hq %ld Hkv %ld D %ld norm %d rows %ld: q max %ld ulp (%ld over 1, |diff| %g), "
                  "k max %ld ulp\n",
                  static_cast<long>(c.hq), static_cast<long>(c.hkv), static_cast<long>(c.d), c.qk_norm ? 1 : 0,
                  static_cast<long>(rows), static_cast<long>(q_ulps), static_cast<long>(CountOverOneUlp(q, q_ref)),
                  MaxAbsDiff(q, q_ref), static_cast<long>(k_ulps));
      INFO("Hq " << c.hq << " Hkv " << c.hkv << " D " << c.d << " norm " << c.qk_norm << " rows " << rows
                 << ": q max " << q_ulps << " ulp, k max " << k_ulps << " ulp");
      CHECK(q.sizes() == at::IntArrayRef({rows, c.hq, c.d}));
      CHECK(RopeMatches(q, q_in, q_norm, eps, cos, sin).all().item<bool>());
      CHECK(RopeMatches(k_written, k_in.index_select(0, row_index), k_norm, eps, cos.index_select(0, row_index),
                        sin.index_select(0, row_index))
                .all()
                .item<bool>());
      if (!c.qk_norm) {
        CHECK(q_ulps == 0);
        CHECK(k_ulps == 0);
      }
      CHECK(at::equal(v_got.index_select(1, slot_index), v_exp.index_select(1, slot_index)));
      const at::Tensor keep = untouched.nonzero().squeeze(1);
      CHECK(at::equal(k_got.index_select(1, keep), k_before.view({c.hkv, tokens, c.d}).index_select(1, keep)));
      CHECK(at::equal(v_got.index_select(1, keep), v_before.view({c.hkv, tokens, c.d}).index_select(1, keep)));
    }
  }
}

TEST_CASE("RopeAppend: without q_norm the rotation is exact, bit for bit", "[cuda]") {
  if (NoGpu()) return;
  at::manual_seed(4);
  // Every rounding step is elementwise: no reduction order can differ.
  const int64_t rows = 8, hq = 32, hkv = 8, d = 128;
  const at::Tensor qkv = at::randn({rows, (hq + 2 * hkv) * d}, Bf16()) * 4;
  const at::Tensor positions = at::randint(0, 1 << 20, {rows}, Int32());
  const at::Tensor slots = at::arange(rows, Int32()) * 3 + 1;
  at::Tensor k_pool = at::zeros({hkv, 2, 32, d}, Bf16()), v_pool = at::zeros_like(k_pool);
  const at::Tensor inv_freq = InvFreq(d, 500000.0);
  at::Tensor q = at::empty({rows, hq, d}, Bf16());
  RopeAppendOut(qkv, positions, inv_freq, at::Tensor(), at::Tensor(), 1e-6, hq, slots, k_pool, v_pool, q);
  auto [cos, sin] = RopeCosSinRef(positions, inv_freq);
  CHECK(at::equal(q, RopeRef(qkv.narrow(1, 0, hq * d).view({rows, hq, d}), at::Tensor(), 0, cos, sin)));
}

// ---- SiluMul ----

TEST_CASE("SiluMul: at::silu(gate) * up within one ulp", "[cuda]") {
  if (NoGpu()) return;
  at::manual_seed(5);
  for (int64_t inter : {14336, 1024}) {
    for (int64_t rows : {1, 3, 8}) {
      const at::Tensor gate_up = (at::randn({rows, 2 * inter + 16}, Bf16()) * 4).narrow(1, 0, 2 * inter);
      const at::Tensor want = at::silu(gate_up.narrow(1, 0, inter)) * gate_up.narrow(1, inter, inter);
      const at::Tensor got = SiluMul(gate_up);
      const int64_t ulps = MaxUlps(got, want);
      std::printf("SiluMul I %ld rows %ld: max %ld ulp, max |diff| %g\n", static_cast<long>(inter),
                  static_cast<long>(rows), static_cast<long>(ulps), MaxAbsDiff(got, want));
      INFO("I " << inter << " rows " << rows);
      CHECK(ulps <= 1);
    }
  }
  // Leading dimensions are kept: [N, 1, 2I] -> [N, 1, I].
  const at::Tensor gate_up = at::randn({2, 1, 2048}, Bf16());
  CHECK(SiluMul(gate_up).sizes() == at::IntArrayRef({2, 1, 1024}));
}

// ---- ArgmaxRows ----

TEST_CASE("ArgmaxRows: the first index of the maximum, as at::argmax", "[cuda]") {
  if (NoGpu()) return;
  at::manual_seed(6);
  for (int64_t vocab : {128256, 8192, 1001}) {
    for (int64_t rows : {1, 3, 8}) {
      // A row stride of a multiple of 4 above the width (1001 is not a multiple of 4).
      const int64_t stride = (vocab + 3) / 4 * 4 + 4;
      at::Tensor logits = at::randn({rows, stride}, Float32()).narrow(1, 0, vocab);
      CHECK(at::equal(ArgmaxRows(logits), at::argmax(logits, 1).to(at::kInt)));
    }
  }
  // Ties, ends, constant, -inf and NaN rows; each row's answer is at::argmax's.
  const int64_t vocab = 128256;
  at::Tensor logits = at::randn({9, vocab}, Float32());
  logits[0][70000] = 100.f, logits[0][5] = 100.f;          // tie: the lower index
  logits[1][vocab - 1] = 100.f;                            // the last element
  logits[2][0] = 100.f, logits[2][vocab - 1] = 100.f;      // tie at both ends
  logits[3].fill_(1.5f);                                   // all equal: 0
  logits[4].fill_(-INFINITY);                              // all -inf: 0
  logits[5][1000] = NAN, logits[5][90000] = NAN;           // the first NaN
  logits[6][vocab - 2] = INFINITY;
  logits[7][3] = 0.f, logits[7].fill_(-1.f), logits[7][7] = -0.f, logits[7][6] = 0.f;  // +0 and -0 equal
  logits[8][4099] = 1e30f, logits[8][4100] = 1e30f;
  const at::Tensor got = ArgmaxRows(logits);
  const at::Tensor want = at::argmax(logits, 1).to(at::kInt);
  INFO("got " << got.cpu() << " want " << want.cpu());
  CHECK(at::equal(got, want));
  CHECK(got.cpu()[0].item<int>() == 5);
  CHECK(got.cpu()[5].item<int>() == 1000);
  CHECK(got.cpu()[7].item<int>() == 6);
}

// ---- Gemv ----

struct GemvShape {
  int64_t n, k;
};

// max |got - want| / max |want| and ||got - want|| / ||want||, in float32.
std::pair<double, double> RelativeErrors(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor diff = got.to(at::kFloat) - want;
  return {diff.abs().max().item<double>() / want.abs().max().item<double>(),
          diff.norm().item<double>() / want.norm().item<double>()};
}

TEST_CASE("Gemv: x weight^T (+ residual) within 1e-2 of at::linear in float32", "[cuda]") {
  if (NoGpu()) return;
  at::manual_seed(7);
  // Llama-3-8B's projections (qkv, o, gate_up, down, lm head), the bundled model's, and shapes that
  // leave partial tiles: n not a multiple of 16, k not a multiple of 32.
  const std::vector<GemvShape> shapes = {{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336}, {128256, 4096},
                                         {1152, 384},  {384, 1024},  {1000, 392},   {7, 8}};
  for (const GemvShape& s : shapes) {
    const at::Tensor w = at::randn({s.n, s.k}, Bf16()) * 0.02;
    const at::Tensor w32 = w.to(at::kFloat);
    const bool all_rows = s.n <= 6144;
    for (int64_t rows = 1; rows <= 11; ++rows) {
      if (!all_rows && rows != 1 && rows != 3 && rows != 8) continue;
      const at::Tensor x = at::randn({rows, s.k}, Bf16());
      const at::Tensor want = at::linear(x.to(at::kFloat), w32);
      const auto [max_rel, norm_rel] = RelativeErrors(Gemv(x, w, at::Tensor()), want);
      INFO("n " << s.n << " k " << s.k << " rows " << rows << ": relative max " << max_rel << ", norm " << norm_rel);
      CHECK(max_rel < 1e-2);
      CHECK(norm_rel < 1e-2);
      if (rows == 3 || rows == 8) {
        std::printf("Gemv n %ld k %ld rows %ld: relative max %.3g, norm %.3g\n", static_cast<long>(s.n),
                    static_cast<long>(s.k), static_cast<long>(rows), max_rel, norm_rel);
        // With a residual, in place: residual + x w^T.
        at::Tensor residual = at::randn({rows, s.n}, Bf16());
        const at::Tensor want_res = residual.to(at::kFloat) + want;
        GemvOut(x, w, residual, residual);
        const auto [res_max, res_norm] = RelativeErrors(residual, want_res);
        INFO("with residual: relative max " << res_max << ", norm " << res_norm);
        CHECK(res_max < 1e-2);
        CHECK(res_norm < 1e-2);
      }
    }
  }
}

TEST_CASE("Gemv: [N, 1, K] states and a weight that is a view of a wider one", "[cuda]") {
  if (NoGpu()) return;
  at::manual_seed(8);
  const at::Tensor wide = at::randn({512, 1024 + 64}, Bf16()) * 0.05;
  const at::Tensor w = wide.narrow(1, 0, 1024);  // row stride 1088
  const at::Tensor x = at::randn({4, 1, 1024}, Bf16());
  const at::Tensor got = Gemv(x, w, at::Tensor());
  CHECK(got.sizes() == at::IntArrayRef({4, 1, 512}));
  const auto [max_rel, norm_rel] = RelativeErrors(got, at::linear(x.to(at::kFloat), w.to(at::kFloat)));
  CHECK(max_rel < 1e-2);
  CHECK(norm_rel < 1e-2);
}

// ---- argument checks and graph capture ----

TEST_CASE("the entry points refuse what the kernels cannot take", "[cuda]") {
  if (NoGpu()) return;
  at::Tensor residual = at::randn({2, 4096}, Bf16());
  const at::Tensor weight = at::randn({4096}, Bf16());
  at::Tensor out = at::empty({2, 4096}, Bf16());
  CHECK_THROWS_AS(AddRmsNorm(at::Tensor(), residual, weight.to(at::kFloat), 1e-5, out), c10::Error);
  at::Tensor cpu_residual = residual.cpu();
  CHECK_THROWS_AS(AddRmsNorm(at::Tensor(), cpu_residual, weight, 1e-5, out), c10::Error);
  CHECK_THROWS_AS(AddRmsNorm(at::Tensor(), residual, weight, 1e-5, residual), c10::Error);  // out = residual
  at::Tensor misaligned = at::randn({2, 4096 + 8}, Bf16()).narrow(1, 4, 4096);
  CHECK_THROWS_AS(AddRmsNorm(at::Tensor(), misaligned, weight, 1e-5, out), c10::Error);
  CHECK_THROWS_AS(SiluMul(at::randn({2, 100}, Bf16())), c10::Error);                   // I = 50
  CHECK_THROWS_AS(Gemv(at::randn({2, 64}, Bf16()), at::randn({32, 72}, Bf16()), at::Tensor()), c10::Error);
  CHECK_THROWS_AS(Gemv(at::randn({2, 64}, Bf16()), at::randn({64, 32}, Bf16()).t(), at::Tensor()), c10::Error);
  CHECK_THROWS_AS(ArgmaxRows(at::randn({2, 64}, Bf16())), c10::Error);
  at::Tensor k_pool = at::zeros({2, 4, 16, 64}, Bf16()), v_pool = at::zeros({2, 4, 16, 64}, Bf16());
  const at::Tensor qkv = at::randn({1, 10 * 64}, Bf16());
  const at::Tensor one = at::zeros({1}, Int32());
  const at::Tensor inv_freq = InvFreq(64, 10000.0);
  CHECK_NOTHROW(RopeAppend(qkv, one, inv_freq, at::Tensor(), at::Tensor(), 1e-6, 6, one, k_pool, v_pool));
  CHECK_THROWS_AS(RopeAppend(qkv, one, inv_freq, at::Tensor(), at::Tensor(), 1e-6, 5, one, k_pool, v_pool),
                  c10::Error);  // width is not (5 + 4) x 64
  CHECK_THROWS_AS(RopeAppend(qkv, one.to(at::kLong), inv_freq, at::Tensor(), at::Tensor(), 1e-6, 6, one, k_pool, v_pool),
                  c10::Error);
  CHECK_THROWS_AS(RopeAppend(qkv, one, inv_freq, at::ones({64}, Bf16()), at::Tensor(), 1e-6, 6, one, k_pool, v_pool),
                  c10::Error);  // q_norm without k_norm
}

TEST_CASE("a decode-step chain of the kernels replays from a CUDA graph as it ran eagerly", "[cuda]") {
  if (NoGpu()) return;
  at::manual_seed(9);
  // The bundled model's shapes: H 384, 6 + 2 heads of 64, I 1024, V 8192; 3 rows.
  const int64_t rows = 3, hidden = 384, hq = 6, hkv = 2, d = 64, inter = 1024, vocab = 8192;
  const at::Tensor norm_w = at::randn({hidden}, Bf16());
  const at::Tensor qkv_w = at::randn({(hq + 2 * hkv) * d, hidden}, Bf16()) * 0.05;
  const at::Tensor o_w = at::randn({hidden, hq * d}, Bf16()) * 0.05;
  const at::Tensor gate_up_w = at::randn({2 * inter, hidden}, Bf16()) * 0.05;
  const at::Tensor down_w = at::randn({hidden, inter}, Bf16()) * 0.05;
  const at::Tensor head_w = at::randn({vocab, hidden}, Bf16()) * 0.05;
  const at::Tensor inv_freq = InvFreq(d, 500000.0);
  const at::Tensor positions = at::tensor(std::vector<int32_t>{7, 4000, 131071}, at::kInt).to(at::kCUDA);
  const at::Tensor slots = at::tensor(std::vector<int32_t>{17, 70, 33}, at::kInt).to(at::kCUDA);
  const at::Tensor start = at::randn({rows, hidden}, Bf16());

  struct Result {
    at::Tensor hidden, k_pool, v_pool, ids;
  };
  // Fresh state per run; the chain allocates its intermediates with at::empty (in the graph's pool
  // under capture).
  auto make_state = [&] {
    return Result{start.clone(), at::zeros({hkv, 8, 16, d}, Bf16()), at::zeros({hkv, 8, 16, d}, Bf16()), at::Tensor()};
  };
  auto step = [&](Result& s) {
    const at::Tensor normed = AddRmsNorm(at::Tensor(), s.hidden, norm_w, 1e-5);
    const at::Tensor qkv = Gemv(normed, qkv_w, at::Tensor());
    const at::Tensor q = RopeAppend(qkv, positions, inv_freq, at::Tensor(), at::Tensor(), 1e-5, hq, slots, s.k_pool,
                                    s.v_pool);
    GemvOut(q.view({rows, hq * d}), o_w, s.hidden, s.hidden);
    const at::Tensor normed2 = AddRmsNorm(at::Tensor(), s.hidden, norm_w, 1e-5);
    GemvOut(SiluMul(Gemv(normed2, gate_up_w, at::Tensor())), down_w, s.hidden, s.hidden);
    const at::Tensor logits = Gemv(AddRmsNorm(at::Tensor(), s.hidden, norm_w, 1e-5), head_w, at::Tensor());
    s.ids = ArgmaxRows(logits.to(at::kFloat));
  };
  Result eager = make_state();
  step(eager);
  Result captured = make_state();
  absl::StatusOr<std::unique_ptr<CapturedGraph>> graph = CaptureCudaGraph([&] { step(captured); });
  REQUIRE(graph.ok());
  CHECK(at::equal(captured.hidden, start));  // nothing ran during capture
  (*graph)->Replay();
  CHECK(at::equal(captured.hidden, eager.hidden));
  CHECK(at::equal(captured.k_pool, eager.k_pool));
  CHECK(at::equal(captured.v_pool, eager.v_pool));
  CHECK(at::equal(captured.ids, eager.ids));
}

}  // namespace
}  // namespace cuda
}  // namespace lychee
