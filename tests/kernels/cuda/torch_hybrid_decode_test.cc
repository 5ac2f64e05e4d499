// The LibTorch wrapper of the CUDA hybrid decode kernels against a float64 LibTorch reference:
// per-sequence caches given as views of larger caches and batched caches, layers sharing one
// selection state, BeginStep, and the argument checks. Needs a GPU; says SKIPPED where none.
#include "tests/torch_catch.h"

#include <cmath>
#include <cstdio>

#include "kernels/cuda/torch_hybrid_decode.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace lychee {
namespace cuda {
namespace {

constexpr KvHeadMode R = KvHeadMode::kRetrieval, S = KvHeadMode::kSparse, Dn = KvHeadMode::kDense;

at::Tensor Positions(const std::vector<int32_t>& blocks, int64_t length, int block_size) {
  std::vector<int64_t> pos;
  for (int32_t b : blocks) {
    for (int64_t p = int64_t{b} * block_size; p < std::min<int64_t>(length, (b + 1) * int64_t{block_size}); ++p) {
      pos.push_back(p);
    }
  }
  return at::tensor(pos, at::kLong);
}

// softmax(scale q k^T) v in float64 over `positions`: q [G, D], k and v [L, D] (CPU).
at::Tensor Reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                     double scale) {
  const at::Tensor ks = k.index_select(0, positions).to(at::kDouble);
  const at::Tensor vs = v.index_select(0, positions).to(at::kDouble);
  const at::Tensor p = at::softmax(at::matmul(q.to(at::kDouble), ks.t()) * scale, -1);
  return at::matmul(p, vs);
}

double RelativeError(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.to(at::kDouble);
  if (!at::isfinite(g).all().item<bool>()) return INFINITY;
  return (g - want).norm().item<double>() / std::max(want.norm().item<double>(), 1e-30);
}

TEST_CASE("torch wrapper: dense decode over per-sequence cache views", "[cuda][torch]") {
  if (!testing::HaveGpu()) return;
  at::manual_seed(11);
  const int64_t H = 8, G = 4, D = 128;
  const std::vector<int64_t> lengths = {5000, 77, 1};
  const auto cuda = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  std::vector<at::Tensor> k_full, v_full, k_views, v_views;
  for (size_t b = 0; b < lengths.size(); ++b) {
    k_full.push_back(at::randn({H, lengths[b] + 100 * static_cast<int64_t>(b) + 8, D}, cuda));
    v_full.push_back(at::randn_like(k_full.back()));
    k_views.push_back(k_full.back().narrow(1, 0, lengths[b]));
    v_views.push_back(v_full.back().narrow(1, 0, lengths[b]));
  }
  const at::Tensor q = at::randn({static_cast<int64_t>(lengths.size()), H * G, D}, cuda);
  const at::Tensor out = DenseDecodeAttention(q, k_views, v_views, lengths);
  REQUIRE(out.sizes() == q.sizes());
  const at::Tensor out_cpu = out.cpu();
  for (size_t b = 0; b < lengths.size(); ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const at::Tensor want = Reference(q[b].narrow(0, h * G, G).cpu(), k_views[b][h].cpu(), v_views[b][h].cpu(),
                                        at::arange(lengths[b], at::kLong), 1.0 / std::sqrt(double(D)));
      CHECK(RelativeError(out_cpu[b].narrow(0, h * G, G), want) < 1e-2);
    }
  }
}

TEST_CASE("torch wrapper: hybrid layers share the selection state by KV-head index", "[cuda][torch]") {
  if (!testing::HaveGpu()) return;
  at::manual_seed(12);
  const int64_t B = 2, H = 3, G = 2, D = 64, cap = 9000;
  const std::vector<int64_t> lengths = {8999, 3000};
  HybridDecodeOptions options;
  options.selection.block_size = 64;
  options.selection.token_budget = 1024;
  const auto cuda = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  HybridSelectionState state(B, H, options.selection, at::Device(at::kCUDA, 0));
  const std::vector<std::vector<KvHeadMode>> layers = {{R, R, R}, {S, R, S}, {S, Dn, S}};
  for (int step = 0; step < 2; ++step) {
    state.BeginStep();
    for (const std::vector<KvHeadMode>& modes : layers) {
      std::vector<bool> had(H);
      for (int64_t h = 0; h < H; ++h) had[h] = state.has_selection(h);
      const at::Tensor selection_before = state.indices().cpu(), counts_before = state.counts().cpu();
      const at::Tensor k = at::randn({B, H, cap, D}, cuda), v = at::randn({B, H, cap, D}, cuda);
      const at::Tensor q = at::randn({B, H * G, D}, cuda);
      const at::Tensor out = HybridDecodeAttention(q, k, v, lengths, modes, state, options).cpu();
      const at::Tensor k_cpu = k.cpu(), v_cpu = v.cpu(), q_cpu = q.cpu();
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
          at::Tensor positions = at::arange(lengths[b], at::kLong);
          if (modes[h] == S) {
            std::vector<int32_t> blocks;
            if (had[h]) {
              const int n = counts_before[b][h].item<int>();
              for (int i = 0; i < n; ++i) blocks.push_back(selection_before[b][h][i].item<int>());
            } else {
              blocks = MandatoryBlocks(lengths[b], options.selection);
            }
            std::sort(blocks.begin(), blocks.end());
            positions = Positions(blocks, lengths[b], 64);
          }
          const at::Tensor want = Reference(q_cpu[b].narrow(0, h * G, G), k_cpu[b][h], v_cpu[b][h], positions,
                                            1.0 / std::sqrt(double(D)));
          INFO("step " << step << " b " << b << " h " << h << " mode " << static_cast<int>(modes[h]));
          CHECK(RelativeError(out[b].narrow(0, h * G, G), want) < 1e-2);
          if (modes[h] == R) {
            CHECK(state.counts().cpu()[b][h].item<int>() == SelectedBlockCount(lengths[b], options.selection));
          }
        }
      }
    }
  }
}

TEST_CASE("torch wrapper: argument checks", "[cuda][torch]") {
  if (!testing::HaveGpu()) return;
  const auto cuda = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const at::Tensor q = at::randn({1, 8, 128}, cuda);
  const at::Tensor k = at::randn({1, 2, 100, 128}, cuda);
  CHECK_NOTHROW(DenseDecodeAttention(q, k, k, {100}));
  CHECK_THROWS(DenseDecodeAttention(q.to(at::kFloat), k, k, {100}));            // dtype
  CHECK_THROWS(DenseDecodeAttention(q, k, k, {101}));                           // length past the cache
  CHECK_THROWS(DenseDecodeAttention(q, k.narrow(3, 0, 64), k.narrow(3, 0, 64), {100}));  // head_dim mismatch
  CHECK_THROWS(DenseDecodeAttention(q.cpu(), k, k, {100}));                     // device
  CHECK_THROWS(DenseDecodeAttention(at::randn({1, 7, 128}, cuda), k, k, {100}));  // group
  HybridSelectionState state(1, 2, BlockSelectionConfig{}, at::Device(at::kCUDA, 0));
  CHECK_THROWS(HybridDecodeAttention(q, k, k, {100}, {R}, state));              // modes size
  HybridDecodeOptions other;
  other.selection.block_size = 32;
  CHECK_THROWS(HybridDecodeAttention(q, k, k, {100}, {R, S}, state, other));    // state/options mismatch
  CHECK_NOTHROW(HybridDecodeAttention(q, k, k, {100}, {R, S}, state));
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
}

}  // namespace
}  // namespace cuda
}  // namespace lychee
