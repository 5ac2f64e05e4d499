// AttentionOptions at the service edge, without a server: the deprecated flat fields translated
// into the per-policy messages of `choice`, a request with both forms refused, and bad values
// refused naming the field.
#include <catch2/catch.hpp>

#include <google/protobuf/text_format.h>
#include <google/protobuf/util/message_differencer.h>

#include <string>
#include <vector>

#include "inference/generate_request.h"

namespace lychee {
namespace {

v1::AttentionOptions Options(const std::string& text) {
  v1::AttentionOptions options;
  REQUIRE(google::protobuf::TextFormat::ParseFromString(text, &options));
  return options;
}

TEST_CASE("the deprecated attention fields translate into the policy's message") {
  struct Translation {
    std::string legacy;
    std::string current;
    std::string described;  // the engine's spec of the translation, lychee before its partition is known
  };
  const std::vector<Translation> translations = {
      {"mode: ATTENTION_MODE_DENSE", "dense {}", "dense"},
      {"mode: ATTENTION_MODE_HYBRID token_budget: 128 partition_version: 3",
       "lychee { token_budget: 128 partition_version: 3 }", "lychee budget=128 block=64 sink=64 recent=64"},
      // A budget or a version alone asked for the server's default, hybrid.
      {"partition_version: 3", "lychee { partition_version: 3 }", "lychee budget=4096 block=64 sink=64 recent=64"},
      {"policy { name: 'dense' audit: true audit_every: 4 }", "dense {} audit: true audit_every: 4",
       "dense audit every=4"},
      // The flat form's lychee took the authors' defaults, not the partition's selection.
      {"token_budget: 512 policy { name: 'hybrid' block_size: 32 }",
       "lychee { token_budget: 512 block_size: 32 sink_tokens: 64 recent_tokens: 64 }",
       "lychee budget=512 block=32 sink=64 recent=64"},
      {"token_budget: 64 policy { name: 'quest' page_size: 8 quest_dense_layers: 1 sink_tokens: 4 recent_tokens: 8 "
       "p1: 0.5 }",
       "quest { token_budget: 64 page_size: 8 dense_layers: 1 sink_tokens: 4 recent_tokens: 8 }",
       "quest budget=64 page=8 dense_layers=1 sink=4 recent=8"},
      {"token_budget: 256 policy { name: 'prhs' block_size: 32 prhs_selectors: 'temporal' prhs_selectors: 'recency' "
       "prhs_enlargement: 2 prhs_window: 128 }",
       "prhs { token_budget: 256 block_size: 32 selectors: 'temporal' selectors: 'recency' enlargement: 2 window: 128 "
       "}",
       "prhs budget=256 block=32 sink=64 recent=64 selectors=temporal,recency enlargement=2 window=128"},
      {"policy { name: 'double-p' p1: 0.9 p2: 0.5 clusters: 16 kmeans_iterations: 3 sink_tokens: 4 recent_tokens: 8 "
       "tail_tokens: 32 }",
       "double_p { p1: 0.9 p2: 0.5 clusters: 16 kmeans_iterations: 3 sink_tokens: 4 recent_tokens: 8 tail_tokens: 32 }",
       "double-p p1=0.9 p2=0.5 clusters=16 iterations=3 sink=4 recent=8 tail=32"},
      {"token_budget: 128 partition_version: 2 policy { name: 'streaming' sink_tokens: 16 }",
       "streaming { token_budget: 128 sink_tokens: 16 partition_version: 2 }", "streaming budget=128 sink=16"},
      {"token_budget: 64 policy { name: 'tidal' sink_tokens: 2 recent_tokens: 4 tidal_selection_layers: [1, 3] }",
       "tidal { token_budget: 64 sink_tokens: 2 recent_tokens: 4 selection_layers: [1, 3] }",
       "tidal budget=64 sink=2 recent=4 selection_layers=1,3"},
      {"max_dropped_mass: 0.25 policy { name: 'quest' audit: true }", "quest {} audit: true max_dropped_mass: 0.25",
       "quest budget=4096 page=16 dense_layers=2 sink=0 recent=0 audit every=16"},
  };
  for (const Translation& translation : translations) {
    INFO(translation.legacy);
    const absl::StatusOr<v1::AttentionOptions> translated = TranslateLegacyAttention(Options(translation.legacy));
    REQUIRE(translated.ok());
    const v1::AttentionOptions expected = Options(translation.current);
    INFO("got " << translated->ShortDebugString());
    CHECK(google::protobuf::util::MessageDifferencer::Equals(*translated, expected));
    // The current form is left as it is.
    const absl::StatusOr<v1::AttentionOptions> unchanged = TranslateLegacyAttention(expected);
    REQUIRE(unchanged.ok());
    CHECK(google::protobuf::util::MessageDifferencer::Equals(*unchanged, expected));

    absl::StatusOr<std::optional<PolicySpec>> spec = ToPolicySpec(*translated);
    REQUIRE(spec.ok());
    REQUIRE(spec->has_value());
    if ((*spec)->audit && (*spec)->audit_every == 0) (*spec)->audit_every = kDefaultAuditEvery;
    CHECK((*spec)->Describe() == translation.described);
  }
}

TEST_CASE("lychee's unset selection parameters are the partition's; no attention is the server's default") {
  const absl::StatusOr<std::optional<PolicySpec>> spec =
      ToPolicySpec(Options("lychee { block_size: 32 partition_version: 7 }"));
  REQUIRE(spec.ok());
  REQUIRE(spec->has_value());
  CHECK((*spec)->partition_version == 7u);
  SelectionParams selection;
  selection.token_budget = 768;
  selection.block_size = 128;
  selection.sink_tokens = 0;
  selection.recent_tokens = 256;
  CHECK((*spec)->WithPartitionSelection(selection).Describe() == "lychee budget=768 block=32 sink=0 recent=256");

  const absl::StatusOr<std::optional<PolicySpec>> server_default = ToPolicySpec(Options("max_dropped_mass: 0.5"));
  REQUIRE(server_default.ok());
  CHECK_FALSE(server_default->has_value());
}

TEST_CASE("a request that sets both forms, or a bad value, is INVALID_ARGUMENT naming the fields") {
  struct Bad {
    std::string options;
    std::vector<std::string> named;
  };
  const std::vector<Bad> translations = {
      {"mode: ATTENTION_MODE_DENSE quest {}", {"attention.mode", "attention.quest", "not both"}},
      {"token_budget: 64 policy { name: 'quest' } audit: true",
       {"attention.token_budget", "attention.policy", "attention.audit"}},
      {"partition_version: 2 lychee { token_budget: 64 }", {"attention.partition_version", "attention.lychee"}},
      {"mode: ATTENTION_MODE_HYBRID policy { name: 'quest' }", {"a mode or a policy"}},
      {"mode: ATTENTION_MODE_DENSE token_budget: 64", {"attention.token_budget"}},
      {"mode: 7", {"attention.mode"}},
      {"policy { name: 'magic' }", {"attention.policy.name", "magic"}},
      {"policy { page_size: 8 }", {"attention.policy.name", "required"}},
      {"partition_version: 2 policy { name: 'quest' }", {"attention.partition_version", "quest"}},
  };
  for (const Bad& bad : translations) {
    INFO(bad.options);
    const absl::StatusOr<v1::AttentionOptions> translated = TranslateLegacyAttention(Options(bad.options));
    REQUIRE_FALSE(translated.ok());
    CHECK(translated.status().code() == absl::StatusCode::kInvalidArgument);
    for (const std::string& named : bad.named) {
      INFO(translated.status().message());
      CHECK(translated.status().message().find(named) != absl::string_view::npos);
    }
  }
  for (const Bad& bad : std::vector<Bad>{{"prhs { selectors: 'sideways' }", {"attention.prhs.selectors", "sideways"}},
                                         {"audit: true", {"attention.audit"}},
                                         {"audit_every: 2", {"attention.audit"}}}) {
    INFO(bad.options);
    const absl::StatusOr<std::optional<PolicySpec>> spec = ToPolicySpec(Options(bad.options));
    REQUIRE_FALSE(spec.ok());
    CHECK(spec.status().code() == absl::StatusCode::kInvalidArgument);
    for (const std::string& named : bad.named) {
      INFO(spec.status().message());
      CHECK(spec.status().message().find(named) != absl::string_view::npos);
    }
  }
}

}  // namespace
}  // namespace lychee
