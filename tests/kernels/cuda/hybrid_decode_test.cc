// The CUDA hybrid decode kernels (raw-pointer API) against a float64 CPU reference on random data:
// dense, retrieval (attention + fused block scoring + selection) and sparse heads over several
// layers, so that selections are shared across layers by KV-head index and sparse heads without a
// selection fall back to the sink and recent blocks. Needs a GPU; says SKIPPED where there is none.
#include <catch2/catch.hpp>

#include <cmath>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <sstream>

#include "tests/kernels/cuda/cuda_test_util.h"

namespace lychee {
namespace cuda {
namespace {

using testing::Bf16ToFloat;
using testing::DeviceBuffer;
using testing::FloatToBf16;

// kPaged: every sequence's positions in pages of one pool, [H, pages, page_size, D], its page
// table a shuffled set of them.
enum class Layout { kHeadMajor, kTokenMajor, kPerSequence, kPaged };

struct Scenario {
  int head_dim = 128;
  int group = 4;
  int num_kv_heads = 3;
  std::vector<int64_t> lengths;
  BlockSelectionConfig config;
  std::vector<std::vector<KvHeadMode>> layers;
  Layout layout = Layout::kHeadMajor;
  uint64_t seed = 1;
  float scale = 0;
  bool use_pdl = true;
  int ctas_per_sm = 2;
  int kernel_variant = 0;  // 0 tensor cores, 1 / 2 CUDA cores (see HybridDecodeArgs)
  int page_size = 64;      // kPaged
  // Plan laid out for room beyond the step and launched at that room, as a CUDA-graph step is.
  bool fixed_capacity = false;
};

std::string Describe(const Scenario& s) {
  std::ostringstream os;
  os << "D=" << s.head_dim << " G=" << s.group << " Hkv=" << s.num_kv_heads << " lengths={";
  for (size_t i = 0; i < s.lengths.size(); ++i) os << (i ? "," : "") << s.lengths[i];
  os << "} bs=" << s.config.block_size << " budget=" << s.config.token_budget << " sink=" << s.config.sink_tokens
     << " recent=" << s.config.recent_tokens << " layout=" << static_cast<int>(s.layout) << " page=" << s.page_size
     << " fixed=" << s.fixed_capacity << " variant=" << s.kernel_variant
     << " layers=";
  for (const auto& layer : s.layers) {
    os << "[";
    for (KvHeadMode m : layer) os << (m == KvHeadMode::kDense ? 'D' : m == KvHeadMode::kRetrieval ? 'R' : 'S');
    os << "]";
  }
  return os.str();
}

// Cheap deterministic uniform bf16 in [-1.5, 1.5) (never all zero).
struct FastRandom {
  uint64_t state;
  explicit FastRandom(uint64_t seed) : state(seed * 0x9E3779B97F4A7C15ull + 1) {}
  float Next() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (static_cast<float>(state >> 40) / static_cast<float>(1 << 24)) * 3.f - 1.5f;
  }
  void Fill(std::vector<uint16_t>& v) {
    for (auto& x : v) x = FloatToBf16(Next());
  }
};

// One layer's caches on host and device in the scenario's layout.
struct LayerCaches {
  std::vector<std::vector<uint16_t>> k_host, v_host;  // one entry (batched) or one per sequence
  std::vector<DeviceBuffer<uint16_t>> k_dev, v_dev;
  int64_t batch_stride = 0, head_stride = 0, token_stride = 0;
  std::vector<int64_t> head_strides;  // per sequence (kPerSequence)
  // kPaged: page tables [B][width], pages in the pool, positions per page.
  std::vector<std::vector<int32_t>> pages;
  int64_t pool_pages = 0, page_size = 0, width = 0;
  DeviceBuffer<int32_t> page_table;
  // Row (D values) of sequence b, head h, position p in the host copy.
  const uint16_t* Row(const std::vector<std::vector<uint16_t>>& host, int b, int h, int64_t p) const {
    if (!pages.empty()) {
      return host[0].data() + ((h * pool_pages + pages[b][p / page_size]) * page_size + p % page_size) * token_stride;
    }
    if (host.size() == 1) return host[0].data() + b * batch_stride + h * head_stride + p * token_stride;
    return host[b].data() + h * head_strides[b] + p * token_stride;
  }
};

LayerCaches MakeCaches(const Scenario& s, FastRandom& rng) {
  LayerCaches c;
  const int B = static_cast<int>(s.lengths.size()), H = s.num_kv_heads, D = s.head_dim;
  const int64_t max_len = *std::max_element(s.lengths.begin(), s.lengths.end());
  auto poison_tail = [&](std::vector<uint16_t>& host, int b, auto index) {
    // Positions at or past the length hold NaN: reading one would show in the output.
    for (int h = 0; h < H; ++h) {
      for (int64_t p = s.lengths[b]; p < index.cap(b); ++p) {
        for (int d = 0; d < D; ++d) host[index(b, h, p) + d] = testing::kBf16NaN;
      }
    }
  };
  if (s.layout == Layout::kPaged) {
    // Pages for each sequence's length and one more, handed out in a shuffled order; page 0 unused.
    c.page_size = s.page_size;
    std::vector<int64_t> counts;
    for (int b = 0; b < B; ++b) counts.push_back((s.lengths[b] + c.page_size) / c.page_size);
    c.width = *std::max_element(counts.begin(), counts.end());
    c.pool_pages = 1 + std::accumulate(counts.begin(), counts.end(), int64_t{0});
    std::vector<int32_t> order(c.pool_pages - 1);
    std::iota(order.begin(), order.end(), 1);
    std::mt19937_64 shuffle(s.seed);
    std::shuffle(order.begin(), order.end(), shuffle);
    size_t next = 0;
    std::vector<int32_t> table(static_cast<size_t>(B) * c.width, 0);
    for (int b = 0; b < B; ++b) {
      c.pages.emplace_back(order.begin() + next, order.begin() + next + counts[b]);
      std::copy(c.pages[b].begin(), c.pages[b].end(), table.begin() + b * c.width);
      next += counts[b];
    }
    c.token_stride = D;
    c.head_stride = c.pool_pages * c.page_size * D;
    std::vector<uint16_t> k(static_cast<size_t>(H) * c.pool_pages * c.page_size * D), v(k.size());
    rng.Fill(k);
    rng.Fill(v);
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < H; ++h) {
        for (int64_t p = s.lengths[b]; p < static_cast<int64_t>(c.pages[b].size()) * c.page_size; ++p) {
          const int64_t at = ((h * c.pool_pages + c.pages[b][p / c.page_size]) * c.page_size + p % c.page_size) * D;
          for (int d = 0; d < D; ++d) k[at + d] = v[at + d] = testing::kBf16NaN;
        }
      }
    }
    c.page_table.Resize(table.size());
    c.page_table.Upload(table);
    c.k_host.push_back(std::move(k));
    c.v_host.push_back(std::move(v));
  } else if (s.layout == Layout::kPerSequence) {
    for (int b = 0; b < B; ++b) {
      const int64_t cap = s.lengths[b] + 5 + 8 * b;
      std::vector<uint16_t> k(static_cast<size_t>(H) * cap * D), v(k.size());
      rng.Fill(k);
      rng.Fill(v);
      c.head_strides.push_back(cap * D);
      c.token_stride = D;
      struct Index {
        int64_t cap_, D_;
        int64_t cap(int) const { return cap_; }
        int64_t operator()(int, int h, int64_t p) const { return (h * cap_ + p) * D_; }
      } index{cap, D};
      poison_tail(k, b, index);
      poison_tail(v, b, index);
      c.k_host.push_back(std::move(k));
      c.v_host.push_back(std::move(v));
    }
  } else {
    const int64_t cap = max_len + 3;
    std::vector<uint16_t> k(static_cast<size_t>(B) * H * cap * D), v(k.size());
    rng.Fill(k);
    rng.Fill(v);
    if (s.layout == Layout::kHeadMajor) {
      c.batch_stride = H * cap * D, c.head_stride = cap * D, c.token_stride = D;
    } else {
      c.batch_stride = cap * H * D, c.head_stride = D, c.token_stride = H * D;
    }
    struct Index {
      int64_t cap_, bs_, hs_, ts_;
      int64_t cap(int) const { return cap_; }
      int64_t operator()(int b, int h, int64_t p) const { return b * bs_ + h * hs_ + p * ts_; }
    } index{cap, c.batch_stride, c.head_stride, c.token_stride};
    for (int b = 0; b < B; ++b) {
      poison_tail(k, b, index);
      poison_tail(v, b, index);
    }
    c.k_host.push_back(std::move(k));
    c.v_host.push_back(std::move(v));
  }
  for (size_t i = 0; i < c.k_host.size(); ++i) {
    c.k_dev.emplace_back(c.k_host[i].size());
    c.v_dev.emplace_back(c.v_host[i].size());
    c.k_dev.back().Upload(c.k_host[i]);
    c.v_dev.back().Upload(c.v_host[i]);
  }
  return c;
}

int NumSms() {
  cudaDeviceProp prop;
  LYCHEE_CUDA_REQUIRE(cudaGetDeviceProperties(&prop, 0));
  return prop.multiProcessorCount;
}

struct SelectionCheck {
  int exact = 0, near_tie = 0;
};

void RunScenario(const Scenario& s) {
  INFO(Describe(s));
  const int B = static_cast<int>(s.lengths.size()), H = s.num_kv_heads, G = s.group, D = s.head_dim;
  const int HQ = H * G;
  const BlockSelectionConfig& cfg = s.config;
  const int budget_blocks = cfg.budget_blocks();
  FastRandom rng(s.seed);

  DeviceBuffer<int32_t> sel_indices(static_cast<size_t>(B) * H * budget_blocks);
  DeviceBuffer<int32_t> sel_counts(static_cast<size_t>(B) * H);
  sel_indices.Upload(std::vector<int32_t>(sel_indices.size(), 1 << 20));  // unwritten entries point far away
  sel_counts.Upload(std::vector<int32_t>(sel_counts.size(), -1));
  std::vector<bool> has_selection(H, false);
  std::vector<std::vector<std::vector<int32_t>>> selection(B, std::vector<std::vector<int32_t>>(H));
  const double scale = s.scale > 0 ? s.scale : 1.0 / std::sqrt(static_cast<double>(D));
  SelectionCheck sel_stats;

  for (size_t layer = 0; layer < s.layers.size(); ++layer) {
    INFO("layer " << layer);
    const std::vector<KvHeadMode>& modes = s.layers[layer];
    REQUIRE(static_cast<int>(modes.size()) == H);
    std::vector<uint16_t> q_host(static_cast<size_t>(B) * HQ * D);
    rng.Fill(q_host);
    LayerCaches caches = MakeCaches(s, rng);
    DeviceBuffer<uint16_t> q_dev(q_host.size()), out_dev(q_host.size());
    q_dev.Upload(q_host);
    out_dev.Upload(std::vector<uint16_t>(q_host.size(), testing::kBf16NaN));  // poison

    HybridDecodeShape shape{B, HQ, H, D};
    PlanOptions popts;
    popts.num_sms = NumSms();
    popts.ctas_per_sm = s.ctas_per_sm;
    HybridPlan plan;
    std::unique_ptr<bool[]> flags(new bool[H]);
    for (int h = 0; h < H; ++h) flags[h] = has_selection[h];
    const int64_t max_len = *std::max_element(s.lengths.begin(), s.lengths.end());
    const PlanCapacity room = HybridPlanCapacity(HybridDecodeShape{B + 2, HQ, H, D}, cfg, 2 * max_len + 1000, popts);
    const std::string error = PlanHybridDecode(shape, cfg, s.lengths.data(), modes.data(), flags.get(), popts, &plan,
                                               s.fixed_capacity ? &room : nullptr);
    REQUIRE(error.empty());
    DeviceBuffer<int32_t> plan_dev(plan.words.size());
    plan_dev.Upload(plan.words);
    DeviceBuffer<uint8_t> workspace(HybridWorkspaceBytes(plan, shape));

    HybridDecodeArgs a;
    a.q = q_dev.get();
    a.q_batch_stride = HQ * D, a.q_head_stride = D;
    a.out = out_dev.get();
    a.out_batch_stride = HQ * D, a.out_head_stride = D;
    DeviceBuffer<const void*> k_ptrs, v_ptrs;
    DeviceBuffer<int64_t> k_hs, v_hs;
    if (s.layout == Layout::kPerSequence) {
      std::vector<const void*> kp, vp;
      for (int b = 0; b < B; ++b) kp.push_back(caches.k_dev[b].get()), vp.push_back(caches.v_dev[b].get());
      k_ptrs.Resize(B), v_ptrs.Resize(B), k_hs.Resize(B), v_hs.Resize(B);
      k_ptrs.Upload(kp), v_ptrs.Upload(vp), k_hs.Upload(caches.head_strides), v_hs.Upload(caches.head_strides);
      a.k_ptrs = k_ptrs.get(), a.v_ptrs = v_ptrs.get();
      a.k_head_strides = k_hs.get(), a.v_head_strides = v_hs.get();
      a.k_head_stride = a.v_head_stride = caches.head_strides[0];
    } else {
      a.k = caches.k_dev[0].get(), a.v = caches.v_dev[0].get();
      a.k_batch_stride = a.v_batch_stride = caches.batch_stride;
      a.k_head_stride = a.v_head_stride = caches.head_stride;
    }
    if (s.layout == Layout::kPaged) {
      a.page_table = caches.page_table.get();
      a.page_table_stride = caches.width;
      a.page_size = static_cast<int>(caches.page_size);
      a.k_page_stride = a.v_page_stride = caches.page_size * D;
    }
    a.launch_capacity = s.fixed_capacity;
    a.k_token_stride = a.v_token_stride = caches.token_stride;
    a.sel_indices = sel_indices.get();
    a.sel_counts = sel_counts.get();
    a.sel_batch_stride = static_cast<int64_t>(H) * budget_blocks, a.sel_head_stride = budget_blocks;
    a.sel_count_batch_stride = H;
    a.workspace = workspace.get();
    a.plan = plan_dev.get();
    a.scale = s.scale;
    a.use_pdl = s.use_pdl;
    a.kernel_variant = s.kernel_variant;
    LYCHEE_CUDA_REQUIRE(LaunchHybridDecode(a, plan, shape, cfg, nullptr));
    LYCHEE_CUDA_REQUIRE(cudaGetLastError());
    LYCHEE_CUDA_REQUIRE(cudaDeviceSynchronize());

    const std::vector<uint16_t> out = out_dev.Download();
    const std::vector<int32_t> idx = sel_indices.Download();
    const std::vector<int32_t> cnt = sel_counts.Download();

    std::vector<std::string> failures;
    double worst = 0;
    for (int b = 0; b < B; ++b) {
      const int64_t L = s.lengths[b];
      for (int h = 0; h < H; ++h) {
        std::vector<const uint16_t*> krows(L), vrows(L);
        for (int64_t p = 0; p < L; ++p) {
          krows[p] = caches.Row(caches.k_host, b, h, p);
          vrows[p] = caches.Row(caches.v_host, b, h, p);
        }
        std::vector<int64_t> positions;
        if (modes[h] == KvHeadMode::kSparse) {
          positions = testing::BlockPositions(has_selection[h] ? selection[b][h] : MandatoryBlocks(L, cfg), L,
                                              cfg.block_size);
        } else {
          positions.resize(L);
          std::iota(positions.begin(), positions.end(), 0);
        }
        std::vector<std::vector<double>> queries(G, std::vector<double>(D));
        for (int g = 0; g < G; ++g) {
          for (int d = 0; d < D; ++d) queries[g][d] = Bf16ToFloat(q_host[(static_cast<size_t>(b) * HQ + h * G + g) * D + d]);
          const std::vector<double> ref = testing::ReferenceAttention(queries[g], krows, vrows, positions, scale);
          double num = 0, den = 0, max_ref = 0, max_err = 0;
          for (int d = 0; d < D; ++d) {
            const double got = Bf16ToFloat(out[(static_cast<size_t>(b) * HQ + h * G + g) * D + d]);
            const double err = std::fabs(got - ref[d]);
            num += err * err, den += ref[d] * ref[d];
            max_ref = std::max(max_ref, std::fabs(ref[d]));
            max_err = std::isnan(got) ? INFINITY : std::max(max_err, err);
          }
          const double rel = std::sqrt(num / std::max(den, 1e-30));
          worst = std::max(worst, std::isnan(rel) ? INFINITY : rel);
          if (!(rel <= 1e-2) || !(max_err <= 2e-2 * max_ref + 1e-4)) {
            std::ostringstream os;
            os << "b=" << b << " h=" << h << " g=" << g << " mode=" << static_cast<int>(modes[h]) << " L=" << L
               << " positions=" << positions.size() << " rel=" << rel << " max_err=" << max_err << " max_ref=" << max_ref;
            failures.push_back(os.str());
          }
        }
        if (modes[h] == KvHeadMode::kRetrieval) {
          const int count = cnt[b * H + h];
          const int64_t expected = SelectedBlockCount(L, cfg);
          if (count != expected) {
            failures.push_back("selection count " + std::to_string(count) + " != " + std::to_string(expected) +
                               " at b=" + std::to_string(b) + " h=" + std::to_string(h));
            continue;
          }
          std::vector<int32_t> got(idx.begin() + (static_cast<size_t>(b) * H + h) * budget_blocks,
                                   idx.begin() + (static_cast<size_t>(b) * H + h) * budget_blocks + count);
          std::sort(got.begin(), got.end());
          const std::vector<double> scores = testing::ReferenceBlockScores(queries, krows, cfg.block_size);
          const std::vector<int32_t> want = testing::ReferenceSelection(scores, L, cfg);
          const int64_t nb = NumBlocks(L, cfg.block_size);
          bool valid = std::adjacent_find(got.begin(), got.end()) == got.end() && !got.empty() && got.front() >= 0 &&
                       got.back() < nb;
          if (valid && got != want) {
            // Accept only near-ties: every chosen non-mandatory block scores at least as high as
            // every rejected one, up to float32 rounding of the dot products.
            const std::vector<int32_t> mandatory = MandatoryBlocks(L, cfg);
            std::set<int32_t> chosen(got.begin(), got.end());
            for (int32_t m : mandatory) valid &= chosen.count(m) == 1;
            double min_chosen = INFINITY, max_rejected = -INFINITY, max_abs = 0;
            const std::set<int32_t> mand(mandatory.begin(), mandatory.end());
            for (int64_t j = 0; j < nb; ++j) {
              max_abs = std::max(max_abs, std::fabs(scores[j]));
              if (mand.count(static_cast<int32_t>(j))) continue;
              if (chosen.count(static_cast<int32_t>(j))) {
                min_chosen = std::min(min_chosen, scores[j]);
              } else {
                max_rejected = std::max(max_rejected, scores[j]);
              }
            }
            valid &= min_chosen >= max_rejected - 1e-4 * (1 + max_abs);
            if (valid) ++sel_stats.near_tie;
          } else if (valid) {
            ++sel_stats.exact;
          }
          if (!valid) {
            failures.push_back("invalid selection at b=" + std::to_string(b) + " h=" + std::to_string(h) +
                               " L=" + std::to_string(L));
          }
          selection[b][h] = got;
        }
      }
    }
    INFO("worst relative error " << worst);
    INFO("first failure: " << (failures.empty() ? std::string("none") : failures.front()));
    CHECK(failures.empty());
    for (int h = 0; h < H; ++h) {
      if (modes[h] == KvHeadMode::kRetrieval) has_selection[h] = true;
    }
  }
  std::printf("ok: %s (selections exact %d, near-tie %d)\n", Describe(s).c_str(), sel_stats.exact, sel_stats.near_tie);
}

BlockSelectionConfig Config(int block, int budget, int sink = 64, int recent = 64) {
  BlockSelectionConfig c;
  c.block_size = block, c.token_budget = budget, c.sink_tokens = sink, c.recent_tokens = recent;
  return c;
}

constexpr KvHeadMode R = KvHeadMode::kRetrieval, S = KvHeadMode::kSparse, Dn = KvHeadMode::kDense;

TEST_CASE("dense split-KV decode matches float64 attention", "[cuda]") {
  if (!testing::HaveGpu()) return;
  uint64_t seed = 100;
  for (int head_dim : {64, 128}) {
    for (int group : {1, 2, 3, 4, 8}) {
      for (const std::vector<int64_t>& lengths :
           {std::vector<int64_t>{1, 63, 65}, std::vector<int64_t>{1000}, std::vector<int64_t>{64, 4097, 20000}}) {
        Scenario s;
        s.head_dim = head_dim, s.group = group, s.num_kv_heads = 2, s.lengths = lengths;
        s.config = Config(64, 4096);
        s.layers = {{Dn, Dn}};
        s.layout = group % 2 ? Layout::kTokenMajor : Layout::kHeadMajor;
        s.kernel_variant = lengths.size() == 3 && lengths[0] == 1 ? 1 : lengths.size() == 1 ? 2 : 0;
        s.seed = ++seed;
        RunScenario(s);
      }
    }
  }
}

TEST_CASE("hybrid decode: retrieval selection is shared by KV-head index across layers", "[cuda]") {
  if (!testing::HaveGpu()) return;
  // Layer 0: head 0 sparse with no selection yet (sink + recent), head 1 retrieval.
  // Layer 1: head 0 retrieval, head 1 sparse on layer 0's selection, head 2 still fallback.
  // Layer 2: heads 0 and 1 sparse on the latest selections, head 2 retrieval.
  const std::vector<std::vector<KvHeadMode>> three = {{S, R, S}, {R, S, S}, {S, S, R}};
  std::vector<Scenario> scenarios;
  auto add = [&](int D, int G, std::vector<int64_t> lengths, BlockSelectionConfig cfg, Layout layout) {
    Scenario s;
    s.head_dim = D, s.group = G, s.num_kv_heads = 3, s.lengths = std::move(lengths), s.config = cfg;
    s.layers = three, s.layout = layout, s.seed = 1000 + scenarios.size();
    scenarios.push_back(s);
  };
  add(128, 4, {20000, 65, 4097}, Config(64, 1024), Layout::kHeadMajor);
  add(64, 3, {20000}, Config(64, 4096), Layout::kTokenMajor);
  add(128, 8, {1000, 1, 64}, Config(32, 256), Layout::kPerSequence);
  add(64, 1, {4097, 63, 20000}, Config(128, 1024), Layout::kPerSequence);
  add(128, 2, {1000, 4097, 65}, Config(64, 100000), Layout::kHeadMajor);  // budget above every context
  add(64, 8, {63}, Config(32, 4096), Layout::kHeadMajor);
  add(128, 3, {20000, 20000, 1000}, Config(128, 2048, 200, 300), Layout::kTokenMajor);
  add(64, 4, {4097, 1000, 2}, Config(64, 512, 0, 0), Layout::kPerSequence);
  add(128, 1, {4097, 20000}, Config(32, 4096, 64, 64), Layout::kHeadMajor);
  add(64, 2, {1000, 20000, 4097}, Config(128, 4096), Layout::kTokenMajor);
  scenarios[3].kernel_variant = 1;
  scenarios[7].kernel_variant = 2;
  for (Scenario& s : scenarios) RunScenario(s);

  // Dense heads mixed in, no PDL, an explicit scale, a different split target.
  Scenario mixed;
  mixed.head_dim = 128, mixed.group = 4, mixed.num_kv_heads = 3, mixed.lengths = {4097, 20000, 64};
  mixed.config = Config(64, 1024);
  mixed.layers = {{R, Dn, S}, {S, R, Dn}, {Dn, S, S}};
  mixed.use_pdl = false, mixed.scale = 0.05f, mixed.ctas_per_sm = 5, mixed.seed = 77;
  RunScenario(mixed);

  // Long context: 128K + 77 tokens, batch 1, Llama-3 shape of group.
  Scenario longest;
  longest.head_dim = 128, longest.group = 4, longest.num_kv_heads = 2, longest.lengths = {131072 + 77};
  longest.config = Config(64, 4096);
  longest.layers = {{R, S}, {S, R}};
  longest.seed = 78;
  RunScenario(longest);
}

TEST_CASE("paged caches read through shuffled page tables, plans at a fixed capacity", "[cuda]") {
  if (!testing::HaveGpu()) return;
  std::vector<Scenario> scenarios;
  auto add = [&](int D, int G, std::vector<int64_t> lengths, BlockSelectionConfig cfg, int page, bool fixed) {
    Scenario s;
    s.head_dim = D, s.group = G, s.num_kv_heads = 3, s.lengths = std::move(lengths), s.config = cfg;
    s.layers = {{Dn, R, S}, {R, S, S}, {S, S, R}}, s.layout = Layout::kPaged, s.page_size = page;
    s.fixed_capacity = fixed, s.seed = 3000 + scenarios.size();
    scenarios.push_back(s);
  };
  add(128, 4, {20000, 65, 4097}, Config(64, 1024), 64, false);
  add(128, 4, {20000, 65, 4097}, Config(64, 1024), 64, true);
  add(64, 8, {1000, 1, 64}, Config(32, 256), 16, true);     // blocks span two pages
  add(128, 2, {4097, 63, 20000}, Config(128, 1024), 256, true);  // pages hold two blocks
  add(64, 1, {131072 + 77}, Config(64, 4096), 64, true);
  scenarios[2].kernel_variant = 1;
  for (Scenario& s : scenarios) RunScenario(s);
}

TEST_CASE("block selection keeps the mandatory blocks and the best others, ties to the lower index", "[cuda]") {
  if (!testing::HaveGpu()) return;
  struct Case {
    int64_t length;
    BlockSelectionConfig cfg;
  };
  const std::vector<Case> cases = {
      {40 * 16, Config(16, 5 * 16, 16, 16)},  {38 * 16, Config(16, 5 * 16, 16, 24)},
      {1000, Config(32, 320, 70, 100)},       {131072, Config(64, 4096)},
      {20000, Config(128, 1024, 0, 0)},       {64 * 70 + 1, Config(64, 4096)},
      {64 * 64, Config(64, 4096)},            {1 << 20, Config(64, 4096, 128, 256)},
  };
  std::mt19937_64 rng(5);
  for (int distinct : {3, 1000000}) {
    std::vector<SelectItem> items;
    std::vector<float> scores;
    // Scores drawn from `distinct` values: with 3, most scores tie.
    std::uniform_int_distribution<int> pick(0, distinct - 1);
    for (size_t i = 0; i < cases.size(); ++i) {
      const int64_t nb = NumBlocks(cases[i].length, cases[i].cfg.block_size);
      items.push_back({static_cast<int32_t>(i), 0, static_cast<int32_t>(cases[i].length),
                       static_cast<int32_t>(scores.size())});
      for (int64_t j = 0; j < nb; ++j) scores.push_back(static_cast<float>(pick(rng)) * 0.25f - 0.5f);
    }
    DeviceBuffer<float> scores_dev(scores.size());
    scores_dev.Upload(scores);
    for (size_t i = 0; i < cases.size(); ++i) {
      INFO("case " << i << " length " << cases[i].length << " distinct " << distinct);
      const BlockSelectionConfig& cfg = cases[i].cfg;
      DeviceBuffer<SelectItem> item_dev(1);
      SelectItem item = items[i];
      item.batch = 0;
      item_dev.Upload({item});
      DeviceBuffer<int32_t> idx(cfg.budget_blocks()), cnt(1);
      idx.Upload(std::vector<int32_t>(cfg.budget_blocks(), -1));
      cnt.Upload({-1});
      LYCHEE_CUDA_REQUIRE(LaunchBlockSelect(scores_dev.get(), item_dev.get(), 1, idx.get(), cnt.get(), 0, 0, 0, cfg,
                                            nullptr));
      LYCHEE_CUDA_REQUIRE(cudaDeviceSynchronize());
      const std::vector<int32_t> got_all = idx.Download();
      const int count = cnt.Download()[0];
      const int64_t nb = NumBlocks(cases[i].length, cfg.block_size);
      const std::vector<double> block_scores(scores.begin() + items[i].score_offset,
                                             scores.begin() + items[i].score_offset + nb);
      const std::vector<int32_t> want = testing::ReferenceSelection(block_scores, cases[i].length, cfg);
      REQUIRE(count == static_cast<int>(want.size()));
      std::vector<int32_t> got(got_all.begin(), got_all.begin() + count);
      std::sort(got.begin(), got.end());
      CHECK(got == want);
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace lychee
