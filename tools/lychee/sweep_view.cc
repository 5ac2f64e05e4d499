#include "tools/lychee/sweep_view.h"

#include <algorithm>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/base/accuracy_plot.h"
#include "common/base/status_macros.h"

namespace lychee::cli {
namespace {

// The tasks of the table's columns, in the order dense reports them.
std::vector<std::string> Tasks(const v1::SweepResult& sweep) {
  std::vector<std::string> tasks;
  for (const v1::TaskAccuracy& task : sweep.dense().tasks()) tasks.push_back(task.task());
  return tasks;
}

std::string Accuracy(const v1::ValidationSummary& summary, const std::string& task) {
  for (const v1::TaskAccuracy& accuracy : summary.tasks()) {
    if (accuracy.task() == task) return absl::StrFormat("%.3f", accuracy.accuracy());
  }
  return "-";
}

std::string KvBytes(const v1::ValidationSummary& summary) {
  return absl::StrCat(FormatByteCount(summary.kv_bytes_per_token()), summary.kv_bytes_measured() ? "" : "*");
}

std::string Dropped(const v1::ValidationSummary& summary) {
  return summary.audited() ? absl::StrFormat("%.3f/%.3f", summary.max_dropped_mass(), summary.mean_dropped_mass())
                           : "-";
}

}  // namespace

const std::set<std::string>& SweepValuedFlags() {
  static const std::set<std::string> flags = {"target-densities",   "max-accuracy-drop", "validation-context",
                                              "validation-samples", "validation-seed",   "validation-corpus",
                                              "validation-prompts", "validation-budget"};
  return flags;
}

const std::set<std::string>& SweepSwitches() {
  static const std::set<std::string> switches = {"sweep", "audit"};
  return switches;
}

absl::StatusOr<std::vector<double>> ParseTargetDensities(const std::string& text) {
  std::vector<double> targets;
  if (text.empty()) return targets;
  for (const std::string& item : std::vector<std::string>(absl::StrSplit(text, ','))) {
    char* end = nullptr;
    const double value = std::strtod(item.c_str(), &end);
    if (item.empty() || *end != '\0') {
      return absl::InvalidArgumentError(absl::StrCat("--target-densities: '", item, "' is not a number"));
    }
    targets.push_back(value);
  }
  return targets;
}

absl::Status AddSweepFromArgs(const Args& args, v1::SubmitCalibrationJobRequest& request) {
  const bool listed = args.Has("target-densities");
  if (listed && args.Has("sweep")) return absl::InvalidArgumentError("give --target-densities or --sweep, not both");
  if (!listed && !args.Has("sweep")) {
    for (const std::string& flag : SweepValuedFlags()) {
      if (args.Has(flag))
        return absl::InvalidArgumentError(absl::StrCat("--", flag, " goes with --target-densities or --sweep"));
    }
    if (args.Has("audit")) return absl::InvalidArgumentError("--audit goes with --target-densities or --sweep");
    return absl::OkStatus();
  }
  if (args.Has("target-density")) {
    return absl::InvalidArgumentError(
        "--target-density trains one partition; a sweep takes --target-densities or --sweep");
  }
  LYCHEE_ASSIGN_OR_RETURN(const std::vector<double> targets,
                          ParseTargetDensities(listed ? *args.Get("target-densities") : kDefaultSweepTargets));
  for (double target : targets) request.add_target_densities(target);
  v1::SweepConfig* sweep = request.mutable_sweep();
  if (args.Has("max-accuracy-drop")) {
    LYCHEE_ASSIGN_OR_RETURN(const double drop, args.GetDouble("max-accuracy-drop", 0));
    sweep->set_max_accuracy_drop(drop);
  }
  if (args.Has("validation-context")) {
    LYCHEE_ASSIGN_OR_RETURN(const int64_t context, args.GetInt("validation-context", 0));
    sweep->set_validation_context_tokens(context);
  }
  if (args.Has("validation-samples")) {
    LYCHEE_ASSIGN_OR_RETURN(const int64_t samples, args.GetInt("validation-samples", 0));
    sweep->set_validation_samples(samples);
  }
  if (args.Has("validation-seed")) {
    LYCHEE_ASSIGN_OR_RETURN(const int64_t seed, args.GetInt("validation-seed", 0));
    sweep->set_validation_seed(static_cast<uint64_t>(seed));
  }
  if (args.Has("validation-budget")) {
    LYCHEE_ASSIGN_OR_RETURN(const int64_t budget, args.GetInt("validation-budget", 0));
    sweep->set_validation_token_budget(budget);
  }
  if (args.Has("validation-corpus")) sweep->set_validation_corpus(*args.Get("validation-corpus"));
  if (args.Has("validation-prompts")) sweep->set_validation_prompts(*args.Get("validation-prompts"));
  if (args.Has("audit")) sweep->set_audit(true);
  return absl::OkStatus();
}

bool IsSweep(const v1::Job& job) { return job.request().has_sweep() || job.has_sweep(); }

std::string RenderSweepTable(const v1::Job& job) {
  const v1::SweepResult& sweep = job.sweep();
  const v1::SweepConfig& config = job.request().sweep();
  std::string text = absl::StrFormat(
      "sweep over %d target(s): validation %s, budget %d tokens; bound: accuracy >= dense - %.3f on every task\n",
      job.request().target_densities_size(),
      sweep.validation_context_tokens() > 0 ? absl::StrCat(sweep.validation_context_tokens(), "-token prompts")
                                            : std::string("prompts file ") + config.validation_prompts(),
      sweep.validation_token_budget(), config.max_accuracy_drop());
  const std::vector<std::string> tasks = Tasks(sweep);
  absl::StrAppendFormat(&text, "  %-8s %8s %8s %13s", "target", "expected", "deployed", "KV read/token");
  for (const std::string& task : tasks) absl::StrAppendFormat(&text, " %9s", task);
  absl::StrAppendFormat(&text, " %15s %8s %8s  %s\n", "dropped max/mean", "train s", "valid s", "verdict");
  if (sweep.has_dense()) {
    absl::StrAppendFormat(&text, "  %-8s %8s %8s %13s", "dense", "-", "1.000", KvBytes(sweep.dense()));
    for (const std::string& task : tasks) absl::StrAppendFormat(&text, " %9s", Accuracy(sweep.dense(), task));
    absl::StrAppendFormat(&text, " %15s %8s %8.1f\n", Dropped(sweep.dense()), "-", sweep.dense().seconds());
  }
  for (int i = 0; i < sweep.rows_size(); ++i) {
    const v1::SweepRow& row = sweep.rows(i);
    const bool chosen = sweep.has_chosen() && sweep.chosen() == i;
    absl::StrAppendFormat(&text, "%s %-8.4g %8.3f %8.3f %13s", chosen ? "*" : " ", row.target_density(),
                          row.expected_density(), row.deployed_density(), KvBytes(row.validation()));
    for (const std::string& task : tasks) absl::StrAppendFormat(&text, " %9s", Accuracy(row.validation(), task));
    absl::StrAppendFormat(&text, " %15s %8.1f %8.1f  %s%s\n", Dropped(row.validation()), row.training_seconds(),
                          row.validation_seconds(), row.verdict(),
                          chosen ? absl::StrCat(", published as version ", row.partition_version()) : "");
  }
  const bool computed = !sweep.dense().kv_bytes_measured() ||
                        std::any_of(sweep.rows().begin(), sweep.rows().end(),
                                    [](const v1::SweepRow& row) { return !row.validation().kv_bytes_measured(); });
  if (sweep.has_dense() && computed) text += "  * KV bytes computed from the roles and the budget (no telemetry)\n";
  if (!sweep.summary().empty()) absl::StrAppend(&text, "  ", sweep.summary(), "\n");
  return text;
}

std::string RenderSweepSvg(const v1::Job& job) {
  const v1::SweepResult& sweep = job.sweep();
  std::vector<AccuracyPlotSeries> series(2);
  series[0].name = "dense";
  series[1].name = absl::StrCat(job.name(), " partitions (label: target density)");
  for (const v1::TaskAccuracy& task : sweep.dense().tasks()) {
    series[0].points.push_back({task.task(), sweep.dense().kv_bytes_per_token(), task.accuracy(), "dense",
                                absl::StrFormat("dense %s: %.3f, %s", task.task(), task.accuracy(),
                                                FormatByteCount(sweep.dense().kv_bytes_per_token()))});
  }
  // Joined from the fewest bytes read to the most.
  std::vector<const v1::SweepRow*> rows;
  for (const v1::SweepRow& row : sweep.rows()) rows.push_back(&row);
  std::stable_sort(rows.begin(), rows.end(), [](const v1::SweepRow* a, const v1::SweepRow* b) {
    return a->validation().kv_bytes_per_token() < b->validation().kv_bytes_per_token();
  });
  for (const v1::SweepRow* row : rows) {
    const bool chosen = row->partition_version() != 0;
    for (const v1::TaskAccuracy& task : row->validation().tasks()) {
      series[1].points.push_back(
          {task.task(), row->validation().kv_bytes_per_token(), task.accuracy(),
           absl::StrCat(absl::StrFormat("%.4g", row->target_density()), chosen ? " (published)" : ""),
           absl::StrFormat("target %.4g (deployed %.3f) %s: %.3f, %s", row->target_density(), row->deployed_density(),
                           task.task(), task.accuracy(), FormatByteCount(row->validation().kv_bytes_per_token()))});
    }
  }
  return AccuracyPlotSvg(series);
}

}  // namespace lychee::cli
