// The seam between the decoder and its attention: the model computes projections and RoPE,
// appends keys and values to the sequence's cache, and asks an AttentionBackend for the output.
// Backends (dense, hybrid-head sparse, ...) live in kernels/ and may keep per-sequence state,
// such as the block selection that sparse heads of later layers reuse.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace lychee {

// What decoding one sequence has read from its KV cache, summed over its decode steps (prefill,
// which every backend computes densely, is not counted). Backends that keep it fill it from
// their SequenceAttentionState; the inference service reports it per request.
struct AttentionTelemetry {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  // Per (layer, KV head), layer-major: cache positions attended exactly, summed over steps.
  std::vector<int64_t> tokens_attended;
  int64_t decode_steps = 0;
  // Keys and values read, plus whatever summaries the policy reads (page bounds, centroids).
  int64_t kv_bytes_read = 0;
  // Audit mode only: per (step, layer, query head), the dense attention mass of the positions
  // not attended exactly, delta = 1 - sum of the dense softmax over the attended positions.
  bool audited = false;
  int64_t audited_heads = 0;
  double max_dropped_mass = 0;
  double sum_dropped_mass = 0;

  int64_t tokens(int64_t layer, int64_t kv_head) const {
    return tokens_attended[layer * num_kv_heads + kv_head];
  }
  // Adds `count` positions to (layer, kv_head), growing the table to hold the layer.
  void AddTokens(int64_t layer, int64_t kv_head, int64_t kv_heads, int64_t count) {
    if (num_kv_heads == 0) num_kv_heads = kv_heads;
    if (layer >= num_layers) {
      num_layers = layer + 1;
      tokens_attended.resize(num_layers * num_kv_heads, 0);
    }
    tokens_attended[layer * num_kv_heads + kv_head] += count;
  }
  double mean_dropped_mass() const { return audited_heads > 0 ? sum_dropped_mass / audited_heads : 0.0; }
  void AddDroppedMass(double delta) {
    audited = true;
    ++audited_heads;
    sum_dropped_mass += delta;
    if (delta > max_dropped_mass) max_dropped_mass = delta;
  }
};

// State a backend keeps for one sequence across layers and steps.
class SequenceAttentionState {
 public:
  virtual ~SequenceAttentionState() = default;
  // Null for backends that keep no account of what they read.
  virtual const AttentionTelemetry* telemetry() const { return nullptr; }
};

struct AttentionInput {
  int layer = 0;
  // [num_heads, T, head_dim], RoPE applied; the queries of the last T positions of the cache.
  at::Tensor queries;
  // [num_kv_heads, L, head_dim]: the layer's whole cache, the T new positions included.
  at::Tensor keys;
  at::Tensor values;
  double scale = 1.0;
  // Mistral's sliding window: a query attends to at most this many positions, itself included.
  std::optional<int64_t> sliding_window;
  // The sequence's state from NewSequenceState(); null for backends that keep none.
  SequenceAttentionState* state = nullptr;
};

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  virtual std::unique_ptr<SequenceAttentionState> NewSequenceState() const { return nullptr; }
  // Returns [num_heads, T, head_dim] in the queries' dtype. Query t sits at cache position
  // L - T + t and attends causally.
  virtual at::Tensor Attend(const AttentionInput& input) const = 0;
  // One decode step of several sequences in the same layer; backends with batched kernels
  // override it.
  virtual std::vector<at::Tensor> AttendBatch(const std::vector<AttentionInput>& inputs) const {
    std::vector<at::Tensor> outputs;
    outputs.reserve(inputs.size());
    for (const AttentionInput& input : inputs) outputs.push_back(Attend(input));
    return outputs;
  }
};

}  // namespace lychee
