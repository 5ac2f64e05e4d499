// The Llama / Qwen / Mistral decoder in LibTorch: prefill and single-token decode over a
// per-sequence KV cache, with attention delegated to an AttentionBackend. fp32 on the CPU
// (bf16 weights upcast), bf16 on CUDA.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/attention.h"
#include "common/model_config.h"

namespace lychee {

// Keys and values of one sequence, every layer, grown by doubling so that appends are cheap.
class KvCache {
 public:
  KvCache(const ModelConfig& config, at::TensorOptions options);

  // Appends [num_kv_heads, T, head_dim] keys and values to `layer`.
  void Append(int layer, const at::Tensor& keys, const at::Tensor& values);
  // [num_kv_heads, length, head_dim] views of what `layer` holds.
  at::Tensor Keys(int layer) const;
  at::Tensor Values(int layer) const;
  // Positions held by the last layer appended to (all layers after a full step).
  int64_t length() const { return lengths_.empty() ? 0 : lengths_.back(); }
  int64_t capacity() const { return capacity_; }
  size_t num_bytes() const;
  // Allocates room for exactly `tokens` positions (when it has less), so that a server that
  // accounts KV memory per sequence up front never sees the cache grow past its reservation.
  void Reserve(int64_t tokens);

 private:
  void Grow(int64_t min_capacity);
  void Reallocate(int64_t capacity);

  std::vector<at::Tensor> keys_;
  std::vector<at::Tensor> values_;
  std::vector<int64_t> lengths_;
  int64_t capacity_ = 0;
  int64_t num_kv_heads_;
  int64_t head_dim_;
  at::TensorOptions options_;
};

// One sequence being decoded: its cache, and the attention backend it was admitted with (held
// for its whole life, so that a backend swapped in later does not change it mid-sequence).
class Sequence {
 public:
  Sequence(const ModelConfig& config, at::TensorOptions cache_options,
           std::shared_ptr<const AttentionBackend> attention);

  int64_t length() const { return cache_.length(); }
  const KvCache& cache() const { return cache_; }
  void ReserveCache(int64_t tokens) { cache_.Reserve(tokens); }
  const AttentionBackend& attention() const { return *attention_; }
  // The backend's state for this sequence (null for backends that keep none), which carries
  // the telemetry of what decoding has read.
  const SequenceAttentionState* attention_state() const { return attention_state_.get(); }

 private:
  friend class Model;
  KvCache cache_;
  std::shared_ptr<const AttentionBackend> attention_;
  std::unique_ptr<SequenceAttentionState> attention_state_;
};

struct ModelOptions {
  at::Device device = at::kCPU;
  // Compute dtype: kFloat on the CPU, kBFloat16 on CUDA by default.
  at::ScalarType dtype = at::kFloat;
};

// "cpu" (float32) or "cuda" (bf16 on device 0); FAILED_PRECONDITION where no CUDA device is
// usable, INVALID_ARGUMENT for another name.
absl::StatusOr<ModelOptions> ModelOptionsForDevice(const std::string& device);

class Model {
 public:
  // Reads config.json and the safetensors weights of `model_dir`; every error names the file
  // and the tensor or field.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& model_dir,
                                                     ModelOptions options = {});
  ~Model();

  const ModelConfig& config() const { return config_; }
  const ModelOptions& options() const { return options_; }
  const std::string& model_dir() const { return model_dir_; }

  std::unique_ptr<Sequence> NewSequence(std::shared_ptr<const AttentionBackend> attention) const;
  // A new sequence holding a copy of `source`'s cache that decodes on with `attention`, whose
  // state starts fresh. Lets one prefill serve several backends whose prefill is dense and
  // leaves nothing in their state (the evaluation harness compares policies this way).
  std::unique_ptr<Sequence> Fork(const Sequence& source, std::shared_ptr<const AttentionBackend> attention) const;

  // Runs `ids` through the model after what `sequence` already holds and returns the float32
  // logits of the last position, [vocab_size].
  absl::StatusOr<at::Tensor> Prefill(Sequence& sequence, absl::Span<const int32_t> ids) const;
  // One new token for each sequence (sequences may differ in length); returns float32 logits
  // [sequences.size(), vocab_size].
  absl::StatusOr<at::Tensor> Decode(absl::Span<Sequence* const> sequences,
                                    absl::Span<const int32_t> ids) const;

  // The final-normed hidden states of every position of `ids`, [T, hidden_size], computed in
  // one pass without a KV cache and with autograd left on: calibration differentiates through
  // the attention backend's gates. `state` comes from attention.NewSequenceState().
  absl::StatusOr<at::Tensor> HiddenStates(absl::Span<const int32_t> ids, const AttentionBackend& attention,
                                          SequenceAttentionState* state) const;

 private:
  struct Layer;
  // Attends one layer: queries [N, heads, T, D], new keys and values [N, kv_heads, T, D];
  // returns [N, heads, T, D].
  using AttendFn = std::function<at::Tensor(int layer, const at::Tensor& queries, const at::Tensor& keys,
                                            const at::Tensor& values)>;

  Model() = default;
  absl::Status CheckIds(absl::Span<const int32_t> ids) const;
  at::Tensor Embed(absl::Span<const int32_t> ids) const;
  // hidden: [N, T, hidden]; positions: [N, T] int64.
  at::Tensor Forward(at::Tensor hidden, const at::Tensor& positions, const AttendFn& attend) const;
  at::Tensor Attention(const Layer& layer, int layer_index, const at::Tensor& normed, const at::Tensor& positions,
                       const AttendFn& attend) const;
  // Appends the new keys and values to each sequence's cache and attends through its backend.
  at::Tensor AttendCached(absl::Span<Sequence* const> sequences, int layer, const at::Tensor& queries,
                          const at::Tensor& keys, const at::Tensor& values) const;
  AttentionInput MakeInput(int layer, const at::Tensor& queries, at::Tensor keys, at::Tensor values,
                           SequenceAttentionState* state) const;
  at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight) const;
  std::pair<at::Tensor, at::Tensor> RopeCosSin(const at::Tensor& positions) const;

  ModelConfig config_;
  ModelOptions options_;
  std::string model_dir_;
  at::Tensor embed_tokens_;
  at::Tensor lm_head_;
  at::Tensor final_norm_;
  at::Tensor rope_inv_freq_;  // float32 [head_dim / 2]
  std::vector<Layer> layers_;
};

}  // namespace lychee
