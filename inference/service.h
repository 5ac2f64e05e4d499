// lychee-inference's gRPC server: lychee.v1.InferenceService over an InferenceEngine, the
// PartitionManager and, when a trainer is named, a TrainerWatcher that rolls its partitions out;
// grpc.health.v1 health, server reflection, Prometheus metrics on their own port and, when asked
// for, the OpenAI-compatible HTTP API (inference/http_server.h). A thin layer: requests are
// translated and checked, the engine and the manager serve them, and their absl::Status errors
// map one to one onto gRPC codes (onto HTTP statuses for the HTTP API). TLS and the tokens are
// common/service/security.h's. Free of LibTorch.
#pragma once

#include <memory>
#include <string>

#include <grpcpp/server.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/service/metrics.h"
#include "common/service/security.h"
#include "inference/engine.h"
#include "inference/http_server.h"
#include "inference/partition_manager.h"
#include "inference/shadow_validator.h"
#include "inference/trainer_watcher.h"

namespace lychee {

struct InferenceServerOptions {
  // host:port; port 0 picks a free one (see InferenceServer::port).
  std::string listen_address = "127.0.0.1:50062";
  // The partitions received and which one is active; survives restarts.
  std::string state_dir;
  // A lychee-trainer to follow; empty: partitions change only through the admin RPCs.
  std::string trainer_address;
  // How to reach that trainer: TLS when a file is named (the watch needs no token).
  TlsClientConfig trainer_tls;
  // Plaintext unless a certificate is given; mutual TLS with a client CA.
  TlsServerConfig tls;
  // ActivatePartition, Rollback and SetRolloutHold are the admin RPCs; the others are the
  // clients', which need the client token when there is one.
  AccessOptions access;
  // IPV4:PORT for /metrics; empty: none.
  std::string metrics_address;
  // One INFO log line per gRPC call (method, peer, status, time).
  bool log_requests = false;
  // [HOST:]PORT for the OpenAI-compatible HTTP API (a bare port: the loopback); empty: none. It
  // takes the client token as the gRPC service does, and serves HTTPS when `tls` has a certificate.
  std::string http_address;
  EngineOptions engine;
  // Partitions from the trainer are validated against dense before they become active (the
  // admin RPCs activate what is stored without it). Under tensor parallelism with validation on,
  // shadow.tensor_parallel is the validation's group of the engine's ranks.
  ShadowValidationOptions shadow;
  // How canaries that name no bounds are decided.
  CanaryBounds canary_bounds;
  // In [0, 1]: when above 0, a shadow-validated partition from the trainer starts as a canary of
  // this fraction of new sequences (when another is active) instead of becoming active at once.
  double offer_canary_fraction = 0;
};

class InferenceServer {
 public:
  static absl::StatusOr<std::unique_ptr<InferenceServer>> Start(InferenceServerOptions options);
  ~InferenceServer();

  int port() const { return port_; }
  int metrics_port() const { return metrics_server_ == nullptr ? 0 : metrics_server_->port(); }
  int http_port() const { return http_server_ == nullptr ? 0 : http_server_->port(); }
  // Why /v1/chat/completions answers 400 (the model's chat template is missing or outside the
  // supported subset); OK when it has a usable one, or when there is no HTTP API.
  const absl::Status& chat_template_status() const { return chat_template_status_; }
  // OK while the engine can decode; UNAVAILABLE once it lost a tensor-parallel rank.
  absl::Status serving_status() const { return engine_->serving_status(); }
  // Stops taking calls, ends the generations in flight and the watch. Idempotent.
  void Shutdown();

 private:
  class Service;
  InferenceServer() = default;
  // The engine can serve no more (it lost a tensor-parallel rank): gRPC health says NOT_SERVING from
  // now on. Any thread.
  void MarkNotServing();

  std::unique_ptr<AccessControl> access_;
  MetricsRegistry metrics_;
  std::unique_ptr<PartitionManager> partitions_;
  std::unique_ptr<InferenceEngine> engine_;
  std::unique_ptr<ShadowValidator> shadow_;
  std::unique_ptr<TrainerWatcher> watcher_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsHttpServer> metrics_server_;
  std::unique_ptr<HttpServer> http_server_;
  absl::Status chat_template_status_;
  int port_ = 0;
  // What MarkNotServing reaches: the gRPC server once it runs, until it shuts down.
  absl::Mutex health_mutex_;
  grpc::Server* health_server_ ABSL_GUARDED_BY(health_mutex_) = nullptr;
  bool serving_ ABSL_GUARDED_BY(health_mutex_) = true;
};

}  // namespace lychee
