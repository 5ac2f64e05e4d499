// Tensor-parallel serving (inference/rank_mirror.h) on the bundled model (2 KV heads), on the CPU:
// rank 0 is an engine or an InferenceServer in this test, rank 1 a lychee-inference process that
// RankWorkers starts as its follower, as the server itself does. TP-2 must decode TP-1's greedy
// tokens, dense and hybrid, with a partition active at the start and one activated later, and under
// every other selection policy; a
// follower killed mid-serving must fail the requests with UNAVAILABLE and turn health to
// NOT_SERVING, without a hang.
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <signal.h>

#include <catch2/catch.hpp>

#include <chrono>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/base/head_partition.h"
#include "common/base/model_fingerprint.h"
#include "common/base/random_partition.h"
#include "common/model/rank_workers.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "harness/temp_dir.h"
#include "inference/engine.h"
#include "inference/rank_mirror.h"
#include "inference/service.h"
#include "inference/shadow_validator.h"
#include "lychee/v1/inference.grpc.pb.h"
#include "tests/http_get.h"

namespace lychee {
namespace {

using namespace std::chrono_literals;

const std::string kModelDir = "models/tiny-llama-retrieval";
constexpr int kWorldSize = 2;
constexpr int64_t kKvCacheMib = 64;
// Short, so that a rank that falls silent is given up quickly; a killed one is noticed at once.
constexpr int kStepTimeoutSeconds = 5;

// lychee-inference's flags for its follower rank, matching the rank-0 engine options below; with
// shadow validation, the follower joins the validation's group too and validates beside serving.
std::vector<std::string> FollowerArguments(const std::string& state_dir, bool shadow_validation) {
  return {"--state-dir",
          state_dir,
          "--kv-cache-mib",
          std::to_string(kKvCacheMib),
          "--threads",
          "1",
          "--shadow-validation",
          shadow_validation ? "true" : "false",
          "--tensor-parallel",
          std::to_string(kWorldSize),
          "--tensor-parallel-timeout-s",
          std::to_string(kStepTimeoutSeconds)};
}

EngineOptions RankZeroOptions() {
  EngineOptions options;
  options.model_dir = kModelDir;
  options.kv_cache_bytes = kKvCacheMib << 20;
  options.threads = 1;
  return options;
}

// The follower process and rank 0's end of the group (and of the validation's, with shadow
// validation), joined as lychee-inference's rank 0 joins them.
struct Ranks {
  testing::TempDir follower_state;
  std::unique_ptr<RankWorkers> workers;
  std::shared_ptr<const TensorParallelGroup> group;
  std::shared_ptr<const TensorParallelGroup> validation_group;

  explicit Ranks(bool shadow_validation = false) {
    auto started =
        RankWorkers::Start(LYCHEE_INFERENCE, FollowerArguments(follower_state.str(), shadow_validation), kWorldSize);
    REQUIRE(started.ok());
    workers = *std::move(started);
    group = Join(workers->rendezvous_file());
    if (shadow_validation) validation_group = Join(ShadowValidationRendezvousFile(workers->rendezvous_file()));
  }

  static std::shared_ptr<const TensorParallelGroup> Join(const std::string& rendezvous_file) {
    auto joined = JoinGlooGroup(rendezvous_file, 0, kWorldSize, std::chrono::seconds(kStepTimeoutSeconds));
    INFO(joined.status());
    REQUIRE(joined.ok());
    return *std::move(joined);
  }
};

std::string Fingerprint() {
  absl::StatusOr<std::string> fingerprint = ModelFingerprint(kModelDir);
  REQUIRE(fingerprint.ok());
  return *fingerprint;
}

// A partition file of the model as version `version`.
HeadPartition ShippedPartition(const std::string& file, uint64_t version) {
  absl::StatusOr<HeadPartition> partition = LoadHeadPartitionJson(kModelDir + "/partitions/" + file);
  REQUIRE(partition.ok());
  partition->model_fingerprint = Fingerprint();
  partition->version = version;
  return *std::move(partition);
}

// ShippedPartition with its budget lowered below the long prompts, so that the sparse heads select.
HeadPartition PartitionFromFile(const std::string& file, uint64_t version) {
  HeadPartition partition = ShippedPartition(file, version);
  partition.mutable_selection().token_budget = 256;
  return partition;
}

// Token ids in [1, 8192) from a fixed linear congruential sequence: a prompt of `length` tokens.
std::vector<int32_t> Prompt(int64_t length, uint32_t seed) {
  std::vector<int32_t> ids;
  uint32_t state = seed;
  for (int64_t i = 0; i < length; ++i) {
    state = state * 1664525u + 1013904223u;
    ids.push_back(static_cast<int32_t>(1 + (state >> 8) % 8191));
  }
  return ids;
}

struct Generated {
  std::vector<int32_t> ids;
  absl::Status error;
  uint64_t partition_version = 0;
  std::string policy;
  std::optional<DenseFallback> dense_fallback;
};

// An engine over a partition manager of its own; `group` null: one process.
struct EngineUnderTest {
  testing::TempDir state;
  std::unique_ptr<PartitionManager> partitions;
  std::unique_ptr<InferenceEngine> engine;

  EngineUnderTest(std::shared_ptr<const TensorParallelGroup> group, const std::vector<HeadPartition>& active_at_start) {
    absl::StatusOr<ModelConfig> config = ModelConfig::FromFile(kModelDir + "/config.json");
    REQUIRE(config.ok());
    PartitionManager::Options partition_options;
    partition_options.state_dir = state.str();
    partition_options.model_fingerprint = Fingerprint();
    partition_options.model_config = *config;
    auto manager = PartitionManager::Open(partition_options);
    REQUIRE(manager.ok());
    partitions = *std::move(manager);
    for (const HeadPartition& partition : active_at_start) Offer(partition);
    EngineOptions options = RankZeroOptions();
    options.tensor_parallel = std::move(group);
    auto created = InferenceEngine::Create(options, partitions.get(), nullptr);
    INFO(created.status());
    REQUIRE(created.ok());
    engine = *std::move(created);
  }

  void Offer(const HeadPartition& partition) { REQUIRE(partitions->Offer(partition).ok()); }

  // The requests submitted together, so that they decode in shared steps; then each read to its end.
  // A request the engine refuses (one that has lost a rank refuses new ones) has that error.
  std::vector<Generated> Generate(const std::vector<GenerationRequest>& requests) {
    std::vector<absl::StatusOr<std::shared_ptr<GenerationStream>>> streams;
    for (const GenerationRequest& request : requests) streams.push_back(engine->Submit(request));
    std::vector<Generated> generated(streams.size());
    for (size_t i = 0; i < streams.size(); ++i) {
      if (!streams[i].ok()) {
        generated[i].error = streams[i].status();
        continue;
      }
      const auto give_up = std::chrono::steady_clock::now() + 60s;
      while (std::chrono::steady_clock::now() < give_up) {
        GenerationEvent event = (*streams[i])->Next(200ms);
        if (event.kind == GenerationEvent::Kind::kChunk) {
          generated[i].ids.insert(generated[i].ids.end(), event.token_ids.begin(), event.token_ids.end());
        } else if (event.kind == GenerationEvent::Kind::kDone) {
          generated[i].partition_version = event.summary.partition_version;
          generated[i].policy = event.summary.policy;
          generated[i].dense_fallback = event.summary.dense_fallback;
          break;
        } else if (event.kind == GenerationEvent::Kind::kError) {
          generated[i].error = event.error;
          break;
        }
      }
    }
    return generated;
  }
};

GenerationRequest Request(std::vector<int32_t> prompt, bool dense) {
  GenerationRequest request;
  request.prompt_ids = std::move(prompt);
  request.max_new_tokens = 8;
  // Unset: the server's default, the active partition.
  if (dense) request.attention = PolicySpec::Defaults(PolicyKind::kDense);
  return request;
}

// Dense and hybrid requests mixed, so that a step decodes two groups; two prompts long enough for
// the sparse heads to select under the lowered budget.
std::vector<GenerationRequest> MixedRequests() {
  return {Request(Prompt(600, 1), /*dense=*/true), Request(Prompt(600, 1), /*dense=*/false),
          Request(Prompt(40, 2), /*dense=*/true), Request(Prompt(700, 3), /*dense=*/false)};
}

std::vector<GenerationRequest> HybridRequests() {
  return {Request(Prompt(600, 1), /*dense=*/false), Request(Prompt(700, 3), /*dense=*/false)};
}

// Every selection policy but lychee (the partition's, above), with parameters tight enough that
// a long prompt decodes otherwise than densely on this model; tight enough too that for every
// policy a follower that decoded its KV head densely fails the test (seen by making it so).
std::vector<PolicySpec> TightPolicies() {
  PolicySpec quest = PolicySpec::Defaults(PolicyKind::kQuest);
  quest.token_budget = 32;
  quest.quest_dense_layers = 1;
  PolicySpec prhs = PolicySpec::Defaults(PolicyKind::kPrhs);
  prhs.token_budget = 64;
  prhs.block_size = 16;
  prhs.sink_tokens = prhs.recent_tokens = prhs.prhs_window = 16;
  PolicySpec double_p = PolicySpec::Defaults(PolicyKind::kDoubleP);
  double_p.p1 = 0.6;
  double_p.p2 = 0.3;
  PolicySpec streaming = PolicySpec::Defaults(PolicyKind::kStreaming);
  streaming.token_budget = 64;
  streaming.sink_tokens = 16;
  PolicySpec tidal = PolicySpec::Defaults(PolicyKind::kTidal);
  tidal.token_budget = 64;
  return {quest, prhs, double_p, streaming, tidal};
}

// Each policy on the 600-token prompt: request p is policy p's. With `max_dropped_mass` 0 each
// falls back to dense attention after its first decode step (completion token 1), noting the
// largest mass that step dropped over all KV heads, both ranks' (each rank audits its own heads;
// rank 0's alone were seen to give another mass for three of the policies).
std::vector<GenerationRequest> PolicyRequests(std::optional<double> max_dropped_mass) {
  std::vector<GenerationRequest> requests;
  for (const PolicySpec& policy : TightPolicies()) {
    GenerationRequest request = Request(Prompt(600, 1), /*dense=*/false);
    request.attention = policy;
    request.max_dropped_mass = max_dropped_mass;
    requests.push_back(std::move(request));
  }
  return requests;
}

void RequireSameTokens(const std::vector<Generated>& tp2, const std::vector<Generated>& tp1) {
  REQUIRE(tp2.size() == tp1.size());
  for (size_t i = 0; i < tp1.size(); ++i) {
    INFO("request " << i << ": TP-1 " << tp1[i].error << ", TP-2 " << tp2[i].error);
    REQUIRE(tp1[i].error.ok());
    REQUIRE(tp2[i].error.ok());
    CHECK(tp2[i].ids.size() == 8);
    CHECK(tp2[i].ids == tp1[i].ids);
    CHECK(tp2[i].partition_version == tp1[i].partition_version);
    CHECK(tp2[i].policy == tp1[i].policy);
    REQUIRE(tp2[i].dense_fallback.has_value() == tp1[i].dense_fallback.has_value());
    if (tp1[i].dense_fallback) {
      CHECK(tp2[i].dense_fallback->token_index == tp1[i].dense_fallback->token_index);
      CHECK(tp2[i].dense_fallback->dropped_mass == Approx(tp1[i].dense_fallback->dropped_mass).margin(1e-4));
    }
  }
}

TEST_CASE("TP-2 serving decodes TP-1's greedy tokens: dense, every policy, a partition activated after start",
          "[tensor_parallel]") {
  const HeadPartition shipped = PartitionFromFile("learned-target-0.25.json", 1);
  const HeadPartition later = PartitionFromFile("retrieval-head-0.json", 2);
  std::vector<Generated> mixed_tp1, policies_tp1, bounded_tp1, later_tp1;
  {
    EngineUnderTest tp1(nullptr, {shipped});
    mixed_tp1 = tp1.Generate(MixedRequests());
    policies_tp1 = tp1.Generate(PolicyRequests(std::nullopt));
    bounded_tp1 = tp1.Generate(PolicyRequests(0.0));
    tp1.Offer(later);
    later_tp1 = tp1.Generate(HybridRequests());
  }
  // The test can fail only if the partitions and policies matter: with each, a long prompt decodes
  // otherwise than densely.
  REQUIRE(mixed_tp1[1].partition_version == 1);
  REQUIRE(mixed_tp1[1].ids != mixed_tp1[0].ids);
  REQUIRE(later_tp1[0].partition_version == 2);
  REQUIRE(later_tp1[0].ids != mixed_tp1[1].ids);
  for (const Generated& policy : policies_tp1) {
    INFO(policy.policy);
    REQUIRE(policy.error.ok());
    CHECK(policy.ids != mixed_tp1[0].ids);
  }
  for (const Generated& bounded : bounded_tp1) {
    INFO(bounded.policy);
    REQUIRE(bounded.dense_fallback.has_value());
    CHECK(bounded.dense_fallback->token_index == 1);
  }

  Ranks ranks;
  {
    EngineUnderTest tp2(ranks.group, {shipped});
    RequireSameTokens(tp2.Generate(MixedRequests()), mixed_tp1);
    // Every policy's backends on the follower select for its own KV heads what TP-1 selects there.
    RequireSameTokens(tp2.Generate(PolicyRequests(std::nullopt)), policies_tp1);
    // A bound on the dropped mass holds over both ranks' KV heads.
    RequireSameTokens(tp2.Generate(PolicyRequests(0.0)), bounded_tp1);
    // Version 2 reaches the follower with the first request that uses it.
    tp2.Offer(later);
    RequireSameTokens(tp2.Generate(HybridRequests()), later_tp1);
  }
  // The engine's end sent the follower its shutdown command.
  CHECK(ranks.workers->Wait().ok());
}

// An engine whose partitions from a trainer pass shadow validation first, wired as InferenceServer
// wires it (the trainer watcher's offers go through PartitionManager::Offer and its gate);
// `validation_group` null: one process.
struct ValidatedEngine : EngineUnderTest {
  std::unique_ptr<ShadowValidator> shadow;

  ValidatedEngine(std::shared_ptr<const TensorParallelGroup> group,
                  std::shared_ptr<const TensorParallelGroup> validation_group)
      : EngineUnderTest(std::move(group), {}) {
    ShadowValidationOptions options;
    options.enabled = true;
    options.heldout_corpus = "data/corpus/kjv-heldout.txt.gz";
    // Half the default, for the test's time: the random partition below still fails every
    // multi-key prompt, and the learned one passes them all.
    options.prompts_per_task = 2;
    options.served_context_tokens = engine->max_context_tokens();
    options.tensor_parallel = std::move(validation_group);
    auto created = ShadowValidator::Create(options, engine->model(), engine->tokenizer());
    INFO(created.status());
    REQUIRE(created.ok());
    shadow = *std::move(created);
    partitions->SetOfferGate([this](const HeadPartition& partition) { return shadow->Check(partition); });
  }

  ~ValidatedEngine() { shadow->Cancel(); }

  // Offers `partition` on a thread of its own, as the trainer watcher does, and returns once its
  // validation runs.
  std::future<absl::Status> OfferWhileValidating(const HeadPartition& partition) {
    std::future<absl::Status> offer =
        std::async(std::launch::async, [this, partition] { return partitions->Offer(partition); });
    const auto give_up = std::chrono::steady_clock::now() + 60s;
    while (!shadow->running() && std::chrono::steady_clock::now() < give_up) std::this_thread::sleep_for(5ms);
    REQUIRE(shadow->running());
    return offer;
  }
};

// The random partition of density 0.1 that shadow_validation_test rejects.
HeadPartition RandomPartition(uint64_t version) {
  absl::StatusOr<ModelConfig> config = ModelConfig::FromFile(kModelDir + "/config.json");
  REQUIRE(config.ok());
  absl::StatusOr<HeadPartition> partition = RandomHeadPartition(*config, 0.1, 2);
  REQUIRE(partition.ok());
  partition->version = version;
  partition->model_fingerprint = Fingerprint();
  return *std::move(partition);
}

// What each validation decided and saw.
struct Validated {
  absl::Status offered;
  ShadowValidationRecord record;
};

void RequireSameValidation(const Validated& tp2, const Validated& tp1) {
  INFO("TP-1: " << tp1.record.summary << "\nTP-2: " << tp2.record.summary);
  CHECK(tp2.offered.code() == tp1.offered.code());
  CHECK(tp2.record.promoted == tp1.record.promoted);
  CHECK(tp2.record.validation.token_budget == tp1.record.validation.token_budget);
  for (const auto& [tp2_result, tp1_result] :
       {std::pair(&tp2.record.validation.dense, &tp1.record.validation.dense),
        std::pair(&tp2.record.validation.partition, &tp1.record.validation.partition)}) {
    REQUIRE(tp2_result->tasks.size() == tp1_result->tasks.size());
    for (size_t i = 0; i < tp1_result->tasks.size(); ++i) {
      CHECK(tp2_result->tasks[i].task == tp1_result->tasks[i].task);
      CHECK(tp2_result->tasks[i].correct == tp1_result->tasks[i].correct);
    }
    // Both ranks' KV heads: rank 0's alone drop another mass.
    CHECK(tp2_result->mean_dropped_mass == Approx(tp1_result->mean_dropped_mass).margin(1e-4));
    CHECK(tp2_result->max_dropped_mass == Approx(tp1_result->max_dropped_mass).margin(1e-4));
    CHECK(tp2_result->kv_bytes_per_token == Approx(tp1_result->kv_bytes_per_token).epsilon(1e-6));
  }
}

TEST_CASE("TP-2 shadow validation decides as TP-1 does, every rank decoding its shard, while serving goes on",
          "[tensor_parallel][shadow_validation]") {
  const HeadPartition learned = ShippedPartition("learned-target-0.25.json", 1);
  const HeadPartition random = RandomPartition(2);
  const std::vector<GenerationRequest> served = {Request(Prompt(600, 1), /*dense=*/true)};
  Ranks ranks(/*shadow_validation=*/true);
  auto tp2 = std::make_unique<ValidatedEngine>(ranks.group, ranks.validation_group);
  const auto idle_since = std::chrono::steady_clock::now();
  Validated learned_tp1, random_tp1;
  std::vector<Generated> served_tp1;
  {
    ValidatedEngine tp1(nullptr, nullptr);
    learned_tp1.offered = tp1.partitions->Offer(learned);
    learned_tp1.record = tp1.shadow->last().value();
    random_tp1.offered = tp1.partitions->Offer(random);
    random_tp1.record = tp1.shadow->last().value();
    served_tp1 = tp1.Generate(served);
  }
  // One of each decision, or the comparison below could not fail on it.
  REQUIRE(learned_tp1.offered.ok());
  REQUIRE(absl::IsFailedPrecondition(random_tp1.offered));
  REQUIRE(learned_tp1.record.validation.partition.mean_dropped_mass > 0);

  // TP-2 idle past the group's timeout (TP-1's validations above mostly take longer): the
  // validator's keep-alives hold the follower's validation thread, which would otherwise give up
  // waiting, and the validations below would fail.
  std::this_thread::sleep_until(idle_since + std::chrono::seconds(kStepTimeoutSeconds + 1));
  Validated learned_tp2;
  std::future<absl::Status> offer = tp2->OfferWhileValidating(learned);
  // Served beside the validation, on serving's group, with TP-1's tokens.
  RequireSameTokens(tp2->Generate(served), served_tp1);
  CHECK(tp2->shadow->running());
  learned_tp2.offered = offer.get();
  learned_tp2.record = tp2->shadow->last().value();
  RequireSameValidation(learned_tp2, learned_tp1);
  REQUIRE(tp2->partitions->Active().partition != nullptr);
  CHECK(tp2->partitions->Active().partition->version == 1);

  Validated random_tp2;
  random_tp2.offered = tp2->partitions->Offer(random);
  random_tp2.record = tp2->shadow->last().value();
  RequireSameValidation(random_tp2, random_tp1);
  CHECK(tp2->partitions->Active().partition->version == 1);
  CHECK(tp2->engine->serving_status().ok());
  tp2.reset();
  // The validator's end stopped the follower's validation thread, the engine's its serving.
  CHECK(ranks.workers->Wait().ok());
}

TEST_CASE("A follower killed during shadow validation fails it with UNAVAILABLE; the partition is not promoted",
          "[tensor_parallel][shadow_validation]") {
  Ranks ranks(/*shadow_validation=*/true);
  ValidatedEngine tp2(ranks.group, ranks.validation_group);
  std::future<absl::Status> offer = tp2.OfferWhileValidating(ShippedPartition("learned-target-0.25.json", 1));
  // Into the decoding (two seconds or so here), past the validation's start.
  std::this_thread::sleep_for(500ms);
  REQUIRE(offer.wait_for(0s) == std::future_status::timeout);
  const auto start = std::chrono::steady_clock::now();
  REQUIRE(kill(ranks.workers->pid(1), SIGKILL) == 0);
  const absl::Status offered = offer.get();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  INFO(offered);
  CHECK(absl::IsUnavailable(offered));
  CHECK_THAT(std::string(offered.message()), Catch::Contains("shadow validation of partition 1"));
  CHECK(seconds < kStepTimeoutSeconds);
  CHECK(tp2.partitions->Active().partition == nullptr);
  CHECK(!tp2.partitions->Get(1).ok());
  // Serving lost the rank too: requests fail as after any lost rank, and the engine says so (the
  // server's health then turns NOT_SERVING, as the test below checks).
  const std::vector<Generated> after = tp2.Generate({Request(Prompt(40, 2), /*dense=*/true)});
  CHECK(absl::IsUnavailable(after[0].error));
  CHECK(absl::IsUnavailable(tp2.engine->serving_status()));
  tp2.shadow->Cancel();
  const absl::Status workers = ranks.workers->Wait();
  CHECK_THAT(std::string(workers.message()), Catch::Contains("killed by signal 9"));
}

grpc::health::v1::HealthCheckResponse::ServingStatus Health(const std::string& target) {
  auto stub = grpc::health::v1::Health::NewStub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 10s);
  grpc::health::v1::HealthCheckResponse response;
  REQUIRE(stub->Check(&context, {}, &response).ok());
  return response.status();
}

TEST_CASE("A killed follower rank fails in-flight and later requests with UNAVAILABLE; health turns NOT_SERVING",
          "[tensor_parallel]") {
  Ranks ranks;
  testing::TempDir state;
  InferenceServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.http_address = "127.0.0.1:0";
  options.state_dir = state.str();
  options.shadow.enabled = false;
  options.engine = RankZeroOptions();
  options.engine.tensor_parallel = ranks.group;
  auto started = InferenceServer::Start(options);
  INFO(started.status());
  REQUIRE(started.ok());
  std::unique_ptr<InferenceServer> server = *std::move(started);
  const std::string target = "127.0.0.1:" + std::to_string(server->port());
  auto stub = v1::InferenceService::NewStub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
  // Idle past the group's timeout: rank 0's keep-alives hold the follower, which would otherwise give
  // up waiting for a command.
  std::this_thread::sleep_for(std::chrono::seconds(kStepTimeoutSeconds + 1));
  CHECK(Health(target) == grpc::health::v1::HealthCheckResponse::SERVING);
  CHECK(testing::HttpRequest(server->http_port(), "GET", "/health").status == 200);

  v1::GenerateRequest request;
  request.set_text("The old man walked down to the harbour and");
  request.set_max_new_tokens(1000);
  const auto start = std::chrono::steady_clock::now();
  grpc::Status in_flight;
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 60s);
    auto reader = stub->Generate(&context, request);
    v1::GenerateResponse response;
    // Serving: the first tokens came through both ranks.
    REQUIRE(reader->Read(&response));
    REQUIRE(kill(ranks.workers->pid(1), SIGKILL) == 0);
    while (reader->Read(&response)) {
    }
    in_flight = reader->Finish();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  INFO(in_flight.error_message());
  CHECK(in_flight.error_code() == grpc::StatusCode::UNAVAILABLE);
  CHECK_THAT(in_flight.error_message(), Catch::Contains("lost a tensor-parallel rank"));
  // A dead rank's connections close: no wait for the group's timeout.
  CHECK(seconds < kStepTimeoutSeconds);

  grpc::Status later;
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 30s);
    request.set_max_new_tokens(4);
    auto reader = stub->Generate(&context, request);
    v1::GenerateResponse response;
    while (reader->Read(&response)) {
    }
    later = reader->Finish();
  }
  CHECK(later.error_code() == grpc::StatusCode::UNAVAILABLE);
  CHECK(Health(target) == grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  CHECK(testing::HttpRequest(server->http_port(), "GET", "/health").status == 503);

  server->Shutdown();
  server.reset();
  const absl::Status workers = ranks.workers->Wait();
  CHECK(absl::IsUnavailable(workers));
  CHECK_THAT(std::string(workers.message()), Catch::Contains("killed by signal 9"));
}

}  // namespace
}  // namespace lychee
