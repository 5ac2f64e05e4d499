#include "inference/service.h"

#include <grpcpp/security/server_credentials.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/base/chat_template.h"
#include "common/base/model_config.h"
#include "common/base/model_fingerprint.h"
#include "common/base/status_macros.h"
#include "common/service/grpc_server.h"
#include "common/service/grpc_status.h"
#include "inference/generate_request.h"
#include "lychee/v1/inference.grpc.pb.h"

namespace lychee {
namespace {

// How long a Generate call waits for the next event before it looks again whether its client
// is still there.
constexpr std::chrono::milliseconds kStreamPoll(100);
constexpr std::chrono::seconds kShutdownGrace(1);
// Prompts of a few hundred thousand tokens fit; anything larger is refused before parsing (gRPC
// messages and HTTP bodies alike).
constexpr int kMaxRequestBytes = 16 << 20;

// What clients call the model: its directory's name (also with a trailing slash).
std::string ServedModelName(const std::string& model_dir) {
  const std::filesystem::path path(model_dir);
  return (path.has_filename() ? path : path.parent_path()).filename().string();
}

v1::FinishReason ToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStopToken:
      return v1::FINISH_REASON_STOP_TOKEN;
    case FinishReason::kStopSequence:
      return v1::FINISH_REASON_STOP_SEQUENCE;
    case FinishReason::kMaxTokens:
      return v1::FINISH_REASON_MAX_TOKENS;
    case FinishReason::kContextLimit:
      return v1::FINISH_REASON_CONTEXT_LIMIT;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

v1::GenerateDone ToProto(const GenerationSummary& summary) {
  v1::GenerateDone done;
  done.set_finish_reason(ToProto(summary.finish_reason));
  done.mutable_usage()->set_prompt_tokens(static_cast<uint32_t>(summary.prompt_tokens));
  done.mutable_usage()->set_completion_tokens(static_cast<uint32_t>(summary.completion_tokens));
  v1::Timings* timings = done.mutable_timings();
  timings->set_queue_seconds(summary.queue_seconds);
  timings->set_time_to_first_token_seconds(summary.time_to_first_token_seconds);
  timings->set_mean_token_latency_seconds(summary.mean_token_latency_seconds);
  timings->set_max_token_latency_seconds(summary.max_token_latency_seconds);
  timings->set_total_seconds(summary.total_seconds);
  done.set_attention_mode(summary.hybrid ? v1::ATTENTION_MODE_HYBRID : v1::ATTENTION_MODE_DENSE);
  done.set_partition_version(summary.partition_version);
  done.set_token_budget(static_cast<uint32_t>(summary.token_budget));
  done.set_policy(summary.policy);
  if (summary.telemetry) {
    const GenerationTelemetry& telemetry = *summary.telemetry;
    v1::AttentionTelemetry* proto = done.mutable_telemetry();
    proto->set_num_layers(static_cast<uint32_t>(telemetry.num_layers));
    proto->set_num_kv_heads(static_cast<uint32_t>(telemetry.num_kv_heads));
    for (int64_t tokens : telemetry.tokens_attended) proto->add_tokens_attended(static_cast<uint64_t>(tokens));
    proto->set_decode_steps(static_cast<uint64_t>(telemetry.decode_steps));
    proto->set_kv_bytes_read(static_cast<uint64_t>(telemetry.kv_bytes_read));
    proto->set_audited(telemetry.audited);
    proto->set_max_dropped_mass(telemetry.max_dropped_mass);
    proto->set_mean_dropped_mass(telemetry.mean_dropped_mass);
  }
  done.set_preemptions(static_cast<uint32_t>(summary.preemptions));
  if (summary.dense_fallback) {
    const DenseFallback& fallback = *summary.dense_fallback;
    v1::DenseFallback* proto = done.mutable_dense_fallback();
    proto->set_token_index(static_cast<uint32_t>(fallback.token_index));
    proto->set_dropped_mass(fallback.dropped_mass);
    proto->set_max_dropped_mass(fallback.max_dropped_mass);
    proto->set_reason(fallback.Reason());
  }
  return done;
}

v1::CanaryArm ToProto(uint64_t version, const CanaryArmStats& stats) {
  v1::CanaryArm arm;
  arm.set_version(version);
  arm.set_sequences(static_cast<uint64_t>(stats.sequences));
  arm.set_errors(static_cast<uint64_t>(stats.errors));
  arm.set_audited_sequences(static_cast<uint64_t>(stats.audited_sequences));
  arm.set_mean_dropped_mass(stats.mean_dropped_mass());
  arm.set_mean_token_latency_seconds(stats.mean_token_latency());
  arm.set_p99_sequence_token_latency_seconds(stats.p99_sequence_latency());
  return arm;
}

v1::CanaryStatus ToProto(const CanaryRecord& record) {
  v1::CanaryStatus status;
  status.set_state(CanaryStateName(record.state));
  status.set_fraction(record.fraction);
  *status.mutable_canary() = ToProto(record.version, record.canary);
  *status.mutable_stable() = ToProto(record.stable_version, record.stable);
  status.set_decide_after_sequences(static_cast<uint32_t>(record.bounds.sequences));
  status.set_max_dropped_mass(record.bounds.max_dropped_mass);
  status.set_max_error_rate(record.bounds.max_error_rate);
  status.set_max_latency_ratio(record.bounds.max_latency_ratio);
  status.set_reason(record.reason);
  status.set_started_unix_seconds(record.started_unix_seconds);
  status.set_decided_unix_seconds(record.decided_unix_seconds);
  return status;
}

}  // namespace

class InferenceServer::Service final : public v1::InferenceService::Service {
 public:
  Service(std::string model_name, std::string fingerprint, std::string trainer_address, const AccessControl& access,
          InferenceEngine& engine, PartitionManager& partitions, const TrainerWatcher* watcher,
          const CanaryBounds& canary_bounds)
      : model_name_(std::move(model_name)),
        fingerprint_(std::move(fingerprint)),
        trainer_address_(std::move(trainer_address)),
        access_(access),
        engine_(engine),
        partitions_(partitions),
        watcher_(watcher),
        canary_bounds_(canary_bounds) {}

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    if (grpc::Status denied = access_.AuthorizeClient(*context); !denied.ok()) return denied;
    absl::StatusOr<GenerationRequest> generation =
        ToGenerationRequest(*request, engine_.tokenizer(), context->deadline());
    if (!generation.ok()) return ToGrpcStatus(generation.status());
    absl::StatusOr<std::shared_ptr<GenerationStream>> stream = engine_.Submit(*std::move(generation));
    if (!stream.ok()) return ToGrpcStatus(stream.status());
    while (true) {
      if (context->IsCancelled()) {
        (*stream)->Cancel();
        return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
      }
      GenerationEvent event = (*stream)->Next(kStreamPoll);
      v1::GenerateResponse response;
      switch (event.kind) {
        case GenerationEvent::Kind::kNothingYet:
          continue;
        case GenerationEvent::Kind::kError:
          return ToGrpcStatus(event.error);
        case GenerationEvent::Kind::kChunk:
          response.mutable_token_ids()->Add(event.token_ids.begin(), event.token_ids.end());
          response.set_text(std::move(event.text));
          if (!writer->Write(response)) {
            (*stream)->Cancel();
            return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
          }
          continue;
        case GenerationEvent::Kind::kDone:
          *response.mutable_done() = ToProto(event.summary);
          writer->Write(response);
          return grpc::Status::OK;
      }
    }
  }

  grpc::Status Tokenize(grpc::ServerContext* context, const v1::TokenizeRequest* request,
                        v1::TokenizeResponse* response) override {
    if (grpc::Status denied = access_.AuthorizeClient(*context); !denied.ok()) return denied;
    absl::StatusOr<std::vector<int32_t>> ids = engine_.tokenizer().Encode(request->text(), request->add_special_tokens());
    if (!ids.ok()) return ToGrpcStatus(ids.status());
    response->mutable_token_ids()->Add(ids->begin(), ids->end());
    return grpc::Status::OK;
  }

  grpc::Status Detokenize(grpc::ServerContext* context, const v1::DetokenizeRequest* request,
                          v1::DetokenizeResponse* response) override {
    if (grpc::Status denied = access_.AuthorizeClient(*context); !denied.ok()) return denied;
    const std::vector<int32_t> ids(request->token_ids().begin(), request->token_ids().end());
    absl::StatusOr<std::string> text = engine_.tokenizer().Decode(ids, request->skip_special_tokens());
    if (!text.ok()) return ToGrpcStatus(text.status());
    response->set_text(*std::move(text));
    return grpc::Status::OK;
  }

  grpc::Status GetServerInfo(grpc::ServerContext* context, const v1::GetServerInfoRequest*,
                             v1::ServerInfo* response) override {
    if (grpc::Status denied = access_.AuthorizeClient(*context); !denied.ok()) return denied;
    *response = Info();
    return grpc::Status::OK;
  }

  grpc::Status ListPartitions(grpc::ServerContext* context, const v1::ListPartitionsRequest*,
                              v1::ListPartitionsResponse* response) override {
    if (grpc::Status denied = access_.AuthorizeClient(*context); !denied.ok()) return denied;
    for (const PartitionManager::Snapshot& partition : partitions_.List()) {
      *response->add_partitions() = HeadPartitionToProto(*partition);
    }
    const PartitionManager::Snapshot active = partitions_.Active().partition;
    response->set_active_version(active == nullptr ? 0 : active->version);
    return grpc::Status::OK;
  }

  grpc::Status ActivatePartition(grpc::ServerContext* context, const v1::ActivatePartitionRequest* request,
                                 v1::ServerInfo* response) override {
    if (grpc::Status denied = access_.AuthorizeAdmin(*context); !denied.ok()) return denied;
    if (request->version() == 0) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "version: required");
    if (!request->has_canary_fraction()) {
      if (request->has_canary_max_dropped_mass() || request->has_canary_max_error_rate()) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "canary_max_dropped_mass and canary_max_error_rate need canary_fraction");
      }
      return ReplyWithInfo(partitions_.Activate(request->version()), response);
    }
    CanaryBounds bounds = canary_bounds_;
    if (request->has_canary_max_dropped_mass()) bounds.max_dropped_mass = request->canary_max_dropped_mass();
    if (request->has_canary_max_error_rate()) bounds.max_error_rate = request->canary_max_error_rate();
    return ReplyWithInfo(partitions_.StartCanary(request->version(), request->canary_fraction(), bounds), response);
  }

  grpc::Status DecideCanary(grpc::ServerContext* context, const v1::DecideCanaryRequest* request,
                            v1::ServerInfo* response) override {
    if (grpc::Status denied = access_.AuthorizeAdmin(*context); !denied.ok()) return denied;
    switch (request->action()) {
      case v1::CANARY_ACTION_PROMOTE: return ReplyWithInfo(partitions_.PromoteCanary(), response);
      case v1::CANARY_ACTION_ABORT: return ReplyWithInfo(partitions_.AbortCanary(), response);
      default:
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "action: CANARY_ACTION_PROMOTE or CANARY_ACTION_ABORT");
    }
  }

  grpc::Status Rollback(grpc::ServerContext* context, const v1::RollbackRequest*, v1::ServerInfo* response) override {
    if (grpc::Status denied = access_.AuthorizeAdmin(*context); !denied.ok()) return denied;
    return ReplyWithInfo(partitions_.Rollback(), response);
  }

  grpc::Status SetRolloutHold(grpc::ServerContext* context, const v1::SetRolloutHoldRequest* request,
                              v1::ServerInfo* response) override {
    if (grpc::Status denied = access_.AuthorizeAdmin(*context); !denied.ok()) return denied;
    return ReplyWithInfo(partitions_.SetHold(request->hold()), response);
  }

 private:
  grpc::Status ReplyWithInfo(const absl::Status& status, v1::ServerInfo* response) const {
    if (!status.ok()) return ToGrpcStatus(status);
    *response = Info();
    return grpc::Status::OK;
  }

  v1::ServerInfo Info() const {
    v1::ServerInfo info;
    info.set_model(model_name_);
    info.set_model_fingerprint(fingerprint_);
    info.set_num_layers(static_cast<uint32_t>(engine_.config().num_layers));
    info.set_num_kv_heads(static_cast<uint32_t>(engine_.config().num_kv_heads));
    info.set_max_context_tokens(static_cast<uint32_t>(engine_.max_context_tokens()));
    info.set_device(engine_.device());
    const ActivePartition active = partitions_.Active();
    if (active.partition != nullptr) {
      info.set_active_partition_version(active.partition->version);
      info.set_active_partition_source(active.partition->source);
      info.set_activated_by(active.activated_by);
    }
    info.set_rollout_held(partitions_.held());
    info.set_trainer_address(trainer_address_);
    if (watcher_ != nullptr) {
      info.set_trainer_connected(watcher_->connected());
      info.set_trainer_last_error(watcher_->last_error());
    }
    for (const RejectedPartition& rejected : partitions_.rejections()) {
      v1::RejectedPartition* entry = info.add_rejected();
      entry->set_version(rejected.version);
      entry->set_reason(rejected.reason);
      entry->set_unix_seconds(rejected.unix_seconds);
    }
    const EngineLoad load = engine_.load();
    info.set_active_sequences(static_cast<uint32_t>(load.active_sequences));
    info.set_queued_requests(static_cast<uint32_t>(load.queued_requests));
    info.set_kv_cache_bytes_reserved(static_cast<uint64_t>(load.kv_bytes_reserved));
    info.set_kv_cache_bytes_limit(static_cast<uint64_t>(load.kv_bytes_limit));
    info.set_kv_cache_pages_used(static_cast<uint64_t>(load.kv_pages_used));
    info.set_kv_cache_pages_total(static_cast<uint64_t>(load.kv_pages_total));
    info.set_max_new_tokens_limit(static_cast<uint32_t>(engine_.max_new_tokens_limit()));
    if (const std::optional<CanaryRecord> canary = partitions_.Canary()) *info.mutable_canary() = ToProto(*canary);
    return info;
  }

  const std::string model_name_;
  const std::string fingerprint_;
  const std::string trainer_address_;
  const AccessControl& access_;
  InferenceEngine& engine_;
  PartitionManager& partitions_;
  const TrainerWatcher* const watcher_;
  const CanaryBounds canary_bounds_;
};

namespace {

// Per side of the canary, labelled by side and version; the last canary's numbers stay until the next starts.
void RegisterCanaryMetrics(const PartitionManager& partitions, MetricsRegistry& metrics) {
  metrics.AddGauge("lychee_canary_running", "1 while a canary partition is served to a fraction of new sequences",
                   [&partitions] {
                     const std::optional<CanaryRecord> canary = partitions.Canary();
                     return canary && canary->state == CanaryState::kRunning ? 1.0 : 0.0;
                   });
  metrics.AddGauge("lychee_canary_fraction", "The fraction of new sequences the last canary got", [&partitions] {
    const std::optional<CanaryRecord> canary = partitions.Canary();
    return canary ? canary->fraction : 0.0;
  });
  for (const bool canary_side : {true, false}) {
    const MetricLabels labels = {{"arm", canary_side ? "canary" : "stable"}};
    const auto read = [&partitions, canary_side](double (*value)(uint64_t, const CanaryArmStats&)) {
      return [&partitions, canary_side, value] {
        const std::optional<CanaryRecord> record = partitions.Canary();
        if (!record) return 0.0;
        return value(canary_side ? record->version : record->stable_version,
                     canary_side ? record->canary : record->stable);
      };
    };
    metrics.AddGauge("lychee_canary_version", "The partition version of each side of the last canary",
                     read([](uint64_t version, const CanaryArmStats&) { return static_cast<double>(version); }),
                     labels);
    metrics.AddGauge("lychee_canary_sequences", "Sequences of each side of the last canary that finished",
                     read([](uint64_t, const CanaryArmStats& stats) { return static_cast<double>(stats.sequences); }),
                     labels);
    metrics.AddGauge("lychee_canary_errors", "Sequences of each side of the last canary that ended in an error",
                     read([](uint64_t, const CanaryArmStats& stats) { return static_cast<double>(stats.errors); }),
                     labels);
    metrics.AddGauge("lychee_canary_mean_dropped_mass", "Mean audited dropped mass of each side of the last canary",
                     read([](uint64_t, const CanaryArmStats& stats) { return stats.mean_dropped_mass(); }), labels);
    metrics.AddGauge("lychee_canary_token_latency_seconds", "Mean per-token latency of each side of the last canary",
                     read([](uint64_t, const CanaryArmStats& stats) { return stats.mean_token_latency(); }), labels);
    metrics.AddGauge("lychee_canary_p99_sequence_token_latency_seconds",
                     "p99 of the sequences' mean per-token latency, each side of the last canary",
                     read([](uint64_t, const CanaryArmStats& stats) { return stats.p99_sequence_latency(); }), labels);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<InferenceServer>> InferenceServer::Start(InferenceServerOptions options) {
  if (options.state_dir.empty()) return absl::InvalidArgumentError("the state directory is required");
  LYCHEE_RETURN_IF_ERROR(ShadowValidator::CheckOptions(options.shadow));
  LYCHEE_RETURN_IF_ERROR(options.canary_bounds.Validate("canary bounds: "));
  if (!(options.offer_canary_fraction >= 0 && options.offer_canary_fraction <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the offered partitions' canary fraction must be in [0, 1], got ", options.offer_canary_fraction));
  }
  const std::string model_dir = options.engine.model_dir;
  LYCHEE_ASSIGN_OR_RETURN(const ModelConfig config, ModelConfig::FromFile(model_dir + "/config.json"));
  LYCHEE_ASSIGN_OR_RETURN(const std::string fingerprint, ModelFingerprint(model_dir));
  std::unique_ptr<InferenceServer> server(new InferenceServer());
  LYCHEE_ASSIGN_OR_RETURN(AccessControl access,
                          AccessControl::Create(options.access, options.listen_address));
  server->access_ = std::make_unique<AccessControl>(std::move(access));
  LYCHEE_ASSIGN_OR_RETURN(const std::shared_ptr<grpc::ServerCredentials> credentials,
                          MakeServerCredentials(options.tls));
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> trainer_credentials,
                          MakeChannelCredentials(options.trainer_tls));
  MetricsRegistry& metrics = server->metrics_;

  PartitionManager::Options partition_options;
  partition_options.state_dir = options.state_dir;
  partition_options.model_fingerprint = fingerprint;
  partition_options.model_config = config;
  partition_options.check_servable = [config](const HeadPartition& partition) {
    return CheckPartitionServable(partition, config);
  };
  partition_options.canary_bounds = options.canary_bounds;
  partition_options.offer_canary_fraction = options.offer_canary_fraction;
  LYCHEE_ASSIGN_OR_RETURN(server->partitions_, PartitionManager::Open(std::move(partition_options)));
  PartitionManager& partitions = *server->partitions_;
  metrics.AddGauge("lychee_active_partition_version", "The head partition new sequences get; 0 for none", [&partitions] {
    const PartitionManager::Snapshot active = partitions.Active().partition;
    return active == nullptr ? 0.0 : static_cast<double>(active->version);
  });
  metrics.AddCounterFunction("lychee_partition_rollouts_total", "Changes of the active partition",
                             [&partitions] { return static_cast<double>(partitions.rollouts()); });
  metrics.AddCounterFunction("lychee_partition_rejections_total", "Partitions that failed validation",
                             [&partitions] {
                               return static_cast<double>(partitions.rejected_count() - partitions.rejected_by_gate() -
                                                          partitions.rejected_by_canary());
                             },
                             {{"reason", "invalid"}});
  metrics.AddCounterFunction("lychee_partition_rejections_total", "Partitions that failed validation",
                             [&partitions] { return static_cast<double>(partitions.rejected_by_canary()); },
                             {{"reason", "canary"}});
  RegisterCanaryMetrics(partitions, metrics);
  metrics.AddCounterFunction("lychee_partition_rejections_total", "Partitions that failed validation",
                             [&partitions] { return static_cast<double>(partitions.rejected_by_gate()); },
                             {{"reason", "shadow_validation"}});
  metrics.AddGauge("lychee_rollout_held", "1 while automatic rollouts are held",
                   [&partitions] { return partitions.held() ? 1.0 : 0.0; });

  options.engine.on_unservable = [server = server.get()](const absl::Status&) { server->MarkNotServing(); };
  LYCHEE_ASSIGN_OR_RETURN(server->engine_, InferenceEngine::Create(options.engine, &partitions, &metrics));
  partitions.SetActivationPreparer(
      [engine = server->engine_.get()](const PartitionManager::Snapshot& partition) { return engine->PrepareGraphs(partition); });
  // Only a trainer's offers are validated.
  if (options.shadow.enabled) {
    options.shadow.served_context_tokens = server->engine_->max_context_tokens();
    LYCHEE_ASSIGN_OR_RETURN(server->shadow_, ShadowValidator::Create(options.shadow, server->engine_->model(),
                                                                     server->engine_->tokenizer()));
    ShadowValidator* shadow = server->shadow_.get();
    partitions.SetOfferGate([shadow](const HeadPartition& partition) { return shadow->Check(partition); });
    metrics.AddGauge("lychee_shadow_validation_running", "1 while a partition is validated against dense",
                     [shadow] { return shadow->running() ? 1.0 : 0.0; });
    metrics.AddCounterFunction("lychee_shadow_validations_total", "Shadow validations by outcome",
                               [shadow] { return static_cast<double>(shadow->promoted_count()); },
                               {{"outcome", "promoted"}});
    metrics.AddCounterFunction("lychee_shadow_validations_total", "Shadow validations by outcome",
                               [shadow] { return static_cast<double>(shadow->rejected_count()); },
                               {{"outcome", "rejected"}});
    metrics.AddGauge("lychee_shadow_last_dropped_mass", "Mean dropped mass of the last shadow validation", [shadow] {
      const std::optional<ShadowValidationRecord> last = shadow->last();
      return last ? last->validation.partition.mean_dropped_mass : 0.0;
    });
    metrics.AddGauge("lychee_shadow_last_min_accuracy_margin",
                     "Lowest partition-minus-dense task accuracy of the last shadow validation", [shadow] {
                       const std::optional<ShadowValidationRecord> last = shadow->last();
                       double margin = 0;
                       if (!last) return margin;
                       const auto& tasks = last->validation.partition.tasks;
                       for (size_t i = 0; i < tasks.size() && i < last->validation.dense.tasks.size(); ++i) {
                         margin = std::min(margin, tasks[i].accuracy - last->validation.dense.tasks[i].accuracy);
                       }
                       return margin;
                     });
  }
  if (!options.trainer_address.empty()) {
    server->watcher_ = std::make_unique<TrainerWatcher>(
        TrainerWatcherOptions{options.trainer_address, fingerprint, std::move(trainer_credentials)}, partitions);
    const TrainerWatcher* watcher = server->watcher_.get();
    metrics.AddGauge("lychee_trainer_connected", "1 while the partition watch of the trainer is up",
                     [watcher] { return watcher->connected() ? 1.0 : 0.0; });
  }
  server->service_ =
      std::make_unique<Service>(ServedModelName(model_dir), fingerprint, options.trainer_address, *server->access_,
                                *server->engine_, partitions, server->watcher_.get(), options.canary_bounds);

  LYCHEE_ASSIGN_OR_RETURN(server->server_, StartGrpcServer(options.listen_address, credentials, server->service_.get(),
                                                           kMaxRequestBytes, options.log_requests, &server->port_));
  {
    absl::MutexLock lock(&server->health_mutex_);
    server->health_server_ = server->server_.get();
    if (!server->serving_) server->health_server_->GetHealthCheckService()->SetServingStatus(false);
  }
  if (!options.metrics_address.empty()) {
    LYCHEE_ASSIGN_OR_RETURN(server->metrics_server_, MetricsHttpServer::Start(options.metrics_address, metrics));
  }
  if (!options.http_address.empty()) {
    openai::ServedModel served;
    served.name = ServedModelName(model_dir);
    served.tokenizer = &server->engine_->tokenizer();
    served.max_context_tokens = server->engine_->max_context_tokens();
    served.max_new_tokens_limit = server->engine_->max_new_tokens_limit();
    served.chat_template = ChatTemplate::FromTokenizerConfig(model_dir);
    server->chat_template_status_ = served.chat_template.status();
    served.created = static_cast<int64_t>(std::time(nullptr));
    HttpServerOptions http;
    http.listen_address = options.http_address;
    http.max_body_bytes = kMaxRequestBytes;
    http.tls = options.tls;
    LYCHEE_ASSIGN_OR_RETURN(server->http_server_, HttpServer::Start(http, std::move(served), *server->engine_,
                                                                     *server->access_, metrics));
  }
  return server;
}

InferenceServer::~InferenceServer() { Shutdown(); }

void InferenceServer::MarkNotServing() {
  absl::MutexLock lock(&health_mutex_);
  serving_ = false;
  if (health_server_ != nullptr) health_server_->GetHealthCheckService()->SetServingStatus(false);
}

void InferenceServer::Shutdown() {
  if (shadow_ != nullptr) shadow_->Cancel();
  if (partitions_ != nullptr) partitions_->SetActivationPreparer(nullptr);
  if (engine_ != nullptr) engine_->Shutdown();
  {
    absl::MutexLock lock(&health_mutex_);
    health_server_ = nullptr;
  }
  if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now() + kShutdownGrace);
  watcher_.reset();
  metrics_server_.reset();
  // After the engine: the streams it still serves end with the engine's UNAVAILABLE error event.
  http_server_.reset();
}

}  // namespace lychee
