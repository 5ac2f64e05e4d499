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

// State a backend keeps for one sequence across layers and steps.
class SequenceAttentionState {
 public:
  virtual ~SequenceAttentionState() = default;
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
