#include "inference/engine.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <functional>
#include <future>
#include <thread>

#include <glog/logging.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/base/status_macros.h"
#include "common/model/cuda_support.h"
#include "common/model/sampling.h"
#include "inference/engine_request.h"
#include "inference/kv_cache_manager.h"
#include "inference/model_runner.h"
#include "inference/output_processor.h"
#include "inference/scheduler.h"
#include "kernels/hybrid_attention.h"

namespace lychee {
namespace {

// How long the idle engine sleeps before it looks again at queued requests' deadlines.
constexpr std::chrono::milliseconds kIdlePoll(50);

}  // namespace

absl::Status CheckPartitionServable(const HeadPartition& partition, const ModelConfig& config) {
  return CheckHybridFits(partition, config);
}

std::string DenseFallback::Reason() const {
  return absl::StrFormat(
      "the audited decode step of completion token %d dropped %.4f of a query head's attention mass, over "
      "max_dropped_mass %.4f; the tokens after it were decoded with dense attention",
      token_index, dropped_mass, max_dropped_mass);
}

GenerationEvent GenerationStream::Next(std::chrono::milliseconds timeout) {
  absl::MutexLock lock(&mutex_);
  const auto has_event = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) { return !events_.empty(); };
  if (!mutex_.AwaitWithTimeout(absl::Condition(&has_event), absl::FromChrono(timeout))) return {};
  GenerationEvent event = std::move(events_.front());
  events_.pop_front();
  while (event.kind == GenerationEvent::Kind::kChunk && !events_.empty() &&
         events_.front().kind == GenerationEvent::Kind::kChunk) {
    GenerationEvent& next = events_.front();
    event.token_ids.insert(event.token_ids.end(), next.token_ids.begin(), next.token_ids.end());
    event.text += next.text;
    events_.pop_front();
  }
  return event;
}

void GenerationStream::Cancel() {
  absl::MutexLock lock(&mutex_);
  cancelled_ = true;
}

bool GenerationStream::cancelled() const {
  absl::MutexLock lock(&mutex_);
  return cancelled_;
}

void GenerationStream::Push(GenerationEvent event) {
  absl::MutexLock lock(&mutex_);
  events_.push_back(std::move(event));
}

class InferenceEngine::Impl {
 public:
  Impl(EngineOptions options, PartitionManager* partitions) : options_(std::move(options)), partitions_(partitions) {}
  ~Impl() { Shutdown(); }

  absl::Status Load(MetricsRegistry* metrics) {
    if (options_.max_batch < 1) return absl::InvalidArgumentError("max_batch must be >= 1");
    if (options_.max_queued < 0) return absl::InvalidArgumentError("max_queued must be >= 0");
    if (options_.prefill_chunk_tokens < 1) return absl::InvalidArgumentError("prefill_chunk_tokens must be >= 1");
    LYCHEE_ASSIGN_OR_RETURN(tokenizer_, Tokenizer::FromFile(options_.model_dir + "/tokenizer.json"));
    LYCHEE_ASSIGN_OR_RETURN(runner_, ModelRunner::Create(options_, partitions_));
    const ModelConfig& config = runner_->config();
    max_context_ = config.max_position_embeddings;
    if (options_.max_context_tokens > 0) max_context_ = std::min(max_context_, options_.max_context_tokens);
    if (max_context_ <= 0) max_context_ = options_.max_context_tokens;
    if (max_context_ <= 0) return absl::InvalidArgumentError("the model gives no context limit; set one");
    LYCHEE_ASSIGN_OR_RETURN(kv_, KvCacheManager::Create(runner_->model(), options_.kv_cache_bytes,
                                                        options_.kv_cache_fraction));
    runner_->UseKvPool(kv_->pool());
    scheduler_ = std::make_unique<Scheduler>(
        SchedulerOptions{options_.max_batch, options_.max_queued, options_.prefill_chunk_tokens}, *kv_);
    if (metrics == nullptr) {
      own_metrics_ = std::make_unique<MetricsRegistry>();
      metrics = own_metrics_.get();
    }
    RegisterMetrics(*metrics);
    // Before serving, so that the first requests, dense or with the active partition, replay.
    PrepareGraphsNow(nullptr);
    if (PartitionManager::Snapshot active = partitions_->Active().partition) PrepareGraphsNow(active);
    engine_thread_ = std::thread([this] { Run(); });
    return absl::OkStatus();
  }

  // Any thread: the engine's thread captures the graphs between two iterations.
  absl::Status PrepareGraphs(const PartitionManager::Snapshot& partition) {
    return RunOnEngineThread([this, partition] { return runner_->PrepareGraphs(partition); });
  }

  absl::StatusOr<std::shared_ptr<GenerationStream>> Submit(GenerationRequest generation) {
    LYCHEE_RETURN_IF_ERROR(runner_->serving_status());
    LYCHEE_RETURN_IF_ERROR(Check(generation));
    LYCHEE_ASSIGN_OR_RETURN(AttentionPlan plan, PlanAttention(generation));
    // The last token is sampled, never written to the cache.
    const int64_t prompt_tokens = static_cast<int64_t>(generation.prompt_ids.size());
    const int64_t most_positions = std::min(prompt_tokens + generation.max_new_tokens - 1, max_context_);
    if (absl::Status fits = kv_->CheckFitsPool(most_positions); !fits.ok()) {
      rejected_->Increment();
      return absl::ResourceExhaustedError(absl::StrCat(
          "the request may need ", most_positions, " KV positions (", prompt_tokens, " prompt tokens and up to ",
          generation.max_new_tokens, " new ones, within the context limit of ", max_context_, "): ", fits.message(),
          "; shorten the prompt or max_new_tokens"));
    }
    auto request = std::make_unique<EngineRequest>(next_request_id_++, std::move(generation), *tokenizer_);
    request->plan = std::move(plan);
    std::shared_ptr<GenerationStream> stream = request->stream;
    if (absl::Status added = scheduler_->Add(std::move(request)); !added.ok()) {
      if (absl::IsResourceExhausted(added)) rejected_->Increment();
      return added;
    }
    return stream;
  }

  EngineLoad load() const {
    EngineLoad load;
    load.active_sequences = scheduler_->num_running();
    load.queued_requests = scheduler_->num_waiting();
    load.kv_pages_used = kv_->used_pages();
    load.kv_pages_total = kv_->num_pages();
    load.kv_bytes_reserved = load.kv_pages_used * kv_->bytes_per_page();
    load.kv_bytes_limit = load.kv_pages_total * kv_->bytes_per_page();
    return load;
  }

  void Shutdown() {
    if (shut_down_.exchange(true) || scheduler_ == nullptr) return;
    scheduler_->Stop();
    if (engine_thread_.joinable()) engine_thread_.join();
    absl::MutexLock lock(&tasks_mutex_);
    tasks_stopped_ = true;
  }

  absl::Status serving_status() const { return runner_->serving_status(); }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const Model& model() const { return runner_->model(); }
  const ModelConfig& config() const { return runner_->config(); }
  int64_t max_context() const { return max_context_; }
  int64_t kv_bytes_per_token() const { return kv_->bytes_per_page() / kv_->page_size(); }
  const EngineOptions& options() const { return options_; }

 private:
  absl::Status Check(const GenerationRequest& request) const {
    const ModelConfig& config = runner_->config();
    if (request.prompt_ids.empty()) return absl::InvalidArgumentError("prompt: empty; give text or token ids");
    for (size_t i = 0; i < request.prompt_ids.size(); ++i) {
      const int32_t id = request.prompt_ids[i];
      if (id < 0 || id >= config.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("prompt.token_ids[", i, "] = ", id,
                                                       " is outside the vocabulary [0, ", config.vocab_size, ")"));
      }
    }
    if (static_cast<int64_t>(request.prompt_ids.size()) >= max_context_) {
      return absl::OutOfRangeError(absl::StrCat("the prompt has ", request.prompt_ids.size(),
                                                " tokens; this server's context limit is ", max_context_,
                                                " tokens, generation included"));
    }
    if (request.max_new_tokens <= 0 || request.max_new_tokens > options_.max_new_tokens_limit) {
      return absl::InvalidArgumentError(absl::StrCat("max_new_tokens must be in [1, ", options_.max_new_tokens_limit,
                                                     "], got ", request.max_new_tokens));
    }
    const SamplingParams sampling{request.temperature, request.top_p, request.seed};
    LYCHEE_RETURN_IF_ERROR(sampling.Validate());
    for (size_t i = 0; i < request.stop_sequences.size(); ++i) {
      if (request.stop_sequences[i].empty()) return absl::InvalidArgumentError(absl::StrCat("stop[", i, "]: empty"));
    }
    // Written so that NaN fails too.
    if (request.max_dropped_mass && !(*request.max_dropped_mass >= 0 && *request.max_dropped_mass <= 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("attention.max_dropped_mass must be in [0, 1], got ", *request.max_dropped_mass));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<AttentionPlan> PlanAttention(const GenerationRequest& request) const {
    AttentionPlan plan;
    PolicySpec& spec = plan.policy;
    if (request.attention) {
      spec = *request.attention;
    } else if (options_.hybrid_by_default && partitions_->Active().partition != nullptr) {
      spec = PolicySpec::LycheeAsPartition();
    } else {
      spec = PolicySpec::Defaults(PolicyKind::kDense);
    }
    // The bound is checked against the policy's audit: every step's, unless the request names a period.
    if (request.max_dropped_mass) {
      spec.audit = true;
      if (spec.audit_every == 0) spec.audit_every = 1;
    }
    if (spec.audit_every == 0) spec.audit_every = options_.audit_every;
    const std::string name = PolicyName(spec.kind);
    if (!PolicyNeedsPartition(spec.kind)) {
      if (spec.partition_version) {
        return absl::InvalidArgumentError(
            absl::StrCat("attention.partition_version: policy ", name, " uses no partition"));
      }
      LYCHEE_RETURN_IF_ERROR(spec.Validate(runner_->config()));
      return plan;
    }
    PartitionManager::Snapshot partition;
    if (spec.partition_version) {
      LYCHEE_ASSIGN_OR_RETURN(plan.pinned, partitions_->Get(*spec.partition_version));
      partition = plan.pinned;
    } else {
      partition = partitions_->Active().partition;
      if (partition == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat(
            "policy ", name, ": no head partition is active on this server yet (ask for dense, or activate one)"));
      }
    }
    // Checked with the partition it would be served with now; a canary's is checked at admission.
    LYCHEE_RETURN_IF_ERROR(spec.WithPartitionSelection(partition->selection()).Validate(runner_->config()));
    return plan;
  }

  void PrepareGraphsNow(const PartitionManager::Snapshot& partition) {
    if (absl::Status prepared = runner_->PrepareGraphs(partition); !prepared.ok()) {
      LOG(WARNING) << "decode graphs of "
                   << (partition == nullptr ? std::string("dense attention")
                                            : absl::StrCat("partition ", partition->version))
                   << " not captured ahead (its first steps capture them): " << prepared.message();
    }
  }

  // Any thread: `task` runs on the engine's thread between two iterations (within kIdlePoll when
  // idle); its result, or UNAVAILABLE once the engine has stopped.
  absl::Status RunOnEngineThread(std::function<absl::Status()> task) {
    auto promise = std::make_shared<std::promise<absl::Status>>();
    std::future<absl::Status> result = promise->get_future();
    {
      absl::MutexLock lock(&tasks_mutex_);
      if (tasks_stopped_) return absl::UnavailableError("the inference engine has stopped");
      tasks_.push_back({std::move(task), std::move(promise)});
    }
    return result.get();
  }

  void RunTasks(bool stopping) {
    std::deque<EngineTask> tasks;
    {
      absl::MutexLock lock(&tasks_mutex_);
      tasks.swap(tasks_);
      if (stopping) tasks_stopped_ = true;
    }
    for (EngineTask& task : tasks) {
      task.result->set_value(stopping ? absl::UnavailableError("the inference engine has stopped") : task.run());
    }
  }

  // The engine's loop: run what other threads queued, end what was abandoned, schedule, drop the
  // preempted sequences, start the admitted ones, prefill one chunk each, decode one step each, hand
  // the tokens on; repeat.
  void Run() {
    absl::StatusOr<std::unique_ptr<ThreadCudaStream>> serving_stream = runner_->UseServingStream();
    if (!serving_stream.ok()) {
      LOG(WARNING) << "the engine launches on the default CUDA stream, without priority over background work: "
                   << serving_stream.status();
    }
    while (scheduler_->WaitForWork(kIdlePoll)) {
      runner_->KeepRanksTogether();
      RunTasks(/*stopping=*/false);
      EndAbandoned();
      Retire();
      const SchedulerOutput step = scheduler_->Schedule();
      for (EngineRequest* request : step.preempted) {
        runner_->Preempt(*request);
        preemptions_->Increment();
      }
      for (EngineRequest* request : step.admitted) {
        if (absl::Status started = runner_->Start(*request); !started.ok()) output_->Fail(*request, started);
      }
      for (const PrefillChunk& chunk : step.prefills) {
        if (chunk.request->status == RequestStatus::kFinished) continue;
        absl::StatusOr<std::optional<int32_t>> token = runner_->Prefill(*chunk.request, chunk.tokens);
        if (!token.ok()) {
          output_->Fail(*chunk.request, token.status());
        } else if (token->has_value()) {
          Deliver(*chunk.request, **token);
        }
      }
      if (!step.decodes.empty()) {
        const std::vector<absl::StatusOr<int32_t>> tokens = runner_->Decode(step.decodes);
        for (size_t i = 0; i < tokens.size(); ++i) {
          if (tokens[i].ok()) {
            Deliver(*step.decodes[i], *tokens[i]);
          } else {
            output_->Fail(*step.decodes[i], tokens[i].status());
          }
        }
      }
      Retire();
    }
    for (std::unique_ptr<EngineRequest>& request : scheduler_->TakeAll()) {
      output_->Fail(*request, absl::UnavailableError("the server shut down"));
      runner_->Release(*request);
    }
    RunTasks(/*stopping=*/true);
  }

  void EndAbandoned() {
    for (EngineRequest* request : scheduler_->Abandoned()) {
      if (request->stream->cancelled()) {
        output_->Fail(*request, absl::CancelledError("cancelled by the client"));
      } else {
        output_->Fail(*request, absl::DeadlineExceededError(request->status == RequestStatus::kWaiting
                                                                ? "the deadline passed while the request was queued"
                                                                : "the deadline passed during generation"));
      }
    }
  }

  void Deliver(EngineRequest& request, int32_t token) {
    // Released first: the pages are free by the time the client reads the summary.
    if (output_->Process(request, token)) output_->Complete(request, runner_->Release(request));
  }

  // Frees the pages of every request that ended, however it ended.
  void Retire() {
    for (const std::unique_ptr<EngineRequest>& request : scheduler_->TakeFinished()) runner_->Release(*request);
  }

  void RegisterMetrics(MetricsRegistry& metrics) {
    const std::string requests = "lychee_requests_total";
    const std::string requests_help = "Generate requests by how they ended";
    OutputMetrics output;
    output.succeeded = &metrics.AddCounter(requests, requests_help, {{"outcome", "ok"}});
    output.failed = &metrics.AddCounter(requests, requests_help, {{"outcome", "error"}});
    output.cancelled = &metrics.AddCounter(requests, requests_help, {{"outcome", "cancelled"}});
    rejected_ = &metrics.AddCounter(requests, requests_help, {{"outcome", "rejected"}});
    output.generated_tokens = &metrics.AddCounter("lychee_generated_tokens_total", "Tokens generated");
    output.prompt_tokens = &metrics.AddCounter("lychee_prompt_tokens_total", "Prompt tokens of completed requests");
    const std::vector<double> ttft_bounds = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
    output.time_to_first_token =
        &metrics.AddHistogram("lychee_time_to_first_token_seconds", "From arrival to the first token", ttft_bounds);
    const std::vector<double> token_bounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
    output.token_latency =
        &metrics.AddHistogram("lychee_token_latency_seconds", "Between consecutive tokens of a sequence", token_bounds);
    output.on_finished = [this](const EngineRequest& request, const absl::Status& outcome) {
      RecordCanarySequence(request, outcome);
    };
    output_ = std::make_unique<OutputProcessor>(StopIds(), max_context_, output);
    preemptions_ = &metrics.AddCounter("lychee_preemptions_total",
                                       "Sequences dropped for older ones when the KV pool ran out, to be recomputed");

    const auto running = [this] { return static_cast<double>(scheduler_->num_running()); };
    const auto waiting = [this] { return static_cast<double>(scheduler_->num_waiting()); };
    metrics.AddGauge("lychee_running_requests", "Requests holding a sequence in the KV pool", running);
    metrics.AddGauge("lychee_waiting_requests", "Requests waiting for admission, preempted ones included", waiting);
    metrics.AddGauge("lychee_active_sequences", "Sequences in the KV pool (as lychee_running_requests)", running);
    metrics.AddGauge("lychee_queued_requests", "Requests waiting (as lychee_waiting_requests)", waiting);
    metrics.AddGauge("lychee_kv_cache_usage", "Fraction of the KV pool's pages in use",
                     [this] { return static_cast<double>(kv_->used_pages()) / static_cast<double>(kv_->num_pages()); });
    const std::string pages_help = "Pages of the KV pool by state";
    metrics.AddGauge("lychee_kv_cache_pages", pages_help, [this] { return static_cast<double>(kv_->used_pages()); },
                     {{"state", "used"}});
    metrics.AddGauge("lychee_kv_cache_pages", pages_help, [this] { return static_cast<double>(kv_->free_pages()); },
                     {{"state", "free"}});
    metrics.AddGauge("lychee_kv_cache_reserved_bytes", "Bytes of the KV pages in use",
                     [this] { return static_cast<double>(kv_->used_pages() * kv_->bytes_per_page()); });
    metrics.AddGauge("lychee_kv_cache_limit_bytes", "Bytes of the whole KV pool",
                     [this] { return static_cast<double>(kv_->num_pages() * kv_->bytes_per_page()); });
    metrics.AddCounterFunction("lychee_decode_graph_replays_total", "Decode steps replayed from a captured CUDA graph",
                               [this] { return static_cast<double>(runner_->decode_counts().graph_replays); });
    metrics.AddCounterFunction("lychee_decode_eager_steps_total", "Decode steps launched op by op",
                               [this] { return static_cast<double>(runner_->decode_counts().eager_steps); });
    metrics.AddCounterFunction(
        "lychee_failed_steps_total",
        "Model steps (a prefill chunk, a decode call) that threw or failed; only their requests failed",
        [this] { return static_cast<double>(runner_->failed_steps()); });
    metrics.AddCounterFunction(
        "lychee_dense_fallbacks_total",
        "Sequences switched to dense attention after an audited step dropped more than their max_dropped_mass",
        [this] { return static_cast<double>(runner_->dense_fallbacks()); });
    metrics.AddCounterFunction(
        "lychee_decode_graph_capture_failures_total", "Decode steps whose CUDA graph capture failed",
        [this] { return static_cast<double>(runner_->decode_counts().graph_capture_failures); });
  }

  // Counts a sequence that a canary's routing placed towards the canary's decision. A client that
  // went away and a server shutting down say nothing about the partition; other errors count.
  void RecordCanarySequence(const EngineRequest& request, const absl::Status& outcome) {
    if (request.plan.canary_arm == PartitionRoute::Arm::kNoCanary) return;
    if (absl::IsCancelled(outcome) || absl::IsUnavailable(outcome)) return;
    const GenerationSummary& summary = request.summary;
    CanarySequence sequence;
    sequence.error = !outcome.ok();
    const bool selective = summary.prompt_tokens + summary.completion_tokens > summary.token_budget;
    if (outcome.ok() && selective && summary.telemetry && summary.telemetry->audited) {
      sequence.mean_dropped_mass = summary.telemetry->mean_dropped_mass;
    }
    sequence.timed_tokens = std::max<int64_t>(summary.completion_tokens - 1, 0);
    sequence.token_latency_sum = request.latency_sum;
    partitions_->RecordCanarySequence(request.plan.canary_arm, summary.partition_version, sequence);
  }

  std::vector<int32_t> StopIds() const {
    std::vector<int32_t> ids;
    for (int64_t eos : runner_->config().eos_token_ids) ids.push_back(static_cast<int32_t>(eos));
    return ids;
  }

  const EngineOptions options_;
  PartitionManager* const partitions_;
  std::unique_ptr<Tokenizer> tokenizer_;
  int64_t max_context_ = 0;
  std::unique_ptr<ModelRunner> runner_;
  std::unique_ptr<KvCacheManager> kv_;
  std::unique_ptr<Scheduler> scheduler_;
  // Where the metrics go when the engine is given no registry.
  std::unique_ptr<MetricsRegistry> own_metrics_;
  std::unique_ptr<OutputProcessor> output_;
  Counter* rejected_ = nullptr;
  Counter* preemptions_ = nullptr;
  std::atomic<uint64_t> next_request_id_{1};
  std::atomic<bool> shut_down_{false};
  std::thread engine_thread_;

  struct EngineTask {
    std::function<absl::Status()> run;
    std::shared_ptr<std::promise<absl::Status>> result;
  };
  absl::Mutex tasks_mutex_;
  std::deque<EngineTask> tasks_ ABSL_GUARDED_BY(tasks_mutex_);
  bool tasks_stopped_ ABSL_GUARDED_BY(tasks_mutex_) = false;
};

absl::StatusOr<std::unique_ptr<InferenceEngine>> InferenceEngine::Create(EngineOptions options,
                                                                         PartitionManager* partitions,
                                                                         MetricsRegistry* metrics) {
  auto impl = std::make_unique<Impl>(std::move(options), partitions);
  LYCHEE_RETURN_IF_ERROR(impl->Load(metrics));
  return std::unique_ptr<InferenceEngine>(new InferenceEngine(std::move(impl)));
}

InferenceEngine::InferenceEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
InferenceEngine::~InferenceEngine() = default;

absl::StatusOr<std::shared_ptr<GenerationStream>> InferenceEngine::Submit(GenerationRequest request) {
  return impl_->Submit(std::move(request));
}
const Tokenizer& InferenceEngine::tokenizer() const { return impl_->tokenizer(); }
const ModelConfig& InferenceEngine::config() const { return impl_->config(); }
const Model& InferenceEngine::model() const { return impl_->model(); }
int64_t InferenceEngine::max_context_tokens() const { return impl_->max_context(); }
int64_t InferenceEngine::max_new_tokens_limit() const { return impl_->options().max_new_tokens_limit; }
std::string InferenceEngine::device() const { return impl_->options().device; }
EngineLoad InferenceEngine::load() const { return impl_->load(); }
int64_t InferenceEngine::kv_bytes_per_token() const { return impl_->kv_bytes_per_token(); }
absl::Status InferenceEngine::serving_status() const { return impl_->serving_status(); }
void InferenceEngine::Shutdown() { impl_->Shutdown(); }
absl::Status InferenceEngine::PrepareGraphs(const PartitionManager::Snapshot& partition) {
  return impl_->PrepareGraphs(partition);
}

}  // namespace lychee
