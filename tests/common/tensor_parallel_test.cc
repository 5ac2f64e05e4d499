// Tensor-parallel decoding over Gloo against the single-process model: rank 0 runs in the test,
// ranks 1..N-1 as tensor_parallel_worker processes (RankWorkers) taking the same steps; rank 0 must
// produce the same greedy tokens and, within fp32 tolerance, the same logits, and every worker
// must exit cleanly.
#include "common/model/tensor_parallel.h"

#include <signal.h>

#include <fstream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/base/status_macros.h"
#include "common/model/model.h"
#include "common/model/rank_workers.h"
#include "harness/temp_dir.h"
#include "kernels/dense_attention.h"
#include "tests/common/tensor_parallel_generation.h"
#include "tests/torch_catch.h"

namespace lychee {
namespace {

const std::string kModelDir = "models/tiny-llama-retrieval";

using testing::Decoding;
using testing::Generation;
using testing::RunRanks;
using testing::SingleProcess;

const std::string kLearnedPartition = kModelDir + "/partitions/learned-target-0.25.json";

void RequireSameAsSingleProcess(int world_size, const Decoding& decoding) {
  INFO("TP-" << world_size);
  absl::StatusOr<Generation> reference = SingleProcess(decoding);
  REQUIRE(reference.ok());
  absl::Status workers_status;
  absl::StatusOr<Generation> rank0 = RunRanks(world_size, decoding, TENSOR_PARALLEL_WORKER, workers_status);
  INFO("rank 0: " << rank0.status() << "; workers: " << workers_status);
  REQUIRE(rank0.ok());
  CHECK(workers_status.ok());
  CHECK(rank0->tokens == reference->tokens);
  REQUIRE(rank0->logits.sizes() == reference->logits.sizes());
  const double difference = (rank0->logits - reference->logits).abs().max().item<double>();
  INFO("largest logit difference " << difference);
  CHECK(at::allclose(rank0->logits, reference->logits, /*rtol=*/1e-4, /*atol=*/1e-4));
}

std::vector<int32_t> RandomPrompt(int64_t length, int64_t vocab_size, uint64_t seed) {
  at::Generator generator = at::detail::createCPUGenerator(seed);
  const at::Tensor ids = at::randint(1, vocab_size, {length}, generator, at::kInt);
  return std::vector<int32_t>(ids.data_ptr<int32_t>(), ids.data_ptr<int32_t>() + length);
}

// A random float32 Llama checkpoint in `dir`: 8 KV heads of 16 query heads, attention biases, an
// untied LM head and a vocabulary that 4 ranks split unevenly.
void WriteRandomCheckpoint(const std::string& dir) {
  constexpr int64_t kHidden = 64, kHeads = 16, kKvHeads = 8, kHeadDim = 8, kIntermediate = 96, kLayers = 2,
                    kVocab = 250;
  std::ofstream(dir + "/config.json") << absl::StrCat(
      R"({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": )", kVocab,
      R"(, "hidden_size": )", kHidden, R"(, "intermediate_size": )", kIntermediate, R"(, "num_hidden_layers": )",
      kLayers, R"(, "num_attention_heads": )", kHeads, R"(, "num_key_value_heads": )", kKvHeads, R"(, "head_dim": )",
      kHeadDim,
      R"(, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
          "tie_word_embeddings": false, "attention_bias": true})");
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes = {{"model.embed_tokens.weight", {kVocab, kHidden}},
                                                                      {"lm_head.weight", {kVocab, kHidden}},
                                                                      {"model.norm.weight", {kHidden}}};
  for (int64_t layer = 0; layer < kLayers; ++layer) {
    const std::string prefix = absl::StrCat("model.layers.", layer, ".");
    for (const char* norm : {"input_layernorm.weight", "post_attention_layernorm.weight"}) {
      shapes.push_back({prefix + norm, {kHidden}});
    }
    shapes.push_back({prefix + "self_attn.q_proj.weight", {kHeads * kHeadDim, kHidden}});
    shapes.push_back({prefix + "self_attn.q_proj.bias", {kHeads * kHeadDim}});
    for (const char* projection : {"k_proj", "v_proj"}) {
      shapes.push_back({absl::StrCat(prefix, "self_attn.", projection, ".weight"), {kKvHeads * kHeadDim, kHidden}});
      shapes.push_back({absl::StrCat(prefix, "self_attn.", projection, ".bias"), {kKvHeads * kHeadDim}});
    }
    shapes.push_back({prefix + "self_attn.o_proj.weight", {kHidden, kHeads * kHeadDim}});
    shapes.push_back({prefix + "self_attn.o_proj.bias", {kHidden}});
    shapes.push_back({prefix + "mlp.gate_proj.weight", {kIntermediate, kHidden}});
    shapes.push_back({prefix + "mlp.up_proj.weight", {kIntermediate, kHidden}});
    shapes.push_back({prefix + "mlp.down_proj.weight", {kHidden, kIntermediate}});
  }
  at::Generator generator = at::detail::createCPUGenerator(17);
  std::vector<std::string> entries;
  std::string data;
  for (const auto& [name, shape] : shapes) {
    const at::Tensor values = at::randn(shape, generator, at::kFloat) * 0.3;
    entries.push_back(absl::StrCat("\"", name, "\": {\"dtype\": \"F32\", \"shape\": [", absl::StrJoin(shape, ", "),
                                   "], \"data_offsets\": [", data.size(), ", ", data.size() + values.nbytes(), "]}"));
    data.append(static_cast<const char*>(values.data_ptr()), values.nbytes());
  }
  std::string header = absl::StrCat("{", absl::StrJoin(entries, ", "), "}");
  header.resize((header.size() + 7) / 8 * 8, ' ');
  std::string length(8, '\0');
  for (int i = 0; i < 8; ++i) length[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  std::ofstream(dir + "/model.safetensors", std::ios::binary) << length << header << data;
}

TEST_CASE("TP-2 on the bundled model decodes as one process does, dense", "[tensor_parallel]") {
  RequireSameAsSingleProcess(2, {kModelDir, RandomPrompt(48, 8192, 1), 6});
}

TEST_CASE("TP-2 on the bundled model decodes as one process does, hybrid with the learned partition",
          "[tensor_parallel]") {
  // A budget well under the prompt, so that the sparse heads select blocks (kept small for speed).
  RequireSameAsSingleProcess(2, {kModelDir, RandomPrompt(600, 8192, 2), 6, kLearnedPartition, 256});
}

TEST_CASE("TP-2 and TP-4 on a random checkpoint of 8 KV heads decode as one process does", "[tensor_parallel]") {
  testing::TempDir dir;
  WriteRandomCheckpoint(dir.str());
  for (int world_size : {2, 4}) RequireSameAsSingleProcess(world_size, {dir.str(), RandomPrompt(40, 250, 3), 8});
}

TEST_CASE("A rank process killed mid-generation fails rank 0's next step with UNAVAILABLE", "[tensor_parallel]") {
  testing::TempDir dir;
  WriteRandomCheckpoint(dir.str());
  constexpr int kWorldSize = 4, kKilledRank = 2;
  // The workers would decode far longer than rank 0 does here.
  const Decoding decoding{dir.str(), RandomPrompt(40, 250, 4), 1000};
  auto workers = RankWorkers::Start(TENSOR_PARALLEL_WORKER, decoding.WorkerArgs(kWorldSize), kWorldSize);
  REQUIRE(workers.ok());
  absl::StatusOr<at::Tensor> logits = absl::UnknownError("rank 0 did not decode");
  {
    auto group = JoinGlooGroup((*workers)->rendezvous_file(), 0, kWorldSize, std::chrono::seconds(20));
    REQUIRE(group.ok());
    ModelOptions options;
    options.tensor_parallel = *std::move(group);
    auto model = Model::Load(dir.str(), options);
    REQUIRE(model.ok());
    auto sequence = (*model)->NewSequence(std::make_shared<DenseAttentionBackend>());
    logits = (*model)->Prefill(*sequence, decoding.prompt);
    REQUIRE(logits.ok());
    DecodeContext context;
    Sequence* batch[] = {sequence.get()};
    for (int step = 0; step < 2; ++step) {
      logits = (*model)->Decode(batch, {static_cast<int32_t>(logits->argmax().item<int64_t>())}, &context);
      REQUIRE(logits.ok());
    }
    REQUIRE(kill((*workers)->pid(kKilledRank), SIGKILL) == 0);
    logits = (*model)->Decode(batch, {1}, &context);
  }  // Rank 0's group closes here, as its process ending would close it.
  REQUIRE_FALSE(logits.ok());
  CHECK(logits.status().code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(logits.status().message()), Catch::Contains("rank 0 of 4"));
  // The others lost the group too and ended instead of hanging; the killed rank is the one named.
  const absl::Status workers_status = (*workers)->Wait();
  CHECK(workers_status.code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(workers_status.message()), Catch::Contains("rank 2 (pid"));
  CHECK_THAT(std::string(workers_status.message()), Catch::Contains("killed by signal 9"));
}

TEST_CASE("A rank that never joins fails the join within the group's timeout", "[tensor_parallel]") {
  testing::TempDir dir;
  const auto start = std::chrono::steady_clock::now();
  auto group = JoinGlooGroup((dir.path / "rendezvous").string(), 0, 2, std::chrono::seconds(2));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  REQUIRE_FALSE(group.ok());
  CHECK(group.status().code() == absl::StatusCode::kUnavailable);
  CHECK(seconds < 30);
}

// A group that is never asked for a collective: loading fails first.
class UnusedGroup : public TensorParallelGroup {
 public:
  explicit UnusedGroup(int world_size) : world_size_(world_size) {}
  int rank() const override { return 0; }
  int world_size() const override { return world_size_; }
  void AllReduceSum(at::Tensor&) const override { FAIL("no collective before the model loads"); }
  void Broadcast(at::Tensor&, int) const override { FAIL("no collective before the model loads"); }
  std::chrono::milliseconds timeout() const override { return std::chrono::seconds(60); }

 private:
  int world_size_;
};

TEST_CASE("A rank count that does not divide the KV heads is an error naming both", "[tensor_parallel]") {
  ModelOptions options;
  options.tensor_parallel = std::make_shared<UnusedGroup>(3);
  auto model = Model::Load(kModelDir, options);
  REQUIRE_FALSE(model.ok());
  CHECK(model.status().code() == absl::StatusCode::kInvalidArgument);
  const std::string message(model.status().message());
  CHECK_THAT(message, Catch::Contains("3 ranks"));
  CHECK_THAT(message, Catch::Contains("2 KV heads"));
}

TEST_CASE("An aborted group refuses its collectives and the model's steps, naming the cause", "[tensor_parallel]") {
  testing::TempDir dir;
  auto group = JoinGlooGroup(dir.str() + "/rendezvous", 0, 1);
  REQUIRE(group.ok());
  ModelOptions options;
  options.tensor_parallel = *group;
  auto model = Model::Load(kModelDir, options);
  REQUIRE(model.ok());
  auto sequence = (*model)->NewSequence(std::make_shared<DenseAttentionBackend>());
  REQUIRE((*model)->Prefill(*sequence, RandomPrompt(20, 8192, 5)).ok());
  CHECK_NOTHROW((*group)->ThrowIfAborted());

  (*group)->Abort("tensor-parallel rank 1 (pid 42) was killed by signal 9");
  (*group)->Abort("a second cause is not kept");
  at::Tensor tensor = at::ones({4});
  CHECK_THROWS_WITH((*group)->AllReduceSum(tensor), Catch::Contains("the group was aborted") &&
                                                        Catch::Contains("rank 1 (pid 42) was killed by signal 9"));
  DecodeContext context;
  Sequence* batch[] = {sequence.get()};
  const absl::StatusOr<at::Tensor> step = (*model)->Decode(batch, {7}, &context);
  REQUIRE_FALSE(step.ok());
  CHECK(step.status().code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(step.status().message()), Catch::Contains("decode lost a rank") &&
                                                       Catch::Contains("was killed by signal 9") &&
                                                       !Catch::Contains("second cause"));
  CHECK((*model)->Prefill(*sequence, {7}).status().code() == absl::StatusCode::kUnavailable);
}

TEST_CASE("A rank's head partition holds its own KV heads", "[tensor_parallel]") {
  HeadPartition partition = HeadPartition::AllRetrieval(2, 4, SelectionParams{});
  partition.set_role(1, 3, HeadRole::kSparse);
  auto shard = ShardHeadPartition(partition, 1, 2);
  REQUIRE(shard.ok());
  CHECK(shard->num_kv_heads() == 2);
  CHECK(shard->role(1, 0) == HeadRole::kRetrieval);
  CHECK(shard->role(1, 1) == HeadRole::kSparse);
  CHECK_FALSE(ShardHeadPartition(partition, 0, 3).ok());
  CHECK(VocabSliceOf(250, 3, 4).begin == 189);
  CHECK(VocabSliceOf(250, 3, 4).size == 61);
}

}  // namespace
}  // namespace lychee
