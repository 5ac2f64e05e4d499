// Greedy decoding on the bundled model for the attention tests: each step's logits, so that two
// backends can be compared step by step.
#pragma once

#include "tests/torch_catch.h"

#include <memory>
#include <string>
#include <vector>

#include "common/model/model.h"

namespace lychee {
namespace testing {

inline const std::string kModelDir = "models/tiny-llama-retrieval";

// Greedy decode of `steps` tokens after a fixed 700-token prompt; the prefill's and each step's logits.
inline std::vector<at::Tensor> DecodeLogits(const Model& model, std::shared_ptr<const AttentionBackend> attention,
                                            int steps) {
  std::vector<int32_t> prompt(700);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>(100 + (i * 37) % 4000);
  auto sequence = model.NewSequence(std::move(attention));
  std::vector<at::Tensor> logits = {model.Prefill(*sequence, prompt).value()};
  Sequence* const batch[] = {sequence.get()};
  for (int i = 0; i < steps; ++i) {
    const int32_t next[] = {static_cast<int32_t>(logits.back().argmax().item<int64_t>())};
    logits.push_back(model.Decode(batch, next).value()[0]);
  }
  return logits;
}

}  // namespace testing
}  // namespace lychee
