#include "inference/generate_request.h"

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/base/status_macros.h"
#include "kernels/policy.h"

namespace lychee {
namespace {

// The fields of each form that `options` sets, by their names in the request.
std::vector<std::string> LegacyFieldsSet(const v1::AttentionOptions& options) {
  std::vector<std::string> fields;
  if (options.mode() != v1::ATTENTION_MODE_UNSPECIFIED) fields.push_back("attention.mode");
  if (options.has_token_budget()) fields.push_back("attention.token_budget");
  if (options.has_partition_version()) fields.push_back("attention.partition_version");
  if (options.has_policy() && options.policy().ByteSizeLong() > 0) fields.push_back("attention.policy");
  return fields;
}

std::vector<std::string> CurrentFieldsSet(const v1::AttentionOptions& options) {
  std::vector<std::string> fields;
  if (options.choice_case() != v1::AttentionOptions::CHOICE_NOT_SET) {
    const google::protobuf::FieldDescriptor* field =
        options.GetDescriptor()->FindFieldByNumber(static_cast<int>(options.choice_case()));
    fields.push_back(absl::StrCat("attention.", field->name()));
  }
  if (options.audit()) fields.push_back("attention.audit");
  if (options.has_audit_every()) fields.push_back("attention.audit_every");
  return fields;
}

// The named policy's message, with the deprecated flat fields it uses; the token budget and
// partition version are the deprecated top-level ones.
absl::Status TranslateLegacyPolicy(const v1::AttentionOptions& legacy, v1::AttentionOptions* current) {
  const v1::PolicyOptions& policy = legacy.policy();
  if (policy.name().empty()) return absl::InvalidArgumentError("attention.policy.name: required");
  absl::StatusOr<PolicyKind> kind = ParsePolicyKind(policy.name());
  if (!kind.ok()) return absl::InvalidArgumentError(absl::StrCat("attention.policy.name: ", kind.status().message()));
  if (legacy.has_partition_version() && !PolicyNeedsPartition(*kind)) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention.partition_version: policy ", PolicyName(*kind), " uses no partition"));
  }
  const bool budget = legacy.has_token_budget();
  switch (*kind) {
    case PolicyKind::kDense: current->mutable_dense(); break;
    case PolicyKind::kLychee: {
      // The flat form's lychee took its authors' defaults, not the partition's selection.
      const PolicySpec defaults = PolicySpec::Defaults(PolicyKind::kLychee);
      v1::LycheeAttention* lychee = current->mutable_lychee();
      lychee->set_token_budget(budget ? legacy.token_budget() : static_cast<uint32_t>(defaults.token_budget));
      lychee->set_block_size(policy.has_block_size() ? policy.block_size()
                                                     : static_cast<uint32_t>(defaults.block_size));
      lychee->set_sink_tokens(policy.has_sink_tokens() ? policy.sink_tokens()
                                                       : static_cast<uint32_t>(defaults.sink_tokens));
      lychee->set_recent_tokens(policy.has_recent_tokens() ? policy.recent_tokens()
                                                           : static_cast<uint32_t>(defaults.recent_tokens));
      if (legacy.has_partition_version()) lychee->set_partition_version(legacy.partition_version());
      break;
    }
    case PolicyKind::kQuest: {
      v1::QuestAttention* quest = current->mutable_quest();
      if (budget) quest->set_token_budget(legacy.token_budget());
      if (policy.has_page_size()) quest->set_page_size(policy.page_size());
      if (policy.has_quest_dense_layers()) quest->set_dense_layers(policy.quest_dense_layers());
      if (policy.has_sink_tokens()) quest->set_sink_tokens(policy.sink_tokens());
      if (policy.has_recent_tokens()) quest->set_recent_tokens(policy.recent_tokens());
      break;
    }
    case PolicyKind::kPrhs: {
      v1::PrhsAttention* prhs = current->mutable_prhs();
      if (budget) prhs->set_token_budget(legacy.token_budget());
      if (policy.has_block_size()) prhs->set_block_size(policy.block_size());
      if (policy.has_sink_tokens()) prhs->set_sink_tokens(policy.sink_tokens());
      if (policy.has_recent_tokens()) prhs->set_recent_tokens(policy.recent_tokens());
      *prhs->mutable_selectors() = policy.prhs_selectors();
      if (policy.has_prhs_enlargement()) prhs->set_enlargement(policy.prhs_enlargement());
      if (policy.has_prhs_window()) prhs->set_window(policy.prhs_window());
      break;
    }
    case PolicyKind::kDoubleP: {
      v1::DoublePAttention* double_p = current->mutable_double_p();
      if (policy.has_p1()) double_p->set_p1(policy.p1());
      if (policy.has_p2()) double_p->set_p2(policy.p2());
      if (policy.has_clusters()) double_p->set_clusters(policy.clusters());
      if (policy.has_kmeans_iterations()) double_p->set_kmeans_iterations(policy.kmeans_iterations());
      if (policy.has_sink_tokens()) double_p->set_sink_tokens(policy.sink_tokens());
      if (policy.has_recent_tokens()) double_p->set_recent_tokens(policy.recent_tokens());
      if (policy.has_tail_tokens()) double_p->set_tail_tokens(policy.tail_tokens());
      break;
    }
    case PolicyKind::kStreaming: {
      v1::StreamingAttention* streaming = current->mutable_streaming();
      if (budget) streaming->set_token_budget(legacy.token_budget());
      if (policy.has_sink_tokens()) streaming->set_sink_tokens(policy.sink_tokens());
      if (legacy.has_partition_version()) streaming->set_partition_version(legacy.partition_version());
      break;
    }
    case PolicyKind::kTidal: {
      v1::TidalAttention* tidal = current->mutable_tidal();
      if (budget) tidal->set_token_budget(legacy.token_budget());
      if (policy.has_sink_tokens()) tidal->set_sink_tokens(policy.sink_tokens());
      if (policy.has_recent_tokens()) tidal->set_recent_tokens(policy.recent_tokens());
      *tidal->mutable_selection_layers() = policy.tidal_selection_layers();
      break;
    }
  }
  current->set_audit(policy.audit());
  if (policy.has_audit_every()) current->set_audit_every(policy.audit_every());
  return absl::OkStatus();
}

// Sets `value` from `given` where the request gives it, and marks it as not the partition's.
void Override(bool given, int64_t given_value, int64_t& value, bool& from_partition) {
  if (!given) return;
  value = given_value;
  from_partition = false;
}

absl::StatusOr<PrhsSelectors> SelectorsOf(const google::protobuf::RepeatedPtrField<std::string>& names) {
  absl::StatusOr<PrhsSelectors> selectors = ParsePrhsSelectors(absl::StrJoin(names, ","));
  if (!selectors.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("attention.prhs.selectors: ", selectors.status().message()));
  }
  return selectors;
}

}  // namespace

absl::StatusOr<v1::AttentionOptions> TranslateLegacyAttention(const v1::AttentionOptions& options) {
  const std::vector<std::string> legacy = LegacyFieldsSet(options);
  if (legacy.empty()) return options;
  if (const std::vector<std::string> current = CurrentFieldsSet(options); !current.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("attention: give the deprecated ", absl::StrJoin(legacy, ", "),
                                                   " or ", absl::StrJoin(current, ", "), ", not both"));
  }
  const bool policy_named = std::find(legacy.begin(), legacy.end(), "attention.policy") != legacy.end();
  if (options.mode() != v1::ATTENTION_MODE_UNSPECIFIED && policy_named) {
    return absl::InvalidArgumentError("attention: give a mode or a policy, not both");
  }
  v1::AttentionOptions current;
  if (options.has_max_dropped_mass()) current.set_max_dropped_mass(options.max_dropped_mass());
  if (policy_named) {
    LYCHEE_RETURN_IF_ERROR(TranslateLegacyPolicy(options, &current));
    return current;
  }
  switch (options.mode()) {
    case v1::ATTENTION_MODE_DENSE:
      if (options.has_token_budget() || options.has_partition_version()) {
        return absl::InvalidArgumentError(
            "attention.token_budget and attention.partition_version need hybrid attention");
      }
      current.mutable_dense();
      return current;
    // A budget or a version without a mode asked for the server's default, hybrid, with them.
    case v1::ATTENTION_MODE_HYBRID:
    case v1::ATTENTION_MODE_UNSPECIFIED: {
      v1::LycheeAttention* lychee = current.mutable_lychee();
      if (options.has_token_budget()) lychee->set_token_budget(options.token_budget());
      if (options.has_partition_version()) lychee->set_partition_version(options.partition_version());
      return current;
    }
    default: return absl::InvalidArgumentError(absl::StrCat("attention.mode: unknown value ", options.mode()));
  }
}

absl::StatusOr<std::optional<PolicySpec>> ToPolicySpec(const v1::AttentionOptions& options) {
  std::optional<PolicySpec> spec;
  switch (options.choice_case()) {
    case v1::AttentionOptions::CHOICE_NOT_SET:
      if (options.audit() || options.has_audit_every()) {
        return absl::InvalidArgumentError(
            "attention.audit: goes with a policy (attention.dense, attention.lychee, ...), the one audited");
      }
      return spec;
    case v1::AttentionOptions::kDense: spec = PolicySpec::Defaults(PolicyKind::kDense); break;
    case v1::AttentionOptions::kLychee: {
      const v1::LycheeAttention& lychee = options.lychee();
      spec = PolicySpec::LycheeAsPartition();
      PolicySpec::PartitionSelected& inherited = spec->from_partition;
      Override(lychee.has_token_budget(), lychee.token_budget(), spec->token_budget, inherited.token_budget);
      Override(lychee.has_block_size(), lychee.block_size(), spec->block_size, inherited.block_size);
      Override(lychee.has_sink_tokens(), lychee.sink_tokens(), spec->sink_tokens, inherited.sink_tokens);
      Override(lychee.has_recent_tokens(), lychee.recent_tokens(), spec->recent_tokens, inherited.recent_tokens);
      if (lychee.has_partition_version()) spec->partition_version = lychee.partition_version();
      break;
    }
    case v1::AttentionOptions::kQuest: {
      const v1::QuestAttention& quest = options.quest();
      spec = PolicySpec::Defaults(PolicyKind::kQuest);
      if (quest.has_token_budget()) spec->token_budget = quest.token_budget();
      if (quest.has_page_size()) spec->page_size = quest.page_size();
      if (quest.has_dense_layers()) spec->quest_dense_layers = quest.dense_layers();
      if (quest.has_sink_tokens()) spec->sink_tokens = quest.sink_tokens();
      if (quest.has_recent_tokens()) spec->recent_tokens = quest.recent_tokens();
      break;
    }
    case v1::AttentionOptions::kPrhs: {
      const v1::PrhsAttention& prhs = options.prhs();
      spec = PolicySpec::Defaults(PolicyKind::kPrhs);
      if (prhs.has_token_budget()) spec->token_budget = prhs.token_budget();
      if (prhs.has_block_size()) spec->block_size = prhs.block_size();
      if (prhs.has_sink_tokens()) spec->sink_tokens = prhs.sink_tokens();
      if (prhs.has_recent_tokens()) spec->recent_tokens = prhs.recent_tokens();
      if (prhs.selectors_size() > 0) {
        LYCHEE_ASSIGN_OR_RETURN(spec->prhs_selectors, SelectorsOf(prhs.selectors()));
      }
      if (prhs.has_enlargement()) spec->prhs_enlargement = prhs.enlargement();
      if (prhs.has_window()) spec->prhs_window = prhs.window();
      break;
    }
    case v1::AttentionOptions::kDoubleP: {
      const v1::DoublePAttention& double_p = options.double_p();
      spec = PolicySpec::Defaults(PolicyKind::kDoubleP);
      if (double_p.has_p1()) spec->p1 = double_p.p1();
      if (double_p.has_p2()) spec->p2 = double_p.p2();
      if (double_p.has_clusters()) spec->clusters = double_p.clusters();
      if (double_p.has_kmeans_iterations()) spec->kmeans_iterations = double_p.kmeans_iterations();
      if (double_p.has_sink_tokens()) spec->sink_tokens = double_p.sink_tokens();
      if (double_p.has_recent_tokens()) spec->recent_tokens = double_p.recent_tokens();
      if (double_p.has_tail_tokens()) spec->tail_tokens = double_p.tail_tokens();
      break;
    }
    case v1::AttentionOptions::kStreaming: {
      const v1::StreamingAttention& streaming = options.streaming();
      spec = PolicySpec::Defaults(PolicyKind::kStreaming);
      if (streaming.has_token_budget()) spec->token_budget = streaming.token_budget();
      if (streaming.has_sink_tokens()) spec->sink_tokens = streaming.sink_tokens();
      if (streaming.has_partition_version()) spec->partition_version = streaming.partition_version();
      break;
    }
    case v1::AttentionOptions::kTidal: {
      const v1::TidalAttention& tidal = options.tidal();
      spec = PolicySpec::Defaults(PolicyKind::kTidal);
      if (tidal.has_token_budget()) spec->token_budget = tidal.token_budget();
      if (tidal.has_sink_tokens()) spec->sink_tokens = tidal.sink_tokens();
      if (tidal.has_recent_tokens()) spec->recent_tokens = tidal.recent_tokens();
      spec->tidal_selection_layers.assign(tidal.selection_layers().begin(), tidal.selection_layers().end());
      break;
    }
  }
  spec->audit = options.audit();
  spec->audit_every = options.audit_every();  // 0 when unset: the engine fills in the server's period
  return spec;
}

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
  LYCHEE_ASSIGN_OR_RETURN(const v1::AttentionOptions attention, TranslateLegacyAttention(request.attention()));
  LYCHEE_ASSIGN_OR_RETURN(generation.attention, ToPolicySpec(attention));
  if (attention.has_max_dropped_mass()) generation.max_dropped_mass = attention.max_dropped_mass();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    generation.deadline =
        std::chrono::steady_clock::now() +
        std::chrono::duration_cast<std::chrono::steady_clock::duration>(deadline - std::chrono::system_clock::now());
  }
  return generation;
}

}  // namespace lychee
