// Helpers of the CUDA kernel tests: GPU presence (skip loudly when there is none), checked CUDA
// calls, device buffers, bf16 on the host, and the float64 reference of hybrid decode attention.
#pragma once

#include <cuda_runtime_api.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/hybrid_decode.h"

namespace lychee {
namespace cuda {
namespace testing {

// True when a CUDA device is usable; otherwise says SKIPPED on stdout and as a Catch2 warning.
inline bool HaveGpu() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::printf("SKIPPED: no CUDA device (%s)\n", err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    WARN("SKIPPED: no CUDA device");
    cudaGetLastError();
    return false;
  }
  return true;
}

#define LYCHEE_CUDA_REQUIRE(expr)                                                          \
  do {                                                                                     \
    const cudaError_t lychee_err_ = (expr);                                                \
    INFO(#expr << ": " << cudaGetErrorString(lychee_err_));                                \
    REQUIRE(lychee_err_ == cudaSuccess);                                                   \
  } while (0)

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { Resize(n); }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), n_(o.n_) { o.ptr_ = nullptr, o.n_ = 0; }
  void Resize(size_t n) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    n_ = n;
    if (n > 0) LYCHEE_CUDA_REQUIRE(cudaMalloc(reinterpret_cast<void**>(&ptr_), n * sizeof(T)));
  }
  void Upload(const std::vector<T>& host) {
    REQUIRE(host.size() <= n_);
    LYCHEE_CUDA_REQUIRE(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> Download() const {
    std::vector<T> host(n_);
    LYCHEE_CUDA_REQUIRE(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  T* get() const { return ptr_; }
  size_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

inline uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                      // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
inline float Bf16ToFloat(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
constexpr uint16_t kBf16NaN = 0x7fc0;

// Random bf16 values (normal, times `scale`), never all zero.
inline std::vector<uint16_t> RandomBf16(size_t n, std::mt19937_64& rng, float scale = 1.f) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = FloatToBf16(dist(rng));
  return v;
}

// Max over the block's positions of mean(q_g) . k_p, in float64, for each block.
inline std::vector<double> ReferenceBlockScores(const std::vector<std::vector<double>>& group_queries,
                                                const std::vector<const uint16_t*>& key_rows, int block_size) {
  const size_t dim = group_queries[0].size();
  std::vector<double> pooled(dim, 0.0);
  for (const auto& q : group_queries) {
    for (size_t d = 0; d < dim; ++d) pooled[d] += q[d] / static_cast<double>(group_queries.size());
  }
  const size_t length = key_rows.size();
  std::vector<double> scores((length + block_size - 1) / block_size, -INFINITY);
  for (size_t p = 0; p < length; ++p) {
    double dot = 0;
    for (size_t d = 0; d < dim; ++d) dot += pooled[d] * Bf16ToFloat(key_rows[p][d]);
    scores[p / block_size] = std::max(scores[p / block_size], dot);
  }
  return scores;
}

// softmax(scale q.k) v over `positions`, float64.
inline std::vector<double> ReferenceAttention(const std::vector<double>& q, const std::vector<const uint16_t*>& key_rows,
                                              const std::vector<const uint16_t*>& value_rows,
                                              const std::vector<int64_t>& positions, double scale) {
  const size_t dim = q.size();
  std::vector<double> logits(positions.size());
  double mx = -INFINITY;
  for (size_t i = 0; i < positions.size(); ++i) {
    const uint16_t* k = key_rows[positions[i]];
    double dot = 0;
    for (size_t d = 0; d < dim; ++d) dot += q[d] * Bf16ToFloat(k[d]);
    logits[i] = dot * scale;
    mx = std::max(mx, logits[i]);
  }
  std::vector<double> out(dim, 0.0);
  double sum = 0;
  for (size_t i = 0; i < positions.size(); ++i) {
    const double w = std::exp(logits[i] - mx);
    sum += w;
    const uint16_t* v = value_rows[positions[i]];
    for (size_t d = 0; d < dim; ++d) out[d] += w * Bf16ToFloat(v[d]);
  }
  for (auto& x : out) x /= sum;
  return out;
}

inline std::vector<int64_t> BlockPositions(const std::vector<int32_t>& blocks, int64_t length, int block_size) {
  std::vector<int64_t> positions;
  for (int32_t b : blocks) {
    for (int64_t p = static_cast<int64_t>(b) * block_size; p < std::min<int64_t>(length, (b + 1) * int64_t{block_size}); ++p) {
      positions.push_back(p);
    }
  }
  return positions;
}

// The reference selection from exact scores: mandatory blocks, then the best others by (score
// desc, index asc), up to the budget; every block when they fit. Ascending.
inline std::vector<int32_t> ReferenceSelection(const std::vector<double>& scores, int64_t length,
                                               const BlockSelectionConfig& config) {
  const int64_t num_blocks = NumBlocks(length, config.block_size);
  std::vector<int32_t> all(num_blocks);
  for (int64_t i = 0; i < num_blocks; ++i) all[i] = static_cast<int32_t>(i);
  if (num_blocks <= config.budget_blocks()) return all;
  std::vector<int32_t> selected = MandatoryBlocks(length, config);
  std::vector<bool> taken(num_blocks, false);
  for (int32_t b : selected) taken[b] = true;
  std::vector<int32_t> cand;
  for (int32_t b : all) {
    if (!taken[b]) cand.push_back(b);
  }
  const size_t want = std::min<size_t>(config.budget_blocks() - selected.size(), cand.size());
  std::stable_sort(cand.begin(), cand.end(), [&](int32_t a, int32_t b) { return scores[a] > scores[b]; });
  selected.insert(selected.end(), cand.begin(), cand.begin() + want);
  std::sort(selected.begin(), selected.end());
  return selected;
}

}  // namespace testing
}  // namespace cuda
}  // namespace lychee
