// Both services with TLS and tokens, over loopback gRPC with certificates that openssl makes at
// test time: an in-process trainer that requires mutual TLS and an admin token, an in-process
// inference server with TLS, an admin and a client token that follows that trainer over mutual
// TLS, the lychee CLI against both, request size limits, and a lychee-trainer process whose log
// must not show the tokens that were sent to it.
#include <catch2/catch.hpp>
#include <grpcpp/create_channel.h>
#include <signal.h>

#include <chrono>
#include <fstream>
#include <iterator>
#include <regex>
#include <thread>

#include "common/base/head_partition.h"
#include "common/service/security.h"
#include "harness/child_process.h"
#include "harness/temp_dir.h"
#include "inference/service.h"
#include "lychee/v1/inference.grpc.pb.h"
#include "lychee/v1/trainer.grpc.pb.h"
#include "tests/run_command.h"
#include "tests/security/test_pki.h"
#include "trainer/service.h"

namespace lychee {
namespace {

using namespace std::chrono_literals;
using testing::RunCommand;
using testing::TempDir;
using testing::TestPki;

constexpr char kAdminToken[] = "admin-5f0c1d2e3a4b59687766";
constexpr char kClientToken[] = "client-9a8b7c6d5e4f30211234";
constexpr char kWrongToken[] = "wrong-13579bdf02468ace1122";
const std::string kModelDir = "models/tiny-llama-retrieval";
const std::string kShippedPartition = "models/tiny-llama-retrieval/partitions/learned-target-0.25.json";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The PKI, and the three tokens in files.
struct Secrets {
  TestPki pki;
  TempDir dir;
  std::string admin = Write("admin.token", kAdminToken);
  std::string client = Write("client.token", kClientToken);
  std::string wrong = Write("wrong.token", kWrongToken);

  std::string Write(const std::string& name, const std::string& token) {
    const std::string path = (dir.path / name).string();
    std::ofstream(path) << token << "\n";
    return path;
  }
  TlsClientConfig Tls(const std::string& client_name = "") const {
    if (client_name.empty()) return {pki.Cert("ca"), "", ""};
    return {pki.Cert("ca"), pki.Cert(client_name), pki.Key(client_name)};
  }
};

std::shared_ptr<grpc::Channel> Channel(int port, const TlsClientConfig& tls) {
  return grpc::CreateChannel("127.0.0.1:" + std::to_string(port), MakeChannelCredentials(tls).value());
}

std::unique_ptr<grpc::ClientContext> Context(const std::string& token = "", std::chrono::seconds timeout = 30s) {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + timeout);
  AttachBearerToken(*context, token);
  return context;
}

CalibrationRunner RunnerThatRunsNothing() {
  return [](const CalibrationJobInputs&) -> absl::StatusOr<std::unique_ptr<CalibrationSession>> {
    return absl::UnimplementedError("this test runs no calibration");
  };
}

v1::PublishHeadPartitionRequest ShippedPartition() {
  v1::PublishHeadPartitionRequest request;
  request.mutable_model()->set_name("tiny-llama-retrieval");
  *request.mutable_partition() = HeadPartitionToProto(LoadHeadPartitionJson(kShippedPartition).value());
  return request;
}

// A trainer that requires mutual TLS (clients signed by the test CA) and the admin token.
struct MutualTlsTrainer {
  TempDir registry;
  std::unique_ptr<TrainerServer> server;

  explicit MutualTlsTrainer(const Secrets& secrets) {
    TrainerServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.registry_dir = registry.str();
    options.jobs.model_root = "models";
    options.tls = {secrets.pki.Cert("server"), secrets.pki.Key("server"), secrets.pki.Cert("ca")};
    options.access.admin_token_file = secrets.admin;
    server = TrainerServer::Start(options, RunnerThatRunsNothing()).value();
  }
  std::unique_ptr<v1::TrainerService::Stub> Stub(const TlsClientConfig& tls) const {
    return v1::TrainerService::NewStub(Channel(server->port(), tls));
  }
};

grpc::StatusCode ListJobsCode(v1::TrainerService::Stub& stub) {
  v1::ListJobsResponse response;
  return stub.ListJobs(Context("", 10s).get(), {}, &response).error_code();
}

testing::CommandResult Cli(const std::string& args) { return RunCommand(std::string(LYCHEE_CLI) + " " + args); }

TEST_CASE("the trainer over mutual TLS: only clients its CA signed get in; admin RPCs need the admin token") {
  Secrets secrets;
  MutualTlsTrainer trainer(secrets);

  CHECK(ListJobsCode(*trainer.Stub({})) == grpc::StatusCode::UNAVAILABLE);                // plaintext
  CHECK(ListJobsCode(*trainer.Stub(secrets.Tls())) == grpc::StatusCode::UNAVAILABLE);     // no client certificate
  CHECK(ListJobsCode(*trainer.Stub({secrets.pki.Cert("ca"), secrets.pki.Cert("other-client"),
                                    secrets.pki.Key("other-client")})) == grpc::StatusCode::UNAVAILABLE);
  // A client that trusts another CA does not take the server's certificate.
  CHECK(ListJobsCode(*trainer.Stub({secrets.pki.Cert("other-ca"), secrets.pki.Cert("client"),
                                    secrets.pki.Key("client")})) == grpc::StatusCode::UNAVAILABLE);

  const auto stub = trainer.Stub(secrets.Tls("client"));
  CHECK(ListJobsCode(*stub) == grpc::StatusCode::OK);  // reads need no token

  v1::HeadPartition published;
  const v1::PublishHeadPartitionRequest publish = ShippedPartition();
  CHECK(stub->PublishHeadPartition(Context().get(), publish, &published).error_code() ==
        grpc::StatusCode::UNAUTHENTICATED);
  CHECK(stub->PublishHeadPartition(Context(kWrongToken).get(), publish, &published).error_code() ==
        grpc::StatusCode::UNAUTHENTICATED);
  REQUIRE(stub->PublishHeadPartition(Context(kAdminToken).get(), publish, &published).ok());
  CHECK(published.version() == 1);

  v1::CancelJobRequest cancel;
  cancel.set_name("jobs/1");
  v1::Job job;
  CHECK(stub->CancelJob(Context().get(), cancel, &job).error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(stub->CancelJob(Context(kAdminToken).get(), cancel, &job).error_code() == grpc::StatusCode::NOT_FOUND);
  v1::SubmitCalibrationJobRequest submit;
  submit.set_model("no-such-model");
  CHECK(stub->SubmitCalibrationJob(Context().get(), submit, &job).error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(stub->SubmitCalibrationJob(Context(kAdminToken).get(), submit, &job).error_code() ==
        grpc::StatusCode::INVALID_ARGUMENT);

  // The watch that inference services follow is a read: no token.
  auto watch_context = Context("", 10s);
  v1::WatchHeadPartitionsRequest watch;
  watch.mutable_model()->set_name("tiny-llama-retrieval");
  auto reader = stub->WatchHeadPartitions(watch_context.get(), watch);
  v1::HeadPartition watched;
  CHECK(reader->Read(&watched));
  CHECK(watched.version() == 1);
  watch_context->TryCancel();
  reader->Finish();

  // A request above the trainer's 1 MiB limit is refused before it is parsed.
  v1::PublishHeadPartitionRequest oversized = publish;
  oversized.mutable_partition()->set_source(std::string(2 << 20, 'x'));
  CHECK(stub->PublishHeadPartition(Context(kAdminToken).get(), oversized, &published).error_code() ==
        grpc::StatusCode::RESOURCE_EXHAUSTED);
  CHECK(ListJobsCode(*stub) == grpc::StatusCode::OK);
}

TEST_CASE("a trainer or inference server beyond the loopback without an admin token does not start") {
  Secrets secrets;
  TempDir state;
  TrainerServerOptions trainer;
  trainer.listen_address = "0.0.0.0:0";
  trainer.registry_dir = state.str();
  const absl::Status trainer_status = TrainerServer::Start(trainer, RunnerThatRunsNothing()).status();
  CHECK(trainer_status.code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(trainer_status.message()), Catch::Contains("--admin-token-file"));

  InferenceServerOptions inference;
  inference.listen_address = "[::]:0";
  inference.state_dir = state.str();
  inference.engine.model_dir = kModelDir;
  CHECK(InferenceServer::Start(inference).status().code() == absl::StatusCode::kFailedPrecondition);

  // A bad certificate file is named at start, not met as a server that fails to listen.
  trainer.listen_address = "127.0.0.1:0";
  trainer.tls = {secrets.pki.Cert("server"), secrets.pki.Key("client"), ""};
  const absl::Status bad_key = TrainerServer::Start(trainer, RunnerThatRunsNothing()).status();
  CHECK(bad_key.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(bad_key.message()), Catch::Contains(secrets.pki.Key("client")));
}

TEST_CASE("a port another server holds is refused, not shared") {
  TempDir state;
  TrainerServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.registry_dir = (state.path / "first").string();
  absl::StatusOr<std::unique_ptr<TrainerServer>> first = TrainerServer::Start(options, RunnerThatRunsNothing());
  REQUIRE(first.ok());
  options.listen_address = absl::StrCat("127.0.0.1:", (*first)->port());
  options.registry_dir = (state.path / "second").string();
  const absl::Status second = TrainerServer::Start(options, RunnerThatRunsNothing()).status();
  CHECK(second.code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(second.message()), Catch::Contains(options.listen_address) && Catch::Contains("taken"));
}

TEST_CASE("the inference service over TLS: client and admin tokens, a mutual-TLS trainer, the CLI, a size limit") {
  Secrets secrets;
  MutualTlsTrainer trainer(secrets);
  v1::HeadPartition published;
  REQUIRE(trainer.Stub(secrets.Tls("client"))
              ->PublishHeadPartition(Context(kAdminToken).get(), ShippedPartition(), &published)
              .ok());

  TempDir state;
  InferenceServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.state_dir = state.str();
  options.engine.model_dir = kModelDir;
  options.tls = {secrets.pki.Cert("server"), secrets.pki.Key("server"), ""};
  options.access = {secrets.admin, secrets.client, false};
  options.trainer_address = "127.0.0.1:" + std::to_string(trainer.server->port());
  options.trainer_tls = secrets.Tls("client");
  std::unique_ptr<InferenceServer> server = InferenceServer::Start(options).value();
  const auto stub = v1::InferenceService::NewStub(Channel(server->port(), secrets.Tls()));

  // The partition arrives through the watch over mutual TLS.
  v1::ServerInfo info;
  const auto give_up = std::chrono::steady_clock::now() + 30s;
  while (std::chrono::steady_clock::now() < give_up) {
    REQUIRE(stub->GetServerInfo(Context(kClientToken).get(), {}, &info).ok());
    if (info.active_partition_version() == 1) break;
    std::this_thread::sleep_for(50ms);
  }
  CHECK(info.active_partition_version() == 1);
  CHECK(info.activated_by() == "trainer");
  CHECK(info.trainer_connected());

  CHECK(stub->GetServerInfo(Context().get(), {}, &info).error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(stub->GetServerInfo(Context(kWrongToken).get(), {}, &info).error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(v1::InferenceService::NewStub(Channel(server->port(), {}))
            ->GetServerInfo(Context(kClientToken, 10s).get(), {}, &info)
            .error_code() == grpc::StatusCode::UNAVAILABLE);

  const auto generate = [&](const std::string& token) {
    v1::GenerateRequest request;
    request.set_text("The harbour was quiet that morning and");
    request.set_max_new_tokens(3);
    auto context = Context(token, 60s);
    auto reader = stub->Generate(context.get(), request);
    v1::GenerateResponse response;
    bool done = false;
    while (reader->Read(&response)) done = done || response.has_done();
    const grpc::Status status = reader->Finish();
    return status.ok() && done ? grpc::StatusCode::OK : status.error_code();
  };
  CHECK(generate(kClientToken) == grpc::StatusCode::OK);
  CHECK(generate(kAdminToken) == grpc::StatusCode::OK);
  CHECK(generate("") == grpc::StatusCode::UNAUTHENTICATED);

  v1::SetRolloutHoldRequest hold;
  hold.set_hold(true);
  CHECK(stub->SetRolloutHold(Context().get(), hold, &info).error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(stub->SetRolloutHold(Context(kClientToken).get(), hold, &info).error_code() ==
        grpc::StatusCode::PERMISSION_DENIED);
  CHECK(stub->SetRolloutHold(Context(kWrongToken).get(), hold, &info).error_code() ==
        grpc::StatusCode::UNAUTHENTICATED);
  REQUIRE(stub->SetRolloutHold(Context(kAdminToken).get(), hold, &info).ok());
  CHECK(info.rollout_held());
  v1::ActivatePartitionRequest activate;
  activate.set_version(1);
  CHECK(stub->ActivatePartition(Context(kClientToken).get(), activate, &info).error_code() ==
        grpc::StatusCode::PERMISSION_DENIED);
  CHECK(stub->ActivatePartition(Context(kAdminToken).get(), activate, &info).ok());
  CHECK(stub->Rollback(Context().get(), {}, &info).error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(stub->Rollback(Context(kClientToken).get(), {}, &info).error_code() == grpc::StatusCode::PERMISSION_DENIED);
  v1::ListPartitionsResponse partitions;
  CHECK(stub->ListPartitions(Context(kClientToken).get(), {}, &partitions).ok());
  CHECK(partitions.partitions_size() == 1);

  // Above the 16 MiB limit: refused before it is parsed, and the server goes on.
  v1::TokenizeRequest huge;
  huge.set_text(std::string(17 << 20, 'a'));
  v1::TokenizeResponse tokens;
  CHECK(stub->Tokenize(Context(kClientToken).get(), huge, &tokens).error_code() ==
        grpc::StatusCode::RESOURCE_EXHAUSTED);
  v1::TokenizeRequest small;
  small.set_text("harbour");
  CHECK(stub->Tokenize(Context(kClientToken).get(), small, &tokens).ok());

  // The CLI: --tls-ca and --token-file on every remote command.
  const std::string at_server = " --server 127.0.0.1:" + std::to_string(server->port());
  const std::string tls = " --tls-ca " + secrets.pki.Cert("ca");
  const testing::CommandResult shown = Cli("server-info" + at_server + tls + " --token-file " + secrets.client);
  INFO(shown.output);
  CHECK(shown.exit_code == 0);
  CHECK_THAT(shown.output, Catch::Contains("active partition: version 1") && Catch::Contains("HELD"));
  const testing::CommandResult generated =
      Cli("generate" + at_server + tls + " --token-file " + secrets.client + " --prompt harbour --max-new-tokens 2");
  INFO(generated.output);
  CHECK(generated.exit_code == 0);
  const testing::CommandResult refused = Cli("hold off" + at_server + tls + " --token-file " + secrets.client);
  CHECK(refused.exit_code != 0);
  CHECK_THAT(refused.output, Catch::Contains("PERMISSION_DENIED"));
  const testing::CommandResult released = Cli("hold off" + at_server + tls + " --token-file " + secrets.admin);
  INFO(released.output);
  CHECK(released.exit_code == 0);
  CHECK_THAT(released.output, Catch::Contains("rollouts automatic"));
  const testing::CommandResult plaintext = Cli("server-info" + at_server + " --token-file " + secrets.client);
  CHECK(plaintext.exit_code != 0);
  CHECK_THAT(plaintext.output, Catch::Contains("UNAVAILABLE"));
  const testing::CommandResult health = Cli("health --target 127.0.0.1:" + std::to_string(server->port()) + tls);
  INFO(health.output);
  CHECK(health.exit_code == 0);
  CHECK_THAT(health.output, Catch::Contains("SERVING"));
  for (const testing::CommandResult* result : {&shown, &generated, &refused, &released, &plaintext}) {
    CHECK_THAT(result->output, !Catch::Contains(kClientToken) && !Catch::Contains(kAdminToken));
  }
  server->Shutdown();
}

TEST_CASE("lychee-trainer with TLS and an admin token, driven by the CLI; no token reaches a log or an output") {
  Secrets secrets;
  TempDir registry;
  const std::string log = (registry.path / "trainer.log").string();
  testing::ChildProcess trainer(LYCHEE_TRAINER,
                                {"--listen", "127.0.0.1:0", "--registry-dir", (registry.path / "registry").string(),
                                 "--model-root", "models", "--tls-cert", secrets.pki.Cert("server"), "--tls-key",
                                 secrets.pki.Key("server"), "--admin-token-file", secrets.admin},
                                log);
  int port = 0;
  static const std::regex kServing("on port (\\d+)");
  for (const auto give_up = std::chrono::steady_clock::now() + 60s;
       port == 0 && trainer.running() && std::chrono::steady_clock::now() < give_up;) {
    std::smatch match;
    const std::string text = ReadFile(log);
    if (std::regex_search(text, match, kServing)) port = std::stoi(match[1]);
    std::this_thread::sleep_for(50ms);
  }
  INFO(ReadFile(log));
  REQUIRE(port != 0);
  CHECK_THAT(ReadFile(log), Catch::Contains("TLS") && Catch::Contains("admin RPCs need the admin token"));

  const std::string target = " --trainer 127.0.0.1:" + std::to_string(port);
  const std::string tls = " --tls-ca " + secrets.pki.Cert("ca");
  const testing::CommandResult health = Cli("health --target 127.0.0.1:" + std::to_string(port) + tls);
  CHECK(health.exit_code == 0);
  const testing::CommandResult wrong =
      Cli("publish " + kShippedPartition + target + tls + " --token-file " + secrets.wrong);
  CHECK(wrong.exit_code != 0);
  CHECK_THAT(wrong.output, Catch::Contains("UNAUTHENTICATED"));
  const testing::CommandResult missing = Cli("publish " + kShippedPartition + target + tls);
  CHECK(missing.exit_code != 0);
  CHECK_THAT(missing.output, Catch::Contains("UNAUTHENTICATED"));
  const testing::CommandResult published =
      Cli("publish " + kShippedPartition + target + tls + " --token-file " + secrets.admin);
  INFO(published.output);
  CHECK(published.exit_code == 0);
  CHECK_THAT(published.output, Catch::Contains("as version 1"));
  const testing::CommandResult listed = Cli("partitions" + target + tls);
  CHECK(listed.exit_code == 0);
  CHECK_THAT(listed.output, Catch::Contains("1 partition(s)"));
  const testing::CommandResult plaintext = Cli("jobs" + target);
  CHECK(plaintext.exit_code != 0);

  REQUIRE(trainer.Kill(SIGTERM));
  const std::string everything = ReadFile(log) + wrong.output + missing.output + published.output;
  CHECK_THAT(everything, !Catch::Contains(kWrongToken) && !Catch::Contains(kAdminToken));

  // Beyond the loopback and without a token, it refuses to start and says why.
  const testing::CommandResult exposed = RunCommand(std::string(LYCHEE_TRAINER) +
                                                    " --listen 0.0.0.0:0 --registry-dir " +
                                                    (registry.path / "exposed").string());
  CHECK(exposed.exit_code == 1);
  CHECK_THAT(exposed.output, Catch::Contains("beyond the loopback") && Catch::Contains("--insecure-admin"));
}

}  // namespace
}  // namespace lychee
