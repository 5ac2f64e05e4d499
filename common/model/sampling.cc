#include "common/model/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/model/model.h"

namespace lychee {

absl::Status SamplingParams::Validate() const {
  if (!std::isfinite(temperature) || temperature < 0) {
    return absl::InvalidArgumentError(absl::StrCat("temperature must be a finite number >= 0, got ", temperature));
  }
  if (!(top_p > 0 && top_p <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", top_p));
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

double Sampler::Uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

int32_t Sampler::Next(const at::Tensor& logits) {
  at::Tensor cpu = logits.to(at::kCPU, at::kFloat).contiguous();
  const float* values = cpu.data_ptr<float>();
  const int64_t vocab = cpu.numel();
  if (params_.temperature == 0.0) {
    return static_cast<int32_t>(std::max_element(values, values + vocab) - values);
  }
  // Softmax in double over logits / T, then the smallest most-probable set whose mass reaches top_p.
  const float max_logit = *std::max_element(values, values + vocab);
  std::vector<double> probs(vocab);
  double total = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    probs[i] = std::exp((static_cast<double>(values[i]) - max_logit) / params_.temperature);
    total += probs[i];
  }
  std::vector<int32_t> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return probs[a] > probs[b]; });
  double kept_mass = 0;
  size_t kept = 0;
  while (kept < order.size() && (kept == 0 || kept_mass < params_.top_p * total)) {
    kept_mass += probs[order[kept]];
    ++kept;
  }
  double target = Uniform() * kept_mass;
  for (size_t i = 0; i < kept; ++i) {
    target -= probs[order[i]];
    if (target < 0) return order[i];
  }
  return order[kept - 1];
}

absl::StatusOr<StopReason> Generate(const Model& model, Sequence& sequence, absl::Span<const int32_t> prompt,
                                    const GenerationOptions& options,
                                    const std::function<bool(int32_t)>& on_token) {
  LYCHEE_RETURN_IF_ERROR(options.sampling.Validate());
  if (options.max_new_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_new_tokens must be > 0, got ", options.max_new_tokens));
  }
  Sampler sampler(options.sampling);
  // Pages for the whole generation up front: a pool that grew mid-generation would move under the
  // captured decode step.
  LYCHEE_RETURN_IF_ERROR(sequence.Reserve(sequence.length() + static_cast<int64_t>(prompt.size()) +
                                          options.max_new_tokens));
  LYCHEE_ASSIGN_OR_RETURN(at::Tensor logits, model.Prefill(sequence, prompt));
  Sequence* const batch[] = {&sequence};
  DecodeContext context;
  for (int64_t generated = 0;;) {
    const int32_t token = sampler.Next(logits);
    ++generated;
    if (!on_token(token)) return StopReason::kCancelled;
    if (std::find(options.stop_ids.begin(), options.stop_ids.end(), token) != options.stop_ids.end()) {
      return StopReason::kStopToken;
    }
    if (generated >= options.max_new_tokens) return StopReason::kMaxTokens;
    const int32_t next[] = {token};
    LYCHEE_ASSIGN_OR_RETURN(at::Tensor step_logits, model.Decode(batch, next, &context));
    logits = step_logits[0];
  }
}

}  // namespace lychee
