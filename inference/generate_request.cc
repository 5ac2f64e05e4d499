#include "inference/generate_request.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/policy.h"

namespace lychee {
namespace {

absl::StatusOr<PolicySpec> ToPolicySpec(const v1::PolicyOptions& options) {
  absl::StatusOr<PolicyKind> kind = ParsePolicyKind(options.name());
  if (!kind.ok()) return absl::InvalidArgumentError(absl::StrCat("attention.policy.name: ", kind.status().message()));
  PolicySpec spec = PolicySpec::Defaults(*kind);
  if (options.has_block_size()) spec.block_size = options.block_size();
  if (options.has_sink_tokens()) spec.sink_tokens = options.sink_tokens();
  if (options.has_recent_tokens()) spec.recent_tokens = options.recent_tokens();
  if (options.has_p1()) spec.p1 = options.p1();
  if (options.has_p2()) spec.p2 = options.p2();
  if (options.has_clusters()) spec.clusters = options.clusters();
  if (options.has_kmeans_iterations()) spec.kmeans_iterations = options.kmeans_iterations();
  if (options.has_tail_tokens()) spec.tail_tokens = options.tail_tokens();
  if (options.prhs_selectors_size() > 0) {
    std::string list;
    for (const std::string& selector : options.prhs_selectors())
      absl::StrAppend(&list, list.empty() ? "" : ",", selector);
    absl::StatusOr<PrhsSelectors> selectors = ParsePrhsSelectors(list);
    if (!selectors.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("attention.policy.prhs_selectors: ", selectors.status().message()));
    }
    spec.prhs_selectors = *selectors;
  }
  if (options.has_prhs_enlargement()) spec.prhs_enlargement = options.prhs_enlargement();
  if (options.has_prhs_window()) spec.prhs_window = options.prhs_window();
  spec.tidal_selection_layers.assign(options.tidal_selection_layers().begin(), options.tidal_selection_layers().end());
  if (options.has_page_size()) spec.page_size = options.page_size();
  if (options.has_quest_dense_layers()) spec.quest_dense_layers = options.quest_dense_layers();
  spec.audit = options.audit();
  spec.audit_every = options.audit_every();  // 0 when unset: the engine fills in the server's period
  return spec;
}

}  // namespace

absl::StatusOr<GenerationRequest> ToGenerationRequest(const v1::GenerateRequest& request, const Tokenizer& tokenizer,
                                                      std::chrono::system_clock::time_point deadline) {
  GenerationRequest generation;
  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText: {
      if (request.text().empty()) return absl::InvalidArgumentError("prompt.text: empty");
      LYCHEE_ASSIGN_OR_RETURN(generation.prompt_ids, tokenizer.Encode(request.text()));
      break;
    }
    case v1::GenerateRequest::kTokenIds:
      generation.prompt_ids.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
      if (generation.prompt_ids.empty()) return absl::InvalidArgumentError("prompt.token_ids: empty");
      break;
    case v1::GenerateRequest::PROMPT_NOT_SET:
      return absl::InvalidArgumentError("prompt: required, give text or token_ids");
  }
  generation.max_new_tokens = request.has_max_new_tokens() ? request.max_new_tokens() : kDefaultMaxNewTokens;
  generation.temperature = request.temperature();
  generation.top_p = request.has_top_p() ? request.top_p() : 1.0;
  generation.seed = request.seed();
  generation.stop_sequences.assign(request.stop().begin(), request.stop().end());
  const v1::AttentionOptions& attention = request.attention();
  switch (attention.mode()) {
    case v1::ATTENTION_MODE_DENSE:
      generation.attention = AttentionChoice::kDense;
      break;
    case v1::ATTENTION_MODE_HYBRID:
      generation.attention = AttentionChoice::kHybrid;
      break;
    case v1::ATTENTION_MODE_UNSPECIFIED:
      generation.attention = AttentionChoice::kServerDefault;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("attention.mode: unknown value ", attention.mode()));
  }
  if (attention.has_token_budget()) generation.token_budget = attention.token_budget();
  if (attention.has_partition_version()) generation.partition_version = attention.partition_version();
  if (attention.has_max_dropped_mass()) generation.max_dropped_mass = attention.max_dropped_mass();
  if (!attention.policy().name().empty()) {
    if (attention.mode() != v1::ATTENTION_MODE_UNSPECIFIED) {
      return absl::InvalidArgumentError("attention: give a mode or a policy, not both");
    }
    LYCHEE_ASSIGN_OR_RETURN(PolicySpec policy, ToPolicySpec(attention.policy()));
    if (generation.token_budget) policy.token_budget = *generation.token_budget;
    generation.token_budget.reset();
    generation.policy = std::move(policy);
  }
  if (deadline != std::chrono::system_clock::time_point::max()) {
    generation.deadline =
        std::chrono::steady_clock::now() +
        std::chrono::duration_cast<std::chrono::steady_clock::duration>(deadline - std::chrono::system_clock::now());
  }
  return generation;
}

}  // namespace lychee
