#include "kernels/policy.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace lychee {

bool IsPowerOfTwo(int64_t value) { return value > 0 && (value & (value - 1)) == 0; }

namespace {

absl::Status Invalid(const std::string& kind, const std::string& parameter, const std::string& rule,
                     const std::string& got) {
  return absl::InvalidArgumentError(absl::StrCat("policy ", kind, ": ", parameter, " ", rule, ", got ", got));
}

absl::Status CheckProbability(const std::string& kind, const char* parameter, double value) {
  if (value > 0 && value <= 1) return absl::OkStatus();
  return Invalid(kind, parameter, "must be in (0, 1]", absl::StrCat(value));
}

absl::Status CheckNonNegative(const std::string& kind, const char* parameter, int64_t value) {
  if (value >= 0) return absl::OkStatus();
  return Invalid(kind, parameter, "must be >= 0", absl::StrCat(value));
}

absl::Status CheckPositive(const std::string& kind, const char* parameter, int64_t value) {
  if (value > 0) return absl::OkStatus();
  return Invalid(kind, parameter, "must be > 0", absl::StrCat(value));
}

// The budget must hold at least one selectable unit besides the positions always kept.
absl::Status CheckBudget(const std::string& kind, int64_t budget, int64_t unit, const char* unit_name,
                         int64_t always_kept) {
  if (budget < unit) {
    return Invalid(kind, "token_budget", absl::StrCat("is below one ", unit_name, " of ", unit, " tokens"),
                   absl::StrCat(budget));
  }
  if (budget < always_kept + unit) {
    return Invalid(kind, "token_budget",
                   absl::StrCat("must leave room for one ", unit_name, " of ", unit, " tokens beyond the ",
                                always_kept, " always kept"),
                   absl::StrCat(budget));
  }
  return absl::OkStatus();
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

absl::StatusOr<PolicyKind> ParsePolicyKind(std::string_view name) {
  if (name == "hybrid") return PolicyKind::kLychee;
  for (PolicyKind kind : AllPolicyKinds()) {
    if (name == PolicyName(kind)) return kind;
  }
  std::vector<std::string> names;
  for (PolicyKind kind : AllPolicyKinds()) names.push_back(PolicyName(kind));
  return absl::InvalidArgumentError(
      absl::StrCat("policy: unknown policy '", std::string(name), "' (", absl::StrJoin(names, ", "), ")"));
}

std::string PolicyName(PolicyKind kind) {
  switch (kind) {
    case PolicyKind::kDense:
      return "dense";
    case PolicyKind::kLychee:
      return "lychee";
    case PolicyKind::kDoubleP:
      return "double-p";
    case PolicyKind::kPrhs:
      return "prhs";
    case PolicyKind::kStreaming:
      return "streaming";
    case PolicyKind::kTidal:
      return "tidal";
    case PolicyKind::kQuest:
      return "quest";
  }
  return "unknown";
}

const std::vector<PolicyKind>& AllPolicyKinds() {
  static const std::vector<PolicyKind> kinds = {PolicyKind::kDense,     PolicyKind::kLychee, PolicyKind::kDoubleP,
                                                PolicyKind::kPrhs,      PolicyKind::kStreaming,
                                                PolicyKind::kTidal,     PolicyKind::kQuest};
  return kinds;
}

absl::StatusOr<PrhsSelectors> ParsePrhsSelectors(std::string_view list) {
  PrhsSelectors selectors{false, false, false};
  const std::vector<std::string> names = absl::StrSplit(absl::string_view(list.data(), list.size()), ',');
  for (const std::string& name : names) {
    if (name == "temporal") {
      selectors.temporal = true;
    } else if (name == "recency") {
      selectors.recency = true;
    } else if (name == "cross-layer") {
      selectors.cross_layer = true;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("policy prhs: prhs_selectors: unknown selector '",
                                                     name, "' (temporal, recency, cross-layer)"));
    }
  }
  return selectors;
}

std::string PrhsSelectorsName(const PrhsSelectors& selectors) {
  std::vector<std::string> names;
  if (selectors.temporal) names.push_back("temporal");
  if (selectors.recency) names.push_back("recency");
  if (selectors.cross_layer) names.push_back("cross-layer");
  return names.empty() ? "none" : absl::StrJoin(names, ",");
}

PolicySpec PolicySpec::Defaults(PolicyKind kind) {
  PolicySpec spec;
  spec.kind = kind;
  switch (kind) {
    case PolicyKind::kStreaming:
      spec.token_budget = 320;
      spec.sink_tokens = 64;
      spec.recent_tokens = 256;
      break;
    case PolicyKind::kDoubleP:
      spec.sink_tokens = 4;
      spec.recent_tokens = 64;
      break;
    case PolicyKind::kTidal:
    case PolicyKind::kQuest:
      spec.sink_tokens = 0;
      spec.recent_tokens = 0;
      break;
    case PolicyKind::kDense:
    case PolicyKind::kLychee:
    case PolicyKind::kPrhs:
      break;
  }
  return spec;
}

PolicySpec PolicySpec::LycheeAsPartition() {
  PolicySpec spec = Defaults(PolicyKind::kLychee);
  spec.from_partition = {true, true, true, true};
  return spec;
}

PolicySpec PolicySpec::WithPartitionSelection(const SelectionParams& selection) const {
  PolicySpec spec = *this;
  if (from_partition.token_budget) spec.token_budget = selection.token_budget;
  if (from_partition.block_size) spec.block_size = selection.block_size;
  if (from_partition.sink_tokens) spec.sink_tokens = selection.sink_tokens;
  if (from_partition.recent_tokens) spec.recent_tokens = selection.recent_tokens;
  spec.from_partition = {};
  return spec;
}

int64_t PolicySpec::AuditPeriod() const {
  if (!audit) return 0;
  return audit_every > 0 ? audit_every : kDefaultAuditEvery;
}

absl::Status PolicySpec::Validate(const ModelConfig& config) const {
  const std::string name = PolicyName(kind);
  if (kind == PolicyKind::kDense) return absl::OkStatus();
  if (config.sliding_window) {
    return absl::FailedPreconditionError(
        absl::StrCat("policy ", name, ": sparse policies do not support models with a sliding window"));
  }
  if (absl::Status status = CheckNonNegative(name, "sink_tokens", sink_tokens); !status.ok()) return status;
  if (absl::Status status = CheckNonNegative(name, "audit_every", audit_every); !status.ok()) return status;
  if (absl::Status status = CheckNonNegative(name, "recent_tokens", recent_tokens); !status.ok()) return status;
  switch (kind) {
    case PolicyKind::kDense:
      return absl::OkStatus();
    case PolicyKind::kLychee:
    case PolicyKind::kPrhs: {
      if (!IsPowerOfTwo(block_size)) {
        return Invalid(name, "block_size", "must be a power of two", absl::StrCat(block_size));
      }
      // The recent window can straddle one more block than it fills, plus the partial last block.
      const int64_t window =
          kind == PolicyKind::kPrhs && prhs_selectors.recency ? std::max(recent_tokens, prhs_window) : recent_tokens;
      const int64_t mandatory_blocks = CeilDiv(sink_tokens, block_size) + CeilDiv(window, block_size) + 1;
      if (absl::Status status = CheckBudget(name, token_budget, block_size, "block", mandatory_blocks * block_size);
          !status.ok()) {
        return status;
      }
      if (kind == PolicyKind::kPrhs) {
        if (!prhs_selectors.temporal && !prhs_selectors.recency && !prhs_selectors.cross_layer) {
          return Invalid(name, "prhs_selectors", "must name at least one selector", "none");
        }
        if (absl::Status status = CheckNonNegative(name, "prhs_enlargement", prhs_enlargement); !status.ok()) {
          return status;
        }
        if (absl::Status status = CheckNonNegative(name, "prhs_window", prhs_window); !status.ok()) return status;
      }
      return absl::OkStatus();
    }
    case PolicyKind::kStreaming:
      if (token_budget < sink_tokens + 1) {
        return Invalid(name, "token_budget", absl::StrCat("must exceed sink_tokens (", sink_tokens, ")"),
                       absl::StrCat(token_budget));
      }
      return absl::OkStatus();
    case PolicyKind::kTidal: {
      if (absl::Status status = CheckBudget(name, token_budget, 1, "token", sink_tokens + recent_tokens);
          !status.ok()) {
        return status;
      }
      for (size_t i = 0; i < tidal_selection_layers.size(); ++i) {
        const int64_t layer = tidal_selection_layers[i];
        if (layer < 0 || layer >= config.num_layers || (i > 0 && layer <= tidal_selection_layers[i - 1])) {
          return Invalid(name, "tidal_selection_layers",
                         absl::StrCat("must be increasing layers in [0, ", config.num_layers, ")"),
                         absl::StrCat("[", absl::StrJoin(tidal_selection_layers, ","), "]"));
        }
      }
      return absl::OkStatus();
    }
    case PolicyKind::kQuest:
      if (absl::Status status = CheckPositive(name, "page_size", page_size); !status.ok()) return status;
      // The pages of the sink, of the recent window and of the current position are always kept.
      if (absl::Status status = CheckBudget(
              name, token_budget, page_size, "page",
              (CeilDiv(sink_tokens, page_size) + CeilDiv(recent_tokens, page_size) + 1) * page_size);
          !status.ok()) {
        return status;
      }
      if (quest_dense_layers < 0 || quest_dense_layers > config.num_layers) {
        return Invalid(name, "quest_dense_layers", absl::StrCat("must be in [0, ", config.num_layers, "]"),
                       absl::StrCat(quest_dense_layers));
      }
      return absl::OkStatus();
    case PolicyKind::kDoubleP:
      if (absl::Status status = CheckProbability(name, "p1", p1); !status.ok()) return status;
      if (absl::Status status = CheckProbability(name, "p2", p2); !status.ok()) return status;
      if (absl::Status status = CheckPositive(name, "clusters", clusters); !status.ok()) return status;
      if (absl::Status status = CheckPositive(name, "kmeans_iterations", kmeans_iterations); !status.ok()) {
        return status;
      }
      if (absl::Status status = CheckPositive(name, "tail_tokens", tail_tokens); !status.ok()) return status;
      return absl::OkStatus();
  }
  return absl::OkStatus();
}

std::string PolicySpec::Describe() const {
  std::string text = PolicyName(kind);
  switch (kind) {
    case PolicyKind::kDense:
      break;
    case PolicyKind::kLychee:
      absl::StrAppend(&text, " budget=", token_budget, " block=", block_size, " sink=", sink_tokens,
                      " recent=", recent_tokens);
      break;
    case PolicyKind::kPrhs:
      absl::StrAppend(&text, " budget=", token_budget, " block=", block_size, " sink=", sink_tokens,
                      " recent=", recent_tokens, " selectors=", PrhsSelectorsName(prhs_selectors),
                      " enlargement=", prhs_enlargement, " window=", prhs_window);
      break;
    case PolicyKind::kStreaming:
      absl::StrAppend(&text, " budget=", token_budget, " sink=", sink_tokens);
      break;
    case PolicyKind::kTidal:
      absl::StrAppend(&text, " budget=", token_budget, " sink=", sink_tokens, " recent=", recent_tokens,
                      " selection_layers=",
                      tidal_selection_layers.empty() ? "default" : absl::StrJoin(tidal_selection_layers, ","));
      break;
    case PolicyKind::kQuest:
      absl::StrAppend(&text, " budget=", token_budget, " page=", page_size, " dense_layers=", quest_dense_layers,
                      " sink=", sink_tokens, " recent=", recent_tokens);
      break;
    case PolicyKind::kDoubleP:
      absl::StrAppend(&text, " p1=", p1, " p2=", p2, " clusters=", clusters, " iterations=", kmeans_iterations,
                      " sink=", sink_tokens, " recent=", recent_tokens, " tail=", tail_tokens);
      break;
  }
  if (audit) absl::StrAppend(&text, " audit", AuditPeriod() > 1 ? absl::StrCat(" every=", AuditPeriod()) : "");
  return text;
}

std::vector<int64_t> TidalSelectionLayers(const PolicySpec& spec, int64_t num_layers) {
  std::vector<int64_t> layers = spec.tidal_selection_layers;
  if (layers.empty()) {
    layers = {2, std::llround(13.0 / 32.0 * static_cast<double>(num_layers))};
  }
  std::vector<int64_t> inside;
  for (int64_t layer : layers) {
    if (layer >= 0 && layer < num_layers && (inside.empty() || layer > inside.back())) inside.push_back(layer);
  }
  return inside;
}

bool PolicyObservesPrefill(PolicyKind kind) { return kind == PolicyKind::kPrhs; }

bool PolicyNeedsPartition(PolicyKind kind) { return kind == PolicyKind::kLychee || kind == PolicyKind::kStreaming; }

}  // namespace lychee
