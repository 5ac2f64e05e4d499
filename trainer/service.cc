#include "trainer/service.h"

#include <grpcpp/security/server_credentials.h>

#include <chrono>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/base/model_config.h"
#include "common/base/model_fingerprint.h"
#include "common/base/status_macros.h"
#include "common/service/grpc_server.h"
#include "common/service/grpc_status.h"
#include "lychee/v1/trainer.grpc.pb.h"
#include "trainer/paths.h"

namespace lychee {
namespace {

// How long a watch stream sleeps before it looks again whether its client is still there.
constexpr std::chrono::milliseconds kWatchPoll(250);
// How long Shutdown lets calls in flight finish before cancelling them.
constexpr std::chrono::seconds kShutdownGrace(1);
// The largest request is a published partition: a few kilobytes even for large models.
constexpr int kMaxRequestBytes = 1 << 20;

}  // namespace

class TrainerServer::Service final : public v1::TrainerService::Service {
 public:
  Service(std::string model_root, const AccessControl& access, JobManager& jobs, PartitionStore& store)
      : model_root_(std::move(model_root)), access_(access), jobs_(jobs), store_(store) {}

  grpc::Status SubmitCalibrationJob(grpc::ServerContext* context, const v1::SubmitCalibrationJobRequest* request,
                                    v1::Job* response) override {
    if (grpc::Status denied = access_.AuthorizeAdmin(*context); !denied.ok()) return denied;
    return Reply(jobs_.Submit(*request), response);
  }

  grpc::Status GetJob(grpc::ServerContext*, const v1::GetJobRequest* request, v1::Job* response) override {
    return Reply(jobs_.Get(request->name()), response);
  }

  grpc::Status ListJobs(grpc::ServerContext*, const v1::ListJobsRequest*, v1::ListJobsResponse* response) override {
    for (v1::Job& job : jobs_.List()) *response->add_jobs() = std::move(job);
    return grpc::Status::OK;
  }

  grpc::Status CancelJob(grpc::ServerContext* context, const v1::CancelJobRequest* request, v1::Job* response) override {
    if (grpc::Status denied = access_.AuthorizeAdmin(*context); !denied.ok()) return denied;
    return Reply(jobs_.Cancel(request->name()), response);
  }

  grpc::Status WatchJob(grpc::ServerContext* context, const v1::WatchJobRequest* request,
                        grpc::ServerWriter<v1::Job>* writer) override {
    uint64_t seen = 0;
    while (!context->IsCancelled()) {
      absl::StatusOr<JobManager::Update> update = jobs_.WaitForUpdate(request->name(), seen, kWatchPoll);
      if (!update.ok()) return ToGrpcStatus(update.status());
      if (update->revision == seen) continue;
      seen = update->revision;
      if (!writer->Write(update->job)) break;
      if (IsFinal(update->job.state())) return grpc::Status::OK;
    }
    return grpc::Status(grpc::StatusCode::CANCELLED, "watch ended before the job did");
  }

  grpc::Status ListHeadPartitions(grpc::ServerContext*, const v1::ListHeadPartitionsRequest* request,
                                  v1::ListHeadPartitionsResponse* response) override {
    absl::StatusOr<std::string> fingerprint = Fingerprint(request->model());
    if (!fingerprint.ok()) return ToGrpcStatus(fingerprint.status());
    response->set_model_fingerprint(*fingerprint);
    for (const PartitionStore::Snapshot& partition : store_.List(*fingerprint)) {
      *response->add_partitions() = HeadPartitionToProto(*partition);
    }
    return grpc::Status::OK;
  }

  grpc::Status GetHeadPartition(grpc::ServerContext*, const v1::GetHeadPartitionRequest* request,
                                v1::HeadPartition* response) override {
    absl::StatusOr<std::string> fingerprint = Fingerprint(request->model());
    if (!fingerprint.ok()) return ToGrpcStatus(fingerprint.status());
    absl::StatusOr<PartitionStore::Snapshot> partition =
        request->version() == 0 ? store_.Latest(*fingerprint) : store_.Get(*fingerprint, request->version());
    if (!partition.ok()) return ToGrpcStatus(partition.status());
    *response = HeadPartitionToProto(**partition);
    return grpc::Status::OK;
  }

  grpc::Status WatchHeadPartitions(grpc::ServerContext* context, const v1::WatchHeadPartitionsRequest* request,
                                   grpc::ServerWriter<v1::HeadPartition>* writer) override {
    absl::StatusOr<std::string> fingerprint = Fingerprint(request->model());
    if (!fingerprint.ok()) return ToGrpcStatus(fingerprint.status());
    uint64_t after_version = request->after_version();
    if (!request->has_after_version()) {
      // A new subscriber starts from the newest version, not from the whole history.
      if (absl::StatusOr<PartitionStore::Snapshot> latest = store_.Latest(*fingerprint); latest.ok()) {
        if (!writer->Write(HeadPartitionToProto(**latest))) return grpc::Status::OK;
        after_version = (*latest)->version;
      }
    }
    while (!context->IsCancelled()) {
      for (const PartitionStore::Snapshot& partition : store_.WaitForNewerThan(*fingerprint, after_version, kWatchPoll)) {
        if (!writer->Write(HeadPartitionToProto(*partition))) return grpc::Status::OK;
        after_version = partition->version;
      }
    }
    return grpc::Status(grpc::StatusCode::CANCELLED, "watch ended");
  }

  grpc::Status PublishHeadPartition(grpc::ServerContext* context, const v1::PublishHeadPartitionRequest* request,
                                    v1::HeadPartition* response) override {
    if (grpc::Status denied = access_.AuthorizeAdmin(*context); !denied.ok()) return denied;
    return Reply(Publish(*request), response);
  }

 private:
  template <typename Message>
  static grpc::Status Reply(absl::StatusOr<Message> result, Message* response) {
    if (!result.ok()) return ToGrpcStatus(result.status());
    *response = *std::move(result);
    return grpc::Status::OK;
  }

  absl::StatusOr<v1::HeadPartition> Publish(const v1::PublishHeadPartitionRequest& request) const {
    if (request.model().model_case() != v1::ModelSelector::kName) {
      return absl::InvalidArgumentError("model.name: required, the partition is checked against that model's shape");
    }
    LYCHEE_ASSIGN_OR_RETURN(const std::string model_dir, ResolveModelDir(model_root_, request.model().name()));
    LYCHEE_ASSIGN_OR_RETURN(const std::string fingerprint, ModelFingerprint(model_dir));
    LYCHEE_ASSIGN_OR_RETURN(HeadPartition partition, HeadPartitionFromProto(request.partition()));
    if (!partition.model_fingerprint.empty() && partition.model_fingerprint != fingerprint) {
      return absl::FailedPreconditionError(absl::StrCat("partition.model_fingerprint ", partition.model_fingerprint,
                                                        " is not model ", request.model().name(), "'s (",
                                                        fingerprint, ")"));
    }
    LYCHEE_ASSIGN_OR_RETURN(const ModelConfig config, ModelConfig::FromFile(model_dir + "/config.json"));
    LYCHEE_RETURN_IF_ERROR(partition.ValidateFor(config));
    partition.model_fingerprint = fingerprint;
    if (partition.source.empty()) partition.source = "published";
    if (partition.created_unix_seconds == 0) partition.created_unix_seconds = absl::ToUnixSeconds(absl::Now());
    LYCHEE_ASSIGN_OR_RETURN(const uint64_t version, store_.Publish(std::move(partition)));
    LYCHEE_ASSIGN_OR_RETURN(const PartitionStore::Snapshot stored, store_.Get(fingerprint, version));
    return HeadPartitionToProto(*stored);
  }

  absl::StatusOr<std::string> Fingerprint(const v1::ModelSelector& selector) const {
    switch (selector.model_case()) {
      case v1::ModelSelector::kName: {
        LYCHEE_ASSIGN_OR_RETURN(const std::string model_dir, ResolveModelDir(model_root_, selector.name()));
        return ModelFingerprint(model_dir);
      }
      case v1::ModelSelector::kFingerprint:
        if (!IsValidFingerprint(selector.fingerprint())) {
          return absl::InvalidArgumentError(
              absl::StrCat("model.fingerprint: '", selector.fingerprint(), "' is not a model fingerprint"));
        }
        return selector.fingerprint();
      case v1::ModelSelector::MODEL_NOT_SET:
        break;
    }
    return absl::InvalidArgumentError("model: required (a model name or fingerprint)");
  }

  const std::string model_root_;
  const AccessControl& access_;
  JobManager& jobs_;
  PartitionStore& store_;
};

absl::StatusOr<std::unique_ptr<TrainerServer>> TrainerServer::Start(TrainerServerOptions options,
                                                                    CalibrationRunner runner) {
  if (options.registry_dir.empty()) return absl::InvalidArgumentError("the registry directory is required");
  std::unique_ptr<TrainerServer> server(new TrainerServer());
  LYCHEE_ASSIGN_OR_RETURN(AccessControl access,
                          AccessControl::Create(options.access, options.listen_address));
  server->access_ = std::make_unique<AccessControl>(std::move(access));
  LYCHEE_ASSIGN_OR_RETURN(const std::shared_ptr<grpc::ServerCredentials> credentials,
                          MakeServerCredentials(options.tls));
  LYCHEE_ASSIGN_OR_RETURN(server->store_, PartitionStore::Open(options.registry_dir));
  options.jobs.journal_dir = (std::filesystem::path(options.registry_dir) / "jobs").string();
  const std::string model_root = options.jobs.model_root;
  options.jobs.metrics = &server->metrics_;
  LYCHEE_ASSIGN_OR_RETURN(server->jobs_, JobManager::Create(std::move(options.jobs), *server->store_, std::move(runner)));
  server->service_ = std::make_unique<Service>(model_root, *server->access_, *server->jobs_, *server->store_);

  LYCHEE_ASSIGN_OR_RETURN(server->server_, StartGrpcServer(options.listen_address, credentials, server->service_.get(),
                                                           kMaxRequestBytes, options.log_requests, &server->port_));
  if (!options.metrics_address.empty()) {
    LYCHEE_ASSIGN_OR_RETURN(server->metrics_server_,
                            MetricsHttpServer::Start(options.metrics_address, server->metrics_));
  }
  return server;
}

TrainerServer::~TrainerServer() { Shutdown(); }

void TrainerServer::Wait() { server_->Wait(); }

void TrainerServer::Shutdown() {
  if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now() + kShutdownGrace);
  // The job metrics read the manager: no scrape may come once it is gone.
  metrics_server_.reset();
  jobs_.reset();
}

}  // namespace lychee
