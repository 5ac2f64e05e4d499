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
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/base/model_config.h"
#include "common/model/attention.h"
#include "common/model/kv_pool.h"
#include "common/model/tensor_parallel.h"

namespace lychee {

// One sequence being decoded: its page table in a KV pool, and the attention backend it was
// admitted with (held for its whole life, so that a backend swapped in later does not change it
// mid-sequence). Gives its pages back when destroyed.
class Sequence {
 public:
  Sequence(std::shared_ptr<KvPool> pool, std::shared_ptr<const AttentionBackend> attention);
  ~Sequence();
  Sequence(const Sequence&) = delete;
  Sequence& operator=(const Sequence&) = delete;

  int64_t length() const { return length_; }
  // Positions the sequence's pages hold.
  int64_t capacity() const { return static_cast<int64_t>(pages_.size()) * pool_->page_size(); }
  const std::vector<int32_t>& pages() const { return pages_; }
  const KvPool& pool() const { return *pool_; }
  // Takes pages from the pool until `tokens` positions fit; RESOURCE_EXHAUSTED, taking none, when
  // the pool has too few.
  absl::Status Reserve(int64_t tokens);
  const AttentionBackend& attention() const { return *attention_; }
  const std::shared_ptr<const AttentionBackend>& attention_ptr() const { return attention_; }
  // The backend's state for this sequence (null for backends that keep none), which carries
  // the telemetry of what decoding has read.
  const SequenceAttentionState* attention_state() const { return attention_state_.get(); }
  // Decodes on with `attention` from the next step, its state fresh. The cache carries over: every
  // backend prefills densely and keeps every head's whole cache.
  void SwitchAttention(std::shared_ptr<const AttentionBackend> attention);

 private:
  friend class Model;
  std::shared_ptr<KvPool> pool_;
  std::vector<int32_t> pages_;
  int64_t length_ = 0;
  std::shared_ptr<const AttentionBackend> attention_;
  std::unique_ptr<SequenceAttentionState> attention_state_;
};

struct DecodeOptions {
  // Capture each batch-size bucket's decode step as a CUDA graph and replay it (CUDA, paged
  // backends only); otherwise every step is launched op by op.
  bool cuda_graphs = true;
  // Largest batch a graph is captured for; larger batches run eagerly.
  int64_t max_graph_batch = 8;
};

// What a decode step leaves on the device: float32 logits [rows, vocab] and each row's argmax, int32
// [rows].
struct DecodeStepOutput {
  at::Tensor logits;
  at::Tensor greedy;
};

// Counts of how a DecodeContext's steps ran, for metrics and benchmarks.
struct DecodeStats {
  int64_t graph_captures = 0;
  int64_t graph_replays = 0;
  int64_t eager_steps = 0;
  int64_t capture_failures = 0;
  std::string last_capture_error;
};

// What a caller keeps across its decode steps: per batch-size bucket, the step's inputs on the
// device (ids, positions, write slots, page tables), the backend's plan workspace and, on CUDA, the
// captured graph of the step. Not thread-safe: one per decoding thread.
class DecodeContext {
 public:
  explicit DecodeContext(DecodeOptions options = {});
  ~DecodeContext();
  const DecodeOptions& options() const { return options_; }
  DecodeStats stats() const { return stats_; }
  // The argmax of each row's logits in the latest step decoded with this context (computed on the
  // device with the step, so that greedy rows need not copy their logits to the host).
  std::vector<int32_t> GreedyTokens() const;

 private:
  friend class Model;
  struct Bucket;
  DecodeOptions options_;
  DecodeStats stats_;
  bool graphs_failed_ = false;
  std::vector<std::unique_ptr<Bucket>> buckets_;
  at::Tensor last_greedy_;
};

struct ModelOptions {
  at::Device device = at::kCPU;
  // Compute dtype: kFloat on the CPU, kBFloat16 on CUDA by default.
  at::ScalarType dtype = at::kFloat;
  // CUDA decode steps on the fused kernels of common/model/cuda (residual add + RMSNorm, RoPE with the KV
  // append, SiLU times up) where this build has them; false runs the LibTorch operations of the
  // reference path (for comparison).
  bool fused_decode = true;
  // With fused_decode, the projections of steps of up to 8 rows on our tensor-core GEMV instead of
  // cuBLAS (bf16 weights without biases).
  bool small_batch_gemv = true;
  // With fused_decode, the step's fused kernels start while the kernel before them finishes
  // (programmatic dependent launch, Hopper): no launch gap, and each GEMV warms L2 with its weight
  // meanwhile (common/model/cuda/model_kernels.h). False launches them one after the other.
  bool overlap_kernel_launches = true;
  // Tensor parallelism: this process is rank group->rank() of the group and holds only its shard
  // of the weights (common/model/tensor_parallel.h); every rank must run the same calls in the same order.
  // Null: the whole model in this process. Steps run eagerly on the LibTorch path (neither the
  // fused CUDA kernels nor CUDA graphs yet).
  std::shared_ptr<const TensorParallelGroup> tensor_parallel;
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
  // The shape of this rank's shard (heads, KV heads, intermediate size per rank); config() without
  // tensor parallelism. KV pools and attention backends (a head partition through
  // ShardHeadPartition) are of this shape.
  const ModelConfig& shard_config() const { return shard_config_; }
  const ModelOptions& options() const { return options_; }
  const std::string& model_dir() const { return model_dir_; }

  // A fixed pool of `num_pages` pages on the model's device, in its compute dtype.
  absl::StatusOr<std::shared_ptr<KvPool>> NewKvPool(int64_t num_pages, int64_t page_size = kDefaultPageSize) const;
  // A sequence in `pool`.
  std::unique_ptr<Sequence> NewSequence(std::shared_ptr<KvPool> pool,
                                        std::shared_ptr<const AttentionBackend> attention) const;
  // A sequence with a growable pool of its own.
  std::unique_ptr<Sequence> NewSequence(std::shared_ptr<const AttentionBackend> attention) const;
  // A new sequence in `source`'s pool holding a copy of its cache that decodes on with `attention`,
  // whose state starts fresh. Lets one prefill serve several backends whose prefill is dense and
  // leaves nothing in their state (the evaluation harness compares policies this way).
  absl::StatusOr<std::unique_ptr<Sequence>> Fork(Sequence& source,
                                                 std::shared_ptr<const AttentionBackend> attention) const;

  // Runs `ids` through the model after what `sequence` already holds and returns the float32
  // logits of the last position, [vocab_size].
  absl::StatusOr<at::Tensor> Prefill(Sequence& sequence, absl::Span<const int32_t> ids) const;
  // One new token for each sequence (sequences may differ in length); returns float32 logits
  // [sequences.size(), vocab_size] (a view of the context's buffers, valid until its next step).
  // When every sequence has the same paged backend the step is planned once and, with a context
  // on CUDA, replayed from a captured graph; otherwise each layer attends sequence by sequence.
  // RESOURCE_EXHAUSTED when a sequence's pool has no page for the new position.
  absl::StatusOr<at::Tensor> Decode(absl::Span<Sequence* const> sequences, absl::Span<const int32_t> ids,
                                    DecodeContext* context = nullptr) const;

  // Captures the decode step of `attention` over `pool` for every batch-size bucket `context` would
  // capture (1, 2, 4, ... up to its max_graph_batch), so that the first steps of real sequences
  // replay instead of capturing: each bucket's first step runs eagerly and its second is captured,
  // as RunDecode does, on throwaway sequences of one prefilled token that take a page each for
  // the time of the call. Does nothing where the context would not capture (no CUDA, graphs off, or a
  // backend that decodes eagerly), nor under tensor parallelism (the other ranks would not join these
  // steps' collectives; the graphs are captured on the ranks' first common steps instead). The context's counts of
  // eager steps and replays leave these steps out. RESOURCE_EXHAUSTED when the pool has no pages for them; a failed
  // capture is the error it returns, and the context decodes eagerly from then on, as after any failed capture.
  // UNAVAILABLE, naming `step` and the cause, once the tensor-parallel group was aborted
  // (TensorParallelGroup::Abort); OK otherwise. Prefill and Decode check it before they launch
  // anything; a caller checks it again after reading a step's results back, which a step running
  // when the group was aborted may have left incomplete.
  absl::Status CheckGroup(absl::string_view step) const;

  absl::Status PrepareDecodeGraphs(const std::shared_ptr<const AttentionBackend>& attention,
                                   const std::shared_ptr<KvPool>& pool, DecodeContext& context) const;

  // The final-normed hidden states of every position of `ids`, [T, hidden_size], computed in
  // one pass without a KV cache and with autograd left on: calibration differentiates through
  // the attention backend's gates. `state` comes from attention.NewSequenceState().
  absl::StatusOr<at::Tensor> HiddenStates(absl::Span<const int32_t> ids, const AttentionBackend& attention,
                                          SequenceAttentionState* state) const;
  // HiddenStates one layer at a time, so that calibration's backward can recompute a layer's
  // activations instead of keeping every layer's: the embedding of `ids`, [1, T, hidden]; decoder
  // layer `layer` over the whole sequence `hidden` (positions 0..T-1), [1, T, hidden]; the final
  // norm, [T, hidden].
  absl::StatusOr<at::Tensor> EmbedForTraining(absl::Span<const int32_t> ids) const;
  at::Tensor LayerForTraining(int layer, const at::Tensor& hidden, const AttentionBackend& attention,
                              SequenceAttentionState* state) const;
  at::Tensor FinalNorm(const at::Tensor& hidden) const;

  // This model's weights (the same tensors, no copy) with its collectives on `group` instead: work
  // on another thread beside this model's steps (shadow validation) must keep its collectives off
  // the group that serving's steps use. INVALID_ARGUMENT unless `group` has this model's rank and
  // world size.
  absl::StatusOr<std::unique_ptr<Model>> SharingWeights(std::shared_ptr<const TensorParallelGroup> group) const;

 private:
  struct Layer;
  // Attends one layer: queries [N, heads, T, D], new keys and values [N, kv_heads, T, D];
  // returns [N, heads, T, D].
  using AttendFn = std::function<at::Tensor(int layer, const at::Tensor& queries, const at::Tensor& keys,
                                            const at::Tensor& values)>;

  Model() = default;
  absl::Status CheckIds(absl::Span<const int32_t> ids) const;
  at::Tensor Embed(absl::Span<const int32_t> ids) const;
  double Scale() const;
  // hidden: [N, T, hidden]; positions: [N, T] int64.
  at::Tensor Forward(at::Tensor hidden, const at::Tensor& positions, const AttendFn& attend) const;
  // One decoder layer; cos and sin [N, 1, T, D].
  at::Tensor DecoderLayer(int layer_index, at::Tensor hidden, const at::Tensor& cos, const at::Tensor& sin,
                          const AttendFn& attend) const;
  // Whole-sequence attention of a single sequence through `attention`, and its positions [1, T].
  AttendFn WholeSequenceAttend(const AttentionBackend& attention, SequenceAttentionState* state) const;
  at::Tensor WholeSequencePositions(int64_t length) const;
  // cos and sin of the positions' RoPE angles, [N, 1, T, D].
  at::Tensor Attention(const Layer& layer, int layer_index, const at::Tensor& normed, const at::Tensor& cos,
                       const at::Tensor& sin, const AttendFn& attend) const;
  AttentionInput MakeInput(int layer, const at::Tensor& queries, at::Tensor keys, at::Tensor values,
                           SequenceAttentionState* state) const;
  at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight) const;
  std::pair<at::Tensor, at::Tensor> RopeCosSin(const at::Tensor& positions) const;
  // The embedding rows of `ids` (any integer dtype); under tensor parallelism each rank looks up its
  // vocabulary slice and one all-reduce joins them.
  at::Tensor EmbedRows(const at::Tensor& ids) const;
  // x weight^T (+ bias) of a row-parallel projection: the ranks' partial sums all-reduced before
  // the bias.
  at::Tensor RowParallelLinear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) const;
  // float32 logits [rows, vocab] of final-normed hidden states; under tensor parallelism each rank
  // scores its vocabulary slice (JoinVocabSlices).
  at::Tensor Logits(const at::Tensor& normed) const;
  // Under tensor parallelism, float32 [rows, vocab] from this rank's scores of its vocabulary slice
  // [rows, slice]: written into a zeroed full row, and one all-reduce joins the ranks' rows.
  at::Tensor JoinVocabSlices(const at::Tensor& local) const;

  at::Tensor RunPrefill(Sequence& sequence, absl::Span<const int32_t> ids) const;
  absl::StatusOr<at::Tensor> RunDecode(absl::Span<Sequence* const> sequences, absl::Span<const int32_t> ids,
                                       int64_t width, DecodeContext& context) const;

  struct DecodeGroup;
  // The context's bucket for a step of `batch` sequences like `first` (backend and pool) whose page
  // tables are at most `width` pages; graph buckets only for a batch of one backend and pool.
  absl::StatusOr<DecodeContext::Bucket*> BucketFor(DecodeContext& context, const Sequence& first, int64_t batch,
                                                   int64_t width, bool whole_batch) const;
  // Writes the group's step inputs into its bucket (one copy to the device) and fills its DecodeStep.
  void StageInputs(DecodeGroup& group, absl::Span<Sequence* const> sequences, absl::Span<const int32_t> ids) const;
  // The decode step from the embedding to the logits: every group's new keys and values written
  // through its slots, its attention through its backend's paged decode.
  DecodeStepOutput DecodeForward(const at::Tensor& ids, const at::Tensor& positions, std::vector<DecodeGroup>& groups) const;
  // The same step on the fused CUDA kernels, with the residual stream added in place.
  DecodeStepOutput FusedDecodeForward(const at::Tensor& ids, std::vector<DecodeGroup>& groups) const;
  bool UsesFusedDecode() const;
  // Whether a CUDA graph can hold the step's collectives: true with one rank, and with a group whose
  // collectives run on the device's stream (NCCL).
  bool CollectivesCapturable() const;

  ModelConfig config_;
  ModelOptions options_;
  ModelConfig shard_config_;
  VocabSlice vocab_slice_;  // the rows of embed_tokens_ and lm_head_
  std::string model_dir_;
  at::Tensor embed_tokens_;
  at::Tensor lm_head_;
  at::Tensor final_norm_;
  at::Tensor rope_inv_freq_;  // float32 [head_dim / 2]
  std::vector<Layer> layers_;
};

}  // namespace lychee
