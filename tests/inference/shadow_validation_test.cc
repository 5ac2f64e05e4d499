// Shadow validation on the bundled model, in process: a random partition of density 0.1 is
// rejected with its numbers, the shipped learned one is promoted, bad options are refused, the
// validation thread runs below serving's CPU priority, and live requests are served while a
// validation runs.
#include "tests/torch_catch.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>
#include <thread>
#include <vector>

#include "common/base/model_config.h"
#include "common/base/model_fingerprint.h"
#include "common/base/random_partition.h"
#include "harness/temp_dir.h"
#include "inference/engine.h"
#include "inference/shadow_validator.h"

namespace lychee {
namespace {

using namespace std::chrono_literals;

const std::string kModelDir = "models/tiny-llama-retrieval";
const std::string kHeldout = "data/corpus/kjv-heldout.txt.gz";

ShadowValidationOptions SmallValidation() {
  ShadowValidationOptions options;
  options.enabled = true;
  options.heldout_corpus = kHeldout;
  return options;
}

struct Fixture {
  testing::TempDir state;
  ModelConfig config = ModelConfig::FromFile(kModelDir + "/config.json").value();
  std::string fingerprint = ModelFingerprint(kModelDir).value();
  std::unique_ptr<PartitionManager> partitions;
  std::unique_ptr<InferenceEngine> engine;
  std::unique_ptr<ShadowValidator> shadow;

  explicit Fixture(ShadowValidationOptions shadow_options = SmallValidation()) {
    PartitionManager::Options partition_options;
    partition_options.state_dir = state.str();
    partition_options.model_fingerprint = fingerprint;
    partition_options.model_config = config;
    partitions = PartitionManager::Open(partition_options).value();
    EngineOptions engine_options;
    engine_options.model_dir = kModelDir;
    engine_options.threads = 1;
    engine = InferenceEngine::Create(engine_options, partitions.get(), nullptr).value();
    shadow_options.served_context_tokens = engine->max_context_tokens();
    shadow = ShadowValidator::Create(shadow_options, engine->model(), engine->tokenizer()).value();
    partitions->SetOfferGate([this](const HeadPartition& partition) { return shadow->Check(partition); });
  }

  HeadPartition Random(double density, uint64_t seed, uint64_t version) const {
    HeadPartition partition = RandomHeadPartition(config, density, seed).value();
    partition.version = version;
    partition.model_fingerprint = fingerprint;
    return partition;
  }

  HeadPartition Learned(uint64_t version) const {
    HeadPartition partition = LoadHeadPartitionJson(kModelDir + "/partitions/learned-target-0.25.json").value();
    partition.version = version;
    return partition;
  }
};

TEST_CASE("shadow validation rejects a random partition of density 0.1 and promotes the learned one") {
  Fixture fixture;
  const absl::Status random = fixture.partitions->Offer(fixture.Random(0.1, 2, 1));
  INFO(random.message());
  CHECK(absl::IsFailedPrecondition(random));
  CHECK(fixture.partitions->Active().partition == nullptr);
  CHECK(!fixture.partitions->Get(1).ok());                                           // not stored
  const std::vector<RejectedPartition> rejected = fixture.partitions->rejections();  // GetServerInfo's list
  REQUIRE(rejected.size() == 1);
  CHECK(rejected[0].version == 1);
  CHECK(rejected[0].reason.find("shadow validation") != std::string::npos);
  CHECK(rejected[0].reason.find("passkey") != std::string::npos);
  CHECK(rejected[0].reason.find("mean dropped mass") != std::string::npos);
  CHECK(fixture.partitions->rejected_by_gate() == 1);
  const ShadowValidationRecord random_record = fixture.shadow->last().value();
  CHECK(!random_record.promoted);
  CHECK(random_record.validation.partition.audited);

  // Offered again (a reconnecting watch): the same answer without another validation.
  CHECK(fixture.partitions->Offer(fixture.Random(0.1, 2, 1)) == random);
  CHECK(fixture.shadow->rejected_count() == 1);

  const absl::Status learned = fixture.partitions->Offer(fixture.Learned(2));
  INFO(learned.message());
  REQUIRE(learned.ok());
  REQUIRE(fixture.partitions->Active().partition != nullptr);
  CHECK(fixture.partitions->Active().partition->version == 2);
  const ShadowValidationRecord learned_record = fixture.shadow->last().value();
  CHECK(learned_record.promoted);
  CHECK(learned_record.validation.partition.mean_dropped_mass <= 0.2);
  CHECK(learned_record.validation.partition.mean_dropped_mass < random_record.validation.partition.mean_dropped_mass);
  WARN("random: " << random_record.summary << "\nlearned: " << learned_record.summary);
}

TEST_CASE("shadow validation refuses bad options, naming the flag") {
  const auto refused = [](const ShadowValidationOptions& options, const std::string& flag) {
    const absl::Status status = ShadowValidator::CheckOptions(options);
    INFO(status.message());
    CHECK(absl::IsInvalidArgument(status));
    CHECK(status.message().find(flag) != std::string::npos);
  };
  ShadowValidationOptions options = SmallValidation();
  CHECK(ShadowValidator::CheckOptions(options).ok());
  options.max_accuracy_drop = -0.1;
  refused(options, "--shadow-max-accuracy-drop");
  options = SmallValidation();
  options.max_dropped_mass = 1.5;
  refused(options, "--shadow-max-dropped-mass");
  options = SmallValidation();
  options.heldout_corpus = "no/such/corpus.txt";
  refused(options, "--shadow-heldout-corpus");
  options = SmallValidation();
  options.prompts_file = "no/such/prompts.jsonl";
  refused(options, "--shadow-prompts-file");

  testing::TempDir dir;
  const std::string malformed = dir.str() + "/prompts.jsonl";
  std::ofstream(malformed) << "{\"task\": \"passkey\", \"prompt\": \"The pass key is\"}\n";  // no answer
  options.prompts_file = malformed;
  refused(options, "--shadow-prompts-file");
  // Off: nothing to check.
  options.enabled = false;
  CHECK(ShadowValidator::CheckOptions(options).ok());
}

// The nice value of each thread of this process (field 19 of /proc/self/task/TID/stat).
std::vector<int> ThreadNiceValues() {
  std::vector<int> values;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream stat(task.path() / "stat");
    std::string line;
    std::getline(stat, line);
    // The command name, field 2, is in parentheses and may hold spaces: count from after it.
    std::istringstream fields(line.substr(line.rfind(')') + 2));
    std::string field;
    for (int index = 3; index <= 19 && fields >> field; ++index) {
      if (index == 19) values.push_back(std::stoi(field));
    }
  }
  return values;
}

TEST_CASE("the validation runs on a thread below serving's CPU priority") {
  // Relative to the nice value the test runs at (under `nice ctest`, 10 already).
  errno = 0;
  const int serving_nice = getpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)));
  REQUIRE(errno == 0);
  const int validation_nice = ShadowValidator::ValidationNiceValue(serving_nice);
  Fixture fixture;
  const auto at_validation_priority = [validation_nice] {
    const std::vector<int> values = ThreadNiceValues();
    return std::count(values.begin(), values.end(), validation_nice);
  };
  // The worker sets its priority as it starts.
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (at_validation_priority() == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(5ms);
  }
  CHECK(at_validation_priority() == 1);
  const std::vector<int> nice_values = ThreadNiceValues();
  CHECK(std::count(nice_values.begin(), nice_values.end(), serving_nice) >= 1);
  if (serving_nice < 19) CHECK(validation_nice > serving_nice);
}

TEST_CASE("live requests are served while a validation runs") {
  ShadowValidationOptions options = SmallValidation();
  options.prompts_per_task = 8;  // long enough to serve requests meanwhile
  Fixture fixture(options);
  std::future<absl::Status> offer =
      std::async(std::launch::async, [&] { return fixture.partitions->Offer(fixture.Learned(1)); });
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (!fixture.shadow->running() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
  REQUIRE(fixture.shadow->running());

  int served_during_validation = 0;
  for (int i = 0; i < 3; ++i) {
    GenerationRequest request;
    request.prompt_ids = fixture.engine->tokenizer().Encode("The harbour was quiet that morning and").value();
    request.max_new_tokens = 4;
    std::shared_ptr<GenerationStream> stream = fixture.engine->Submit(request).value();
    GenerationEvent event;
    do {
      event = stream->Next(1000ms);
      REQUIRE(event.kind != GenerationEvent::Kind::kError);
    } while (event.kind != GenerationEvent::Kind::kDone);
    CHECK(event.summary.completion_tokens == 4);
    if (fixture.shadow->running()) ++served_during_validation;
  }
  CHECK(served_during_validation == 3);
  CHECK(offer.get().ok());
}

}  // namespace
}  // namespace lychee
