// The trainer's gRPC server: lychee.v1.TrainerService over a JobManager and the partition
// registry, with the standard grpc.health.v1 health service and server reflection. A thin
// layer: requests are checked and served by the job manager and the store, whose absl::Status
// errors map one to one onto gRPC codes. TLS and the admin token are common/service/security.h's. Free of LibTorch (the
// runner comes in from outside).
#pragma once

#include <memory>
#include <string>

#include <grpcpp/server.h>

#include "absl/status/statusor.h"
#include "common/base/partition_store.h"
#include "common/service/metrics.h"
#include "common/service/security.h"
#include "trainer/job_manager.h"

namespace lychee {

struct TrainerServerOptions {
  // host:port; port 0 picks a free one (see TrainerServer::port).
  std::string listen_address = "127.0.0.1:50061";
  // Holds the partition registry (partitions/) and the job journal (jobs/).
  std::string registry_dir;
  // journal_dir is set from registry_dir.
  JobManagerOptions jobs;
  // Plaintext unless a certificate is given; mutual TLS with a client CA.
  TlsServerConfig tls;
  // SubmitCalibrationJob, CancelJob and PublishHeadPartition are the admin RPCs; the others
  // (reading jobs and partitions, the inference services' watch) are open. No client token here.
  AccessOptions access;
  // IPV4:PORT for /metrics (jobs by state, step time, last loss); empty: none.
  std::string metrics_address;
  // One INFO log line per gRPC call (method, peer, status, time).
  bool log_requests = false;
};

class TrainerServer {
 public:
  static absl::StatusOr<std::unique_ptr<TrainerServer>> Start(TrainerServerOptions options, CalibrationRunner runner);
  ~TrainerServer();

  int port() const { return port_; }
  int metrics_port() const { return metrics_server_ == nullptr ? 0 : metrics_server_->port(); }
  // Blocks until Shutdown.
  void Wait();
  // Stops taking calls and gives the ones in flight (watch streams included) a second to end;
  // jobs still running stop within one step and end INTERRUPTED. Idempotent.
  void Shutdown();

 private:
  class Service;
  TrainerServer() = default;

  std::unique_ptr<AccessControl> access_;
  MetricsRegistry metrics_;
  std::unique_ptr<PartitionStore> store_;
  std::unique_ptr<JobManager> jobs_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsHttpServer> metrics_server_;
  int port_ = 0;
};

}  // namespace lychee
