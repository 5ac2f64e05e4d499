// The commands tensor-parallel rank 0 sends its followers (inference/rank_mirror.h), serving's and
// shadow validation's: every field survives the bytes, and bytes it did not make are refused.
#include <catch2/catch.hpp>

#include <cstdint>
#include <string>

#include "inference/rank_mirror.h"

namespace lychee {
namespace {

TEST_CASE("A start command carries every field of the policy and the partition bytes") {
  RankCommand command;
  command.op = RankOp::kStart;
  command.request_ids = {42};
  command.partition_version = 7;
  command.partition = std::string("\0partition\xff", 11);
  PolicySpec& policy = command.policy;
  policy.kind = PolicyKind::kTidal;
  policy.partition_version = 7;
  policy.from_partition.block_size = true;
  policy.from_partition.recent_tokens = true;
  policy.token_budget = 333;
  policy.block_size = 32;
  policy.sink_tokens = 5;
  policy.recent_tokens = 6;
  policy.p1 = 0.81;
  policy.p2 = 0.42;
  policy.clusters = 9;
  policy.kmeans_iterations = 3;
  policy.tail_tokens = 11;
  policy.prhs_selectors.recency = false;
  policy.prhs_enlargement = 2;
  policy.prhs_window = 77;
  policy.tidal_selection_layers = {1, 4};
  policy.page_size = 8;
  policy.quest_dense_layers = 1;
  policy.audit = true;
  policy.audit_every = 3;

  absl::StatusOr<RankCommand> decoded = DecodeRankCommand(EncodeRankCommand(command));
  REQUIRE(decoded.ok());
  CHECK(decoded->op == RankOp::kStart);
  CHECK(decoded->request_ids == command.request_ids);
  CHECK(decoded->partition_version == 7);
  CHECK(decoded->partition == command.partition);
  const PolicySpec& got = decoded->policy;
  CHECK(got.kind == PolicyKind::kTidal);
  CHECK(got.partition_version == std::optional<uint64_t>(7));
  CHECK_FALSE(got.from_partition.token_budget);
  CHECK(got.from_partition.block_size);
  CHECK_FALSE(got.from_partition.sink_tokens);
  CHECK(got.from_partition.recent_tokens);
  CHECK(got.token_budget == 333);
  CHECK(got.block_size == 32);
  CHECK(got.sink_tokens == 5);
  CHECK(got.recent_tokens == 6);
  CHECK(got.p1 == 0.81);
  CHECK(got.p2 == 0.42);
  CHECK(got.clusters == 9);
  CHECK(got.kmeans_iterations == 3);
  CHECK(got.tail_tokens == 11);
  CHECK(got.prhs_selectors.temporal);
  CHECK_FALSE(got.prhs_selectors.recency);
  CHECK(got.prhs_selectors.cross_layer);
  CHECK(got.prhs_enlargement == 2);
  CHECK(got.prhs_window == 77);
  CHECK(got.tidal_selection_layers == std::vector<int64_t>{1, 4});
  CHECK(got.page_size == 8);
  CHECK(got.quest_dense_layers == 1);
  CHECK(got.audit);
  CHECK(got.audit_every == 3);
  CHECK(got.Describe() == policy.Describe());
}

TEST_CASE("A start command whose policy fields do not make the policy rank 0 described is refused") {
  // As a PolicySpec field that the encoding missed would arrive: a parameter the policy uses
  // differs from rank 0's, and the description sent beside the fields tells.
  RankCommand command;
  command.op = RankOp::kStart;
  command.request_ids = {42};
  command.policy = PolicySpec::Defaults(PolicyKind::kTidal);
  command.policy.token_budget = 333;
  std::string bytes = EncodeRankCommand(command);
  const int64_t budget = 333;
  const size_t at = bytes.find(std::string(reinterpret_cast<const char*>(&budget), sizeof(budget)));
  REQUIRE(at != std::string::npos);
  REQUIRE(DecodeRankCommand(bytes).ok());
  const int64_t other = 334;
  bytes.replace(at, sizeof(other), reinterpret_cast<const char*>(&other), sizeof(other));
  const absl::Status status = DecodeRankCommand(bytes).status();
  CHECK(absl::IsInvalidArgument(status));
  CHECK_THAT(std::string(status.message()), Catch::Contains("rank 0 sent"));
}

TEST_CASE("A decode command carries its rows' requests and tokens, and whether to combine the dropped mass") {
  for (bool combine : {false, true}) {
    RankCommand command{RankOp::kDecode, {3, 1, 2}, {100, -1, 8191}};
    command.combine_dropped_mass = combine;
    absl::StatusOr<RankCommand> decoded = DecodeRankCommand(EncodeRankCommand(command));
    REQUIRE(decoded.ok());
    CHECK(decoded->op == RankOp::kDecode);
    CHECK(decoded->request_ids == command.request_ids);
    CHECK(decoded->token_ids == command.token_ids);
    CHECK(decoded->combine_dropped_mass == combine);
  }
}

TEST_CASE("Bytes the encoder did not make are refused") {
  const std::string bytes = EncodeRankCommand({RankOp::kPrefill, {5}, {1, 2, 3}});
  for (size_t length = 0; length < bytes.size(); ++length) {
    INFO("truncated to " << length);
    CHECK(absl::IsInvalidArgument(DecodeRankCommand(bytes.substr(0, length)).status()));
  }
  // A decode command's last byte is its combine flag.
  const std::string decode = EncodeRankCommand({RankOp::kDecode, {5}, {1}});
  CHECK(absl::IsInvalidArgument(DecodeRankCommand(decode.substr(0, decode.size() - 1)).status()));
  CHECK(absl::IsInvalidArgument(DecodeRankCommand(bytes + "x").status()));
  std::string unknown = bytes;
  unknown[0] = 99;
  CHECK(absl::IsInvalidArgument(DecodeRankCommand(unknown).status()));
  CHECK(absl::IsInvalidArgument(DecodeRankCommand(EncodeRankCommand({RankOp::kPreempt})).status()));
  CHECK(DecodeRankCommand(EncodeRankCommand({RankOp::kShutdown})).ok());
}

TEST_CASE("A validation command carries the partition, the budget and every prompt and answer") {
  ValidationCommand command{ValidationOp::kValidate, std::string("\0partition\xff", 11), 256};
  ValidationSet::Task passkey{"passkey", 1024, {}};
  passkey.samples.resize(2);
  passkey.samples[0].prompt_ids = {1, 2, 3};
  passkey.samples[0].answer_ids = {4};
  passkey.samples[1].prompt_ids = {8191, 0};
  passkey.samples[1].answer_ids = {5, 6};
  command.tasks = {passkey, {"multikey", 7, {}}};
  const std::string bytes = EncodeValidationCommand(command);
  absl::StatusOr<ValidationCommand> decoded = DecodeValidationCommand(bytes);
  REQUIRE(decoded.ok());
  CHECK(decoded->op == ValidationOp::kValidate);
  CHECK(decoded->partition == command.partition);
  CHECK(decoded->token_budget == 256);
  REQUIRE(decoded->tasks.size() == 2);
  CHECK(decoded->tasks[0].name == "passkey");
  CHECK(decoded->tasks[0].longest_prompt_tokens == 1024);
  REQUIRE(decoded->tasks[0].samples.size() == 2);
  for (size_t i = 0; i < 2; ++i) {
    CHECK(decoded->tasks[0].samples[i].prompt_ids == passkey.samples[i].prompt_ids);
    CHECK(decoded->tasks[0].samples[i].answer_ids == passkey.samples[i].answer_ids);
  }
  CHECK(decoded->tasks[1].name == "multikey");
  CHECK(decoded->tasks[1].longest_prompt_tokens == 7);
  CHECK(decoded->tasks[1].samples.empty());

  for (size_t length = 0; length < bytes.size(); ++length) {
    INFO("truncated to " << length);
    CHECK(absl::IsInvalidArgument(DecodeValidationCommand(bytes.substr(0, length)).status()));
  }
  CHECK(absl::IsInvalidArgument(DecodeValidationCommand(bytes + "x").status()));
  CHECK(absl::IsInvalidArgument(DecodeValidationCommand(std::string(1, '\x63')).status()));
  CHECK(DecodeValidationCommand(EncodeValidationCommand({ValidationOp::kKeepAlive})).ok());
  CHECK(DecodeValidationCommand(EncodeValidationCommand({ValidationOp::kStop})).ok());
}

}  // namespace
}  // namespace lychee
