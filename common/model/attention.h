// The seam between the decoder and its attention: the model computes projections and RoPE,
// writes keys and values into the sequence's pages of the KV pool, and asks an AttentionBackend
// for the output. Backends (dense, hybrid-head sparse, ...) live in kernels/ and may keep
// per-sequence state, such as the block selection that sparse heads of later layers reuse.
//
// Two ways to attend:
//   Attend / AttendBatch  one sequence at a time over its cache gathered from the pages into one
//                         [num_kv_heads, L, head_dim] tensor (the CPU references, and prefill);
//   paged decode          a whole batched decode step planned once (PlanDecodeStep) into a
//                         workspace the caller owns, then one AttendDecode per layer that reads the
//                         pool through the page tables and only enqueues device work (the CUDA
//                         backends; FlashInfer's plan/run split).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/status.h"

namespace lychee {

class KvPool;

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
  // Adds what another sequence read (a preempted sequence's earlier life).
  void Add(const AttentionTelemetry& other) {
    num_layers = std::max(num_layers, other.num_layers);
    num_kv_heads = std::max(num_kv_heads, other.num_kv_heads);
    tokens_attended.resize(std::max(tokens_attended.size(), other.tokens_attended.size()), 0);
    for (size_t i = 0; i < other.tokens_attended.size(); ++i) tokens_attended[i] += other.tokens_attended[i];
    decode_steps += other.decode_steps;
    kv_bytes_read += other.kv_bytes_read;
    audited = audited || other.audited;
    audited_heads += other.audited_heads;
    max_dropped_mass = std::max(max_dropped_mass, other.max_dropped_mass);
    sum_dropped_mass += other.sum_dropped_mass;
  }
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

// What every layer of one batched decode step shares, given to a paged backend once per step.
struct DecodeStep {
  // Cached positions per row, this step's token included.
  std::vector<int64_t> lengths;
  // Each row's state from NewSequenceState().
  std::vector<SequenceAttentionState*> states;
  // Each row's page table on the host.
  std::vector<const std::vector<int32_t>*> pages;
  const KvPool* pool = nullptr;
  // int32 [rows >= lengths.size(), width] on the pool's device: row r lists the pages of row r's
  // positions 0, page_size, 2 page_size, ...
  at::Tensor page_table;
  double scale = 1.0;
  std::optional<int64_t> sliding_window;
  int64_t batch() const { return static_cast<int64_t>(lengths.size()); }
};

// Device buffers a paged backend plans a decode step into. The backend makes one for a batch and
// page-table capacity; the caller owns it and passes it to every step of at most that size, so that
// no layer call allocates, copies from the host or synchronizes.
class DecodeWorkspace {
 public:
  virtual ~DecodeWorkspace() = default;
  // Which captured graph the planned step replays: steps whose device work differs (an audited
  // step runs more kernels than a plain one) are captured apart. Below kGraphVariants.
  virtual int graph_variant() const { return 0; }
  static constexpr int kGraphVariants = 2;
};

struct DecodeCapacity {
  int64_t max_batch = 1;
  int64_t max_pages = 1;  // page-table width: pages of the longest sequence
  // The workspace's launches cover the capacity whatever a step needs (the kernels read how much
  // work there is from the plan on the device), so that a step captured in a CUDA graph replays
  // correctly for any later step.
  bool for_graph = false;
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

  // Paged decode. The defaults serve every backend: each row's cache is gathered from its pages
  // and attended through AttendBatch. Backends with kernels that read the pages themselves (CUDA)
  // override all three.
  virtual std::unique_ptr<DecodeWorkspace> NewDecodeWorkspace(const KvPool& pool, const DecodeCapacity& capacity) const;
  // Once per step, before layer 0: plans every layer of `step` into `workspace` (host work and at
  // most one copy to the device). Errors name what does not fit.
  virtual absl::Status PlanDecodeStep(const DecodeStep& step, DecodeWorkspace& workspace) const;
  // One layer of the planned step: queries [rows, num_heads, head_dim] (rows >= step.batch(); the
  // rows past the batch are padding whose output is undefined) -> the same shape.
  virtual at::Tensor AttendDecode(int layer, const at::Tensor& queries, const DecodeStep& step,
                                  DecodeWorkspace& workspace) const;
  // Whether AttendDecode only enqueues device work on the workspace's fixed buffers, so that a
  // step can be captured in a CUDA graph and replayed for later steps.
  virtual bool CapturesDecode() const { return false; }
};

}  // namespace lychee
