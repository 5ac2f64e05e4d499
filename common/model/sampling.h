// Token choice from logits: greedy (temperature 0) or temperature and top-p (nucleus) sampling
// with a seeded generator of our own, so that a seed gives the same text on every platform.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace lychee {

class Model;
class Sequence;

struct SamplingParams {
  double temperature = 0.0;  // 0 means greedy
  double top_p = 1.0;        // in (0, 1]
  uint64_t seed = 0;

  // INVALID_ARGUMENT naming the parameter when out of range.
  absl::Status Validate() const;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // logits: float32 [vocab_size], on any device.
  int32_t Next(const at::Tensor& logits);

 private:
  double Uniform();

  SamplingParams params_;
  std::mt19937_64 rng_;
};

struct GenerationOptions {
  int64_t max_new_tokens = 32;
  SamplingParams sampling;
  // Generation stops after any of these (the model's eos ids by default).
  std::vector<int32_t> stop_ids;
};

enum class StopReason { kStopToken, kMaxTokens, kCancelled };

// Prefills `prompt` into `sequence` and decodes until a stop token or the token limit.
// `on_token` sees every generated id (the stop token included) and may return false to stop.
absl::StatusOr<StopReason> Generate(const Model& model, Sequence& sequence, absl::Span<const int32_t> prompt,
                                    const GenerationOptions& options,
                                    const std::function<bool(int32_t)>& on_token);

}  // namespace lychee
