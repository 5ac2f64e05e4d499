// Tensor parallelism on GPUs, over c10d's NCCL (GPU host only; built where LibTorch has NCCL).
// "[one_gpu]": a group of one rank decodes the bundled model as the single process does, through
// the same fused step and CUDA graphs, whose captures now hold the group's all-reduces.
// "[multi_gpu]": TP-2 across two GPUs against one process, each worker on its own GPU; skipped,
// saying so, on a host with fewer GPUs.
#include <c10/cuda/CUDAFunctions.h>

#include <optional>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/model/model.h"
#include "common/model/tensor_parallel.h"
#include "harness/temp_dir.h"
#include "tests/common/tensor_parallel_generation.h"
#include "tests/torch_catch.h"

namespace lychee {
namespace {

const std::string kModelDir = "models/tiny-llama-retrieval";
const std::string kLearnedPartition = kModelDir + "/partitions/learned-target-0.25.json";

std::vector<int32_t> Prompt(size_t length, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(100, 4000);
  std::vector<int32_t> ids(length);
  for (int32_t& value : ids) value = id(rng);
  return ids;
}

double LargestDifference(const testing::Generation& a, const testing::Generation& b) {
  REQUIRE(a.logits.sizes() == b.logits.sizes());
  return (a.logits - b.logits).abs().max().item<double>();
}

TEST_CASE("an NCCL group of one rank decodes as one process, its all-reduces captured in the CUDA graphs",
          "[one_gpu]") {
  if (!at::hasCUDA()) {
    WARN("SKIPPED: no CUDA device: NCCL groups run on the GPU host only");
    return;
  }
  testing::TempDir dir;
  auto group = JoinNcclGroup(dir.str() + "/rendezvous", 0, 1);
  REQUIRE(group.ok());
  CHECK((*group)->capturable_in_cuda_graphs());
  ModelOptions options = ModelOptionsForDevice("cuda").value();
  auto single = Model::Load(kModelDir, options);
  REQUIRE(single.ok());
  options.tensor_parallel = *group;
  auto ranked = Model::Load(kModelDir, options);
  REQUIRE(ranked.ok());
  const std::optional<HeadPartition> learned = testing::PartitionWithBudget(kLearnedPartition, 256).value();
  const std::vector<int32_t> prompt = Prompt(700, 3);
  constexpr int kSteps = 24;
  for (const auto& [name, partition] : std::vector<std::pair<std::string, std::optional<HeadPartition>>>{
           {"dense", std::nullopt}, {"hybrid", learned}}) {
    INFO(name);
    const auto reference =
        testing::GreedyGenerate(**single, testing::GenerationAttention(**single, partition).value(), prompt, kSteps);
    REQUIRE(reference.ok());
    const auto eager = testing::GreedyGenerate(**ranked, testing::GenerationAttention(**ranked, partition).value(),
                                               prompt, kSteps, DecodeOptions{/*cuda_graphs=*/false});
    REQUIRE(eager.ok());
    const auto graphed =
        testing::GreedyGenerate(**ranked, testing::GenerationAttention(**ranked, partition).value(), prompt, kSteps);
    REQUIRE(graphed.ok());
    INFO("capture error: " << graphed->stats.last_capture_error);
    CHECK(reference->stats.graph_replays == kSteps - 1);
    CHECK(graphed->stats.capture_failures == 0);
    CHECK(graphed->stats.graph_captures == 1);
    CHECK(graphed->stats.graph_replays == kSteps - 1);
    CHECK(eager->stats.graph_replays == 0);
    // The captured all-reduces replay what the eager ones computed.
    const double graph_vs_eager = LargestDifference(*graphed, *eager);
    // One rank's all-reduce adds nothing, but the rank rounds the row-parallel products to bf16
    // before adding them to the residual, where one process adds them unrounded.
    const double rank_vs_single = LargestDifference(*graphed, *reference);
    const double scale = reference->logits.abs().max().item<double>();
    WARN(name << ": max |logit difference| graph vs eager " << graph_vs_eager << ", one NCCL rank vs one process "
              << rank_vs_single << " (largest |logit| " << scale << ")");
    CHECK(graph_vs_eager <= 1e-3);
    CHECK(rank_vs_single <= 0.02 * scale);
    CHECK(graphed->tokens == reference->tokens);
  }
}

TEST_CASE("a rank count above the GPUs is refused naming both", "[one_gpu]") {
  if (!at::hasCUDA()) {
    WARN("SKIPPED: no CUDA device: NCCL groups run on the GPU host only");
    return;
  }
  testing::TempDir dir;
  const int gpus = static_cast<int>(c10::cuda::device_count());
  auto group = JoinRankGroup(RankDevice::kCuda, dir.str() + "/rendezvous", 0, gpus + 1);
  REQUIRE_FALSE(group.ok());
  CHECK(group.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(group.status().message()), Catch::Contains(absl::StrCat("over ", gpus + 1, " ranks")) &&
                                                        Catch::Contains(absl::StrCat("sees ", gpus)));
}

TEST_CASE("TP-2 over NCCL on two GPUs decodes as one process", "[multi_gpu]") {
  const int gpus = at::hasCUDA() ? static_cast<int>(c10::cuda::device_count()) : 0;
  if (gpus < 2) {
    WARN("SKIPPED: TP-2 over NCCL needs 2 GPUs, this host has " << gpus);
    return;
  }
  for (const testing::Decoding& decoding :
       {testing::Decoding{kModelDir, Prompt(48, 1), 16, std::nullopt, 0, "cuda"},
        testing::Decoding{kModelDir, Prompt(700, 2), 16, kLearnedPartition, 256, "cuda"}}) {
    INFO((decoding.partition_file.has_value() ? "hybrid" : "dense"));
    const auto reference = testing::SingleProcess(decoding);
    REQUIRE(reference.ok());
    absl::Status workers_status;
    const auto rank0 = testing::RunRanks(2, decoding, TENSOR_PARALLEL_WORKER, workers_status);
    INFO("rank 0: " << rank0.status() << "; workers: " << workers_status);
    REQUIRE(rank0.ok());
    CHECK(workers_status.ok());
    CHECK(rank0->stats.graph_replays == decoding.steps - 1);
    const double difference = LargestDifference(*rank0, *reference);
    const double scale = reference->logits.abs().max().item<double>();
    WARN("TP-2 vs one process: max |logit difference| " << difference << " (largest |logit| " << scale << ")");
    CHECK(difference <= 0.02 * scale);
    CHECK(rank0->tokens == reference->tokens);
  }
}

}  // namespace
}  // namespace lychee
