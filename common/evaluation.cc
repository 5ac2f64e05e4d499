#include "common/evaluation.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"

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

std::string FormatBytes(double bytes) {
  if (bytes >= 1e6) return absl::StrFormat("%.2f MB", bytes / 1e6);
  if (bytes >= 1e3) return absl::StrFormat("%.1f kB", bytes / 1e3);
  return absl::StrFormat("%.0f B", bytes);
}

std::string ContextLabel(int64_t context) {
  return context % 1024 == 0 ? absl::StrCat(context / 1024, "K") : absl::StrCat(context);
}

std::string XmlEscape(const std::string& text) {
  std::string escaped;
  for (char c : text) {
    switch (c) {
      case '&':
        escaped += "&amp;";
        break;
      case '<':
        escaped += "&lt;";
        break;
      case '>':
        escaped += "&gt;";
        break;
      default:
        escaped += c;
    }
  }
  return escaped;
}

}  // namespace

absl::StatusOr<std::vector<EvalCell>> RunEvaluation(const Model& model, const HaystackBuilder& builder,
                                                    const std::vector<EvalPolicy>& policies,
                                                    const EvalOptions& options,
                                                    const std::function<void(const EvalCell&)>& on_cell) {
  if (options.samples <= 0) return absl::InvalidArgumentError(absl::StrCat("samples must be > 0, got ", options.samples));
  if (policies.empty() || options.tasks.empty() || options.contexts.empty()) {
    return absl::InvalidArgumentError("an evaluation needs at least one policy, task and context");
  }
  const bool any_shared =
      std::any_of(policies.begin(), policies.end(), [](const EvalPolicy& p) { return p.shares_dense_prefill; });
  if (any_shared && options.prefill_attention == nullptr) {
    return absl::InvalidArgumentError("the shared prefill needs a dense attention backend");
  }
  // One pool for every sample's sequences (the shared prefill and a fork at a time), so that the
  // decode context's buckets, and on CUDA their graphs, serve every sample.
  KvPool::Options pool_options;
  const int64_t longest = *std::max_element(options.contexts.begin(), options.contexts.end());
  pool_options.num_pages = 2 * ((longest + 256) / pool_options.page_size + 1);
  pool_options.growable = true;
  LYCHEE_ASSIGN_OR_RETURN(
      std::shared_ptr<KvPool> pool,
      KvPool::Create(model.config(),
                     at::TensorOptions().dtype(model.options().dtype).device(model.options().device), pool_options));
  DecodeContext decode;
  std::vector<EvalCell> cells;
  for (RetrievalTask task : options.tasks) {
    for (int64_t context : options.contexts) {
      std::vector<Tally> tallies(policies.size());
      for (int64_t i = 0; i < options.samples; ++i) {
        LYCHEE_ASSIGN_OR_RETURN(RetrievalSample sample,
                                builder.Build(task, context, options.seed * 1000003 + static_cast<uint64_t>(i)));
        std::unique_ptr<Sequence> shared;
        at::Tensor shared_logits;
        if (any_shared) {
          shared = model.NewSequence(pool, options.prefill_attention);
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
          if (!right && options.on_failure) options.on_failure(policies[p].name, task, i, sample, produced);
        }
      }
      for (size_t p = 0; p < policies.size(); ++p) {
        const Tally& tally = tallies[p];
        EvalCell cell;
        cell.policy = policies[p].name;
        cell.description = policies[p].description;
        cell.task = RetrievalTaskName(task);
        cell.context = context;
        cell.samples = options.samples;
        cell.correct = tally.correct;
        cell.accuracy = static_cast<double>(tally.correct) / static_cast<double>(options.samples);
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
  }
  return cells;
}

std::string EvalTableHeader() {
  return absl::StrFormat("%-12s %-10s %7s %7s %8s %12s %14s %15s %8s", "policy", "task", "context", "samples",
                         "accuracy", "tokens/head", "KV read/token", "delta max/mean", "seconds");
}

std::string EvalTableRow(const EvalCell& cell) {
  const std::string tokens = cell.has_telemetry ? absl::StrFormat("%.0f", cell.tokens_per_head) : "-";
  const std::string bytes = cell.has_telemetry ? FormatBytes(cell.kv_bytes_per_token) : "-";
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
  static const char* const kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd",
                                        "#ff7f0e", "#8c564b", "#e377c2", "#17becf"};
  std::vector<std::string> tasks, policies;
  double low = INFINITY, high = 0;
  for (const EvalCell& cell : cells) {
    if (std::find(tasks.begin(), tasks.end(), cell.task) == tasks.end()) tasks.push_back(cell.task);
    if (std::find(policies.begin(), policies.end(), cell.policy) == policies.end()) policies.push_back(cell.policy);
    if (cell.has_telemetry && cell.kv_bytes_per_token > 0) {
      low = std::min(low, cell.kv_bytes_per_token);
      high = std::max(high, cell.kv_bytes_per_token);
    }
  }
  if (!(high > 0)) low = 1, high = 10;
  // Whole decades around the data.
  const double decade_low = std::floor(std::log10(low));
  const double decade_high = std::max(decade_low + 1, std::ceil(std::log10(high)));
  const int panel_width = 380, panel_height = 280, left = 60, top = 40, plot_width = 290, plot_height = 190;
  const int legend_height = 24 + 18 * static_cast<int>(policies.size());
  const int width = panel_width * static_cast<int>(std::max<size_t>(1, tasks.size()));
  const int height = panel_height + legend_height;
  std::string svg = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" "
      "font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
      width, height);
  auto x_of = [&](double bytes) {
    return (std::log10(bytes) - decade_low) / (decade_high - decade_low) * plot_width;
  };
  for (size_t t = 0; t < tasks.size(); ++t) {
    const int x0 = static_cast<int>(t) * panel_width + left;
    const int y0 = top;
    absl::StrAppendFormat(&svg, "<text x=\"%d\" y=\"%d\" font-size=\"13\" font-weight=\"bold\">%s</text>\n", x0,
                          y0 - 14, XmlEscape(tasks[t]));
    absl::StrAppendFormat(&svg,
                          "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#444\"/>\n", x0,
                          y0, plot_width, plot_height);
    for (int tick = 0; tick <= 4; ++tick) {
      const double y = y0 + plot_height - tick * plot_height / 4.0;
      absl::StrAppendFormat(&svg,
                            "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#ddd\"/>"
                            "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.2f</text>\n",
                            x0, y, x0 + plot_width, y, x0 - 4, y + 4, tick / 4.0);
    }
    for (double decade = decade_low; decade <= decade_high; ++decade) {
      const double x = x0 + x_of(std::pow(10.0, decade));
      absl::StrAppendFormat(&svg,
                            "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#ddd\"/>"
                            "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n",
                            x, y0, x, y0 + plot_height, x, y0 + plot_height + 14,
                            FormatBytes(std::pow(10.0, decade)));
    }
    absl::StrAppendFormat(&svg, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">KV bytes read per token</text>\n",
                          x0 + plot_width / 2, y0 + plot_height + 30);
    absl::StrAppendFormat(&svg,
                          "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" transform=\"rotate(-90 %d %d)\">accuracy</text>\n",
                          x0 - 38, y0 + plot_height / 2, x0 - 38, y0 + plot_height / 2);
    for (size_t p = 0; p < policies.size(); ++p) {
      std::vector<const EvalCell*> series;
      for (const EvalCell& cell : cells) {
        if (cell.task == tasks[t] && cell.policy == policies[p] && cell.has_telemetry && cell.kv_bytes_per_token > 0) {
          series.push_back(&cell);
        }
      }
      std::sort(series.begin(), series.end(), [](const EvalCell* a, const EvalCell* b) { return a->context < b->context; });
      const char* color = kColors[p % (sizeof(kColors) / sizeof(kColors[0]))];
      std::string points;
      for (const EvalCell* cell : series) {
        const double x = x0 + x_of(cell->kv_bytes_per_token);
        const double y = y0 + plot_height * (1.0 - cell->accuracy);
        absl::StrAppendFormat(&points, "%.1f,%.1f ", x, y);
        absl::StrAppendFormat(&svg,
                              "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"><title>%s %s %s: %.3f, %s</title>"
                              "</circle><text x=\"%.1f\" y=\"%.1f\" font-size=\"9\" fill=\"%s\">%s</text>\n",
                              x, y, color, XmlEscape(cell->policy), cell->task, ContextLabel(cell->context),
                              cell->accuracy, FormatBytes(cell->kv_bytes_per_token), x + 4, y - 4, color,
                              ContextLabel(cell->context));
      }
      if (series.size() > 1) {
        absl::StrAppendFormat(&svg, "<polyline points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\"/>\n",
                              points, color);
      }
    }
  }
  for (size_t p = 0; p < policies.size(); ++p) {
    const int y = panel_height + 16 + 18 * static_cast<int>(p);
    const char* color = kColors[p % (sizeof(kColors) / sizeof(kColors[0]))];
    absl::StrAppendFormat(&svg,
                          "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\" stroke-width=\"2\"/>"
                          "<text x=\"%d\" y=\"%d\">%s</text>\n",
                          left, y, left + 24, y, color, left + 30, y + 4, XmlEscape(policies[p]));
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace lychee
