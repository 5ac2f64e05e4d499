// Parity with Hugging Face transformers for every architecture the loader accepts: tiny random
// checkpoints (Llama-3 rope scaling in bf16, Qwen2 tied with q/k/v biases, Qwen3 with an explicit
// head_dim and q/k norms in fp16, Mistral with a sliding window) and their float32 references,
// written by tools/parity/make_hf_fixtures.py with transformers.
#include "tests/torch_catch.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common/model/model.h"
#include "common/model/sampling.h"
#include "kernels/dense_attention.h"

namespace lychee {
namespace {

const std::filesystem::path kFixtures = "tests/data/hf_parity";

TEST_CASE("tiny random checkpoints of each architecture match transformers") {
  const std::vector<std::string> cases = {"llama3-scaled-bf16", "qwen2-tied", "qwen3-head-dim", "mistral-window"};
  for (const std::string& name : cases) {
    const std::string dir = (kFixtures / name).string();
    INFO(name);
    auto model = Model::Load(dir);
    REQUIRE(model.ok());
    std::ifstream in(dir + "/refs.json");
    REQUIRE(in.good());
    const nlohmann::json refs = nlohmann::json::parse(in);
    const auto ids = refs["ids"].get<std::vector<int32_t>>();

    auto sequence = (*model)->NewSequence(std::make_shared<DenseAttentionBackend>());
    auto logits = (*model)->Prefill(*sequence, ids);
    REQUIRE(logits.ok());
    at::Tensor expected = at::tensor(refs["last_logits"].get<std::vector<float>>());
    const double error = (*logits - expected).abs().max().item<double>();
    INFO("max |logit - transformers| = " << error);
    CHECK(error < 1e-4);

    std::vector<int32_t> greedy;
    auto fresh = (*model)->NewSequence(std::make_shared<DenseAttentionBackend>());
    GenerationOptions options;
    options.max_new_tokens = 8;
    REQUIRE(Generate(**model, *fresh, ids, options, [&](int32_t id) {
              greedy.push_back(id);
              return true;
            }).ok());
    CHECK(greedy == refs["greedy8"].get<std::vector<int32_t>>());
  }
}

}  // namespace
}  // namespace lychee
