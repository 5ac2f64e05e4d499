// lychee-trainer: the calibration job server (lychee.v1.TrainerService).
#include <glog/logging.h>

#include <cstdint>
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/model/rank_workers.h"
#include "common/service/rank_flags.h"
#include "common/service/resource_paths.h"
#include "common/service/service_main.h"
#include "common/service/shutdown_signals.h"
#include "trainer/job_runner.h"
#include "trainer/service.h"

ABSL_FLAG(std::string, listen, lychee::TrainerServerOptions{}.listen_address, "HOST:PORT where to serve");
ABSL_FLAG(std::string, model_root, lychee::ResourcePathOrEmpty("models"), "models are the directories under it");
ABSL_FLAG(std::string, data_root, lychee::ResourcePathOrEmpty("data"), "corpora that jobs name are paths under it");
ABSL_FLAG(std::string, registry_dir, "",
          "published partitions (DIR/partitions) and the job journal (DIR/jobs); required");
ABSL_FLAG(int64_t, max_concurrent_jobs, 1, "jobs that run at once");
ABSL_FLAG(int64_t, max_queued_jobs, 64, "jobs that may wait");
ABSL_FLAG(std::string, device, "cpu", "cpu or cuda: where jobs run");
ABSL_FLAG(int64_t, threads, 0,
          "LibTorch intra-op threads per job and per data-parallel rank (0: LibTorch's own default, OMP_NUM_THREADS "
          "or 1)");
ABSL_FLAG(int64_t, data_parallel, 1,
          "ranks each calibration runs on (over Gloo on cpu, NCCL on cuda with a GPU each): rank 0 in the trainer, the "
          "others as worker processes; they "
          "split every step's samples, so a job's samples_per_step must be a multiple of it");
ABSL_FLAG(std::string, calibration_worker, "", "set by rank 0 on the calibration workers it starts; not for users");
ABSL_FLAG(std::string, tls_cert, "",
          "with --tls-key: serve TLS with the PEM certificate chain of this file (default plaintext)");
ABSL_FLAG(std::string, tls_key, "", "the PEM key of --tls-cert");
ABSL_FLAG(std::string, tls_client_ca, "", "mutual TLS: clients must present a certificate the CA of this file signed");
ABSL_FLAG(std::string, admin_token_file, "",
          "submit, cancel and publish need the token of this file ('authorization: Bearer TOKEN'); without it they "
          "are open, which only a loopback --listen accepts");
ABSL_FLAG(bool, insecure_admin, false, "allow open admin RPCs on a --listen beyond the loopback");
ABSL_FLAG(std::string, metrics_listen, "", "IP:PORT where to serve Prometheus metrics at /metrics (default: off)");
ABSL_FLAG(bool, log_requests, false, "log one line per gRPC call (method, peer, status, time) at INFO");

namespace {

constexpr char kUsage[] =
    "usage: lychee-trainer --registry-dir DIR [flags]\n\nA job that names no corpus uses the bundled "
    "data/corpus/calibration.txt.gz;\na sweep that names no validation corpus builds its prompts from the bundled "
    "data/corpus/persuasion.txt.gz\n(bundled: under $LYCHEE_SHARE_DIR, <prefix>/share/lychee beside <prefix>/bin, or "
    "the source tree)";

absl::Status Serve() {
  // A calibration worker keeps the SIGINT and SIGTERM that its trainer's job thread had blocked: a
  // Ctrl-C is rank 0's to take, whose shutdown ends the job INTERRUPTED and kills the workers.
  if (const std::string job_file = absl::GetFlag(FLAGS_calibration_worker); !job_file.empty()) {
    const lychee::WorkerRankFlags worker = lychee::WorkerRankFromFlags();
    return lychee::RunCalibrationWorker(job_file, worker.rank, worker.rendezvous_file);
  }
  lychee::TrainerServerOptions options;
  options.listen_address = absl::GetFlag(FLAGS_listen);
  options.registry_dir = absl::GetFlag(FLAGS_registry_dir);
  if (options.registry_dir.empty()) return absl::InvalidArgumentError("--registry-dir is required");
  options.tls.cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls.key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls.client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  options.access.admin_token_file = absl::GetFlag(FLAGS_admin_token_file);
  options.access.insecure_admin = absl::GetFlag(FLAGS_insecure_admin);
  LYCHEE_ASSIGN_OR_RETURN(options.jobs.model_root,
                          lychee::RequireFlagPath(absl::GetFlag(FLAGS_model_root), "--model-root"));
  LYCHEE_ASSIGN_OR_RETURN(options.jobs.data_root,
                          lychee::RequireFlagPath(absl::GetFlag(FLAGS_data_root), "--data-root"));
  options.metrics_address = absl::GetFlag(FLAGS_metrics_listen);
  options.log_requests = absl::GetFlag(FLAGS_log_requests);
  LYCHEE_ASSIGN_OR_RETURN(options.jobs.default_corpus,
                          lychee::ResourcePath(absl::StrCat(lychee::kCorpusDir, "/calibration.txt.gz")));
  LYCHEE_ASSIGN_OR_RETURN(options.jobs.default_heldout_corpus,
                          lychee::ResourcePath(absl::StrCat(lychee::kCorpusDir, "/persuasion.txt.gz")));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t concurrent, lychee::FlagInRange(FLAGS_max_concurrent_jobs, 1, 64));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t queued, lychee::FlagInRange(FLAGS_max_queued_jobs, 1, 100000));
  options.jobs.max_concurrent_jobs = static_cast<int>(concurrent);
  options.jobs.max_queued_jobs = static_cast<int>(queued);
  LYCHEE_ASSIGN_OR_RETURN(const int64_t threads, lychee::FlagInRange(FLAGS_threads, 0, 1024));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t data_parallel, lychee::FlagInRange(FLAGS_data_parallel, 1, 64));
  const std::string device = absl::GetFlag(FLAGS_device);
  LYCHEE_RETURN_IF_ERROR(lychee::CheckGpuPerRank(lychee::RankDeviceNamed(device), static_cast<int>(data_parallel),
                                                 absl::StrCat("--data-parallel ", data_parallel)));
  options.jobs.data_parallel = static_cast<int>(data_parallel);
  LYCHEE_ASSIGN_OR_RETURN(lychee::CalibrationRunner runner,
                          lychee::MakeCalibrationRunner(device, static_cast<int>(threads)));

  const sigset_t signals = lychee::BlockShutdownSignals();

  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<lychee::TrainerServer> server,
                          lychee::TrainerServer::Start(options, std::move(runner)));
  LOG(INFO) << "lychee-trainer: serving lychee.v1.TrainerService on port " << server->port() << " ("
            << options.listen_address << "), "
            << (options.tls.client_ca_file.empty() ? (options.tls.enabled() ? "TLS" : "plaintext") : "mutual TLS")
            << ", admin RPCs " << (options.access.admin_token_file.empty() ? "open" : "need the admin token")
            << (data_parallel > 1 ? absl::StrCat(", calibrations on ", data_parallel, " data-parallel ranks") : "")
            << ", registry " << options.registry_dir
            << (server->metrics_port() != 0 ? absl::StrCat(", metrics on port ", server->metrics_port()) : "");
  const int signal_number = lychee::WaitForShutdownSignal(signals);
  LOG(INFO) << "lychee-trainer: signal " << signal_number << ", shutting down";
  server->Shutdown();
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) { return lychee::ServiceMain(argc, argv, "lychee-trainer", kUsage, __FILE__, Serve); }
