// HeadPartition: validation, the proto conversion both ways, and the hand-written JSON form.
#include <catch2/catch.hpp>

#include "common/base/head_partition.h"
#include "lychee/v1/head_partition.pb.h"

namespace lychee {
namespace {

const std::string kExample = "models/tiny-llama-retrieval/partitions/retrieval-head-0.json";

ModelConfig TinyShape() {
  ModelConfig config;
  config.num_layers = 6;
  config.num_kv_heads = 2;
  return config;
}

TEST_CASE("the bundled hand-written partition loads and fits the bundled model") {
  auto partition = LoadHeadPartitionJson(kExample);
  REQUIRE(partition.ok());
  CHECK(partition->ValidateFor(TinyShape()).ok());
  CHECK(partition->role(0, 1) == HeadRole::kRetrieval);
  CHECK(partition->role(3, 0) == HeadRole::kRetrieval);
  CHECK(partition->role(3, 1) == HeadRole::kSparse);
  CHECK(partition->selection().token_budget == 1024);
  CHECK(partition->RetrievalDensity() == Approx(0.5));
}

TEST_CASE("proto and JSON conversions keep every field") {
  HeadPartition partition = HeadPartition::AllRetrieval(3, 4, SelectionParams{32, 512, 0, 96});
  partition.set_role(2, 3, HeadRole::kSparse);
  partition.model_fingerprint = "abc123";
  partition.version = 7;
  partition.source = "unit test";
  partition.created_unix_seconds = 1700000000;
  partition.gates.push_back({2, 3, 0.5, 2.0, 0.25});
  partition.training.steps = 300;
  partition.training.target_density = 0.25;
  partition.training.job_name = "jobs/1";

  auto back = HeadPartitionFromProto(HeadPartitionToProto(partition));
  REQUIRE(back.ok());
  auto json = HeadPartitionToJson(partition);
  REQUIRE(json.ok());
  auto from_json = HeadPartitionFromJson(*json, "roundtrip");
  REQUIRE(from_json.ok());
  for (const HeadPartition* copy : {&*back, &*from_json}) {
    CHECK(copy->role(2, 3) == HeadRole::kSparse);
    CHECK(copy->role(2, 2) == HeadRole::kRetrieval);
    CHECK(copy->selection().block_size == 32);
    CHECK(copy->selection().token_budget == 512);
    CHECK(copy->selection().sink_tokens == 0);  // an explicit zero is not the default
    CHECK(copy->selection().recent_tokens == 96);
    CHECK(copy->model_fingerprint == "abc123");
    CHECK(copy->version == 7);
    CHECK(copy->created_unix_seconds == 1700000000);
    REQUIRE(copy->gates.size() == 1);
    CHECK(copy->gates[0].b == 2.0);
    CHECK(copy->training.steps == 300);
    CHECK(copy->training.job_name == "jobs/1");
  }
}

TEST_CASE("omitted selection parameters take the defaults") {
  auto partition = HeadPartitionFromJson(
      R"({"numLayers": 1, "numKvHeads": 1, "layers": [{"kvHeads": ["HEAD_ROLE_RETRIEVAL"]}]})", "inline");
  REQUIRE(partition.ok());
  CHECK(partition->selection().block_size == 64);
  CHECK(partition->selection().token_budget == 4096);
  CHECK(partition->selection().sink_tokens == 64);
  CHECK(partition->selection().recent_tokens == 64);
}

TEST_CASE("partitions that do not fit are refused with a message naming the problem") {
  const auto error_of = [](const std::string& json) {
    auto partition = HeadPartitionFromJson(json, "bad.json");
    REQUIRE_FALSE(partition.ok());
    CHECK(partition.status().code() == absl::StatusCode::kInvalidArgument);
    return std::string(partition.status().message());
  };
  const std::string two_layers = R"("numLayers": 2, "numKvHeads": 1, "layers": [{"kvHeads": ["HEAD_ROLE_RETRIEVAL"]}, {"kvHeads": ["HEAD_ROLE_SPARSE"]}])";
  CHECK_THAT(error_of("{" + two_layers + R"(, "blockSize": 48})"), Catch::Contains("power of two"));
  CHECK_THAT(error_of("{" + two_layers + R"(, "blockSize": 64, "tokenBudget": 32})"), Catch::Contains("below one block"));
  CHECK_THAT(error_of("{" + two_layers + R"(, "tokenBudget": 192})"), Catch::Contains("sink and recent"));
  CHECK_THAT(error_of(R"({"numLayers": 1, "numKvHeads": 1, "layers": [{"kvHeads": ["HEAD_ROLE_SPARSE"]}]})"),
             Catch::Contains("layer 0 must be dense"));
  CHECK_THAT(error_of(R"({"numLayers": 2, "numKvHeads": 1, "layers": [{"kvHeads": ["HEAD_ROLE_RETRIEVAL"]}]})"),
             Catch::Contains("2") && Catch::Contains("1 layers are listed"));
  CHECK_THAT(error_of(R"({"numLayers": 1, "numKvHeads": 2, "layers": [{"kvHeads": ["HEAD_ROLE_RETRIEVAL"]}]})"),
             Catch::Contains("layer 0 lists 1 KV heads"));
  CHECK_THAT(error_of(R"({"numLayers": 1, "numKvHeads": 1, "layers": [{"kvHeads": ["HEAD_ROLE_UNSPECIFIED"]}]})"),
             Catch::Contains("has no role"));
  CHECK_THAT(error_of(R"({"numLayers": 1, "numKvHeads": 1, "layers": [{"kvHeads": ["RETRIEVER"]}]})"),
             Catch::Contains("bad.json"));
  CHECK_THAT(error_of(R"({"numLayers": 1, "numKvHeads": )"), Catch::Contains("bad.json"));

  auto fits_other = LoadHeadPartitionJson(kExample);
  REQUIRE(fits_other.ok());
  ModelConfig other = TinyShape();
  other.num_kv_heads = 8;
  CHECK_THAT(std::string(fits_other->ValidateFor(other).message()), Catch::Contains("the model has 6 layers of 8"));
  CHECK(LoadHeadPartitionJson("/nonexistent.json").status().code() == absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace lychee
