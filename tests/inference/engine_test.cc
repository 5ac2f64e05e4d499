// The serving core on the bundled model, on the CPU: what the scheduler produces, how it takes
// and frees KV pages, preempts when they run out, and how it pins head partitions.
#include "tests/torch_catch.h"

#include "inference/engine.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/base/model_fingerprint.h"
#include "common/base/tokenizer.h"
#include "common/model/kv_pool.h"
#include "common/model/model.h"
#include "common/model/sampling.h"
#include "harness/temp_dir.h"
#include "inference/output_processor.h"
#include "kernels/dense_attention.h"

namespace lychee {
namespace {

using std::chrono::milliseconds;

const std::string kModelDir = "models/tiny-llama-retrieval";
constexpr char kPrompt[] = "The old man walked down to the harbour and";

struct Outcome {
  std::vector<int32_t> ids;
  std::string text;
  std::optional<GenerationSummary> summary;
  absl::Status error;
  int chunks = 0;
};

// Waits for the stream's first chunk of tokens.
void AwaitFirstChunk(GenerationStream& stream) {
  GenerationEvent event;
  while (event.kind != GenerationEvent::Kind::kChunk) event = stream.Next(milliseconds(1000));
}

// Reads a stream to its end (a minute at most).
Outcome Drain(GenerationStream& stream) {
  Outcome outcome;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < give_up) {
    GenerationEvent event = stream.Next(milliseconds(200));
    switch (event.kind) {
      case GenerationEvent::Kind::kNothingYet:
        continue;
      case GenerationEvent::Kind::kChunk:
        ++outcome.chunks;
        outcome.ids.insert(outcome.ids.end(), event.token_ids.begin(), event.token_ids.end());
        outcome.text += event.text;
        continue;
      case GenerationEvent::Kind::kDone:
        outcome.summary = event.summary;
        return outcome;
      case GenerationEvent::Kind::kError:
        outcome.error = event.error;
        return outcome;
    }
  }
  FAIL("the generation did not end within a minute");
  return outcome;
}

// Key and value bytes of one KV page of the bundled model on the CPU (float32).
int64_t BytesPerPage() {
  absl::StatusOr<ModelConfig> config = ModelConfig::FromFile(kModelDir + "/config.json");
  REQUIRE(config.ok());
  return KvPool::BytesPerPage(*config, at::kFloat, kDefaultPageSize);
}

struct Fixture {
  testing::TempDir state;
  std::unique_ptr<PartitionManager> partitions;
  MetricsRegistry metrics;
  absl::Status started;
  std::unique_ptr<InferenceEngine> engine;
  std::string fingerprint;

  // An engine that must start.
  explicit Fixture(EngineOptions options = {}) : Fixture(std::move(options), /*may_fail=*/false) {}

  Fixture(EngineOptions options, bool may_fail) {
    absl::StatusOr<ModelConfig> config = ModelConfig::FromFile(kModelDir + "/config.json");
    REQUIRE(config.ok());
    absl::StatusOr<std::string> model_fingerprint = ModelFingerprint(kModelDir);
    REQUIRE(model_fingerprint.ok());
    fingerprint = *model_fingerprint;
    PartitionManager::Options partition_options;
    partition_options.state_dir = state.str();
    partition_options.model_fingerprint = fingerprint;
    partition_options.model_config = *config;
    partition_options.check_servable = [config = *config](const HeadPartition& partition) {
      return CheckPartitionServable(partition, config);
    };
    auto manager = PartitionManager::Open(partition_options);
    REQUIRE(manager.ok());
    partitions = *std::move(manager);
    options.model_dir = kModelDir;
    auto created = InferenceEngine::Create(options, partitions.get(), &metrics);
    started = created.status();
    if (!may_fail) REQUIRE(started.ok());
    if (created.ok()) engine = *std::move(created);
  }

  // The value of one series in the metrics' text, e.g. "lychee_preemptions_total"; -1 if absent.
  double Metric(const std::string& series) const {
    const std::string text = metrics.Render();
    const size_t at = text.find("\n" + series + " ");
    if (at == std::string::npos) return -1;
    return std::stod(text.substr(at + series.size() + 2));
  }

  std::vector<int32_t> Encode(const std::string& text) const {
    auto ids = engine->tokenizer().Encode(text);
    REQUIRE(ids.ok());
    return *ids;
  }

  GenerationRequest Request(const std::string& text, int64_t max_new_tokens) const {
    GenerationRequest request;
    request.prompt_ids = Encode(text);
    request.max_new_tokens = max_new_tokens;
    return request;
  }

  // Layer 0 dense, one retrieval head per other layer, the given version.
  void OfferPartition(uint64_t version, int64_t budget = 256) {
    HeadPartition partition = HeadPartition::AllRetrieval(engine->config().num_layers, engine->config().num_kv_heads,
                                                          SelectionParams{});
    for (int64_t layer = 1; layer < partition.num_layers(); ++layer) {
      for (int64_t head = 1; head < partition.num_kv_heads(); ++head) partition.set_role(layer, head, HeadRole::kSparse);
    }
    partition.mutable_selection().token_budget = budget;
    partition.model_fingerprint = fingerprint;
    partition.version = version;
    REQUIRE(partitions->Offer(partition).ok());
  }

  bool WaitForIdle(milliseconds timeout = milliseconds(5000)) const {
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < until) {
      const EngineLoad load = engine->load();
      if (load.active_sequences == 0 && load.queued_requests == 0 && load.kv_bytes_reserved == 0) return true;
      std::this_thread::sleep_for(milliseconds(10));
    }
    return false;
  }
};

std::vector<int32_t> GenerateDirectly(const std::vector<int32_t>& prompt, int64_t max_new_tokens) {
  auto model = Model::Load(kModelDir);
  REQUIRE(model.ok());
  auto sequence = (*model)->NewSequence(std::make_shared<DenseAttentionBackend>());
  GenerationOptions options;
  options.max_new_tokens = max_new_tokens;
  for (int64_t eos : (*model)->config().eos_token_ids) options.stop_ids.push_back(static_cast<int32_t>(eos));
  std::vector<int32_t> ids;
  REQUIRE(Generate(**model, *sequence, prompt, options, [&](int32_t id) {
            ids.push_back(id);
            return true;
          }).ok());
  if (!ids.empty() && std::find(options.stop_ids.begin(), options.stop_ids.end(), ids.back()) != options.stop_ids.end()) {
    ids.pop_back();
  }
  return ids;
}

TEST_CASE("greedy generation equals the model's own, streamed as ids and whole text") {
  Fixture fixture;
  GenerationRequest request = fixture.Request(kPrompt, 24);
  const std::vector<int32_t> expected = GenerateDirectly(request.prompt_ids, 24);
  auto stream = fixture.engine->Submit(request);
  REQUIRE(stream.ok());
  const Outcome outcome = Drain(**stream);
  REQUIRE(outcome.error.ok());
  REQUIRE(outcome.summary.has_value());
  CHECK(outcome.ids == expected);
  auto text = fixture.engine->tokenizer().Decode(expected, /*skip_special_tokens=*/true);
  REQUIRE(text.ok());
  CHECK(outcome.text == *text);
  CHECK(outcome.summary->completion_tokens == static_cast<int64_t>(expected.size()));
  CHECK(outcome.summary->prompt_tokens == static_cast<int64_t>(request.prompt_ids.size()));
  CHECK_FALSE(outcome.summary->hybrid);
  CHECK(outcome.summary->partition_version == 0);
  CHECK(outcome.summary->time_to_first_token_seconds > 0);
  CHECK(outcome.summary->total_seconds >= outcome.summary->time_to_first_token_seconds);
  CHECK(fixture.WaitForIdle());
}

TEST_CASE("sequences batched together decode as they would alone") {
  EngineOptions options;
  options.prefill_chunk_tokens = 4;  // prompts take several steps, so prefill and decode interleave
  Fixture fixture(options);
  const std::vector<std::string> prompts = {kPrompt, "In the beginning", "She opened the letter, read the first line,",
                                            "Numbers: one, two, three,"};
  std::vector<std::shared_ptr<GenerationStream>> streams;
  std::vector<std::vector<int32_t>> expected;
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerationRequest request = fixture.Request(prompts[i], 12 + static_cast<int64_t>(i) * 4);
    expected.push_back(GenerateDirectly(request.prompt_ids, request.max_new_tokens));
    auto stream = fixture.engine->Submit(request);
    REQUIRE(stream.ok());
    streams.push_back(*stream);
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Outcome outcome = Drain(*streams[i]);
    REQUIRE(outcome.error.ok());
    CHECK(outcome.ids == expected[i]);
  }
}

TEST_CASE("requests wait in a bounded queue") {
  EngineOptions options;
  options.max_batch = 1;
  options.max_queued = 2;
  Fixture fixture(options);
  std::vector<std::shared_ptr<GenerationStream>> streams;
  for (int i = 0; i < 3; ++i) {
    auto stream = fixture.engine->Submit(fixture.Request(kPrompt, 16));
    REQUIRE(stream.ok());
    streams.push_back(*stream);
  }
  const EngineLoad load = fixture.engine->load();
  CHECK(load.active_sequences + load.queued_requests == 3);
  CHECK(load.active_sequences <= 1);
  CHECK(load.kv_pages_used <= load.kv_pages_total);

  // Two wait already behind the one that runs (or is about to).
  auto refused = fixture.engine->Submit(fixture.Request(kPrompt, 16));
  CHECK(refused.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(std::string(refused.status().message()).find("full") != std::string::npos);

  for (auto& stream : streams) {
    const Outcome outcome = Drain(*stream);
    REQUIRE(outcome.error.ok());
    CHECK(outcome.summary->completion_tokens <= 16);
  }
  CHECK(fixture.WaitForIdle());
}

TEST_CASE("a request that could outgrow the whole KV pool is refused at Submit, with the sizes") {
  const int64_t page_bytes = BytesPerPage();
  EngineOptions options;
  options.kv_cache_bytes = 4 * page_bytes + page_bytes / 2;  // whole pages only: 4
  options.max_context_tokens = 1024;
  Fixture fixture(options);
  CHECK(fixture.engine->load().kv_pages_total == 4);
  CHECK(fixture.engine->load().kv_bytes_limit == 4 * page_bytes);

  GenerationRequest request = fixture.Request(kPrompt, 1);
  const int64_t prompt_tokens = static_cast<int64_t>(request.prompt_ids.size());
  // The last token is never written to the cache: prompt + max_new_tokens - 1 positions.
  request.max_new_tokens = 4 * 64 - prompt_tokens + 2;
  const absl::Status refused = fixture.engine->Submit(request).status();
  CHECK(refused.code() == absl::StatusCode::kResourceExhausted);
  const std::string message(refused.message());
  CHECK(message.find(absl::StrCat(4 * 64 + 1, " KV positions")) != std::string::npos);
  CHECK(message.find("5 pages of 64 positions") != std::string::npos);
  CHECK(message.find(absl::StrCat(5 * page_bytes, " bytes")) != std::string::npos);
  CHECK(message.find(absl::StrCat("whole KV cache of 4 pages (", 4 * page_bytes, " bytes)")) != std::string::npos);
  CHECK(fixture.Metric("lychee_requests_total{outcome=\"rejected\"}") == 1);

  // One position less fits, and runs to its end in the pool alone.
  request.max_new_tokens -= 1;
  request.stop_sequences = {"\n"};
  auto fits = fixture.engine->Submit(request);
  REQUIRE(fits.ok());
  CHECK(Drain(**fits).error.ok());

  // The context limit caps what a request can take.
  EngineOptions capped = options;
  capped.max_context_tokens = 4 * 64;
  capped.max_new_tokens_limit = 100000;
  Fixture capped_fixture(capped);
  auto long_request = capped_fixture.engine->Submit(capped_fixture.Request(kPrompt, 50000));
  CHECK(long_request.ok());
}

TEST_CASE("a KV pool too small for every sequence at once preempts the youngest; each still generates what it would alone") {
  EngineOptions options;
  options.kv_cache_bytes = 3 * BytesPerPage();
  options.prefill_chunk_tokens = 16;  // recomputation takes several chunks
  Fixture fixture(options);
  const std::vector<std::string> prompts = {kPrompt, "In the beginning", "She opened the letter, read the first line,",
                                            "Numbers: one, two, three,", "Once upon a time there was"};
  constexpr int64_t kNewTokens = 120;
  std::vector<std::vector<int32_t>> expected;
  for (const std::string& prompt : prompts) expected.push_back(GenerateDirectly(fixture.Encode(prompt), kNewTokens));
  // Submitted together, so that they run together.
  std::vector<std::shared_ptr<GenerationStream>> streams;
  for (const std::string& prompt : prompts) {
    auto stream = fixture.engine->Submit(fixture.Request(prompt, kNewTokens));
    REQUIRE(stream.ok());
    streams.push_back(*stream);
  }
  int64_t preemptions = 0;
  for (size_t i = 0; i < streams.size(); ++i) {
    const Outcome outcome = Drain(*streams[i]);
    REQUIRE(outcome.error.ok());
    REQUIRE(outcome.summary.has_value());
    CHECK(outcome.ids == expected[i]);
    auto text = fixture.engine->tokenizer().Decode(expected[i], /*skip_special_tokens=*/true);
    REQUIRE(text.ok());
    CHECK(outcome.text == *text);
    CHECK(outcome.summary->completion_tokens == static_cast<int64_t>(expected[i].size()));
    // What attention read is summed over the sequence's recomputations: one decode step per token
    // after the first, as without preemption.
    REQUIRE(outcome.summary->telemetry.has_value());
    CHECK(outcome.summary->telemetry->decode_steps == outcome.summary->completion_tokens - 1);
    preemptions += outcome.summary->preemptions;
  }
  CHECK(preemptions > 0);
  CHECK(fixture.Metric("lychee_preemptions_total") == static_cast<double>(preemptions));
  CHECK(fixture.WaitForIdle());
  CHECK(fixture.Metric("lychee_kv_cache_pages{state=\"free\"}") == 3);
  CHECK(fixture.Metric("lychee_kv_cache_usage") == 0);
}

TEST_CASE("pages are taken as sequences grow, so more run at once than whole reservations allowed") {
  EngineOptions options;
  constexpr int64_t kPages = 16;
  options.kv_cache_bytes = kPages * BytesPerPage();
  Fixture fixture(options);
  // Each may take 8 pages: reserved whole at admission, two would fill the pool.
  GenerationRequest request = fixture.Request(kPrompt, 8 * 64 - static_cast<int64_t>(fixture.Encode(kPrompt).size()));
  auto free_run = fixture.engine->Submit(fixture.Request(kPrompt, 40));
  REQUIRE(free_run.ok());
  const Outcome full = Drain(**free_run);
  REQUIRE(full.text.size() > 40);
  // They stop early, after a few tokens.
  request.stop_sequences = {full.text.substr(full.text.size() / 2, 4)};
  CHECK(fixture.WaitForIdle());

  constexpr int kRequests = 6;
  std::vector<std::shared_ptr<GenerationStream>> streams;
  for (int i = 0; i < kRequests; ++i) {
    auto stream = fixture.engine->Submit(request);
    REQUIRE(stream.ok());
    streams.push_back(*stream);
  }
  int64_t most_running = 0;
  double most_running_metric = 0;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < give_up) {
    const EngineLoad load = fixture.engine->load();
    CHECK(load.kv_pages_used <= kPages);
    most_running = std::max(most_running, load.active_sequences);
    most_running_metric = std::max(most_running_metric, fixture.Metric("lychee_running_requests"));
    if (load.active_sequences == 0 && load.queued_requests == 0) break;
    std::this_thread::sleep_for(milliseconds(1));
  }
  CHECK(most_running > 2);
  CHECK(most_running_metric > 2);
  for (auto& stream : streams) {
    const Outcome outcome = Drain(*stream);
    REQUIRE(outcome.error.ok());
    CHECK(outcome.summary->finish_reason == FinishReason::kStopSequence);
    CHECK(outcome.summary->preemptions == 0);
  }
}

TEST_CASE("a seeded sampled generation gives the same tokens with and without preemption") {
  const std::vector<std::string> hog_prompts = {"In the beginning", "Numbers: one, two, three,"};
  constexpr int64_t kNewTokens = 120;
  GenerationRequest sampled;
  sampled.max_new_tokens = kNewTokens;
  sampled.temperature = 0.8;
  sampled.top_p = 0.95;
  sampled.seed = 7;

  Outcome alone;
  {
    Fixture fixture;
    sampled.prompt_ids = fixture.Encode(kPrompt);
    auto stream = fixture.engine->Submit(sampled);
    REQUIRE(stream.ok());
    alone = Drain(**stream);
    REQUIRE(alone.error.ok());
    CHECK(alone.summary->preemptions == 0);
  }
  // Long enough to need a second page, where the older requests take it away.
  REQUIRE(alone.ids.size() + sampled.prompt_ids.size() > 70);

  EngineOptions options;
  options.kv_cache_bytes = 3 * BytesPerPage();
  options.prefill_chunk_tokens = 16;
  Fixture fixture(options);
  std::vector<std::shared_ptr<GenerationStream>> hogs;
  for (const std::string& prompt : hog_prompts) {
    auto stream = fixture.engine->Submit(fixture.Request(prompt, kNewTokens));
    REQUIRE(stream.ok());
    hogs.push_back(*stream);
  }
  auto stream = fixture.engine->Submit(sampled);  // the youngest
  REQUIRE(stream.ok());
  const Outcome preempted = Drain(**stream);
  REQUIRE(preempted.error.ok());
  CHECK(preempted.summary->preemptions > 0);
  CHECK(preempted.ids == alone.ids);
  CHECK(preempted.text == alone.text);
  for (auto& hog : hogs) CHECK(Drain(*hog).error.ok());
}

TEST_CASE("the KV cache as a fraction of free device memory is for CUDA only") {
  EngineOptions options;
  options.kv_cache_fraction = 0.5;
  Fixture fixture(options, /*may_fail=*/true);
  CHECK(fixture.started.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(fixture.started.message()).find("--kv-cache-mib") != std::string::npos);
}

TEST_CASE("cancellation and deadlines stop the work and free its memory at once") {
  EngineOptions options;
  options.max_new_tokens_limit = 100000;
  Fixture fixture(options);
  SECTION("cancel") {
    auto stream = fixture.engine->Submit(fixture.Request(kPrompt, 5000));
    REQUIRE(stream.ok());
    AwaitFirstChunk(**stream);
    CHECK(fixture.engine->load().kv_bytes_reserved > 0);
    (*stream)->Cancel();
    CHECK(fixture.WaitForIdle(milliseconds(2000)));
  }
  SECTION("deadline") {
    GenerationRequest request = fixture.Request(kPrompt, 5000);
    request.deadline = std::chrono::steady_clock::now() + milliseconds(300);
    auto stream = fixture.engine->Submit(request);
    REQUIRE(stream.ok());
    const Outcome outcome = Drain(**stream);
    CHECK(outcome.error.code() == absl::StatusCode::kDeadlineExceeded);
    CHECK(fixture.WaitForIdle(milliseconds(2000)));
  }
}

TEST_CASE("bad requests get the right code and a message naming the problem") {
  Fixture fixture;
  const auto code_of = [&](GenerationRequest request) { return fixture.engine->Submit(request).status(); };
  GenerationRequest empty;
  CHECK(code_of(empty).code() == absl::StatusCode::kInvalidArgument);

  GenerationRequest outside = fixture.Request(kPrompt, 8);
  outside.prompt_ids[2] = static_cast<int32_t>(fixture.engine->config().vocab_size);
  const absl::Status vocab = code_of(outside);
  CHECK(vocab.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(vocab.message()).find("token_ids[2]") != std::string::npos);

  GenerationRequest too_long = fixture.Request(kPrompt, 8);
  too_long.prompt_ids.assign(static_cast<size_t>(fixture.engine->max_context_tokens()), 1);
  CHECK(code_of(too_long).code() == absl::StatusCode::kOutOfRange);

  for (int64_t max_new_tokens : {int64_t{0}, int64_t{-3}, int64_t{1} << 40}) {
    const absl::Status status = code_of(fixture.Request(kPrompt, max_new_tokens));
    CHECK(status.code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(status.message()).find("max_new_tokens") != std::string::npos);
  }
  GenerationRequest bad_top_p = fixture.Request(kPrompt, 8);
  bad_top_p.top_p = 1.5;
  CHECK(code_of(bad_top_p).code() == absl::StatusCode::kInvalidArgument);

  GenerationRequest hybrid = fixture.Request(kPrompt, 8);
  hybrid.attention = PolicySpec::LycheeAsPartition();
  CHECK(code_of(hybrid).code() == absl::StatusCode::kFailedPrecondition);
  fixture.OfferPartition(1);
  hybrid.attention->partition_version = 5;
  CHECK(code_of(hybrid).code() == absl::StatusCode::kNotFound);
  hybrid.attention->partition_version.reset();
  hybrid.attention->token_budget = 10;
  hybrid.attention->from_partition.token_budget = false;
  const absl::Status budget = code_of(hybrid);
  CHECK(budget.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(budget.message()).find("token_budget") != std::string::npos);

  // The engine still serves after all of that.
  auto stream = fixture.engine->Submit(fixture.Request(kPrompt, 4));
  REQUIRE(stream.ok());
  CHECK(Drain(**stream).error.ok());
}

TEST_CASE("a sequence keeps the partition it was admitted with; new ones get the new partition") {
  EngineOptions options;
  options.max_new_tokens_limit = 100000;
  Fixture fixture(options);
  fixture.OfferPartition(1);
  auto long_running = fixture.engine->Submit(fixture.Request(kPrompt, 200));
  REQUIRE(long_running.ok());
  AwaitFirstChunk(**long_running);

  fixture.OfferPartition(2, 512);
  auto after = fixture.engine->Submit(fixture.Request(kPrompt, 8));
  REQUIRE(after.ok());
  GenerationRequest pinned_request = fixture.Request(kPrompt, 8);
  pinned_request.attention = PolicySpec::LycheeAsPartition();
  pinned_request.attention->partition_version = 1;
  auto pinned = fixture.engine->Submit(pinned_request);
  REQUIRE(pinned.ok());
  GenerationRequest dense_request = fixture.Request(kPrompt, 8);
  dense_request.attention = PolicySpec::Defaults(PolicyKind::kDense);
  auto dense = fixture.engine->Submit(dense_request);
  REQUIRE(dense.ok());

  const Outcome old_outcome = Drain(**long_running);
  const Outcome new_outcome = Drain(**after);
  const Outcome pinned_outcome = Drain(**pinned);
  const Outcome dense_outcome = Drain(**dense);
  REQUIRE(old_outcome.summary.has_value());
  REQUIRE(new_outcome.summary.has_value());
  CHECK(old_outcome.summary->hybrid);
  CHECK(old_outcome.summary->partition_version == 1);
  CHECK(old_outcome.summary->token_budget == 256);
  CHECK(new_outcome.summary->partition_version == 2);
  CHECK(new_outcome.summary->token_budget == 512);
  CHECK(pinned_outcome.summary->partition_version == 1);
  CHECK_FALSE(dense_outcome.summary->hybrid);
}

TEST_CASE("graphs are prepared on the engine's thread between the steps of running requests; a stopped engine refuses") {
  Fixture fixture;
  fixture.OfferPartition(1);
  auto running = fixture.engine->Submit(fixture.Request(kPrompt, 40));
  REQUIRE(running.ok());
  AwaitFirstChunk(**running);
  // On the CPU nothing is captured, but the work goes through the engine's thread as on CUDA.
  CHECK(fixture.engine->PrepareGraphs(fixture.partitions->Active().partition).ok());
  CHECK(fixture.engine->PrepareGraphs(nullptr).ok());
  const Outcome outcome = Drain(**running);
  REQUIRE(outcome.summary.has_value());
  CHECK(outcome.summary->completion_tokens == 40);
  fixture.engine->Shutdown();
  CHECK(fixture.engine->PrepareGraphs(nullptr).code() == absl::StatusCode::kUnavailable);
}

TEST_CASE("a generated id outside the tokenizer's vocabulary (padded embedding rows) streams without text") {
  const std::unique_ptr<Tokenizer> tokenizer = Tokenizer::FromFile(kModelDir + "/tokenizer.json").value();
  MetricsRegistry metrics;
  OutputMetrics counters;
  counters.succeeded = &metrics.AddCounter("ok", "");
  counters.failed = &metrics.AddCounter("failed", "");
  counters.cancelled = &metrics.AddCounter("cancelled", "");
  counters.generated_tokens = &metrics.AddCounter("tokens", "");
  counters.prompt_tokens = &metrics.AddCounter("prompt", "");
  counters.time_to_first_token = &metrics.AddHistogram("ttft", "", {1});
  counters.token_latency = &metrics.AddHistogram("latency", "", {1});
  OutputProcessor output(/*stop_ids=*/{}, /*max_context_tokens=*/1000, counters);
  GenerationRequest generation;
  generation.prompt_ids = tokenizer->Encode("a").value();
  generation.max_new_tokens = 3;
  EngineRequest request(1, generation, *tokenizer);
  const int32_t word = tokenizer->Encode(" harbour").value().back();
  CHECK_FALSE(output.Process(request, word));
  CHECK_FALSE(output.Process(request, tokenizer->vocab_size() + 5));
  CHECK(output.Process(request, word));
  output.Complete(request, std::nullopt);
  const Outcome outcome = Drain(*request.stream);
  CHECK(outcome.error.ok());
  CHECK(outcome.ids == std::vector<int32_t>{word, tokenizer->vocab_size() + 5, word});
  CHECK(outcome.text == tokenizer->Decode({word, word}).value());
}

TEST_CASE("stop sequences end the text before them") {
  Fixture fixture;
  auto free_run = fixture.engine->Submit(fixture.Request(kPrompt, 24));
  REQUIRE(free_run.ok());
  const Outcome full = Drain(**free_run);
  REQUIRE(full.text.size() > 12);
  const std::string stop = full.text.substr(6, 4);
  const std::string expected = full.text.substr(0, full.text.find(stop));

  GenerationRequest request = fixture.Request(kPrompt, 24);
  request.stop_sequences = {stop, "a stop that never comes"};
  auto stopped = fixture.engine->Submit(request);
  REQUIRE(stopped.ok());
  const Outcome outcome = Drain(**stopped);
  REQUIRE(outcome.summary.has_value());
  CHECK(outcome.summary->finish_reason == FinishReason::kStopSequence);
  CHECK(outcome.text == expected);
}

// The request the faults aim at is the one with this seed.
constexpr uint64_t kFaultySeed = 13;

bool HoldsFaulty(const std::vector<const GenerationRequest*>& requests) {
  return std::any_of(requests.begin(), requests.end(),
                     [](const GenerationRequest* request) { return request->seed == kFaultySeed; });
}

TEST_CASE("a failing step fails only its requests, frees their pages, and the engine serves on") {
  enum class Fault { kKernelCheck, kOutOfMemory, kPageAllocation };
  Fault fault = Fault::kKernelCheck;
  SECTION("a kernel check throws in a decode step") { fault = Fault::kKernelCheck; }
  SECTION("the step runs out of device memory") { fault = Fault::kOutOfMemory; }
  SECTION("a KV page allocation fails") { fault = Fault::kPageAllocation; }
  // Armed once the healthy request streams; fires once, in a step of the faulty request.
  auto armed = std::make_shared<std::atomic<bool>>(false);
  // Set by the faulty request's prefill step, for the page allocation that step makes.
  auto allocation_due = std::make_shared<std::atomic<bool>>(false);
  auto faulty_steps = std::make_shared<std::atomic<int>>(0);
  auto faults = std::make_shared<StepFaults>();
  faults->before_step = [=](const std::vector<const GenerationRequest*>& requests) {
    if (!*armed || !HoldsFaulty(requests)) return;
    if (fault == Fault::kPageAllocation) {
      allocation_due->store(true);
      armed->store(false);
      return;
    }
    // Its first step is its prefill (the prompt is one chunk), the second its first decode step.
    if (++*faulty_steps < 2) return;
    armed->store(false);
    TORCH_CHECK_WITH(OutOfMemoryError, fault != Fault::kOutOfMemory, "injected: CUDA out of memory");
    TORCH_CHECK(false, "injected: hybrid decode launch failed: invalid argument");
  };
  faults->page_allocation = [=](int64_t pages) {
    if (!allocation_due->exchange(false)) return absl::OkStatus();
    return absl::ResourceExhaustedError(absl::StrCat("injected: no device memory for ", pages, " KV pages"));
  };
  EngineOptions options;
  options.faults = faults;
  Fixture fixture(options);

  auto healthy = fixture.engine->Submit(fixture.Request(kPrompt, 24));
  REQUIRE(healthy.ok());
  GenerationEvent first_chunk;
  while (first_chunk.kind != GenerationEvent::Kind::kChunk) first_chunk = (*healthy)->Next(milliseconds(1000));
  armed->store(true);
  GenerationRequest faulty_request = fixture.Request("A different prompt, so that it prefills apart", 24);
  faulty_request.seed = kFaultySeed;
  // Its own backend (an audited one), so that it decodes in a step of its own.
  faulty_request.attention = PolicySpec::Defaults(PolicyKind::kDense);
  faulty_request.attention->audit = true;
  auto faulty = fixture.engine->Submit(faulty_request);
  REQUIRE(faulty.ok());

  const Outcome failed = Drain(**faulty);
  Outcome served = Drain(**healthy);
  served.ids.insert(served.ids.begin(), first_chunk.token_ids.begin(), first_chunk.token_ids.end());
  INFO(failed.error);
  const std::string message(failed.error.message());
  switch (fault) {
    case Fault::kKernelCheck:
      CHECK(failed.error.code() == absl::StatusCode::kInternal);
      CHECK(message.find("decode step failed: injected: hybrid decode launch failed") != std::string::npos);
      break;
    case Fault::kOutOfMemory:
      CHECK(failed.error.code() == absl::StatusCode::kResourceExhausted);
      CHECK(message.find("decode step ran out of memory: injected") != std::string::npos);
      break;
    case Fault::kPageAllocation:
      CHECK(failed.error.code() == absl::StatusCode::kResourceExhausted);
      CHECK(message.find("injected: no device memory for 1 KV pages") != std::string::npos);
      break;
  }
  CHECK_FALSE(*armed);
  CHECK_FALSE(*allocation_due);
  REQUIRE(served.summary.has_value());
  CHECK(served.summary->completion_tokens == 24);
  CHECK(fixture.WaitForIdle());
  CHECK(fixture.Metric("lychee_failed_steps_total") == 1);
  CHECK(fixture.Metric("lychee_requests_total{outcome=\"error\"}") == 1);

  // Later requests are served, the same one again among them, and the healthy one generated what it
  // would have alone.
  auto again = fixture.engine->Submit(faulty_request);
  auto alone = fixture.engine->Submit(fixture.Request(kPrompt, 24));
  REQUIRE(again.ok());
  REQUIRE(alone.ok());
  const Outcome retried = Drain(**again);
  CHECK(retried.error.ok());
  CHECK(retried.ids.size() == 24);
  CHECK(Drain(**alone).ids == served.ids);
  CHECK(fixture.WaitForIdle());
}

std::string LongPrompt(int repeats = 24) {
  std::string text;
  for (int i = 0; i < repeats; ++i) absl::StrAppend(&text, kPrompt, " ");
  return text;
}

// Positions one KV head reads over the dense decode steps of a sequence, from the step of
// completion token `from` to the last: the step of token k attends to prompt + k positions.
int64_t DensePositions(int64_t prompt_tokens, int64_t from, int64_t completion_tokens) {
  int64_t positions = 0;
  for (int64_t k = from; k < completion_tokens; ++k) positions += prompt_tokens + k;
  return positions;
}

TEST_CASE("max_dropped_mass switches a sequence to dense attention once an audited step drops more") {
  Fixture fixture;
  GenerationRequest request = fixture.Request(LongPrompt(), 12);
  // Sparse in every layer, two pages of 16 tokens per head.
  PolicySpec quest = PolicySpec::Defaults(PolicyKind::kQuest);
  quest.token_budget = 32;
  quest.quest_dense_layers = 0;
  request.attention = quest;
  const int64_t prompt_tokens = static_cast<int64_t>(request.prompt_ids.size());
  REQUIRE(prompt_tokens > 4 * quest.token_budget);
  // The summary of a generation that must succeed.
  const auto summary_of = [&](const GenerationRequest& generation) {
    auto stream = fixture.engine->Submit(generation);
    INFO(stream.status());
    REQUIRE(stream.ok());
    const Outcome outcome = Drain(**stream);
    INFO(outcome.error);
    REQUIRE(outcome.summary.has_value());
    return *outcome.summary;
  };

  SECTION("a bound the first decode step exceeds: dense from its token on") {
    request.max_dropped_mass = 0.0;
    const GenerationSummary summary = summary_of(request);
    REQUIRE(summary.dense_fallback.has_value());
    // Token 0 comes from the (dense) prefill, token 1 from the first decode step.
    CHECK(summary.dense_fallback->token_index == 1);
    CHECK(summary.dense_fallback->dropped_mass > 0);
    CHECK(summary.dense_fallback->max_dropped_mass == 0);
    CHECK(summary.dense_fallback->Reason().find("completion token 1 dropped") != std::string::npos);
    REQUIRE(summary.telemetry.has_value());
    CHECK(summary.telemetry->audited);
    CHECK(summary.telemetry->max_dropped_mass == summary.dense_fallback->dropped_mass);
    // Every head read its whole cache from token 2 on, and at most that plus the first step's.
    const int64_t completion_tokens = summary.completion_tokens;
    REQUIRE(completion_tokens > 2);
    for (int64_t positions : summary.telemetry->tokens_attended) {
      CHECK(positions >= DensePositions(prompt_tokens, 2, completion_tokens));
      CHECK(positions <= DensePositions(prompt_tokens, 1, completion_tokens));
    }
    CHECK(fixture.Metric("lychee_dense_fallbacks_total") == 1);
  }
  SECTION("a bound no step exceeds: sparse throughout, and audited") {
    request.max_dropped_mass = 1.0;
    const GenerationSummary summary = summary_of(request);
    CHECK_FALSE(summary.dense_fallback.has_value());
    REQUIRE(summary.telemetry.has_value());
    CHECK(summary.telemetry->audited);
    CHECK(summary.telemetry->max_dropped_mass > 0);
    for (int64_t positions : summary.telemetry->tokens_attended) {
      CHECK(positions <= quest.token_budget * (summary.completion_tokens - 1));
    }
    CHECK(fixture.Metric("lychee_dense_fallbacks_total") == 0);
  }
  SECTION("hybrid attention of the active partition is audited and bounded too") {
    // Four blocks of 64 tokens: the sink's, the recent two and one selected, of the prompt's eight.
    fixture.OfferPartition(1, /*budget=*/256);
    GenerationRequest hybrid = fixture.Request(LongPrompt(48), 8);
    REQUIRE(hybrid.prompt_ids.size() > 7 * 64);
    hybrid.max_dropped_mass = 0.0;
    const GenerationSummary summary = summary_of(hybrid);
    CHECK(summary.hybrid);
    REQUIRE(summary.dense_fallback.has_value());
    CHECK(summary.dense_fallback->token_index == 1);
  }
  CHECK(fixture.WaitForIdle());
}

TEST_CASE("a canary's sequences are audited at the server's period and decide it: rolled back, or promoted") {
  EngineOptions options;
  options.audit_every = 4;
  Fixture fixture(options);
  REQUIRE(fixture.partitions->SetHold(true).ok());
  fixture.OfferPartition(1, /*budget=*/256);
  fixture.OfferPartition(2, /*budget=*/256);
  REQUIRE(fixture.partitions->SetHold(false).ok());
  REQUIRE(fixture.partitions->Activate(1).ok());
  // Longer than the budget, so that the sparse heads drop some mass.
  const GenerationRequest request = fixture.Request(LongPrompt(48), 6);
  REQUIRE(request.prompt_ids.size() > 7 * 64);
  CanaryBounds bounds;
  bounds.sequences = 2;
  bounds.max_latency_ratio = 1000;
  const auto run_canary = [&] {
    for (int i = 0; i < bounds.sequences; ++i) {
      auto stream = fixture.engine->Submit(request);
      REQUIRE(stream.ok());
      const Outcome outcome = Drain(**stream);
      INFO(outcome.error);
      REQUIRE(outcome.summary.has_value());
      CHECK(outcome.summary->partition_version == 2);
      REQUIRE(outcome.summary->telemetry.has_value());
      CHECK(outcome.summary->telemetry->audited);
    }
    return *fixture.partitions->Canary();
  };

  SECTION("a bound every sparse step exceeds: rolled back, version 1 stays") {
    bounds.max_dropped_mass = 0;
    REQUIRE(fixture.partitions->StartCanary(2, 1.0, bounds).ok());
    const CanaryRecord canary = run_canary();
    CHECK(canary.state == CanaryState::kRolledBack);
    CHECK(canary.canary.audited_sequences == 2);
    CHECK(canary.canary.mean_dropped_mass() > 0);
    CHECK(fixture.partitions->Active().partition->version == 1);
  }
  SECTION("a bound no step exceeds: promoted, version 2 active") {
    bounds.max_dropped_mass = 1;
    REQUIRE(fixture.partitions->StartCanary(2, 1.0, bounds).ok());
    const CanaryRecord canary = run_canary();
    CHECK(canary.state == CanaryState::kPromoted);
    CHECK(canary.canary.errors == 0);
    CHECK(canary.canary.tokens > 0);
    CHECK(fixture.partitions->Active().partition->version == 2);
    CHECK(fixture.partitions->Active().activated_by == "canary");
  }
  CHECK(fixture.WaitForIdle());
}

TEST_CASE("max_dropped_mass outside [0, 1] is INVALID_ARGUMENT naming the field") {
  Fixture fixture;
  for (const double bound : {-0.1, 1.5, std::nan("")}) {
    GenerationRequest request = fixture.Request(kPrompt, 4);
    request.attention = PolicySpec::Defaults(PolicyKind::kQuest);
    request.max_dropped_mass = bound;
    auto stream = fixture.engine->Submit(request);
    INFO(bound);
    REQUIRE_FALSE(stream.ok());
    CHECK(stream.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(stream.status().message()).find("attention.max_dropped_mass must be in [0, 1]") !=
          std::string::npos);
  }
  CHECK(fixture.Metric("lychee_dense_fallbacks_total") == 0);
  CHECK(fixture.WaitForIdle());
}

}  // namespace
}  // namespace lychee
