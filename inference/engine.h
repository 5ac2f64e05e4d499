// The serving core of lychee-inference, driven without gRPC by the service and by tests.
// One thread runs the model, in iterations after vLLM v1's engine: the scheduler
// (inference/scheduler.h) picks what runs, admitting waiting requests and preempting when the KV
// pool runs out; the KV cache manager (inference/kv_cache_manager.h) holds the one pool of KV
// pages, which sequences take as they grow; the model runner (inference/model_runner.h) runs a
// prefill chunk of every sequence still reading its prompt and the decode steps of all the others
// (continuous batching: new sequences join between steps); the output processor
// (inference/output_processor.h) turns tokens into streamed text and summaries. Cancellation and
// deadlines end a sequence at the next step boundary and free its pages there. Each sequence pins
// the attention it was admitted with: its policy, with the partition then active where the policy
// uses one. Free of LibTorch.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/base/head_partition.h"
#include "common/base/model_config.h"
#include "common/base/tokenizer.h"
#include "common/model/tensor_parallel.h"
#include "common/service/metrics.h"
#include "inference/partition_manager.h"
#include "kernels/policy.h"

namespace lychee {

struct GenerationRequest {
  std::vector<int32_t> prompt_ids;
  int64_t max_new_tokens = 64;
  double temperature = 0;  // 0: greedy
  double top_p = 1;
  uint64_t seed = 0;
  // Generation ends before the first of these strings appears in the text.
  std::vector<std::string> stop_sequences;
  // Unset: the server's default (EngineOptions::hybrid_by_default).
  std::optional<PolicySpec> attention;
  // In [0, 1]: audits every decode step and, once one drops more attention mass than this for a
  // query head, decodes the rest of the generation densely.
  std::optional<double> max_dropped_mass;
  std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
};

enum class FinishReason { kStopToken, kStopSequence, kMaxTokens, kContextLimit };

// What a sequence's attention read over its decode steps, as its backend counted it.
struct GenerationTelemetry {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  std::vector<int64_t> tokens_attended;  // per (layer, KV head), layer-major
  int64_t decode_steps = 0;
  int64_t kv_bytes_read = 0;
  bool audited = false;
  double max_dropped_mass = 0;
  double mean_dropped_mass = 0;
};

// Where and why GenerationRequest::max_dropped_mass switched a sequence to dense attention.
struct DenseFallback {
  // The completion token (0-based) whose decode step dropped too much; the later ones are dense.
  int64_t token_index = 0;
  double dropped_mass = 0;
  double max_dropped_mass = 0;
  std::string Reason() const;
};

struct GenerationSummary {
  FinishReason finish_reason = FinishReason::kMaxTokens;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double queue_seconds = 0;
  double time_to_first_token_seconds = 0;
  double mean_token_latency_seconds = 0;
  double max_token_latency_seconds = 0;
  double total_seconds = 0;
  bool hybrid = false;
  uint64_t partition_version = 0;  // 0 for dense
  int64_t token_budget = 0;
  std::string policy;  // the policy and its parameters, as PolicySpec::Describe gives them
  std::optional<GenerationTelemetry> telemetry;
  // Times the sequence was dropped for an older one when the KV pool ran out, and recomputed.
  int64_t preemptions = 0;
  std::optional<DenseFallback> dense_fallback;
};

// What a client reads from a generation, in order: chunks, then one summary or one error.
struct GenerationEvent {
  enum class Kind { kNothingYet, kChunk, kDone, kError };
  Kind kind = Kind::kNothingYet;
  std::vector<int32_t> token_ids;
  std::string text;
  GenerationSummary summary;
  absl::Status error;
};

// The channel between the scheduler and one client. The scheduler pushes; the client pops and
// may cancel.
class GenerationStream {
 public:
  // The next event, waiting up to `timeout`; kNothingYet when none came. Consecutive chunks
  // are merged into one.
  GenerationEvent Next(std::chrono::milliseconds timeout);
  // Ends the generation at the next step boundary; its memory is freed there.
  void Cancel();
  bool cancelled() const;

 private:
  friend class OutputProcessor;
  void Push(GenerationEvent event);

  mutable absl::Mutex mutex_;
  std::deque<GenerationEvent> events_ ABSL_GUARDED_BY(mutex_);
  bool cancelled_ ABSL_GUARDED_BY(mutex_) = false;
};

// Faults a test injects into the engine, to see that a failing model step fails only the requests
// it holds and frees their KV pages while the others, and later requests, are served. Compiled into
// every build; inert unless a test hands one to the engine (EngineOptions::faults).
struct StepFaults {
  // Called on the engine's thread before each model step (one prefill chunk, or one decode call
  // of the requests that share a backend) with that step's requests; what it throws, the step
  // throws, as a failing kernel check or allocation would.
  std::function<void(const std::vector<const GenerationRequest*>& requests)> before_step;
  // Asked by every allocation of KV pages from the engine's pool; an error it returns is the
  // allocation's.
  std::function<absl::Status(int64_t pages)> page_allocation;
};

struct EngineOptions {
  std::string model_dir;
  std::string device = "cpu";
  // 0: LibTorch's default.
  int threads = 0;
  // The KV pool, in bytes, rounded down to whole pages.
  int64_t kv_cache_bytes = int64_t{2} << 30;
  // When not 0, the KV pool takes this fraction (0 < F <= 1) of the CUDA device's free memory once
  // the model is loaded, in place of kv_cache_bytes; INVALID_ARGUMENT on the CPU.
  double kv_cache_fraction = 0;
  int max_batch = 16;
  int max_queued = 64;
  int64_t max_new_tokens_limit = 4096;
  // 0: the model's max_position_embeddings.
  int64_t max_context_tokens = 0;
  // Prompt tokens a sequence prefills per scheduler iteration, so that a long prompt does not
  // stall the decode steps of the others.
  int64_t prefill_chunk_tokens = 512;
  // What a request without attention gets: lychee with the active partition's own selection when
  // one is active (else dense), or always dense.
  bool hybrid_by_default = true;
  // Capture decode steps as CUDA graphs and replay them (CUDA only).
  bool cuda_graphs = true;
  // The audit period of audited requests that name none.
  int64_t audit_every = kDefaultAuditEvery;
  // Tests only; the servers leave it null.
  std::shared_ptr<const StepFaults> faults;
  // Tensor parallelism (the CPU, over Gloo): this process is rank 0 of the group and holds its shard
  // of the weights; the other ranks are follower processes (RunRankFollower, inference/rank_mirror.h)
  // made with the same options. Null: the whole model in this process.
  std::shared_ptr<const TensorParallelGroup> tensor_parallel;
  // Called once, on the engine's thread, when the engine can serve no more (it lost a
  // tensor-parallel rank), with the UNAVAILABLE error every request gets from then on.
  std::function<void(const absl::Status&)> on_unservable;
};

struct EngineLoad {
  int64_t active_sequences = 0;
  // Waiting for admission, preempted ones included.
  int64_t queued_requests = 0;
  // The bytes of the KV pages in use, and of the whole pool.
  int64_t kv_bytes_reserved = 0;
  int64_t kv_bytes_limit = 0;
  int64_t kv_pages_used = 0;
  int64_t kv_pages_total = 0;
};

// INVALID_ARGUMENT or FAILED_PRECONDITION when the hybrid decoder cannot serve `partition` on a
// model of `config`'s shape (beyond HeadPartition::ValidateFor).
absl::Status CheckPartitionServable(const HeadPartition& partition, const ModelConfig& config);

class Model;

class InferenceEngine {
 public:
  // Loads the model and tokenizer and starts the scheduler. `partitions` and `metrics` must
  // outlive the engine; `metrics` may be null.
  static absl::StatusOr<std::unique_ptr<InferenceEngine>> Create(EngineOptions options, PartitionManager* partitions,
                                                                 MetricsRegistry* metrics);
  ~InferenceEngine();

  // Checks the request (INVALID_ARGUMENT, OUT_OF_RANGE, NOT_FOUND, FAILED_PRECONDITION) and
  // queues it; RESOURCE_EXHAUSTED when its prompt and max_new_tokens could outgrow the whole KV
  // pool, or the queue is full.
  absl::StatusOr<std::shared_ptr<GenerationStream>> Submit(GenerationRequest request);

  const Tokenizer& tokenizer() const;
  const ModelConfig& config() const;
  // The served model, for work beside serving on other threads (shadow validation): its weights
  // are read-only, and each user keeps its own sequences.
  const Model& model() const;
  int64_t max_context_tokens() const;
  int64_t max_new_tokens_limit() const;
  std::string device() const;
  EngineLoad load() const;
  // KV bytes one position of one sequence takes (its pages hold 64 positions each).
  int64_t kv_bytes_per_token() const;

  // OK while the engine can decode; UNAVAILABLE, saying why, once it lost a tensor-parallel rank.
  absl::Status serving_status() const;
  // Ends every generation with UNAVAILABLE and stops the scheduler. Idempotent.
  void Shutdown();
  // Any thread: captures the decode-step graphs of `partition` (dense attention for null) on the
  // engine's thread between two iterations, for each batch bucket, so that requests with it replay
  // from their first step (a no-op without CUDA graphs). The partition manager calls it before a
  // rollout switches; the engine does it at load for dense attention and the active partition.
  absl::Status PrepareGraphs(const PartitionManager::Snapshot& partition);

 private:
  class Impl;
  explicit InferenceEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lychee
