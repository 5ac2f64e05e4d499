// lychee.v1.GenerateRequest as the engine's GenerationRequest: the prompt tokenized, defaults
// filled in, the attention options and the selection policy checked and resolved. The engine
// checks the rest at Submit (vocabulary, context and token limits, sampling ranges). Shared by the
// gRPC service and the OpenAI-compatible HTTP API, which translates its JSON into a
// GenerateRequest first, so that both take one path with the same checks and messages. Free of
// LibTorch.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>

#include "absl/status/statusor.h"
#include "common/base/tokenizer.h"
#include "inference/engine.h"
#include "kernels/policy.h"
#include "lychee/v1/inference.pb.h"

namespace lychee {

// What a request that gives no max_new_tokens gets.
inline constexpr int64_t kDefaultMaxNewTokens = 64;

// The deprecated flat fields of AttentionOptions (mode, token_budget, partition_version, policy)
// in the form of its `choice`, audit and audit_every; `options` itself when it sets none of them.
// INVALID_ARGUMENT naming the fields when it sets both forms, or naming the bad one.
absl::StatusOr<v1::AttentionOptions> TranslateLegacyAttention(const v1::AttentionOptions& options);

// The policy of `options` (current form) as the engine takes it; unset for the server's default.
// INVALID_ARGUMENT naming the field (attention.prhs.selectors, attention.audit).
absl::StatusOr<std::optional<PolicySpec>> ToPolicySpec(const v1::AttentionOptions& options);

// INVALID_ARGUMENT naming the field (prompt.text, attention.policy.p1, ...) when the request is
// malformed; `deadline` (system clock, as gRPC gives it; max() for none) becomes the engine's.
absl::StatusOr<GenerationRequest> ToGenerationRequest(const v1::GenerateRequest& request, const Tokenizer& tokenizer,
                                                      std::chrono::system_clock::time_point deadline);

}  // namespace lychee
