// The dense CPU attention against a naive per-element attention in double precision.
#include "tests/torch_catch.h"

#include <cmath>
#include <optional>

#include "kernels/dense_attention.h"

namespace lychee {
namespace {

at::Tensor NaiveAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                          std::optional<int64_t> window) {
  const int64_t heads = q.size(0), queries = q.size(1), dim = q.size(2), kv_heads = k.size(0), length = k.size(1);
  at::Tensor qd = q.to(at::kDouble), kd = k.to(at::kDouble), vd = v.to(at::kDouble);
  at::Tensor out = at::zeros({heads, queries, dim}, at::kDouble);
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t kv = h / (heads / kv_heads);
    for (int64_t t = 0; t < queries; ++t) {
      const int64_t position = length - queries + t;
      const int64_t first = window ? std::max<int64_t>(0, position - *window + 1) : 0;
      at::Tensor scores = at::mv(kd[kv].slice(0, first, position + 1), qd[h][t]) * scale;
      out[h][t] = at::mv(vd[kv].slice(0, first, position + 1).t(), at::softmax(scores, 0));
    }
  }
  return out;
}

TEST_CASE("dense attention equals naive attention: GQA, causal prefill, decode, windows, query chunks") {
  at::manual_seed(7);
  struct Shape {
    int64_t heads, kv_heads, queries, length, dim;
    std::optional<int64_t> window;
    int64_t max_score_elements;
  };
  const Shape shapes[] = {
      {6, 2, 1, 300, 64, std::nullopt, int64_t{1} << 26},  {6, 2, 17, 17, 64, std::nullopt, int64_t{1} << 26},
      {8, 8, 5, 40, 32, std::nullopt, int64_t{1} << 26},   {8, 1, 9, 70, 16, std::nullopt, 8 * 70 * 2},
      {4, 2, 33, 50, 16, int64_t{8}, 4 * 50},              {4, 2, 1, 100, 16, int64_t{10}, int64_t{1} << 26},
  };
  for (const Shape& s : shapes) {
    at::Tensor q = at::randn({s.heads, s.queries, s.dim});
    at::Tensor k = at::randn({s.kv_heads, s.length, s.dim});
    at::Tensor v = at::randn({s.kv_heads, s.length, s.dim});
    const double scale = 1.0 / std::sqrt(static_cast<double>(s.dim));
    at::Tensor actual = DenseAttention(q, k, v, scale, s.window, s.max_score_elements);
    at::Tensor expected = NaiveAttention(q, k, v, scale, s.window);
    INFO("heads " << s.heads << " kv " << s.kv_heads << " T " << s.queries << " L " << s.length);
    REQUIRE(actual.sizes() == expected.sizes());
    CHECK((actual.to(at::kDouble) - expected).abs().max().item<double>() < 1e-5);
  }
}

}  // namespace
}  // namespace lychee
