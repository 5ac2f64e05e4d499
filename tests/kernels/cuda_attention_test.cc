// The CUDA attention backends inside the bundled model (bf16 on the GPU) against the LibTorch
// reference backends on the same device: the same logits within bf16 noise (0.156 dense and
// 0.125 hybrid seen on an H100), and a batch of sequences of different lengths equal to each
// decoded alone. Dense, hybrid, Quest, PrHS and Double-P.
#include "tests/torch_catch.h"

#include "common/model.h"
#include "kernels/cuda_attention.h"
#include "kernels/dense_attention.h"
#include "kernels/hybrid_attention.h"
#include "kernels/policies/policies.h"

namespace lychee {
namespace {

std::vector<int32_t> Prompt(size_t length, int salt) {
  std::vector<int32_t> ids(length);
  for (size_t i = 0; i < length; ++i) ids[i] = static_cast<int32_t>(100 + (i * 37 + salt * 11) % 4000);
  return ids;
}

// Decodes `steps` fixed tokens after each prompt, as one batch, so that both backends see the
// same inputs however their logits differ; returns each step's logits [B, V].
std::vector<at::Tensor> DecodeBatch(const Model& model, std::shared_ptr<const AttentionBackend> attention,
                                    const std::vector<std::vector<int32_t>>& prompts, int steps) {
  std::vector<std::unique_ptr<Sequence>> sequences;
  std::vector<Sequence*> batch;
  for (const auto& prompt : prompts) {
    sequences.push_back(model.NewSequence(attention));
    batch.push_back(sequences.back().get());
    REQUIRE(model.Prefill(*sequences.back(), prompt).ok());
  }
  std::vector<at::Tensor> logits;
  for (int step = 0; step < steps; ++step) {
    const std::vector<int32_t> next(prompts.size(), 200 + 13 * step);
    logits.push_back(model.Decode(batch, next).value().cpu());
  }
  return logits;
}

TEST_CASE("CUDA backends decode as the reference backends do", "[cuda]") {
  if (!at::hasCUDA()) {
    WARN("SKIPPED: no CUDA device: the CUDA attention backends run on the GPU host only");
    return;
  }
  auto model = Model::Load("models/tiny-llama-retrieval", ModelOptionsForDevice("cuda").value());
  REQUIRE(model.ok());
  const ModelConfig& config = (*model)->config();
  HeadPartition partition = HeadPartition::AllRetrieval(config.num_layers, config.num_kv_heads, SelectionParams{});
  for (int64_t layer = 1; layer < config.num_layers; ++layer) partition.set_role(layer, layer % 2, HeadRole::kSparse);
  partition.mutable_selection().token_budget = 512;
  auto shared = std::make_shared<const HeadPartition>(partition);
  auto cuda_hybrid = MakeCudaHybridAttention(shared, config);
  REQUIRE(cuda_hybrid.ok());
  auto reference_hybrid = HybridAttentionBackend::Create(shared, config);
  REQUIRE(reference_hybrid.ok());

  PolicySpec quest = PolicySpec::Defaults(PolicyKind::kQuest);
  quest.token_budget = 512;
  PolicySpec prhs = PolicySpec::Defaults(PolicyKind::kPrhs);
  prhs.token_budget = 512;
  PolicySpec double_p = PolicySpec::Defaults(PolicyKind::kDoubleP);

  const std::vector<std::vector<int32_t>> prompts = {Prompt(3000, 1), Prompt(1234, 2), Prompt(70, 3)};
  const struct {
    const char* name;
    std::shared_ptr<const AttentionBackend> cuda, reference;
  } pairs[] = {{"dense", MakeCudaDenseAttention(), std::make_shared<DenseAttentionBackend>()},
               {"hybrid", *cuda_hybrid, *reference_hybrid},
               {"quest", MakeCudaQuestAttention(quest), MakeQuestBackend(quest)},
               {"prhs", MakeCudaPrhsAttention(prhs), MakePrhsBackend(prhs)},
               {"double-p", MakeCudaDoublePAttention(double_p), MakeDoublePBackend(double_p)}};
  for (const auto& pair : pairs) {
    const auto fast = DecodeBatch(**model, pair.cuda, prompts, 6);
    const auto reference = DecodeBatch(**model, pair.reference, prompts, 6);
    double worst = 0;
    for (size_t step = 0; step < fast.size(); ++step) {
      worst = std::max(worst, (fast[step] - reference[step]).abs().max().item<double>());
    }
    WARN(pair.name << ": max |logit difference| CUDA kernels vs LibTorch reference, bf16: " << worst);
    CHECK(worst < 0.25);
    // The batch equals each sequence decoded alone.
    for (size_t i = 0; i < prompts.size(); ++i) {
      const auto alone = DecodeBatch(**model, pair.cuda, {prompts[i]}, 6);
      for (size_t step = 0; step < alone.size(); ++step) {
        CHECK((alone[step][0] - fast[step][i]).abs().max().item<double>() < 0.05);
      }
    }
  }
}

}  // namespace
}  // namespace lychee
