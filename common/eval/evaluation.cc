#include "common/eval/evaluation.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/base/accuracy_plot.h"
#include "common/base/status_macros.h"
#include "common/model/torch_errors.h"

namespace lychee {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Greedy decoding from the prompt's last logits, one token per answer token, stopping at the
// first wrong one; returns the tokens produced.
absl::StatusOr<std::vector<int32_t>> GreedyAnswer(const Model& model, Sequence& sequence, at::Tensor logits,
                                                  const std::vector<int32_t>& expected, DecodeContext& context) {
  Sequence* const batch[] = {&sequence};
  std::vector<int32_t> produced;
  while (true) {
    produced.push_back(static_cast<int32_t>(logits.argmax().item<int64_t>()));
    if (produced.size() == expected.size() || produced.back() != expected[produced.size() - 1]) return produced;
    const int32_t next[] = {produced.back()};
    LYCHEE_ASSIGN_OR_RETURN(at::Tensor step, model.Decode(batch, next, &context));
    logits = step[0];
  }
}

// Telemetry summed over a cell's samples.
struct Tally {
  int64_t correct = 0;
  bool has_telemetry = false;
  int64_t decode_steps = 0;
  int64_t head_steps = 0;  // decode steps times (layer, KV head) pairs
  int64_t tokens = 0;
  int64_t bytes = 0;
  bool audited = false;
  int64_t audited_heads = 0;
  double max_dropped = 0;
  double sum_dropped = 0;
  double seconds = 0;

  void Add(const AttentionTelemetry* telemetry) {
    if (telemetry == nullptr) return;
    has_telemetry = true;
    decode_steps += telemetry->decode_steps;
    head_steps += telemetry->decode_steps * telemetry->num_layers * telemetry->num_kv_heads;
    for (int64_t count : telemetry->tokens_attended) tokens += count;
    bytes += telemetry->kv_bytes_read;
    if (telemetry->audited) {
      audited = true;
      audited_heads += telemetry->audited_heads;
      max_dropped = std::max(max_dropped, telemetry->max_dropped_mass);
      sum_dropped += telemetry->sum_dropped_mass;
    }
  }
};

// Under tensor parallelism a rank's backends keep the telemetry of its own KV heads: the tallies'
// sums over every rank (the decode steps and correct answers are every rank's alike), and their
// largest dropped mass, through one all-reduce that every rank makes after the same group.
absl::Status CombineTalliesOverRanks(const Model& model, std::vector<Tally>& tallies) {
  const TensorParallelGroup* group = model.options().tensor_parallel.get();
  if (group == nullptr) return absl::OkStatus();
  constexpr int64_t kFields = 6;
  const int64_t count = static_cast<int64_t>(tallies.size());
  std::vector<double> mine;
  for (const Tally& tally : tallies) {
    mine.insert(mine.end(), {static_cast<double>(tally.head_steps), static_cast<double>(tally.tokens),
                             static_cast<double>(tally.bytes), static_cast<double>(tally.audited_heads),
                             tally.sum_dropped, tally.max_dropped});
  }
  at::Tensor table;
  try {
    table = GatherFromRanks(*group, at::tensor(mine, at::kDouble).view({count, kFields}));
  } catch (const std::exception& error) {
    return StatusFromException(error, "combining the evaluation's telemetry over the tensor-parallel ranks");
  }
  const at::Tensor sums = table.sum(0);
  const at::Tensor largest = std::get<0>(table.max(0));
  for (int64_t i = 0; i < count; ++i) {
    Tally& tally = tallies[i];
    tally.head_steps = static_cast<int64_t>(sums[i][0].item<double>());
    tally.tokens = static_cast<int64_t>(sums[i][1].item<double>());
    tally.bytes = static_cast<int64_t>(sums[i][2].item<double>());
    tally.audited_heads = static_cast<int64_t>(sums[i][3].item<double>());
    tally.sum_dropped = sums[i][4].item<double>();
    tally.max_dropped = largest[i][5].item<double>();
  }
  return absl::OkStatus();
}

std::string ContextLabel(int64_t context) {
  return context % 1024 == 0 ? absl::StrCat(context / 1024, "K") : absl::StrCat(context);
}

}  // namespace

absl::StatusOr<std::vector<EvalCell>> EvaluateGroups(const Model& model, const std::vector<EvalPolicy>& policies,
                                                     const std::vector<EvalGroup>& groups,
                                                     std::shared_ptr<const AttentionBackend> prefill_attention,
                                                     const EvalFailureCallback& on_failure,
                                                     const std::function<void(const EvalCell&)>& on_cell) {
  if (policies.empty() || groups.empty()) {
    return absl::InvalidArgumentError("an evaluation needs at least one policy and one group of samples");
  }
  for (const EvalGroup& group : groups) {
    if (group.samples <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("samples must be > 0, got ", group.samples, " for ", group.task));
    }
  }
  const bool any_shared =
      std::any_of(policies.begin(), policies.end(), [](const EvalPolicy& p) { return p.shares_dense_prefill; });
  if (any_shared && prefill_attention == nullptr) {
    return absl::InvalidArgumentError("the shared prefill needs a dense attention backend");
  }
  // One pool for every sample's sequences (the shared prefill and a fork at a time), so that the
  // decode context's buckets, and on CUDA their graphs, serve every sample.
  KvPool::Options pool_options;
  const int64_t longest = std::max_element(groups.begin(), groups.end(), [](const EvalGroup& a, const EvalGroup& b) {
                            return a.context < b.context;
                          })->context;
  pool_options.num_pages = 2 * ((longest + 256) / pool_options.page_size + 1);
  pool_options.growable = true;
  LYCHEE_ASSIGN_OR_RETURN(
      std::shared_ptr<KvPool> pool,
      KvPool::Create(model.shard_config(),
                     at::TensorOptions().dtype(model.options().dtype).device(model.options().device), pool_options));
  DecodeContext decode;
  std::vector<EvalCell> cells;
  for (const EvalGroup& group : groups) {
    std::vector<Tally> tallies(policies.size());
    for (int64_t i = 0; i < group.samples; ++i) {
      LYCHEE_ASSIGN_OR_RETURN(RetrievalSample sample, group.sample(i));
      std::unique_ptr<Sequence> shared;
      at::Tensor shared_logits;
      if (any_shared) {
        shared = model.NewSequence(pool, prefill_attention);
        LYCHEE_ASSIGN_OR_RETURN(shared_logits, model.Prefill(*shared, sample.prompt_ids));
      }
      for (size_t p = 0; p < policies.size(); ++p) {
        const auto start = Clock::now();
        std::unique_ptr<Sequence> sequence;
        at::Tensor logits;
        if (policies[p].shares_dense_prefill) {
          LYCHEE_ASSIGN_OR_RETURN(sequence, model.Fork(*shared, policies[p].attention));
          logits = shared_logits;
        } else {
          sequence = model.NewSequence(pool, policies[p].attention);
          LYCHEE_ASSIGN_OR_RETURN(logits, model.Prefill(*sequence, sample.prompt_ids));
        }
        LYCHEE_ASSIGN_OR_RETURN(std::vector<int32_t> produced,
                                GreedyAnswer(model, *sequence, logits, sample.answer_ids, decode));
        const bool right = produced == sample.answer_ids;
        tallies[p].correct += right;
        tallies[p].Add(sequence->attention_state() != nullptr ? sequence->attention_state()->telemetry() : nullptr);
        tallies[p].seconds += SecondsSince(start);
        if (!right && on_failure) on_failure(policies[p].name, group.task, i, sample, produced);
      }
    }
    LYCHEE_RETURN_IF_ERROR(CombineTalliesOverRanks(model, tallies));
    for (size_t p = 0; p < policies.size(); ++p) {
      const Tally& tally = tallies[p];
      EvalCell cell;
      cell.policy = policies[p].name;
      cell.description = policies[p].description;
      cell.task = group.task;
      cell.context = group.context;
      cell.samples = group.samples;
      cell.correct = tally.correct;
      cell.accuracy = static_cast<double>(tally.correct) / static_cast<double>(group.samples);
      cell.has_telemetry = tally.has_telemetry && tally.decode_steps > 0;
      cell.decode_steps = tally.decode_steps;
      if (cell.has_telemetry) {
        cell.tokens_per_head = static_cast<double>(tally.tokens) / static_cast<double>(tally.head_steps);
        cell.kv_bytes_per_token = static_cast<double>(tally.bytes) / static_cast<double>(tally.decode_steps);
      }
      cell.audited = tally.audited;
      cell.max_dropped_mass = tally.max_dropped;
      cell.mean_dropped_mass = tally.audited_heads > 0 ? tally.sum_dropped / tally.audited_heads : 0;
      cell.seconds = tally.seconds;
      if (on_cell) on_cell(cell);
      cells.push_back(std::move(cell));
    }
  }
  return cells;
}

absl::StatusOr<std::vector<EvalCell>> RunEvaluation(const Model& model, const HaystackBuilder& builder,
                                                    const std::vector<EvalPolicy>& policies, const EvalOptions& options,
                                                    const std::function<void(const EvalCell&)>& on_cell) {
  if (options.samples <= 0)
    return absl::InvalidArgumentError(absl::StrCat("samples must be > 0, got ", options.samples));
  if (options.tasks.empty() || options.contexts.empty()) {
    return absl::InvalidArgumentError("an evaluation needs at least one policy, task and context");
  }
  std::vector<EvalGroup> groups;
  for (RetrievalTask task : options.tasks) {
    for (int64_t context : options.contexts) {
      groups.push_back(
          {RetrievalTaskName(task), context, options.samples, [&builder, &options, task, context](int64_t i) {
             return builder.Build(task, context, options.seed * 1000003 + static_cast<uint64_t>(i));
           }});
    }
  }
  return EvaluateGroups(model, policies, groups, options.prefill_attention, options.on_failure, on_cell);
}

std::string EvalTableHeader() {
  return absl::StrFormat("%-12s %-10s %7s %7s %8s %12s %14s %15s %8s", "policy", "task", "context", "samples",
                         "accuracy", "tokens/head", "KV read/token", "delta max/mean", "seconds");
}

std::string EvalTableRow(const EvalCell& cell) {
  const std::string tokens = cell.has_telemetry ? absl::StrFormat("%.0f", cell.tokens_per_head) : "-";
  const std::string bytes = cell.has_telemetry ? FormatByteCount(cell.kv_bytes_per_token) : "-";
  const std::string delta =
      cell.audited ? absl::StrFormat("%.3f/%.3f", cell.max_dropped_mass, cell.mean_dropped_mass) : "-";
  return absl::StrFormat("%-12s %-10s %7d %7d %8.3f %12s %14s %15s %8.1f", cell.policy, cell.task, cell.context,
                         cell.samples, cell.accuracy, tokens, bytes, delta, cell.seconds);
}

std::string EvalJson(const std::vector<EvalCell>& cells, const std::string& command) {
  nlohmann::json results = nlohmann::json::array();
  for (const EvalCell& cell : cells) {
    nlohmann::json entry = {{"policy", cell.policy},     {"description", cell.description},
                            {"task", cell.task},         {"context", cell.context},
                            {"samples", cell.samples},   {"correct", cell.correct},
                            {"accuracy", cell.accuracy}, {"seconds", cell.seconds}};
    if (cell.has_telemetry) {
      entry["decode_steps"] = cell.decode_steps;
      entry["tokens_attended_per_head"] = cell.tokens_per_head;
      entry["kv_bytes_read_per_token"] = cell.kv_bytes_per_token;
    }
    if (cell.audited) {
      entry["max_dropped_mass"] = cell.max_dropped_mass;
      entry["mean_dropped_mass"] = cell.mean_dropped_mass;
    }
    results.push_back(std::move(entry));
  }
  return nlohmann::json{{"command", command}, {"results", results}}.dump(2) + "\n";
}

std::string EvalPlotSvg(const std::vector<EvalCell>& cells) {
  std::vector<AccuracyPlotSeries> series;
  for (const EvalCell& cell : cells) {
    if (std::none_of(series.begin(), series.end(),
                     [&](const AccuracyPlotSeries& s) { return s.name == cell.policy; })) {
      series.push_back({cell.policy, {}});
    }
  }
  // Each series runs through its contexts in order, whatever order the cells came in.
  std::vector<const EvalCell*> by_context;
  for (const EvalCell& cell : cells) by_context.push_back(&cell);
  std::stable_sort(by_context.begin(), by_context.end(),
                   [](const EvalCell* a, const EvalCell* b) { return a->context < b->context; });
  for (const EvalCell* cell : by_context) {
    if (!cell->has_telemetry) continue;
    auto it =
        std::find_if(series.begin(), series.end(), [&](const AccuracyPlotSeries& s) { return s.name == cell->policy; });
    it->points.push_back({cell->task, cell->kv_bytes_per_token, cell->accuracy, ContextLabel(cell->context),
                          absl::StrFormat("%s %s %s: %.3f, %s", cell->policy, cell->task, ContextLabel(cell->context),
                                          cell->accuracy, FormatByteCount(cell->kv_bytes_per_token))});
  }
  return AccuracyPlotSvg(series);
}

}  // namespace lychee
