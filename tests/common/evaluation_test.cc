// The evaluation harness on the bundled model, small: one cell per (policy, task, context), the
// telemetry it reports, a shared prefill giving what a policy's own prefill gives, and the JSON
// and SVG outputs.
#include "tests/torch_catch.h"

#include <nlohmann/json.hpp>

#include "common/eval/evaluation.h"
#include "kernels/policy_backend.h"

namespace lychee {
namespace {

TEST_CASE("the harness runs every policy on the same samples and reports their reads") {
  auto model = Model::Load("models/tiny-llama-retrieval");
  REQUIRE(model.ok());
  auto tokenizer = Tokenizer::FromFile("models/tiny-llama-retrieval/tokenizer.json");
  REQUIRE(tokenizer.ok());
  auto corpus = ReadTextCorpus("data/corpus/kjv-heldout.txt.gz");
  REQUIRE(corpus.ok());
  auto builder = HaystackBuilder::Create(**tokenizer, std::move(corpus).value());
  REQUIRE(builder.ok());
  const ModelConfig& config = (*model)->config();

  auto backend = [&](const PolicySpec& spec) {
    auto made = MakePolicyBackend(spec, config, nullptr);
    REQUIRE(made.ok());
    return *made;
  };
  PolicySpec quest = PolicySpec::Defaults(PolicyKind::kQuest);
  quest.token_budget = 128;
  auto dense = backend(PolicySpec::Defaults(PolicyKind::kDense));
  const std::vector<EvalPolicy> policies = {
      {"dense", "dense", dense, true},
      {"dense-own-prefill", "dense", backend(PolicySpec::Defaults(PolicyKind::kDense)), false},
      {"quest", quest.Describe(), backend(quest), true},
  };
  EvalOptions options;
  options.tasks = {RetrievalTask::kPasskey};
  options.contexts = {384, 512};
  options.samples = 2;
  options.prefill_attention = dense;
  int reported = 0;
  auto cells = RunEvaluation(**model, *builder, policies, options, [&](const EvalCell&) { ++reported; });
  INFO(cells.status().ToString());
  REQUIRE(cells.ok());
  REQUIRE(cells->size() == 6);
  CHECK(reported == 6);
  for (size_t c = 0; c < 2; ++c) {
    const EvalCell& shared = (*cells)[3 * c];
    const EvalCell& own = (*cells)[3 * c + 1];
    const EvalCell& sparse = (*cells)[3 * c + 2];
    CHECK(shared.context == options.contexts[c]);
    REQUIRE(shared.has_telemetry);
    REQUIRE(sparse.has_telemetry);
    // A decode step attends the prompt and the tokens decoded so far: a little more than the context.
    CHECK(shared.tokens_per_head >= shared.context - HaystackBuilder::kLengthTolerance);
    CHECK(shared.tokens_per_head < shared.context + 8);
    CHECK(shared.kv_bytes_per_token ==
          Approx(shared.tokens_per_head * config.num_layers * config.num_kv_heads * 2 * config.head_dim * 4));
    CHECK(own.correct == shared.correct);
    CHECK(own.decode_steps == shared.decode_steps);
    CHECK(own.kv_bytes_per_token == shared.kv_bytes_per_token);
    CHECK(sparse.kv_bytes_per_token < shared.kv_bytes_per_token);
  }

  const auto json = nlohmann::json::parse(EvalJson(*cells, "lychee eval --test"));
  CHECK(json["command"] == "lychee eval --test");
  REQUIRE(json["results"].size() == 6);
  CHECK(json["results"][2]["policy"] == "quest");
  CHECK(json["results"][2].contains("kv_bytes_read_per_token"));
  const std::string svg = EvalPlotSvg(*cells);
  CHECK(svg.rfind("<svg", 0) == 0);
  CHECK(svg.find("dense-own-prefill") != std::string::npos);
  CHECK(svg.find("passkey") != std::string::npos);

  options.samples = 0;
  CHECK(RunEvaluation(**model, *builder, policies, options).status().code() == absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lychee
