#include "inference/engine.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <list>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/model.h"
#include "common/model_fingerprint.h"
#include "common/sampling.h"
#include "common/status_macros.h"
#include "kernels/dense_attention.h"
#include "kernels/hybrid_attention.h"
#include "kernels/policy_backend.h"
#ifdef LYCHEE_CUDA_ATTENTION
#include "kernels/cuda_attention.h"
#endif

namespace lychee {
namespace {

using Clock = std::chrono::steady_clock;

// How long the idle scheduler sleeps before it looks again at queued requests' deadlines.
constexpr std::chrono::milliseconds kIdlePoll(50);

double Seconds(Clock::duration duration) { return std::chrono::duration<double>(duration).count(); }

// The length of the longest suffix of `text` that is a proper prefix of one of `stops`: text
// that might become a stop sequence is held back until it is decided.
size_t PossibleStopPrefix(const std::string& text, const std::vector<std::string>& stops) {
  size_t longest = 0;
  for (const std::string& stop : stops) {
    for (size_t length = std::min(text.size(), stop.size() - 1); length > longest; --length) {
      if (text.compare(text.size() - length, length, stop, 0, length) == 0) {
        longest = length;
        break;
      }
    }
  }
  return longest;
}

}  // namespace

absl::Status CheckPartitionServable(const HeadPartition& partition, const ModelConfig& config) {
  return CheckHybridFits(partition, config);
}

GenerationEvent GenerationStream::Next(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!ready_.wait_for(lock, timeout, [&] { return !events_.empty(); })) return {};
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
  std::lock_guard<std::mutex> lock(mutex_);
  cancelled_ = true;
}

bool GenerationStream::cancelled() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return cancelled_;
}

void GenerationStream::Push(GenerationEvent event) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    events_.push_back(std::move(event));
  }
  ready_.notify_all();
}

class InferenceEngine::Impl {
 public:
  Impl(EngineOptions options, PartitionManager* partitions) : options_(std::move(options)), partitions_(partitions) {}
  ~Impl() { Shutdown(); }

  absl::Status Load(MetricsRegistry* metrics) {
    if (options_.threads > 0) at::set_num_threads(options_.threads);
    if (options_.max_batch < 1) return absl::InvalidArgumentError("max_batch must be >= 1");
    if (options_.max_queued < 0) return absl::InvalidArgumentError("max_queued must be >= 0");
    if (options_.prefill_chunk_tokens < 1) return absl::InvalidArgumentError("prefill_chunk_tokens must be >= 1");
    LYCHEE_ASSIGN_OR_RETURN(ModelOptions model_options, ModelOptionsForDevice(options_.device));
    LYCHEE_ASSIGN_OR_RETURN(tokenizer_, Tokenizer::FromFile(options_.model_dir + "/tokenizer.json"));
    LYCHEE_ASSIGN_OR_RETURN(model_, Model::Load(options_.model_dir, model_options));
    const ModelConfig& config = model_->config();
    max_context_ = config.max_position_embeddings;
    if (options_.max_context_tokens > 0) max_context_ = std::min(max_context_, options_.max_context_tokens);
    if (max_context_ <= 0) max_context_ = options_.max_context_tokens;
    if (max_context_ <= 0) return absl::InvalidArgumentError("the model gives no context limit; set one");
    kv_bytes_per_token_ = 2 * config.num_layers * config.num_kv_heads * config.head_dim *
                          static_cast<int64_t>(at::elementSize(model_options.dtype));
    for (int64_t eos : config.eos_token_ids) stop_ids_.push_back(static_cast<int32_t>(eos));
#ifdef LYCHEE_CUDA_ATTENTION
    if (model_options.device.is_cuda()) dense_ = MakeCudaDenseAttention();
#endif
    if (dense_ == nullptr) dense_ = std::make_shared<DenseAttentionBackend>();
    if (metrics != nullptr) RegisterMetrics(*metrics);
    scheduler_ = std::thread([this] { Run(); });
    return absl::OkStatus();
  }

  absl::StatusOr<std::shared_ptr<GenerationStream>> Submit(GenerationRequest request) {
    LYCHEE_RETURN_IF_ERROR(Check(request));
    LYCHEE_ASSIGN_OR_RETURN(AttentionPlan plan, PlanAttention(request));
    const int64_t reserved_tokens =
        std::min<int64_t>(static_cast<int64_t>(request.prompt_ids.size()) + request.max_new_tokens - 1, max_context_);
    const int64_t reserved_bytes = reserved_tokens * kv_bytes_per_token_;
    if (reserved_bytes > options_.kv_cache_bytes) {
      Count(rejected_);
      return absl::ResourceExhaustedError(absl::StrCat(
          "the request needs ", reserved_bytes, " bytes of KV cache (", reserved_tokens, " tokens of ",
          kv_bytes_per_token_, " bytes), more than the server's whole KV memory of ", options_.kv_cache_bytes,
          " bytes; shorten the prompt or max_new_tokens"));
    }
    auto stream = std::make_shared<GenerationStream>();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_) return absl::UnavailableError("the server is shutting down");
      if (WaitingLocked() >= options_.max_queued && !(queue_.empty() && FitsLocked(reserved_bytes))) {
        Count(rejected_);
        return absl::ResourceExhaustedError(absl::StrCat("the server is full: ", running_count_, " sequences hold ",
                                                         reserved_bytes_, " of ", options_.kv_cache_bytes,
                                                         " KV bytes and ", queue_.size(),
                                                         " requests wait already; retry later"));
      }
      queue_.push_back(Pending{std::move(request), stream, Clock::now(), reserved_tokens, reserved_bytes, plan});
    }
    wake_.notify_all();
    return stream;
  }

  EngineLoad load() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return {running_count_, static_cast<int64_t>(queue_.size()), reserved_bytes_, options_.kv_cache_bytes};
  }

  void Shutdown() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_) return;
      stopping_ = true;
    }
    wake_.notify_all();
    if (scheduler_.joinable()) scheduler_.join();
  }

  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const ModelConfig& config() const { return model_->config(); }
  int64_t max_context() const { return max_context_; }
  int64_t kv_bytes_per_token() const { return kv_bytes_per_token_; }
  const EngineOptions& options() const { return options_; }

 private:
  // The attention a request asked for, resolved against the partitions when it is admitted.
  struct AttentionPlan {
    bool hybrid = false;
    std::optional<PolicySpec> policy;
    // Set for a pinned version; else the active partition at admission.
    PartitionManager::Snapshot pinned;
    std::optional<int64_t> token_budget;
  };

  struct Pending {
    GenerationRequest request;
    std::shared_ptr<GenerationStream> stream;
    Clock::time_point arrived;
    int64_t reserved_tokens = 0;
    int64_t reserved_bytes = 0;
    AttentionPlan plan;
  };

  struct Running {
    Running(Pending pending_in, const Tokenizer& tokenizer)
        : pending(std::move(pending_in)),
          sampler(SamplingParams{pending.request.temperature, pending.request.top_p, pending.request.seed}),
          decoder(tokenizer, /*skip_special_tokens=*/true) {}

    Pending pending;
    std::unique_ptr<Sequence> sequence;
    Sampler sampler;
    IncrementalDecoder decoder;
    GenerationSummary summary;
    size_t prefilled = 0;
    int32_t last_token = 0;
    // Decoded text not sent yet because it may begin a stop sequence.
    std::string held_text;
    Clock::time_point admitted;
    Clock::time_point last_token_time;
    double latency_sum = 0;
    bool finished = false;
  };

  absl::Status Check(const GenerationRequest& request) const {
    if (request.prompt_ids.empty()) return absl::InvalidArgumentError("prompt: empty; give text or token ids");
    for (size_t i = 0; i < request.prompt_ids.size(); ++i) {
      const int32_t id = request.prompt_ids[i];
      if (id < 0 || id >= model_->config().vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("prompt.token_ids[", i, "] = ", id,
                                                       " is outside the vocabulary [0, ", model_->config().vocab_size,
                                                       ")"));
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
    return absl::OkStatus();
  }

  absl::StatusOr<AttentionPlan> PlanAttention(const GenerationRequest& request) const {
    AttentionPlan plan;
    if (request.policy) {
      LYCHEE_RETURN_IF_ERROR(request.policy->Validate(model_->config()));
      plan.policy = request.policy;
      if (PolicyNeedsPartition(request.policy->kind)) {
        if (request.partition_version) {
          LYCHEE_ASSIGN_OR_RETURN(plan.pinned, partitions_->Get(*request.partition_version));
        } else if (partitions_->Active().partition == nullptr) {
          return absl::FailedPreconditionError(absl::StrCat("policy ", PolicyName(request.policy->kind),
                                                            ": no head partition is active on this server yet"));
        }
      } else if (request.partition_version) {
        return absl::InvalidArgumentError(absl::StrCat("attention.partition_version: policy ",
                                                       PolicyName(request.policy->kind), " uses no partition"));
      }
      return plan;
    }
    plan.hybrid = request.attention == AttentionChoice::kHybrid ||
                  (request.attention == AttentionChoice::kServerDefault && options_.hybrid_by_default &&
                   (partitions_->Active().partition != nullptr || request.partition_version.has_value()));
    if (!plan.hybrid) {
      if (request.token_budget || request.partition_version) {
        return absl::InvalidArgumentError("attention.token_budget and attention.partition_version need hybrid attention");
      }
      return plan;
    }
    PartitionManager::Snapshot partition;
    if (request.partition_version) {
      LYCHEE_ASSIGN_OR_RETURN(plan.pinned, partitions_->Get(*request.partition_version));
      partition = plan.pinned;
    } else {
      partition = partitions_->Active().partition;
      if (partition == nullptr) {
        return absl::FailedPreconditionError(
            "hybrid attention: no head partition is active on this server yet (ask for dense, or activate one)");
      }
    }
    if (request.token_budget) {
      HeadPartition adjusted = *partition;
      adjusted.mutable_selection().token_budget = *request.token_budget;
      if (absl::Status fits = CheckHybridFits(adjusted, model_->config()); !fits.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("attention.token_budget: ", fits.message()));
      }
      plan.token_budget = request.token_budget;
    }
    return plan;
  }

  bool FitsLocked(int64_t bytes) const {
    return running_count_ < options_.max_batch && reserved_bytes_ + bytes <= options_.kv_cache_bytes;
  }

  // Queued requests that the scheduler will not admit at its next look: those behind the
  // head of the queue that fits now.
  int64_t WaitingLocked() const {
    int64_t sequences = running_count_;
    int64_t bytes = reserved_bytes_;
    int64_t admissible = 0;
    for (const Pending& pending : queue_) {
      if (sequences >= options_.max_batch || bytes + pending.reserved_bytes > options_.kv_cache_bytes) break;
      ++sequences;
      bytes += pending.reserved_bytes;
      ++admissible;
    }
    return static_cast<int64_t>(queue_.size()) - admissible;
  }

  // The scheduler's loop: admit, prefill one chunk each, decode one step, repeat.
  void Run() {
    while (true) {
      std::vector<Pending> admitted;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        if (running_.empty()) {
          wake_.wait_for(lock, kIdlePoll, [&] { return stopping_ || (!queue_.empty() && FitsLocked(queue_.front().reserved_bytes)); });
        }
        if (stopping_) break;
        DropAbandonedLocked();
        while (!queue_.empty() && FitsLocked(queue_.front().reserved_bytes)) {
          reserved_bytes_ += queue_.front().reserved_bytes;
          ++running_count_;
          admitted.push_back(std::move(queue_.front()));
          queue_.pop_front();
        }
      }
      for (Pending& pending : admitted) Admit(std::move(pending));
      if (running_.empty()) continue;
      for (Running& running : running_) {
        if (running.pending.stream->cancelled()) {
          Finish(running, absl::CancelledError("cancelled by the client"));
        } else if (Clock::now() > running.pending.request.deadline) {
          Finish(running, absl::DeadlineExceededError("the deadline passed during generation"));
        }
      }
      Reap();
      PrefillStep();
      DecodeStep();
      Reap();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    for (Pending& pending : queue_) pending.stream->Push(ErrorEvent(absl::UnavailableError("the server shut down")));
    queue_.clear();
    for (Running& running : running_) {
      if (!running.finished) running.pending.stream->Push(ErrorEvent(absl::UnavailableError("the server shut down")));
    }
    running_.clear();
  }

  void DropAbandonedLocked() {
    const Clock::time_point now = Clock::now();
    for (auto it = queue_.begin(); it != queue_.end();) {
      if (it->stream->cancelled()) {
        Count(cancelled_);
        it = queue_.erase(it);
      } else if (now > it->request.deadline) {
        Count(failed_);
        it->stream->Push(ErrorEvent(absl::DeadlineExceededError("the deadline passed while the request was queued")));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void Admit(Pending pending) {
    running_.emplace_back(std::move(pending), *tokenizer_);
    Running& running = running_.back();
    running.admitted = Clock::now();
    running.summary.prompt_tokens = static_cast<int64_t>(running.pending.request.prompt_ids.size());
    running.summary.queue_seconds = Seconds(running.admitted - running.pending.arrived);
    absl::StatusOr<std::shared_ptr<const AttentionBackend>> attention = BackendFor(running);
    if (!attention.ok()) {
      Finish(running, attention.status());
      return;
    }
    running.sequence = model_->NewSequence(*std::move(attention));
    if (absl::Status reserved = running.sequence->Reserve(running.pending.reserved_tokens); !reserved.ok()) {
      Finish(running, reserved);
    }
  }

  absl::StatusOr<std::shared_ptr<const AttentionBackend>> BackendFor(Running& running) {
    const AttentionPlan& plan = running.pending.plan;
    if (plan.policy) return PolicyBackendFor(running);
    if (!plan.hybrid) return dense_;
    PartitionManager::Snapshot partition = plan.pinned != nullptr ? plan.pinned : partitions_->Active().partition;
    if (partition == nullptr) return absl::FailedPreconditionError("hybrid attention: no head partition is active");
    const int64_t budget = plan.token_budget.value_or(partition->selection().token_budget);
    running.summary.hybrid = true;
    running.summary.partition_version = partition->version;
    running.summary.token_budget = budget;
    // Backends are shared by every sequence with the same partition and budget, so that they
    // decode in one batched call.
    const std::pair<uint64_t, int64_t> key(partition->version, budget);
    if (auto it = hybrid_backends_.find(key); it != hybrid_backends_.end()) return it->second;
    auto adjusted = std::make_shared<HeadPartition>(*partition);
    adjusted->mutable_selection().token_budget = budget;
    std::shared_ptr<const AttentionBackend> backend;
#ifdef LYCHEE_CUDA_ATTENTION
    if (model_->options().device.is_cuda()) {
      LYCHEE_ASSIGN_OR_RETURN(backend, MakeCudaHybridAttention(adjusted, model_->config()));
    }
#endif
    if (backend == nullptr) {
      LYCHEE_ASSIGN_OR_RETURN(auto hybrid, HybridAttentionBackend::Create(adjusted, model_->config()));
      backend = std::move(hybrid);
    }
    ForgetUnusedBackends(hybrid_backends_);
    hybrid_backends_[key] = backend;
    return backend;
  }

  // Backends of policies are shared, like hybrid ones, by every sequence with the same policy
  // parameters and partition.
  absl::StatusOr<std::shared_ptr<const AttentionBackend>> PolicyBackendFor(Running& running) {
    const AttentionPlan& plan = running.pending.plan;
    const PolicySpec& spec = *plan.policy;
    PartitionManager::Snapshot partition;
    if (PolicyNeedsPartition(spec.kind)) {
      partition = plan.pinned != nullptr ? plan.pinned : partitions_->Active().partition;
      if (partition == nullptr) return absl::FailedPreconditionError("no head partition is active");
      running.summary.partition_version = partition->version;
    }
    running.summary.hybrid = spec.kind != PolicyKind::kDense;
    running.summary.token_budget = spec.kind == PolicyKind::kDense ? 0 : spec.token_budget;
    running.summary.policy = spec.Describe();
    const std::pair<std::string, uint64_t> key(running.summary.policy, running.summary.partition_version);
    if (auto it = policy_backends_.find(key); it != policy_backends_.end()) return it->second;
    LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<const AttentionBackend> backend,
                            MakePolicyBackend(spec, model_->config(), partition, model_->options().device));
    ForgetUnusedBackends(policy_backends_);
    policy_backends_[key] = backend;
    return backend;
  }

  // Drops cached backends that no sequence holds any more, so that a long-running service does
  // not keep one (and its partition) per version or policy parameters it ever served.
  template <typename Cache>
  static void ForgetUnusedBackends(Cache& cache) {
    for (auto it = cache.begin(); it != cache.end();) {
      it = it->second.use_count() == 1 ? cache.erase(it) : std::next(it);
    }
  }

  static std::optional<GenerationTelemetry> TelemetryOf(const Sequence& sequence) {
    const SequenceAttentionState* state = sequence.attention_state();
    const AttentionTelemetry* telemetry = state == nullptr ? nullptr : state->telemetry();
    if (telemetry == nullptr) return std::nullopt;
    GenerationTelemetry copy;
    copy.num_layers = telemetry->num_layers;
    copy.num_kv_heads = telemetry->num_kv_heads;
    copy.tokens_attended = telemetry->tokens_attended;
    copy.decode_steps = telemetry->decode_steps;
    copy.kv_bytes_read = telemetry->kv_bytes_read;
    copy.audited = telemetry->audited;
    copy.max_dropped_mass = telemetry->max_dropped_mass;
    copy.mean_dropped_mass = telemetry->mean_dropped_mass();
    return copy;
  }

  void PrefillStep() {
    for (Running& running : running_) {
      const std::vector<int32_t>& prompt = running.pending.request.prompt_ids;
      if (running.finished || running.prefilled >= prompt.size()) continue;
      const size_t chunk = std::min<size_t>(prompt.size() - running.prefilled, options_.prefill_chunk_tokens);
      absl::StatusOr<at::Tensor> logits =
          model_->Prefill(*running.sequence, absl::MakeConstSpan(prompt).subspan(running.prefilled, chunk));
      if (!logits.ok()) {
        Finish(running, logits.status());
        continue;
      }
      running.prefilled += chunk;
      if (running.prefilled == prompt.size()) HandleToken(running, running.sampler.Next(*logits));
    }
  }

  void DecodeStep() {
    std::vector<Running*> batch;
    std::vector<Sequence*> sequences;
    std::vector<int32_t> ids;
    for (Running& running : running_) {
      if (running.finished || running.prefilled < running.pending.request.prompt_ids.size()) continue;
      batch.push_back(&running);
      sequences.push_back(running.sequence.get());
      ids.push_back(running.last_token);
    }
    if (batch.empty()) return;
    absl::StatusOr<at::Tensor> logits = model_->Decode(sequences, ids);
    if (!logits.ok()) {
      for (Running* running : batch) Finish(*running, logits.status());
      return;
    }
    // One device-to-host copy for the whole batch, not one per sequence inside the sampler.
    const at::Tensor host_logits = logits->to(at::kCPU);
    for (size_t i = 0; i < batch.size(); ++i) {
      HandleToken(*batch[i], batch[i]->sampler.Next(host_logits[static_cast<int64_t>(i)]));
    }
  }

  void HandleToken(Running& running, int32_t token) {
    const Clock::time_point now = Clock::now();
    GenerationSummary& summary = running.summary;
    if (summary.completion_tokens == 0) {
      summary.time_to_first_token_seconds = Seconds(now - running.pending.arrived);
      if (ttft_ != nullptr) ttft_->Observe(summary.time_to_first_token_seconds);
    } else {
      const double latency = Seconds(now - running.last_token_time);
      running.latency_sum += latency;
      summary.max_token_latency_seconds = std::max(summary.max_token_latency_seconds, latency);
      if (token_latency_ != nullptr) token_latency_->Observe(latency);
    }
    running.last_token_time = now;
    ++summary.completion_tokens;
    Count(tokens_generated_);
    running.last_token = token;
    const GenerationRequest& request = running.pending.request;

    if (std::find(stop_ids_.begin(), stop_ids_.end(), token) != stop_ids_.end()) {
      Complete(running, FinishReason::kStopToken, {});
      return;
    }
    absl::StatusOr<std::string> piece = running.decoder.Push(token);
    if (!piece.ok()) {
      Finish(running, piece.status());
      return;
    }
    running.held_text += *piece;
    size_t stop_at = std::string::npos;
    for (const std::string& stop : request.stop_sequences) stop_at = std::min(stop_at, running.held_text.find(stop));
    if (stop_at != std::string::npos) {
      running.held_text.resize(stop_at);
      Complete(running, FinishReason::kStopSequence, {token});
      return;
    }
    if (summary.completion_tokens >= request.max_new_tokens) {
      Complete(running, FinishReason::kMaxTokens, {token});
      return;
    }
    if (running.sequence->length() + 1 > running.pending.reserved_tokens) {
      Complete(running, FinishReason::kContextLimit, {token});
      return;
    }
    const size_t keep = PossibleStopPrefix(running.held_text, request.stop_sequences);
    GenerationEvent chunk;
    chunk.kind = GenerationEvent::Kind::kChunk;
    chunk.token_ids = {token};
    chunk.text = running.held_text.substr(0, running.held_text.size() - keep);
    running.held_text.erase(0, chunk.text.size());
    running.pending.stream->Push(std::move(chunk));
  }

  // A normal end: the last tokens and text, then the summary.
  void Complete(Running& running, FinishReason reason, std::vector<int32_t> last_ids) {
    GenerationSummary& summary = running.summary;
    if (reason != FinishReason::kStopSequence) running.held_text += running.decoder.Flush();
    if (!last_ids.empty() || !running.held_text.empty()) {
      GenerationEvent chunk;
      chunk.kind = GenerationEvent::Kind::kChunk;
      chunk.token_ids = std::move(last_ids);
      chunk.text = std::move(running.held_text);
      running.pending.stream->Push(std::move(chunk));
    }
    summary.finish_reason = reason;
    if (summary.completion_tokens > 1) {
      summary.mean_token_latency_seconds = running.latency_sum / static_cast<double>(summary.completion_tokens - 1);
    }
    summary.total_seconds = Seconds(Clock::now() - running.pending.arrived);
    if (running.sequence != nullptr) summary.telemetry = TelemetryOf(*running.sequence);
    Count(prompt_tokens_, static_cast<double>(summary.prompt_tokens));
    GenerationEvent done;
    done.kind = GenerationEvent::Kind::kDone;
    done.summary = summary;
    running.pending.stream->Push(std::move(done));
    Count(succeeded_);
    running.finished = true;
  }

  void Finish(Running& running, const absl::Status& error) {
    if (running.finished) return;
    running.finished = true;
    Count(absl::IsCancelled(error) ? cancelled_ : failed_);
    running.pending.stream->Push(ErrorEvent(error));
  }

  // Frees the KV memory of every finished sequence.
  void Reap() {
    int64_t freed_bytes = 0;
    int64_t freed_sequences = 0;
    for (auto it = running_.begin(); it != running_.end();) {
      if (it->finished) {
        freed_bytes += it->pending.reserved_bytes;
        ++freed_sequences;
        it = running_.erase(it);
      } else {
        ++it;
      }
    }
    if (freed_sequences == 0) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      reserved_bytes_ -= freed_bytes;
      running_count_ -= freed_sequences;
    }
    wake_.notify_all();
  }

  static GenerationEvent ErrorEvent(absl::Status error) {
    GenerationEvent event;
    event.kind = GenerationEvent::Kind::kError;
    event.error = std::move(error);
    return event;
  }

  void RegisterMetrics(MetricsRegistry& metrics) {
    const std::string requests = "lychee_requests_total";
    const std::string requests_help = "Generate requests by how they ended";
    succeeded_ = &metrics.AddCounter(requests, requests_help, {{"outcome", "ok"}});
    failed_ = &metrics.AddCounter(requests, requests_help, {{"outcome", "error"}});
    cancelled_ = &metrics.AddCounter(requests, requests_help, {{"outcome", "cancelled"}});
    rejected_ = &metrics.AddCounter(requests, requests_help, {{"outcome", "rejected"}});
    tokens_generated_ = &metrics.AddCounter("lychee_generated_tokens_total", "Tokens generated");
    prompt_tokens_ = &metrics.AddCounter("lychee_prompt_tokens_total", "Prompt tokens of completed requests");
    const std::vector<double> ttft_bounds = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
    ttft_ = &metrics.AddHistogram("lychee_time_to_first_token_seconds", "From arrival to the first token", ttft_bounds);
    const std::vector<double> token_bounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
    token_latency_ =
        &metrics.AddHistogram("lychee_token_latency_seconds", "Between consecutive tokens of a sequence", token_bounds);
    metrics.AddGauge("lychee_active_sequences", "Sequences holding KV memory", [this] { return double(load().active_sequences); });
    metrics.AddGauge("lychee_queued_requests", "Requests waiting for KV memory", [this] { return double(load().queued_requests); });
    metrics.AddGauge("lychee_kv_cache_reserved_bytes", "KV memory reserved by admitted sequences",
                     [this] { return double(load().kv_bytes_reserved); });
    metrics.AddGauge("lychee_kv_cache_limit_bytes", "KV memory sequences may reserve",
                     [this] { return double(options_.kv_cache_bytes); });
  }

  static void Count(Counter* counter, double amount = 1) {
    if (counter != nullptr) counter->Increment(amount);
  }

  const EngineOptions options_;
  PartitionManager* const partitions_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Model> model_;
  int64_t max_context_ = 0;
  int64_t kv_bytes_per_token_ = 0;
  std::vector<int32_t> stop_ids_;
  std::shared_ptr<const AttentionBackend> dense_;

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Pending> queue_;
  int64_t running_count_ = 0;
  int64_t reserved_bytes_ = 0;
  bool stopping_ = false;

  // The scheduler thread's own.
  std::list<Running> running_;
  std::map<std::pair<uint64_t, int64_t>, std::shared_ptr<const AttentionBackend>> hybrid_backends_;
  std::map<std::pair<std::string, uint64_t>, std::shared_ptr<const AttentionBackend>> policy_backends_;
  std::thread scheduler_;

  Counter* succeeded_ = nullptr;
  Counter* failed_ = nullptr;
  Counter* cancelled_ = nullptr;
  Counter* rejected_ = nullptr;
  Counter* tokens_generated_ = nullptr;
  Counter* prompt_tokens_ = nullptr;
  Histogram* ttft_ = nullptr;
  Histogram* token_latency_ = nullptr;
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
int64_t InferenceEngine::max_context_tokens() const { return impl_->max_context(); }
int64_t InferenceEngine::max_new_tokens_limit() const { return impl_->options().max_new_tokens_limit; }
std::string InferenceEngine::device() const { return impl_->options().device; }
EngineLoad InferenceEngine::load() const { return impl_->load(); }
int64_t InferenceEngine::kv_bytes_per_token() const { return impl_->kv_bytes_per_token(); }
void InferenceEngine::Shutdown() { impl_->Shutdown(); }

}  // namespace lychee
