// Tensor-parallel decoding over Gloo against the single-process model: the ranks run as threads,
// each with its own process group meeting through a FileStore in a temp dir, and must produce the
// same greedy tokens and, within fp32 tolerance, the same logits.
#include "common/tensor_parallel.h"

#include <cstring>
#include <fstream>
#include <functional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/model.h"
#include "common/status_macros.h"
#include "harness/temp_dir.h"
#include "kernels/dense_attention.h"
#include "kernels/hybrid_attention.h"
#include "tests/torch_catch.h"

namespace lychee {
namespace {

const std::string kModelDir = "models/tiny-llama-retrieval";

struct Generation {
  std::vector<int32_t> tokens;
  at::Tensor logits;  // [steps, vocab]: the prefill's, then each decode step's
};

// Greedy decoding of `steps` tokens after `prompt`: the prefill, then paged decode steps.
absl::StatusOr<Generation> Generate(const Model& model, std::shared_ptr<const AttentionBackend> attention,
                                    const std::vector<int32_t>& prompt, int steps) {
  auto sequence = model.NewSequence(std::move(attention));
  absl::StatusOr<at::Tensor> logits = model.Prefill(*sequence, prompt);
  Generation generation;
  std::vector<at::Tensor> rows;
  DecodeContext context;
  for (int step = 0; logits.ok(); ++step) {
    rows.push_back(logits->reshape({-1}).clone());
    generation.tokens.push_back(static_cast<int32_t>(rows.back().argmax().item<int64_t>()));
    if (step == steps) break;
    Sequence* batch[] = {sequence.get()};
    logits = model.Decode(batch, {generation.tokens.back()}, &context);
  }
  if (!logits.ok()) return logits.status();
  generation.logits = at::stack(rows);
  return generation;
}

// Each rank's result of `rank_work`, run on threads by RunGlooRanksInThreads. No Catch2 assertion
// runs off the main thread.
std::vector<absl::StatusOr<Generation>> RunRanks(
    int world_size, const std::function<absl::StatusOr<Generation>(std::shared_ptr<TensorParallelGroup>)>& rank_work) {
  std::vector<absl::StatusOr<Generation>> results(world_size, absl::UnknownError("rank did not run"));
  // Each rank's own status is checked, not the first failure this returns.
  RunGlooRanksInThreads(world_size, [&](std::shared_ptr<TensorParallelGroup> group) {
    const int rank = group->rank();
    results[rank] = rank_work(std::move(group));
    return results[rank].status();
  }).IgnoreError();
  return results;
}

ModelOptions TensorParallel(std::shared_ptr<TensorParallelGroup> group) {
  ModelOptions options;
  options.tensor_parallel = std::move(group);
  return options;
}

absl::StatusOr<Generation> DenseRank(const std::string& model_dir, std::shared_ptr<TensorParallelGroup> group,
                                     const std::vector<int32_t>& prompt, int steps) {
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(model_dir, TensorParallel(std::move(group)));
  if (!model.ok()) return model.status();
  return Generate(**model, std::make_shared<DenseAttentionBackend>(), prompt, steps);
}

void RequireSameGeneration(const std::vector<absl::StatusOr<Generation>>& ranks, const Generation& reference) {
  for (size_t rank = 0; rank < ranks.size(); ++rank) {
    INFO("rank " << rank << " of " << ranks.size());
    REQUIRE(ranks[rank].ok());
    CHECK(ranks[rank]->tokens == reference.tokens);
    REQUIRE(ranks[rank]->logits.sizes() == reference.logits.sizes());
    const double difference = (ranks[rank]->logits - reference.logits).abs().max().item<double>();
    INFO("largest logit difference " << difference);
    CHECK(at::allclose(ranks[rank]->logits, reference.logits, /*rtol=*/1e-4, /*atol=*/1e-4));
  }
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
  const std::vector<int32_t> prompt = RandomPrompt(48, 8192, 1);
  auto single = Model::Load(kModelDir);
  REQUIRE(single.ok());
  auto reference = Generate(**single, std::make_shared<DenseAttentionBackend>(), prompt, 6);
  REQUIRE(reference.ok());
  RequireSameGeneration(RunRanks(2,
                                 [&](std::shared_ptr<TensorParallelGroup> group) {
                                   return DenseRank(kModelDir, std::move(group), prompt, 6);
                                 }),
                        *reference);
}

TEST_CASE("TP-2 on the bundled model decodes as one process does, hybrid with the learned partition",
          "[tensor_parallel]") {
  auto partition = LoadHeadPartitionJson(kModelDir + "/partitions/learned-target-0.25.json");
  REQUIRE(partition.ok());
  // A budget well under the prompt, so that the sparse heads select blocks (kept small for speed).
  partition->mutable_selection().token_budget = 256;
  const std::vector<int32_t> prompt = RandomPrompt(600, 8192, 2);
  auto single = Model::Load(kModelDir);
  REQUIRE(single.ok());
  auto backend = HybridAttentionBackend::Create(std::make_shared<const HeadPartition>(*partition), (*single)->config());
  REQUIRE(backend.ok());
  auto reference = Generate(**single, *backend, prompt, 6);
  REQUIRE(reference.ok());
  RequireSameGeneration(
      RunRanks(2,
               [&](std::shared_ptr<TensorParallelGroup> group) -> absl::StatusOr<Generation> {
                 const int rank = group->rank(), world_size = group->world_size();
                 LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Model> model,
                                         Model::Load(kModelDir, TensorParallel(std::move(group))));
                 LYCHEE_ASSIGN_OR_RETURN(HeadPartition shard, ShardHeadPartition(*partition, rank, world_size));
                 LYCHEE_ASSIGN_OR_RETURN(auto hybrid,
                                         HybridAttentionBackend::Create(std::make_shared<const HeadPartition>(shard),
                                                                        model->shard_config()));
                 return Generate(*model, hybrid, prompt, 6);
               }),
      *reference);
}

TEST_CASE("TP-2 and TP-4 on a random checkpoint of 8 KV heads decode as one process does", "[tensor_parallel]") {
  testing::TempDir dir;
  WriteRandomCheckpoint(dir.str());
  const std::vector<int32_t> prompt = RandomPrompt(40, 250, 3);
  auto single = Model::Load(dir.str());
  REQUIRE(single.ok());
  auto reference = Generate(**single, std::make_shared<DenseAttentionBackend>(), prompt, 8);
  REQUIRE(reference.ok());
  for (int world_size : {2, 4}) {
    INFO("TP-" << world_size);
    RequireSameGeneration(RunRanks(world_size,
                                   [&](std::shared_ptr<TensorParallelGroup> group) {
                                     return DenseRank(dir.str(), std::move(group), prompt, 8);
                                   }),
                          *reference);
  }
}

TEST_CASE("A rank that is gone fails the others' steps with UNAVAILABLE instead of hanging", "[tensor_parallel]") {
  testing::TempDir dir;
  const std::string rendezvous = (dir.path / "rendezvous").string();
  absl::Status survivor_status;
  std::thread survivor([&] {
    auto group = JoinGlooGroup(rendezvous, 0, 2, std::chrono::seconds(10));
    if (!group.ok()) {
      survivor_status = group.status();
      return;
    }
    auto model = Model::Load(kModelDir, TensorParallel(*group));
    if (!model.ok()) {
      survivor_status = model.status();
      return;
    }
    auto sequence = (*model)->NewSequence(std::make_shared<DenseAttentionBackend>());
    survivor_status = (*model)->Prefill(*sequence, {1, 2, 3}).status();
  });
  {
    // Rank 1 joins, then goes: its group's connections close, as a killed process's would.
    auto departed = JoinGlooGroup(rendezvous, 1, 2, std::chrono::seconds(10));
    REQUIRE(departed.ok());
  }
  survivor.join();
  CHECK(survivor_status.code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(survivor_status.message()), Catch::Contains("rank 0 of 2"));
}

// A group that is never asked for a collective: loading fails first.
class UnusedGroup : public TensorParallelGroup {
 public:
  explicit UnusedGroup(int world_size) : world_size_(world_size) {}
  int rank() const override { return 0; }
  int world_size() const override { return world_size_; }
  void AllReduceSum(at::Tensor&) const override { FAIL("no collective before the model loads"); }

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
