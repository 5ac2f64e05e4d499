// The evaluation harness: RULER-style retrieval tasks (common/base/retrieval_tasks.h) at chosen
// context lengths, run against any number of attention backends (selection policies), with
// greedy decoding that must produce every answer token. Per (policy, task, context) it reports
// accuracy and, from the backends' telemetry, the tokens attended per head and the KV bytes read
// per decoded token; it formats the results as a table, as JSON, and as an SVG plot of accuracy
// against KV bytes read. Used by `lychee eval`.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/accuracy_plot.h"
#include "common/base/retrieval_tasks.h"
#include "common/model/attention.h"
#include "common/model/model.h"

namespace lychee {

struct EvalPolicy {
  std::string name;         // the table's label
  std::string description;  // the policy and its parameters, for the JSON
  std::shared_ptr<const AttentionBackend> attention;
  // True when the backend prefills densely and keeps nothing from prefill in its state: its
  // sequences then start from a copy of one dense prefill shared by all such policies.
  bool shares_dense_prefill = true;
};

// Called with each failure: policy, task, sample index, expected and produced answer ids.
using EvalFailureCallback = std::function<void(const std::string& policy, const std::string& task, int64_t sample,
                                               const RetrievalSample&, const std::vector<int32_t>& produced)>;

struct EvalOptions {
  std::vector<RetrievalTask> tasks;
  std::vector<int64_t> contexts;
  int64_t samples = 20;
  uint64_t seed = 1;
  // The dense backend of the shared prefill.
  std::shared_ptr<const AttentionBackend> prefill_attention;
  EvalFailureCallback on_failure;
};

struct EvalCell {
  std::string policy;
  std::string description;
  std::string task;
  int64_t context = 0;
  int64_t samples = 0;
  int64_t correct = 0;
  double accuracy = 0;
  // From the backends' telemetry (absent for backends that keep none): decode steps run, their
  // mean tokens attended per (layer, KV head), and KV bytes read per decoded token.
  bool has_telemetry = false;
  int64_t decode_steps = 0;
  double tokens_per_head = 0;
  double kv_bytes_per_token = 0;
  // With audit: the dropped dense attention mass over every (step, layer, query head).
  bool audited = false;
  double max_dropped_mass = 0;
  double mean_dropped_mass = 0;
  // Decoding (and the policy's own prefill, if it has one), not the shared prefill.
  double seconds = 0;
};

// Runs every policy on options.samples samples of every task at every context; the samples are
// the same for every policy. Greedy decoding stops at the first wrong token. `on_cell` sees
// each cell when it is done.
absl::StatusOr<std::vector<EvalCell>> RunEvaluation(const Model& model, const HaystackBuilder& builder,
                                                    const std::vector<EvalPolicy>& policies,
                                                    const EvalOptions& options,
                                                    const std::function<void(const EvalCell&)>& on_cell = {});

// Samples evaluated together, one cell per policy: generated ones of a task at a context, or
// prompts an operator gave (then `context` is the longest of them).
struct EvalGroup {
  std::string task;
  int64_t context = 0;
  int64_t samples = 0;
  // The sample of each index in [0, samples), made when it is evaluated; an error ends the
  // evaluation with it (a caller can end it early this way, e.g. with CANCELLED).
  std::function<absl::StatusOr<RetrievalSample>(int64_t index)> sample;
};

// What RunEvaluation does for its (task, context) pairs, on any groups of samples. Under tensor
// parallelism every rank runs it with the same policies (built for its shard) and samples, and
// each cell's telemetry is every rank's KV heads' (one all-reduce after each group).
absl::StatusOr<std::vector<EvalCell>> EvaluateGroups(const Model& model, const std::vector<EvalPolicy>& policies,
                                                     const std::vector<EvalGroup>& groups,
                                                     std::shared_ptr<const AttentionBackend> prefill_attention,
                                                     const EvalFailureCallback& on_failure = {},
                                                     const std::function<void(const EvalCell&)>& on_cell = {});

std::string EvalTableHeader();
std::string EvalTableRow(const EvalCell& cell);
// The cells and what produced them (`command`), as a JSON document.
std::string EvalJson(const std::vector<EvalCell>& cells, const std::string& command);
// One panel per task: accuracy against KV bytes read per decoded token (log scale), one series per
// policy through its contexts.
std::string EvalPlotSvg(const std::vector<EvalCell>& cells);

}  // namespace lychee
