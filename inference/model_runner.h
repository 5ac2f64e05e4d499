// The model and what runs it for the engine: the one DecodeContext of the engine's thread, the
// attention backends (shared by every request with the same attention, so that they decode
// together), and per request its sampler and its current sequence in the KV pool. A request keeps
// its backend and its sampler's state across preemptions, so that its generation goes on as if
// uninterrupted; only the sequence is dropped and made again. Under tensor parallelism every call
// that runs the model, or changes what a follower holds, is first sent to the follower ranks
// (RankLeader), and a step that loses the group leaves the runner unable to decode: every later
// step fails at once with the UNAVAILABLE error of serving_status(). Not thread-safe: the engine's
// thread only, except decode_counts(), failed_steps(), dense_fallbacks() and serving_status().
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/base/model_config.h"
#include "inference/engine.h"
#include "inference/engine_request.h"
#include "inference/partition_manager.h"
#include "inference/rank_mirror.h"

namespace lychee {

class AttentionBackend;
class ThreadCudaStream;
class DecodeContext;
class KvPool;
class Model;

// How the decode steps ran, summed since the start.
struct DecodeCounts {
  int64_t graph_replays = 0;
  int64_t eager_steps = 0;
  int64_t graph_capture_failures = 0;
};

class ModelRunner {
 public:
  // Loads the model on `options.device`; `partitions` must outlive the runner.
  static absl::StatusOr<std::unique_ptr<ModelRunner>> Create(const EngineOptions& options,
                                                             PartitionManager* partitions);
  ~ModelRunner();

  const Model& model() const { return *model_; }
  const ModelConfig& config() const;
  // The pool every sequence is made in; before the first Start.
  void UseKvPool(std::shared_ptr<KvPool> pool);

  // Makes the request's sequence, empty. On its first admission this resolves its attention (and
  // fills the summary's attention fields); FAILED_PRECONDITION when the partition it needs is gone.
  absl::Status Start(EngineRequest& request);
  // Prefills the next `tokens` positions of the prompt, or of the prompt and generated tokens
  // being recomputed. Returns the first token when this completes the prompt of a request that has
  // none yet; a recomputed request decodes its next token instead, as it would have.
  absl::StatusOr<std::optional<int32_t>> Prefill(EngineRequest& request, int64_t tokens);
  // One token for each request, from one decode call per group of requests that share a backend,
  // so that each group can replay a captured graph. A group's error is each of its requests'.
  // Errors of a step (Start, Prefill, a decode group), thrown or returned, are its requests' alone:
  // RESOURCE_EXHAUSTED when it ran out of memory, else INTERNAL, naming the step and the cause.
  std::vector<absl::StatusOr<int32_t>> Decode(absl::Span<EngineRequest* const> requests);
  // Drops the request's sequence (its pages go back to the pool) and keeps the rest.
  void Preempt(EngineRequest& request);
  // Forgets the request; returns what its attention read over all its sequences, where the
  // backend keeps telemetry.
  std::optional<GenerationTelemetry> Release(EngineRequest& request);

  // Between two iterations of the engine: under tensor parallelism, tells the follower ranks that
  // rank 0 is alive when nothing was sent to them for a while (their wait for the next command has
  // the group's timeout); one that does not take it is lost, as in a step.
  void KeepRanksTogether();

  // Captures the decode-step graphs of every batch bucket for the backend of `partition` at its
  // own token budget (of dense attention for a null partition), so that requests that start with it
  // replay from their first step; see Model::PrepareDecodeGraphs.
  absl::Status PrepareGraphs(const PartitionManager::Snapshot& partition);

  // On CUDA, the calling thread (the engine's) launches on a stream of the device's greatest
  // priority while the result lives, ahead of background work such as shadow validation; null on
  // the CPU.
  absl::StatusOr<std::unique_ptr<ThreadCudaStream>> UseServingStream() const;

  // Any thread.
  DecodeCounts decode_counts() const;
  // OK but once a tensor-parallel rank is lost.
  absl::Status serving_status() const;
  // Steps (Start, a prefill chunk, a decode group) that failed, since the start.
  int64_t failed_steps() const { return failed_steps_.load(); }
  // Sequences that GenerationRequest::max_dropped_mass switched to dense attention.
  int64_t dense_fallbacks() const { return dense_fallbacks_.load(); }

 private:
  struct RequestState;
  ModelRunner(const EngineOptions& options, PartitionManager* partitions);
  // The policy and partition a request is served with.
  struct ResolvedAttention {
    PolicySpec spec;
    PartitionManager::Snapshot partition;
  };
  // Resolves the request's partition (routing it through a running canary where it has none pinned)
  // and fills the summary's attention fields.
  absl::StatusOr<ResolvedAttention> ResolveAttention(EngineRequest& request);
  RequestState& StateOf(const EngineRequest& request);
  // Runs one step as Guarded does; under tensor parallelism not at all once the group is lost, and
  // a step that fails with UNAVAILABLE loses it.
  template <typename Step>
  auto RunStep(absl::string_view name, const Step& step) -> decltype(step());
  absl::Status RunStart(EngineRequest& request);
  absl::StatusOr<std::optional<int32_t>> RunPrefill(EngineRequest& request, int64_t tokens);
  // One decode call for `rows` of `requests`, which share a backend; their tokens go into `tokens`.
  absl::Status DecodeGroup(absl::Span<EngineRequest* const> requests, const std::vector<size_t>& rows,
                           std::vector<absl::StatusOr<int32_t>>& tokens);
  // Calls the test's fault hook, if any, with the requests of the step about to run.
  void InjectFaults(absl::Span<EngineRequest* const> requests) const;
  // Once an audited step of a request with GenerationRequest::max_dropped_mass dropped more than
  // that, switches it to dense attention and notes where and why in its summary. Under tensor
  // parallelism `dropped_over_ranks` is the largest mass so far over every rank's KV heads (this
  // rank's telemetry holds its own heads' only).
  void BoundDroppedMass(EngineRequest& request, std::optional<double> dropped_over_ranks);
  // Adds the sequence's telemetry to what the request's earlier sequences read.
  static void KeepTelemetry(RequestState& state);
  void CountDecodeSteps();

  PartitionManager* const partitions_;
  const std::shared_ptr<const StepFaults> faults_;
  // The audit period of both sides of a canary.
  const int64_t audit_every_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<DecodeContext> decode_context_;
  std::shared_ptr<KvPool> pool_;
  std::unique_ptr<ShardBackends> backends_;
  // Under tensor parallelism; null otherwise.
  std::unique_ptr<RankLeader> leader_;
  std::map<uint64_t, std::unique_ptr<RequestState>> states_;
  std::shared_ptr<const AttentionBackend> prepared_;

  std::atomic<int64_t> graph_replays_{0};
  std::atomic<int64_t> eager_steps_{0};
  std::atomic<int64_t> graph_capture_failures_{0};
  std::atomic<int64_t> failed_steps_{0};
  std::atomic<int64_t> dense_fallbacks_{0};
};

}  // namespace lychee
