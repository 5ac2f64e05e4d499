#include "inference/model_runner.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include <glog/logging.h>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/model/cuda_support.h"
#include "common/model/model.h"
#include "common/model/sampling.h"
#include "common/model/torch_errors.h"
#include "kernels/policy_backend.h"

namespace lychee {
namespace {

// Runs one step and turns what it throws into its status, as what it returns; counts its failure.
template <typename Step>
auto Guarded(absl::string_view name, std::atomic<int64_t>& failures, const Step& step) -> decltype(step()) {
  decltype(step()) result = [&]() -> decltype(step()) {
    try {
      return step();
    } catch (const std::exception& error) {
      return StatusFromException(error, name);
    }
  }();
  if (!result.ok()) ++failures;
  return result;
}

const absl::Status& StatusOf(const absl::Status& status) { return status; }
template <typename T>
const absl::Status& StatusOf(const absl::StatusOr<T>& result) {
  return result.status();
}

GenerationTelemetry ToGenerationTelemetry(const AttentionTelemetry& telemetry) {
  GenerationTelemetry copy;
  copy.num_layers = telemetry.num_layers;
  copy.num_kv_heads = telemetry.num_kv_heads;
  copy.tokens_attended = telemetry.tokens_attended;
  copy.decode_steps = telemetry.decode_steps;
  copy.kv_bytes_read = telemetry.kv_bytes_read;
  copy.audited = telemetry.audited;
  copy.max_dropped_mass = telemetry.max_dropped_mass;
  copy.mean_dropped_mass = telemetry.mean_dropped_mass();
  return copy;
}

}  // namespace

struct ModelRunner::RequestState {
  RequestState(std::shared_ptr<const AttentionBackend> backend_in, const GenerationRequest& request)
      : backend(std::move(backend_in)), sampler(SamplingParams{request.temperature, request.top_p, request.seed}) {}

  std::shared_ptr<const AttentionBackend> backend;
  Sampler sampler;
  // Null while the request is preempted.
  std::unique_ptr<Sequence> sequence;
  // What its earlier sequences read.
  std::optional<AttentionTelemetry> telemetry;
};

ModelRunner::ModelRunner(const EngineOptions& options, PartitionManager* partitions)
    : partitions_(partitions), faults_(options.faults), audit_every_(options.audit_every) {
  DecodeOptions decode_options;
  decode_options.cuda_graphs = options.cuda_graphs;
  // A graph for every batch-size bucket the scheduler can run: 1, 2, 4, ... up to max_batch.
  decode_options.max_graph_batch = options.max_batch;
  decode_context_ = std::make_unique<DecodeContext>(decode_options);
}

ModelRunner::~ModelRunner() {
  // The followers exit; their rank 0 reaps them (RankWorkers::Wait).
  if (leader_ != nullptr && leader_->status().ok()) {
    if (absl::Status sent = leader_->Shutdown(); !sent.ok()) LOG(WARNING) << sent;
  }
}

absl::StatusOr<std::unique_ptr<ModelRunner>> ModelRunner::Create(const EngineOptions& options,
                                                                 PartitionManager* partitions) {
  if (options.threads > 0) at::set_num_threads(options.threads);
  LYCHEE_ASSIGN_OR_RETURN(ModelOptions model_options, ModelOptionsForDevice(options.device));
  std::unique_ptr<ModelRunner> runner(new ModelRunner(options, partitions));
  if (options.tensor_parallel != nullptr) {
    model_options.tensor_parallel = options.tensor_parallel;
    runner->leader_ = std::make_unique<RankLeader>(options.tensor_parallel, options.on_unservable);
  }
  LYCHEE_ASSIGN_OR_RETURN(runner->model_, Model::Load(options.model_dir, model_options));
  LYCHEE_ASSIGN_OR_RETURN(runner->backends_, ShardBackends::Create(*runner->model_));
  return runner;
}

const ModelConfig& ModelRunner::config() const { return model_->config(); }

ModelRunner::RequestState& ModelRunner::StateOf(const EngineRequest& request) { return *states_.at(request.id); }

void ModelRunner::UseKvPool(std::shared_ptr<KvPool> pool) {
  pool_ = std::move(pool);
  if (faults_ != nullptr && faults_->page_allocation) pool_->SetAllocationFault(faults_->page_allocation);
}

void ModelRunner::InjectFaults(absl::Span<EngineRequest* const> requests) const {
  if (faults_ == nullptr || !faults_->before_step) return;
  std::vector<const GenerationRequest*> step;
  for (const EngineRequest* request : requests) step.push_back(&request->request);
  faults_->before_step(step);
}

template <typename Step>
auto ModelRunner::RunStep(absl::string_view name, const Step& step) -> decltype(step()) {
  if (leader_ == nullptr) return Guarded(name, failed_steps_, step);
  LYCHEE_RETURN_IF_ERROR(leader_->status());
  decltype(step()) result = Guarded(name, failed_steps_, step);
  if (!absl::IsUnavailable(StatusOf(result))) return result;
  leader_->Lose(StatusOf(result));
  return leader_->status();
}

void ModelRunner::KeepRanksTogether() {
  if (leader_ != nullptr) leader_->KeepAlive().IgnoreError();
}

absl::Status ModelRunner::Start(EngineRequest& request) {
  return RunStep("starting the sequence", [&] { return RunStart(request); });
}

absl::Status ModelRunner::RunStart(EngineRequest& request) {
  auto it = states_.find(request.id);
  if (it == states_.end()) {
    LYCHEE_ASSIGN_OR_RETURN(ResolvedAttention attention, ResolveAttention(request));
    LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<const AttentionBackend> backend,
                            backends_->Get(attention.spec, attention.partition));
    if (leader_ != nullptr) LYCHEE_RETURN_IF_ERROR(leader_->Start(request.id, attention.spec, attention.partition));
    it = states_.emplace(request.id, std::make_unique<RequestState>(std::move(backend), request.request)).first;
  } else if (leader_ != nullptr) {
    // A follower keeps the attention it made on the first admission.
    LYCHEE_RETURN_IF_ERROR(leader_->Start(request.id, PolicySpec(), nullptr));
  }
  RequestState& state = *it->second;
  state.sequence = model_->NewSequence(pool_, state.backend);
  request.computed_tokens = 0;
  return absl::OkStatus();
}

absl::StatusOr<std::optional<int32_t>> ModelRunner::Prefill(EngineRequest& request, int64_t tokens) {
  EngineRequest* const step[] = {&request};
  return RunStep("prefill", [&] {
    InjectFaults(step);
    return RunPrefill(request, tokens);
  });
}

absl::StatusOr<std::optional<int32_t>> ModelRunner::RunPrefill(EngineRequest& request, int64_t tokens) {
  RequestState& state = StateOf(request);
  std::vector<int32_t> ids;
  ids.reserve(static_cast<size_t>(tokens));
  for (int64_t position = request.computed_tokens; position < request.computed_tokens + tokens; ++position) {
    ids.push_back(request.token_at(position));
  }
  if (leader_ != nullptr) LYCHEE_RETURN_IF_ERROR(leader_->Prefill(request.id, ids));
  LYCHEE_ASSIGN_OR_RETURN(const at::Tensor logits, model_->Prefill(*state.sequence, ids));
  request.computed_tokens = state.sequence->length();
  if (request.prefilling() || !request.output_ids.empty()) return std::nullopt;
  return state.sampler.Next(logits);
}

std::vector<absl::StatusOr<int32_t>> ModelRunner::Decode(absl::Span<EngineRequest* const> requests) {
  std::vector<absl::StatusOr<int32_t>> tokens(requests.size(), absl::UnknownError("not decoded"));
  // Rows of `requests` by backend, in the order the backends first appear.
  std::vector<std::pair<const AttentionBackend*, std::vector<size_t>>> groups;
  for (size_t row = 0; row < requests.size(); ++row) {
    const AttentionBackend* backend = StateOf(*requests[row]).backend.get();
    auto group = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == backend; });
    if (group == groups.end()) group = groups.insert(groups.end(), {backend, {}});
    group->second.push_back(row);
  }
  for (const auto& group : groups) {
    const std::vector<size_t>& rows = group.second;
    const absl::Status decoded = RunStep("decode step", [&] { return DecodeGroup(requests, rows, tokens); });
    if (!decoded.ok()) {
      for (size_t row : rows) tokens[row] = decoded;
    }
  }
  CountDecodeSteps();
  return tokens;
}

absl::Status ModelRunner::DecodeGroup(absl::Span<EngineRequest* const> requests, const std::vector<size_t>& rows,
                                      std::vector<absl::StatusOr<int32_t>>& tokens) {
  std::vector<Sequence*> sequences;
  std::vector<int32_t> ids;
  std::vector<EngineRequest*> step;
  std::vector<uint64_t> request_ids;
  for (size_t row : rows) {
    step.push_back(requests[row]);
    sequences.push_back(StateOf(*requests[row]).sequence.get());
    ids.push_back(requests[row]->output_ids.back());
    request_ids.push_back(requests[row]->id);
  }
  InjectFaults(step);
  // A rank audits its own KV heads only, so under tensor parallelism a bound on the dropped mass is
  // checked against the largest over every rank's heads, as one process checks it over all of them.
  const bool bounded = std::any_of(step.begin(), step.end(), [](const EngineRequest* request) {
    return request->request.max_dropped_mass && !request->summary.dense_fallback;
  });
  const bool combine_dropped_mass = leader_ != nullptr && bounded;
  if (leader_ != nullptr) LYCHEE_RETURN_IF_ERROR(leader_->Decode(request_ids, ids, combine_dropped_mass));
  LYCHEE_ASSIGN_OR_RETURN(const at::Tensor logits, model_->Decode(sequences, ids, decode_context_.get()));
  std::vector<double> dropped_over_ranks;
  if (combine_dropped_mass) {
    LYCHEE_ASSIGN_OR_RETURN(dropped_over_ranks,
                            LargestDroppedMassOverRanks(*model_->options().tensor_parallel, sequences));
  }
  const bool all_greedy =
      std::all_of(rows.begin(), rows.end(), [&](size_t row) { return requests[row]->request.temperature == 0; });
  // Greedy rows need only the argmax the step computed on the device; otherwise one
  // device-to-host copy of the group's logits, not one per request inside the sampler. Both are
  // read before the next group's step reuses the context's buffers.
  const std::vector<int32_t> greedy = all_greedy ? decode_context_->GreedyTokens() : std::vector<int32_t>();
  const at::Tensor host_logits = all_greedy ? at::Tensor() : logits.to(at::kCPU);
  // A step that ran while a lost rank's group was aborted read back what its collectives left.
  LYCHEE_RETURN_IF_ERROR(model_->CheckGroup("decode"));
  for (size_t i = 0; i < rows.size(); ++i) {
    EngineRequest& request = *requests[rows[i]];
    RequestState& state = StateOf(request);
    request.computed_tokens = state.sequence->length();
    tokens[rows[i]] = all_greedy ? greedy[i] : state.sampler.Next(host_logits[static_cast<int64_t>(i)]);
    BoundDroppedMass(request, combine_dropped_mass ? std::optional<double>(dropped_over_ranks[i]) : std::nullopt);
  }
  return absl::OkStatus();
}

void ModelRunner::BoundDroppedMass(EngineRequest& request, std::optional<double> dropped_over_ranks) {
  const std::optional<double>& bound = request.request.max_dropped_mass;
  if (!bound || request.summary.dense_fallback) return;
  RequestState& state = StateOf(request);
  const SequenceAttentionState* attention_state = state.sequence->attention_state();
  const AttentionTelemetry* telemetry = attention_state == nullptr ? nullptr : attention_state->telemetry();
  if (telemetry == nullptr) return;
  // The largest mass so far: every earlier step stayed within the bound, so more is this step's.
  const double dropped = dropped_over_ranks.value_or(telemetry->max_dropped_mass);
  if (dropped <= *bound) return;
  // This step's token is the next one delivered.
  request.summary.dense_fallback = DenseFallback{static_cast<int64_t>(request.output_ids.size()), dropped, *bound};
  ++dense_fallbacks_;
  KeepTelemetry(state);
  state.backend = backends_->dense();
  state.sequence->SwitchAttention(state.backend);
  if (leader_ != nullptr) leader_->DenseFallback(request.id).IgnoreError();
}

void ModelRunner::Preempt(EngineRequest& request) {
  RequestState& state = StateOf(request);
  KeepTelemetry(state);
  state.sequence.reset();
  if (leader_ != nullptr) leader_->Preempt(request.id).IgnoreError();
}

std::optional<GenerationTelemetry> ModelRunner::Release(EngineRequest& request) {
  auto it = states_.find(request.id);
  if (it == states_.end()) return std::nullopt;
  KeepTelemetry(*it->second);
  std::optional<AttentionTelemetry> telemetry = std::move(it->second->telemetry);
  states_.erase(it);
  if (leader_ != nullptr) leader_->Release(request.id).IgnoreError();
  if (!telemetry) return std::nullopt;
  return ToGenerationTelemetry(*telemetry);
}

void ModelRunner::KeepTelemetry(RequestState& state) {
  if (state.sequence == nullptr) return;
  const SequenceAttentionState* attention_state = state.sequence->attention_state();
  const AttentionTelemetry* telemetry = attention_state == nullptr ? nullptr : attention_state->telemetry();
  if (telemetry == nullptr) return;
  if (!state.telemetry) {
    state.telemetry = *telemetry;
  } else {
    state.telemetry->Add(*telemetry);
  }
}

absl::Status ModelRunner::serving_status() const { return leader_ == nullptr ? absl::OkStatus() : leader_->status(); }

DecodeCounts ModelRunner::decode_counts() const {
  return {graph_replays_.load(), eager_steps_.load(), graph_capture_failures_.load()};
}

void ModelRunner::CountDecodeSteps() {
  const DecodeStats stats = decode_context_->stats();
  if (stats.capture_failures > graph_capture_failures_.load()) {
    LOG(WARNING) << "decode step not captured as a CUDA graph, so launched op by op from now on: "
                 << stats.last_capture_error;
  }
  graph_replays_ = stats.graph_replays;
  eager_steps_ = stats.eager_steps;
  graph_capture_failures_ = stats.capture_failures;
}

absl::StatusOr<ModelRunner::ResolvedAttention> ModelRunner::ResolveAttention(EngineRequest& request) {
  AttentionPlan& plan = request.plan;
  PolicySpec spec = plan.policy;
  GenerationSummary& summary = request.summary;
  PartitionManager::Snapshot partition;
  if (PolicyNeedsPartition(spec.kind)) {
    partition = plan.pinned;
    if (partition == nullptr && spec.kind == PolicyKind::kLychee) {
      PartitionRoute route = partitions_->Route(request.id);
      partition = std::move(route.partition);
      plan.canary_arm = route.arm;
    } else if (partition == nullptr) {
      partition = partitions_->Active().partition;
    }
    if (partition == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("policy ", PolicyName(spec.kind), ": no head partition is active"));
    }
    spec = spec.WithPartitionSelection(partition->selection());
    // Both sides of a canary audit, at the server's period unless the request audits, so that
    // their dropped mass is measured.
    if (plan.canary_arm != PartitionRoute::Arm::kNoCanary && !spec.audit) {
      spec.audit = true;
      spec.audit_every = audit_every_;
    }
    summary.partition_version = partition->version;
  }
  summary.hybrid = spec.kind != PolicyKind::kDense;
  summary.token_budget = spec.kind == PolicyKind::kDense ? 0 : spec.token_budget;
  summary.policy = spec.Describe();
  return ResolvedAttention{std::move(spec), std::move(partition)};
}

absl::StatusOr<std::unique_ptr<ThreadCudaStream>> ModelRunner::UseServingStream() const {
  const at::Device device = model_->options().device;
  if (!device.is_cuda()) return nullptr;
  return UseCudaStreamOnThisThread(CudaStreamPriority::kServing, device.index() < 0 ? 0 : device.index());
}

absl::Status ModelRunner::PrepareGraphs(const PartitionManager::Snapshot& partition) {
  std::shared_ptr<const AttentionBackend> backend = backends_->dense();
  if (partition != nullptr) {
    LYCHEE_ASSIGN_OR_RETURN(
        backend,
        backends_->Get(PolicySpec::LycheeAsPartition().WithPartitionSelection(partition->selection()), partition));
  }
  // Kept from being forgotten as unused until the next preparation: no request holds it yet.
  prepared_ = backend;
  absl::Status prepared = model_->PrepareDecodeGraphs(backend, pool_, *decode_context_);
  CountDecodeSteps();
  return prepared;
}

}  // namespace lychee
