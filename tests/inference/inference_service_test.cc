// lychee.v1.InferenceService in process, over loopback gRPC, with a stand-in trainer that
// streams a good partition and a bad one: status codes for bad requests, streaming, admin RPCs,
// rejection reporting, metrics, cancellation and deadlines.
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/server_builder.h>

#include <catch2/catch.hpp>

#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "common/base/model_fingerprint.h"
#include "harness/temp_dir.h"
#include "inference/service.h"
#include "lychee/v1/inference.grpc.pb.h"
#include "lychee/v1/trainer.grpc.pb.h"
#include "tests/http_get.h"

namespace lychee {
namespace {

using namespace std::chrono_literals;

const std::string kModelDir = "models/tiny-llama-retrieval";

// Streams the partitions it was given to every watcher, then holds the stream open.
class StandInTrainer final : public v1::TrainerService::Service {
 public:
  explicit StandInTrainer(std::vector<v1::HeadPartition> partitions) : partitions_(std::move(partitions)) {}

  grpc::Status WatchHeadPartitions(grpc::ServerContext* context, const v1::WatchHeadPartitionsRequest* request,
                                   grpc::ServerWriter<v1::HeadPartition>* writer) override {
    for (const v1::HeadPartition& partition : partitions_) {
      if (partition.version() > request->after_version()) writer->Write(partition);
    }
    while (!context->IsCancelled()) std::this_thread::sleep_for(20ms);
    return grpc::Status::OK;
  }

 private:
  std::vector<v1::HeadPartition> partitions_;
};

v1::HeadPartition PartitionProto(uint64_t version, int64_t layers, const std::string& fingerprint) {
  HeadPartition partition = HeadPartition::AllRetrieval(layers, 2, SelectionParams{});
  for (int64_t layer = 1; layer < layers; ++layer) partition.set_role(layer, 1, HeadRole::kSparse);
  partition.mutable_selection().token_budget = 256;
  partition.version = version;
  partition.model_fingerprint = fingerprint;
  partition.source = "stand-in " + std::to_string(version);
  return HeadPartitionToProto(partition);
}

using testing::HttpGet;

struct Fixture {
  testing::TempDir state;
  std::unique_ptr<StandInTrainer> trainer_service;
  std::unique_ptr<grpc::Server> trainer;
  std::unique_ptr<InferenceServer> server;
  std::unique_ptr<v1::InferenceService::Stub> stub;

  Fixture() {
    absl::StatusOr<std::string> fingerprint = ModelFingerprint(kModelDir);
    REQUIRE(fingerprint.ok());
    // Version 2 has the wrong number of layers for the model.
    trainer_service = std::make_unique<StandInTrainer>(
        std::vector<v1::HeadPartition>{PartitionProto(1, 6, *fingerprint), PartitionProto(2, 5, *fingerprint)});
    int trainer_port = 0;
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &trainer_port);
    builder.RegisterService(trainer_service.get());
    trainer = builder.BuildAndStart();
    REQUIRE(trainer != nullptr);

    InferenceServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.state_dir = state.str();
    options.trainer_address = "127.0.0.1:" + std::to_string(trainer_port);
    options.metrics_address = "127.0.0.1:0";
    options.engine.model_dir = kModelDir;
    options.engine.max_new_tokens_limit = 100000;
    absl::StatusOr<std::unique_ptr<InferenceServer>> started = InferenceServer::Start(options);
    REQUIRE(started.ok());
    server = *std::move(started);
    stub = v1::InferenceService::NewStub(grpc::CreateChannel("127.0.0.1:" + std::to_string(server->port()),
                                                             grpc::InsecureChannelCredentials()));
  }

  ~Fixture() {
    server->Shutdown();
    trainer->Shutdown(std::chrono::system_clock::now() + 1s);
  }

  v1::ServerInfo Info() const {
    grpc::ClientContext context;
    v1::ServerInfo info;
    REQUIRE(stub->GetServerInfo(&context, {}, &info).ok());
    return info;
  }

  // The whole stream: its status, and the last message (which carries `done` on success).
  std::pair<grpc::Status, v1::GenerateResponse> Generate(const v1::GenerateRequest& request,
                                                         std::chrono::milliseconds timeout = 60000ms) const {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + timeout);
    auto reader = stub->Generate(&context, request);
    v1::GenerateResponse response, last;
    while (reader->Read(&response)) last = response;
    return {reader->Finish(), last};
  }
};

v1::GenerateRequest TextRequest(const std::string& text, int max_new_tokens = 8) {
  v1::GenerateRequest request;
  request.set_text(text);
  request.set_max_new_tokens(max_new_tokens);
  return request;
}

TEST_CASE("the service streams generations, takes partitions from the trainer and reports the bad one") {
  Fixture fixture;
  const auto waited_until = std::chrono::steady_clock::now() + 20s;
  while (fixture.Info().rejected_size() == 0 && std::chrono::steady_clock::now() < waited_until) {
    std::this_thread::sleep_for(50ms);
  }
  const v1::ServerInfo info = fixture.Info();
  CHECK(info.model() == "tiny-llama-retrieval");
  CHECK(info.active_partition_version() == 1);
  CHECK(info.activated_by() == "trainer");
  CHECK(info.trainer_connected());
  REQUIRE(info.rejected_size() == 1);
  CHECK(info.rejected(0).version() == 2);
  CHECK(info.rejected(0).reason().find("5 layers") != std::string::npos);

  auto [status, last] = fixture.Generate(TextRequest("The harbour was quiet that morning and", 6));
  REQUIRE(status.ok());
  REQUIRE(last.has_done());
  CHECK(last.done().attention_mode() == v1::ATTENTION_MODE_HYBRID);
  CHECK(last.done().partition_version() == 1);
  CHECK(last.done().usage().completion_tokens() >= 1);
  CHECK(last.done().timings().time_to_first_token_seconds() > 0);

  v1::GenerateRequest dense = TextRequest("The harbour was quiet that morning and", 6);
  dense.mutable_attention()->set_mode(v1::ATTENTION_MODE_DENSE);
  auto [dense_status, dense_last] = fixture.Generate(dense);
  REQUIRE(dense_status.ok());
  CHECK(dense_last.done().partition_version() == 0);
  // The current form: lychee's unset selection parameters are the partition's.
  v1::GenerateRequest lychee = TextRequest("The harbour was quiet that morning and", 6);
  lychee.mutable_attention()->mutable_lychee()->set_block_size(32);
  auto [lychee_status, lychee_last] = fixture.Generate(lychee);
  REQUIRE(lychee_status.ok());
  CHECK(lychee_last.done().attention_mode() == v1::ATTENTION_MODE_HYBRID);
  CHECK(lychee_last.done().partition_version() == 1);
  CHECK(lychee_last.done().policy() == "lychee budget=256 block=32 sink=64 recent=64");

  const std::string metrics = HttpGet(fixture.server->metrics_port(), "/metrics");
  CHECK(metrics.find("lychee_active_partition_version 1\n") != std::string::npos);
  CHECK(metrics.find("lychee_partition_rejections_total{reason=\"invalid\"} 1\n") != std::string::npos);
  CHECK(metrics.find("lychee_requests_total{outcome=\"ok\"} 3\n") != std::string::npos);
  CHECK(metrics.find("lychee_time_to_first_token_seconds_count 3\n") != std::string::npos);
  CHECK(metrics.find("lychee_trainer_connected 1\n") != std::string::npos);
}

TEST_CASE("bad requests get the right code and the server goes on") {
  Fixture fixture;
  const auto code = [&](const v1::GenerateRequest& request) { return fixture.Generate(request).first; };
  CHECK(code(TextRequest("")).error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(code(v1::GenerateRequest()).error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  v1::GenerateRequest no_ids;
  no_ids.mutable_token_ids();
  CHECK(code(no_ids).error_code() == grpc::StatusCode::INVALID_ARGUMENT);

  v1::GenerateRequest too_long;
  too_long.mutable_token_ids()->mutable_ids()->Resize(fixture.Info().max_context_tokens() + 1, 1);
  const grpc::Status long_status = code(too_long);
  CHECK(long_status.error_code() == grpc::StatusCode::OUT_OF_RANGE);
  CHECK(long_status.error_message().find("context limit") != std::string::npos);

  v1::GenerateRequest outside;
  outside.mutable_token_ids()->add_ids(5);
  outside.mutable_token_ids()->add_ids(1 << 30);
  const grpc::Status vocab = code(outside);
  CHECK(vocab.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(vocab.error_message().find("token_ids[1]") != std::string::npos);

  for (int max_new_tokens : {0, -1, 1 << 30}) {
    const grpc::Status status = code(TextRequest("Hello", max_new_tokens));
    CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK(status.error_message().find("max_new_tokens") != std::string::npos);
  }
  v1::GenerateRequest unknown_version = TextRequest("Hello");
  unknown_version.mutable_attention()->set_partition_version(42);
  CHECK(code(unknown_version).error_code() == grpc::StatusCode::NOT_FOUND);
  v1::GenerateRequest small_budget = TextRequest("Hello");
  small_budget.mutable_attention()->set_mode(v1::ATTENTION_MODE_HYBRID);
  small_budget.mutable_attention()->set_token_budget(3);
  // Before the trainer's partition arrives this is FAILED_PRECONDITION; after it, the budget is wrong.
  const grpc::StatusCode budget_code = code(small_budget).error_code();
  CHECK((budget_code == grpc::StatusCode::INVALID_ARGUMENT || budget_code == grpc::StatusCode::FAILED_PRECONDITION));

  grpc::ClientContext detokenize_context;
  v1::DetokenizeRequest detokenize;
  detokenize.add_token_ids(-4);
  v1::DetokenizeResponse detokenized;
  CHECK(fixture.stub->Detokenize(&detokenize_context, detokenize, &detokenized).error_code() ==
        grpc::StatusCode::OUT_OF_RANGE);

  grpc::ClientContext activate_context;
  v1::ActivatePartitionRequest activate;
  activate.set_version(77);
  v1::ServerInfo info;
  CHECK(fixture.stub->ActivatePartition(&activate_context, activate, &info).error_code() == grpc::StatusCode::NOT_FOUND);

  auto [status, last] = fixture.Generate(TextRequest("Still serving?", 3));
  CHECK(status.ok());
  CHECK(last.has_done());
}

TEST_CASE("a request picks a selection policy and gets its telemetry back") {
  Fixture fixture;
  v1::GenerateRequest quest = TextRequest("The harbour was quiet that morning and the old sailor", 6);
  quest.mutable_attention()->mutable_policy()->set_name("quest");
  quest.mutable_attention()->mutable_policy()->set_page_size(8);
  quest.mutable_attention()->mutable_policy()->set_audit(true);
  quest.mutable_attention()->set_token_budget(16);
  auto [status, last] = fixture.Generate(quest);
  REQUIRE(status.ok());
  REQUIRE(last.has_done());
  const v1::GenerateDone& done = last.done();
  CHECK(done.policy().rfind("quest budget=16 page=8", 0) == 0);
  // No period asked for: the server's (16 by default) audits decode steps 1, 17, ...
  CHECK(done.policy().find("audit every=16") != std::string::npos);
  CHECK(done.token_budget() == 16);
  REQUIRE(done.has_telemetry());
  const v1::AttentionTelemetry& telemetry = done.telemetry();
  CHECK(telemetry.num_layers() == 6);
  CHECK(telemetry.num_kv_heads() == 2);
  CHECK(telemetry.tokens_attended_size() == 12);
  CHECK(telemetry.decode_steps() == done.usage().completion_tokens() - 1);
  CHECK(telemetry.kv_bytes_read() > 0);
  CHECK(telemetry.audited());
  CHECK(telemetry.max_dropped_mass() >= telemetry.mean_dropped_mass());
  // Layer 2 selects pages within the budget; layer 0 is dense and reads the whole prefix.
  CHECK(telemetry.tokens_attended(2 * 2) < telemetry.tokens_attended(0));
  CHECK_FALSE(done.has_dense_fallback());

  // A bound that the first audited step exceeds: the final message says where and why.
  v1::GenerateRequest bounded = quest;
  bounded.mutable_attention()->mutable_policy()->clear_audit();
  bounded.mutable_attention()->set_max_dropped_mass(0);
  auto [bounded_status, bounded_last] = fixture.Generate(bounded);
  REQUIRE(bounded_status.ok());
  const v1::GenerateDone& fell_back = bounded_last.done();
  REQUIRE(fell_back.has_dense_fallback());
  // The first step whose cache outgrows the budget drops some mass.
  CHECK(fell_back.dense_fallback().token_index() >= 1);
  CHECK(fell_back.dense_fallback().token_index() < fell_back.usage().completion_tokens());
  CHECK(fell_back.dense_fallback().dropped_mass() > 0);
  CHECK(fell_back.dense_fallback().reason().find("over max_dropped_mass 0.0000") != std::string::npos);
  CHECK(fell_back.telemetry().audited());
  for (const double bound : {-1.0, 2.0}) {
    bounded.mutable_attention()->set_max_dropped_mass(bound);
    const grpc::Status status = fixture.Generate(bounded).first;
    CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK(status.error_message().find("attention.max_dropped_mass") != std::string::npos);
  }

  v1::GenerateRequest every_other = quest;
  every_other.mutable_attention()->mutable_policy()->set_audit_every(2);
  auto [every_other_status, every_other_last] = fixture.Generate(every_other);
  REQUIRE(every_other_status.ok());
  CHECK(every_other_last.done().policy().find("audit every=2") != std::string::npos);
  CHECK(every_other_last.done().telemetry().audited());

  struct BadPolicy {
    std::function<void(v1::PolicyOptions*)> set;
    std::string named;  // what the message must name
  };
  for (const BadPolicy& bad : std::vector<BadPolicy>{
           {[](v1::PolicyOptions* p) { p->set_name("double-p"); p->set_p1(1.5); }, "p1"},
           {[](v1::PolicyOptions* p) { p->set_name("magic"); }, "magic"},
           {[](v1::PolicyOptions* p) { p->set_name("double-p"); p->set_clusters(0); }, "clusters"}}) {
    v1::GenerateRequest request = TextRequest("Hello", 4);
    bad.set(request.mutable_attention()->mutable_policy());
    const grpc::Status status = fixture.Generate(request).first;
    INFO(bad.named << ": " << status.error_message());
    CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK(status.error_message().find(bad.named) != std::string::npos);
  }
  struct BadAttention {
    std::function<void(v1::AttentionOptions*)> set;
    std::string named;
  };
  for (const BadAttention& bad : std::vector<BadAttention>{
           {[](v1::AttentionOptions* a) { a->mutable_double_p()->set_p1(1.5); }, "p1"},
           {[](v1::AttentionOptions* a) { a->mutable_quest()->set_page_size(0); }, "page_size"},
           {[](v1::AttentionOptions* a) { a->mutable_prhs()->add_selectors("sideways"); }, "attention.prhs.selectors"},
           {[](v1::AttentionOptions* a) {
              a->set_mode(v1::ATTENTION_MODE_HYBRID);
              a->mutable_dense();
            },
            "attention.mode"}}) {
    v1::GenerateRequest request = TextRequest("Hello", 4);
    bad.set(request.mutable_attention());
    const grpc::Status status = fixture.Generate(request).first;
    INFO(bad.named << ": " << status.error_message());
    CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK(status.error_message().find(bad.named) != std::string::npos);
  }
}

TEST_CASE("tokenize and detokenize round-trip") {
  Fixture fixture;
  grpc::ClientContext context;
  v1::TokenizeRequest request;
  request.set_text("Lychee decodes long contexts.");
  v1::TokenizeResponse tokens;
  REQUIRE(fixture.stub->Tokenize(&context, request, &tokens).ok());
  CHECK(tokens.token_ids_size() > 3);
  grpc::ClientContext back_context;
  v1::DetokenizeRequest back;
  back.mutable_token_ids()->CopyFrom(tokens.token_ids());
  v1::DetokenizeResponse text;
  REQUIRE(fixture.stub->Detokenize(&back_context, back, &text).ok());
  CHECK(text.text() == "Lychee decodes long contexts.");
}

TEST_CASE("a client that goes away or runs out of time frees its KV memory at once") {
  Fixture fixture;
  SECTION("cancel") {
    grpc::ClientContext context;
    auto reader = fixture.stub->Generate(&context, TextRequest("Tell me a very long story about the sea.", 50000));
    v1::GenerateResponse response;
    REQUIRE(reader->Read(&response));
    CHECK(fixture.Info().kv_cache_bytes_reserved() > 0);
    context.TryCancel();
    while (reader->Read(&response)) {
    }
    CHECK(reader->Finish().error_code() == grpc::StatusCode::CANCELLED);
  }
  SECTION("deadline") {
    auto [status, last] = fixture.Generate(TextRequest("Tell me a very long story about the sea.", 50000), 500ms);
    CHECK(status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  const auto until = std::chrono::steady_clock::now() + 3s;
  while (fixture.Info().kv_cache_bytes_reserved() != 0 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(10ms);
  }
  const v1::ServerInfo info = fixture.Info();
  CHECK(info.kv_cache_bytes_reserved() == 0);
  CHECK(info.kv_cache_pages_used() == 0);
  CHECK(info.kv_cache_pages_total() > 0);
  CHECK(info.kv_cache_bytes_limit() % info.kv_cache_pages_total() == 0);
  CHECK(info.active_sequences() == 0);
}

TEST_CASE("a canary through the admin RPCs: bad input, status in GetServerInfo and /metrics, the operator's abort") {
  testing::TempDir state;
  absl::StatusOr<std::string> fingerprint = ModelFingerprint(kModelDir);
  REQUIRE(fingerprint.ok());
  {
    // Versions 1 (active) and 2 (stored), as the trainer would have left them.
    PartitionManager::Options partition_options;
    partition_options.state_dir = state.str();
    partition_options.model_fingerprint = *fingerprint;
    absl::StatusOr<ModelConfig> config = ModelConfig::FromFile(kModelDir + "/config.json");
    REQUIRE(config.ok());
    partition_options.model_config = *config;
    auto manager = PartitionManager::Open(partition_options);
    REQUIRE(manager.ok());
    for (uint64_t version : {1, 2}) {
      absl::StatusOr<HeadPartition> partition = HeadPartitionFromProto(PartitionProto(version, 6, *fingerprint));
      REQUIRE(partition.ok());
      REQUIRE((*manager)->Offer(*partition).ok());
    }
    REQUIRE((*manager)->Rollback().ok());
  }
  InferenceServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.state_dir = state.str();
  options.metrics_address = "127.0.0.1:0";
  options.engine.model_dir = kModelDir;
  options.canary_bounds.sequences = 1000;
  options.shadow.enabled = false;
  absl::StatusOr<std::unique_ptr<InferenceServer>> server = InferenceServer::Start(options);
  REQUIRE(server.ok());
  auto stub = v1::InferenceService::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string((*server)->port()), grpc::InsecureChannelCredentials()));
  const auto activate = [&](const v1::ActivatePartitionRequest& request, v1::ServerInfo* info = nullptr) {
    grpc::ClientContext context;
    v1::ServerInfo reply;
    grpc::Status status = stub->ActivatePartition(&context, request, &reply);
    if (info != nullptr) *info = reply;
    return status;
  };
  const auto decide = [&](v1::CanaryAction action, v1::ServerInfo* info = nullptr) {
    grpc::ClientContext context;
    v1::DecideCanaryRequest request;
    request.set_action(action);
    v1::ServerInfo reply;
    grpc::Status status = stub->DecideCanary(&context, request, &reply);
    if (info != nullptr) *info = reply;
    return status;
  };
  v1::ActivatePartitionRequest request;
  request.set_version(2);
  for (const double fraction : {0.0, 1.5}) {
    request.set_canary_fraction(fraction);
    const grpc::Status status = activate(request);
    CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK(status.error_message().find("canary_fraction") == 0);
  }
  request.set_canary_fraction(1.0);
  request.set_canary_max_dropped_mass(1.2);
  grpc::Status status = activate(request);
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(status.error_message().find("canary_max_dropped_mass") == 0);
  request.clear_canary_max_dropped_mass();
  request.set_canary_max_error_rate(-1);
  CHECK(activate(request).error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  request.clear_canary_max_error_rate();
  request.set_version(7);
  status = activate(request);
  CHECK(status.error_code() == grpc::StatusCode::NOT_FOUND);
  CHECK(status.error_message().find("version") == 0);
  v1::ActivatePartitionRequest bounds_alone;
  bounds_alone.set_version(2);
  bounds_alone.set_canary_max_dropped_mass(0.1);
  CHECK(activate(bounds_alone).error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(decide(v1::CANARY_ACTION_PROMOTE).error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  grpc::ClientContext info_context;
  v1::ServerInfo info;
  REQUIRE(stub->GetServerInfo(&info_context, {}, &info).ok());
  CHECK_FALSE(info.has_canary());
  CHECK(info.active_partition_version() == 1);

  request.set_version(2);
  request.set_canary_max_dropped_mass(0.5);
  REQUIRE(activate(request, &info).ok());
  CHECK(info.canary().state() == "running");
  CHECK(info.canary().canary().version() == 2);
  CHECK(info.canary().stable().version() == 1);
  CHECK(info.canary().max_dropped_mass() == 0.5);
  CHECK(info.canary().decide_after_sequences() == 1000);
  CHECK(activate(request).error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  for (int i = 0; i < 2; ++i) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 60s);
    auto reader = stub->Generate(&context, TextRequest("The harbour was quiet that morning and", 4));
    v1::GenerateResponse response, last;
    while (reader->Read(&response)) last = response;
    REQUIRE(reader->Finish().ok());
    CHECK(last.done().partition_version() == 2);
    CHECK(last.done().telemetry().audited());
  }
  const std::string metrics = HttpGet((*server)->metrics_port(), "/metrics");
  CHECK(metrics.find("lychee_canary_running 1\n") != std::string::npos);
  CHECK(metrics.find("lychee_canary_version{arm=\"canary\"} 2\n") != std::string::npos);
  CHECK(metrics.find("lychee_canary_sequences{arm=\"canary\"} 2\n") != std::string::npos);
  CHECK(metrics.find("lychee_canary_mean_dropped_mass{arm=\"canary\"} ") != std::string::npos);

  CHECK(decide(v1::CANARY_ACTION_UNSPECIFIED).error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  REQUIRE(decide(v1::CANARY_ACTION_ABORT, &info).ok());
  CHECK(info.canary().state() == "aborted");
  CHECK(info.canary().canary().sequences() == 2);
  CHECK(info.active_partition_version() == 1);
  CHECK(decide(v1::CANARY_ACTION_ABORT).error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  (*server)->Shutdown();
}

}  // namespace
}  // namespace lychee
