// End-to-end decode latency of a whole model on the GPU (bf16, lychee::Model with the CUDA attention
// kernels over a paged KV pool): dense attention, hybrid attention (layer 0 dense, then KV head 0 of
// every layer a retrieval head and the others sparse, budget 4096 by default), and no attention at
// all (the rest of the step alone), at several contexts and batch sizes; beside each row the
// bandwidth limit, bytes that must be read per step (weights plus the KV actually attended) over the
// device-to-device copy bandwidth measured in the same run.
//
// The KV pool is filled by a prefill of random token ids whose attention is skipped (the backend
// hands back its queries while the cache fills): keys and values are the model's own projections of
// those tokens, written where decode reads them, and the fill costs the projections' matmuls only
// (a real 128K prefill would spend minutes in attention per sequence, and is not what is measured).
// max(batches) sequences take their pages for the largest context up front and are topped up
// context after context; batch B decodes the first B of them.
//
// Each (attention, batch) row decodes with its own DecodeContext, so with --graphs true (the
// default) its step is captured as a CUDA graph on the first steps and replayed after. Timing: wall
// clock from the call of Model::Decode until its logits are complete on the device
// (cudaDeviceSynchronize), median of `steps` after `warmup` steps; "host" is the median time for
// Model::Decode to return (writing the step's inputs, planning every layer, launching the graph or
// the operations). "none" is the step without attention: the rest of the step, whose weight-read
// floor is the weights over the copy bandwidth.
//
// With --audit-every N, each row also decodes hybrid with the sampled audit (every Nth step of each
// sequence audited on the device) and prints its cost: the mean step over a whole number of periods
// (at least 4, after a warmup that holds two audited steps, so that both graphs are captured)
// against the plain hybrid step's mean over as many steps.
//
// A configuration whose KV pool does not fit the GPU's free memory is RESOURCE_EXHAUSTED with the
// sizes, before anything is allocated for it.
//
// With --tensor-parallel N the model runs on N GPUs over NCCL (rank 0 here, the others this binary
// re-executed, each on its own GPU, making the same steps; rank 0 prints): each rank's limit is its
// shard's weights and KV over the copy bandwidth, and "all-reduce" is the step's collectives timed
// alone (2 per layer of [batch, hidden] bf16, the embedding's, and the logits' [batch, vocab] float32).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/cuda_timing.h"
#include "bench/median.h"
#include "common/base/head_partition.h"
#include "common/base/status_macros.h"
#include "common/model/model.h"
#include "common/model/rank_workers.h"
#include "common/model/tensor_parallel.h"
#include "common/service/command_line.h"
#include "common/service/rank_flags.h"
#include "kernels/cuda_attention.h"

ABSL_FLAG(std::string, model, "", "the model directory (required)");
ABSL_FLAG(std::string, contexts, "32768,65536,131072", "contexts in tokens, comma-separated");
ABSL_FLAG(std::string, batches, "1,4", "batch sizes, comma-separated");
ABSL_FLAG(int64_t, steps, 10, "measured decode steps of each row");
ABSL_FLAG(int64_t, warmup, 3, "decode steps before them");
ABSL_FLAG(int64_t, budget, 4096, "the token budget of the hybrid rows' sparse heads");
ABSL_FLAG(bool, graphs, true, "capture each row's step as a CUDA graph and replay it (true or false)");
ABSL_FLAG(bool, overlap_launches, true,
          "start each fused kernel of the step while the one before finishes (programmatic dependent launch)");
ABSL_FLAG(int64_t, audit_every, 0, "also decode hybrid with the sampled audit every Nth step (0: no audit rows)");
ABSL_FLAG(std::string, json, "", "also write the rows to this file as JSON lines");
ABSL_FLAG(int64_t, tensor_parallel, 1, "GPUs (ranks over NCCL, each its shard of the weights) to decode across");

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
// Working memory besides weights and KV caches: a prefill chunk's activations (2048 tokens), the
// logits, the decode kernels' workspaces.
constexpr int64_t kWorkingBytes = int64_t{2} << 30;

using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point since) {
  return std::chrono::duration<double, std::milli>(Clock::now() - since).count();
}

absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(error)));
}

enum class Attention { kNone, kDense, kHybrid, kAudited };

const char* Name(Attention attention) {
  switch (attention) {
    case Attention::kNone:
      return "none";
    case Attention::kDense:
      return "dense";
    case Attention::kHybrid:
      return "hybrid";
    case Attention::kAudited: return "hybrid+audit";
  }
  return "?";
}

// The backend every benchmark sequence is created with: it forwards decode steps to the dense or
// the hybrid CUDA backend, or does no attention at all (hands back the queries), as selected
// between rows; prefill (the cache fill) never attends. One pool then serves all of them. Each row
// decodes with its own DecodeContext, whose workspaces and graphs the selected backend made. The
// sequences' states are the audited backend's (where there is one), which the others account in
// as well.
class SwitchedAttention : public lychee::AttentionBackend {
 public:
  SwitchedAttention(std::shared_ptr<const AttentionBackend> dense, std::shared_ptr<const AttentionBackend> hybrid,
                    std::shared_ptr<const AttentionBackend> audited)
      : dense_(std::move(dense)), hybrid_(std::move(hybrid)), audited_(std::move(audited)) {}

  void Select(Attention attention) { attention_ = attention; }

  std::unique_ptr<lychee::SequenceAttentionState> NewSequenceState() const override {
    return audited_ != nullptr ? audited_->NewSequenceState() : nullptr;
  }

  at::Tensor Attend(const lychee::AttentionInput& input) const override { return input.queries; }

  std::unique_ptr<lychee::DecodeWorkspace> NewDecodeWorkspace(const lychee::KvPool& pool,
                                                              const lychee::DecodeCapacity& capacity) const override {
    if (attention_ == Attention::kNone) return std::make_unique<lychee::DecodeWorkspace>();
    return Selected().NewDecodeWorkspace(pool, capacity);
  }
  absl::Status PlanDecodeStep(const lychee::DecodeStep& step, lychee::DecodeWorkspace& workspace) const override {
    if (attention_ == Attention::kNone) return absl::OkStatus();
    return Selected().PlanDecodeStep(step, workspace);
  }
  at::Tensor AttendDecode(int layer, const at::Tensor& queries, const lychee::DecodeStep& step,
                          lychee::DecodeWorkspace& workspace) const override {
    if (attention_ == Attention::kNone) return queries;
    return Selected().AttendDecode(layer, queries, step, workspace);
  }
  bool CapturesDecode() const override { return true; }

 private:
  const AttentionBackend& Selected() const {
    return attention_ == Attention::kDense ? *dense_ : attention_ == Attention::kHybrid ? *hybrid_ : *audited_;
  }

  std::shared_ptr<const AttentionBackend> dense_, hybrid_, audited_;
  Attention attention_ = Attention::kNone;
};

// Bytes one decode step must read on one rank: every weight of its shard once (the embedding only for
// the batch's rows) and the keys and values each of its heads attends to. `config` is the rank's
// shard (Model::shard_config) with its vocabulary slice as vocab_size; `partition` its heads' roles.
struct ByteModel {
  const lychee::ModelConfig config;
  const lychee::HeadPartition& partition;

  int64_t element_bytes() const { return 2; }  // bf16
  int64_t weight_bytes(int64_t batch) const {
    const lychee::ModelConfig& c = config;
    const int64_t q_rows = c.num_attention_heads * c.head_dim;
    const int64_t kv_rows = c.num_kv_heads * c.head_dim;
    const int64_t per_layer = c.hidden_size * (q_rows + 2 * kv_rows) + q_rows * c.hidden_size +
                              3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size;
    return element_bytes() * (c.num_layers * per_layer + c.vocab_size * c.hidden_size + c.hidden_size +
                              batch * c.hidden_size);
  }
  // Keys and values of one position in one (layer, KV head).
  int64_t position_bytes() const { return 2 * config.head_dim * element_bytes(); }
  int64_t kv_bytes_per_token() const { return config.num_layers * config.num_kv_heads * position_bytes(); }
  int64_t kv_bytes(Attention attention, int64_t batch, int64_t context) const {
    if (attention == Attention::kNone) return 0;
    if (attention == Attention::kDense) return batch * context * kv_bytes_per_token();
    int64_t positions = 0;
    for (int64_t layer = 0; layer < config.num_layers; ++layer) {
      for (int64_t head = 0; head < config.num_kv_heads; ++head) {
        positions += partition.role(layer, head) == lychee::HeadRole::kRetrieval
                         ? context
                         : std::min(context, partition.selection().token_budget);
      }
    }
    return batch * positions * position_bytes();
  }
};

struct Measurement {
  double median_ms = 0;
  double mean_ms = 0;
  double host_ms = 0;  // median time for Model::Decode to return
  lychee::DecodeStats stats;
};

struct Bench {
  const lychee::Model& model;
  SwitchedAttention& attention;
  std::vector<std::unique_ptr<lychee::Sequence>>& sequences;
  int steps;
  int warmup;
  bool graphs;
  std::mt19937 rng{1};

  std::vector<int32_t> RandomIds(int64_t count) {
    std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(model.config().vocab_size) - 1);
    std::vector<int32_t> ids(count);
    for (int32_t& id : ids) id = token(rng);
    return ids;
  }

  // Tops every sequence up to `context` positions.
  absl::Status Fill(int64_t context) {
    attention.Select(Attention::kNone);
    for (auto& sequence : sequences) {
      if (sequence->length() >= context) continue;
      LYCHEE_RETURN_IF_ERROR(model.Prefill(*sequence, RandomIds(context - sequence->length())).status());
    }
    return CudaStatus(cudaDeviceSynchronize(), "fill");
  }

  absl::StatusOr<Measurement> Measure(Attention which, int64_t batch) { return Measure(which, batch, warmup, steps); }

  absl::StatusOr<Measurement> Measure(Attention which, int64_t batch, int warmup, int steps) {
    attention.Select(which);
    std::vector<lychee::Sequence*> members;
    for (int64_t i = 0; i < batch; ++i) members.push_back(sequences[i].get());
    lychee::DecodeOptions options;
    options.cuda_graphs = graphs;
    lychee::DecodeContext context(options);
    std::vector<double> wall, host;
    for (int step = 0; step < warmup + steps; ++step) {
      const std::vector<int32_t> ids = RandomIds(batch);
      LYCHEE_RETURN_IF_ERROR(CudaStatus(cudaDeviceSynchronize(), "before a decode step"));
      const Clock::time_point start = Clock::now();
      LYCHEE_RETURN_IF_ERROR(model.Decode(members, ids, &context).status());
      const double queued = MsSince(start);
      LYCHEE_RETURN_IF_ERROR(CudaStatus(cudaDeviceSynchronize(), "decode step"));
      if (step >= warmup) {
        wall.push_back(MsSince(start));
        host.push_back(queued);
      }
    }
    Measurement m;
    m.median_ms = lychee::bench::Median(wall);
    for (double ms : wall) m.mean_ms += ms / static_cast<double>(wall.size());
    m.host_ms = lychee::bench::Median(host);
    m.stats = context.stats();
    return m;
  }
};

// RESOURCE_EXHAUSTED, with the sizes, when a pool for `batch` sequences of `capacity` positions does
// not fit the GPU's free memory beside the loaded model.
absl::Status CheckFits(int64_t batch, int64_t capacity, const ByteModel& bytes) {
  size_t free_bytes = 0, total_bytes = 0;
  LYCHEE_RETURN_IF_ERROR(CudaStatus(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo"));
  const double needed = static_cast<double>(batch) * capacity * bytes.kv_bytes_per_token();
  if (needed + kWorkingBytes <= static_cast<double>(free_bytes)) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrFormat(
      "a KV pool for batch %d at %d positions needs %.1f GiB (%d KiB per position and sequence) plus %.1f GiB of "
      "working memory; the GPU has %.1f GiB free of %.1f GiB with the model's %.2f GiB of weights loaded",
      batch, capacity, needed / kGiB, bytes.kv_bytes_per_token() / 1024, kWorkingBytes / kGiB, free_bytes / kGiB,
      total_bytes / kGiB, bytes.weight_bytes(0) / kGiB));
}

absl::StatusOr<std::vector<int64_t>> ParseList(const std::string& flag, const std::string& value) {
  std::vector<int64_t> list;
  for (absl::string_view part : absl::StrSplit(value, ',')) {
    int64_t number;
    if (!absl::SimpleAtoi(part, &number) || number <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(flag, " takes positive integers separated by commas, got '",
                                                     value, "'"));
    }
    list.push_back(number);
  }
  return list;
}

// The command line's values, checked.
struct Flags {
  std::string model_dir;
  std::vector<int64_t> contexts;
  std::vector<int64_t> batches;
  int64_t steps = 0;
  int64_t warmup = 0;
  int64_t budget = 0;
  bool graphs = true;
  bool overlap_launches = true;
  int64_t audit_every = 0;  // 0: no audit rows
  std::string json_path;
  int tensor_parallel = 1;

  // The audit rows' warmup and measured steps: two audited steps in the warmup (the eager one and
  // the capture), then whole periods, at least four.
  int audit_warmup() const { return static_cast<int>(std::max(warmup, 2 * audit_every + 1)); }
  int audit_steps() const {
    return static_cast<int>((std::max(steps, 4 * audit_every) + audit_every - 1) / audit_every * audit_every);
  }
};

absl::StatusOr<Flags> FlagsFromCommandLine() {
  Flags flags;
  flags.model_dir = absl::GetFlag(FLAGS_model);
  if (flags.model_dir.empty()) return absl::InvalidArgumentError("--model DIR is required");
  LYCHEE_ASSIGN_OR_RETURN(flags.contexts, ParseList("--contexts", absl::GetFlag(FLAGS_contexts)));
  LYCHEE_ASSIGN_OR_RETURN(flags.batches, ParseList("--batches", absl::GetFlag(FLAGS_batches)));
  LYCHEE_ASSIGN_OR_RETURN(flags.steps, lychee::FlagInRange(FLAGS_steps, 1, 1 << 20));
  LYCHEE_ASSIGN_OR_RETURN(flags.warmup, lychee::FlagInRange(FLAGS_warmup, 0, 1 << 20));
  LYCHEE_ASSIGN_OR_RETURN(flags.budget, lychee::FlagInRange(FLAGS_budget, 1, int64_t{1} << 30));
  LYCHEE_ASSIGN_OR_RETURN(flags.audit_every, lychee::FlagInRange(FLAGS_audit_every, 0, 1 << 20));
  flags.graphs = absl::GetFlag(FLAGS_graphs);
  flags.overlap_launches = absl::GetFlag(FLAGS_overlap_launches);
  flags.json_path = absl::GetFlag(FLAGS_json);
  LYCHEE_ASSIGN_OR_RETURN(const int64_t tensor_parallel, lychee::FlagInRange(FLAGS_tensor_parallel, 1, 64));
  flags.tensor_parallel = static_cast<int>(tensor_parallel);
  std::sort(flags.contexts.begin(), flags.contexts.end());
  return flags;
}

// The median time of one decode step's all-reduces alone at `batch` rows, over `group`.
absl::StatusOr<double> AllReduceMs(const lychee::TensorParallelGroup& group, const lychee::ModelConfig& config,
                                   int64_t batch) {
  const at::TensorOptions on_gpu = at::TensorOptions().device(at::kCUDA);
  at::Tensor hidden = at::zeros({batch, config.hidden_size}, on_gpu.dtype(at::kBFloat16));
  at::Tensor logits = at::zeros({batch, config.vocab_size}, on_gpu.dtype(at::kFloat));
  std::vector<double> times;
  for (int repeat = 0; repeat < 25; ++repeat) {
    LYCHEE_RETURN_IF_ERROR(CudaStatus(cudaDeviceSynchronize(), "before the all-reduces"));
    const Clock::time_point start = Clock::now();
    for (int64_t i = 0; i < 2 * config.num_layers + 1; ++i) group.AllReduceSum(hidden);
    group.AllReduceSum(logits);
    LYCHEE_RETURN_IF_ERROR(CudaStatus(cudaDeviceSynchronize(), "the all-reduces"));
    if (repeat >= 5) times.push_back(MsSince(start));
  }
  return lychee::bench::Median(times);
}

absl::Status Run(const Flags& flags, std::shared_ptr<lychee::TensorParallelGroup> group) {
  LYCHEE_ASSIGN_OR_RETURN(lychee::ModelOptions options, lychee::ModelOptionsForDevice("cuda"));
  options.overlap_kernel_launches = flags.overlap_launches;
  options.tensor_parallel = group;
  const int rank = group != nullptr ? group->rank() : 0, world_size = group != nullptr ? group->world_size() : 1;
  // Every rank makes the same steps; rank 0 alone reports them.
  if (rank > 0 && std::freopen("/dev/null", "w", stdout) == nullptr) {
    return absl::InternalError("cannot silence a worker rank's output");
  }
  cudaDeviceProp prop;
  LYCHEE_RETURN_IF_ERROR(CudaStatus(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties"));
  const double copy_gbs = lychee::bench::CopyBandwidthGBs();
  std::printf("device: %s, %.1f GiB; device-to-device copy: %.0f GB/s (read + write)\n", prop.name,
              prop.totalGlobalMem / kGiB, copy_gbs);

  Clock::time_point start = Clock::now();
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<lychee::Model> model, lychee::Model::Load(flags.model_dir, options));
  c10::cuda::CUDACachingAllocator::emptyCache();  // the loader's temporaries
  const lychee::ModelConfig& config = model->config();
  std::printf("model %s: %lld layers, %lld heads, %lld KV heads, head_dim %lld; loaded in %.1f s%s\n",
              flags.model_dir.c_str(), static_cast<long long>(config.num_layers),
              static_cast<long long>(config.num_attention_heads), static_cast<long long>(config.num_kv_heads),
              static_cast<long long>(config.head_dim), MsSince(start) / 1e3,
              world_size > 1 ? absl::StrCat(", across ", world_size, " GPUs (limits per GPU)").c_str() : "");

  // Layer 0 dense, KV head 0 of every later layer a retrieval head, the others sparse.
  std::vector<lychee::HeadRole> roles;
  for (int64_t layer = 0; layer < config.num_layers; ++layer) {
    for (int64_t head = 0; head < config.num_kv_heads; ++head) {
      roles.push_back(layer == 0 || head == 0 ? lychee::HeadRole::kRetrieval : lychee::HeadRole::kSparse);
    }
  }
  lychee::SelectionParams selection;
  selection.token_budget = flags.budget;
  auto partition = std::make_shared<const lychee::HeadPartition>(config.num_layers, config.num_kv_heads,
                                                                 std::move(roles), selection);
  LYCHEE_RETURN_IF_ERROR(partition->ValidateFor(config));
  const lychee::ModelConfig& shard_config = model->shard_config();
  if (group != nullptr) {
    LYCHEE_ASSIGN_OR_RETURN(lychee::HeadPartition shard, lychee::ShardHeadPartition(*partition, rank, world_size));
    partition = std::make_shared<const lychee::HeadPartition>(std::move(shard));
  }
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<const lychee::AttentionBackend> hybrid,
                          lychee::MakeCudaHybridAttention(partition, shard_config));
  std::shared_ptr<const lychee::AttentionBackend> audited;
  if (flags.audit_every > 0) {
    LYCHEE_ASSIGN_OR_RETURN(audited, lychee::MakeCudaHybridAttention(partition, shard_config, flags.audit_every));
  }
  auto attention = std::make_shared<SwitchedAttention>(lychee::MakeCudaDenseAttention(shard_config), hybrid, audited);
  lychee::ModelConfig rank_bytes_config = shard_config;
  rank_bytes_config.vocab_size = lychee::VocabSliceOf(config.vocab_size, rank, world_size).size;
  const ByteModel bytes{rank_bytes_config, *partition};

  const std::vector<Attention> kinds = {Attention::kDense, Attention::kHybrid, Attention::kNone};
  const int64_t max_batch = *std::max_element(flags.batches.begin(), flags.batches.end());
  // Decode steps add positions: every row of the largest context.
  const int64_t audit_steps = flags.audit_every > 0 ? 2 * (flags.audit_warmup() + flags.audit_steps()) : 0;
  const int64_t capacity =
      flags.contexts.back() + static_cast<int64_t>(flags.batches.size()) *
                                  (static_cast<int64_t>(kinds.size()) * (flags.warmup + flags.steps) + audit_steps);
  LYCHEE_RETURN_IF_ERROR(CheckFits(max_batch, capacity, bytes));
  const int64_t pages_per_sequence = (capacity + lychee::kDefaultPageSize - 1) / lychee::kDefaultPageSize;
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<lychee::KvPool> pool, model->NewKvPool(max_batch * pages_per_sequence));
  std::vector<std::unique_ptr<lychee::Sequence>> sequences;
  for (int64_t i = 0; i < max_batch; ++i) {
    sequences.push_back(model->NewSequence(pool, attention));
    LYCHEE_RETURN_IF_ERROR(sequences.back()->Reserve(capacity));
  }

  Bench bench{*model, *attention, sequences, static_cast<int>(flags.steps), static_cast<int>(flags.warmup),
              flags.graphs};
  const bool writes_json = !flags.json_path.empty() && rank == 0;
  std::FILE* json = writes_json ? std::fopen(flags.json_path.c_str(), "w") : nullptr;
  if (writes_json && json == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cannot write ", flags.json_path));
  }
  std::printf("copy bandwidth %.0f GB/s; weights read per step %.2f GB; limit = (weights + KV attended) / copy "
              "bandwidth; ratio = ours / limit; CUDA graphs %s\n",
              copy_gbs, bytes.weight_bytes(1) / 1e9, flags.graphs ? "on" : "off");
  std::printf("%5s %7s | %8s %8s %6s | %8s %8s %6s | %7s | %8s %8s %6s | %s\n", "batch", "context", "dense", "limit",
              "ratio", "hybrid", "limit", "ratio", "speedup", "no-attn", "floor", "ratio", "host ms (dense/hybrid/none)");
  std::vector<std::string> notes;
  for (int64_t context : flags.contexts) {
    start = Clock::now();
    LYCHEE_RETURN_IF_ERROR(bench.Fill(context));
    std::printf("(filled %lld sequences to %lld positions in %.1f s)\n", static_cast<long long>(max_batch),
                static_cast<long long>(context), MsSince(start) / 1e3);
    for (int64_t batch : flags.batches) {
      std::vector<Measurement> rows;
      std::vector<double> limits;
      for (Attention kind : kinds) {
        LYCHEE_ASSIGN_OR_RETURN(Measurement m, bench.Measure(kind, batch));
        rows.push_back(m);
        limits.push_back((bytes.weight_bytes(batch) + bytes.kv_bytes(kind, batch, context)) / (copy_gbs * 1e9) * 1e3);
        const lychee::DecodeStats& st = m.stats;
        if (flags.graphs && (st.capture_failures > 0 || st.graph_replays == 0)) {
          notes.push_back(absl::StrFormat("%s B%d %dK: %d graph replays, %d eager steps, capture failures %d %s",
                                          Name(kind), batch, context / 1024, st.graph_replays, st.eager_steps,
                                          st.capture_failures, st.last_capture_error));
        }
      }
      std::string all_reduce;
      if (group != nullptr) {
        // The step's limit on several GPUs adds its collectives, which no bandwidth of one GPU bounds.
        LYCHEE_ASSIGN_OR_RETURN(const double all_reduce_ms, AllReduceMs(*group, config, batch));
        for (double& limit : limits) limit += all_reduce_ms;
        all_reduce = absl::StrFormat(" | all-reduce %.3f ms (in the limits)", all_reduce_ms);
      }
      std::printf(
          "%5lld %6lldK | %8.2f %8.2f %6.2f | %8.2f %8.2f %6.2f | %7.2f | %8.2f %8.2f %6.2f | %.3f / %.3f / %.3f%s\n",
          static_cast<long long>(batch), static_cast<long long>(context / 1024), rows[0].median_ms, limits[0],
          rows[0].median_ms / limits[0], rows[1].median_ms, limits[1], rows[1].median_ms / limits[1],
          rows[0].median_ms / rows[1].median_ms, rows[2].median_ms, limits[2], rows[2].median_ms / limits[2],
          rows[0].host_ms, rows[1].host_ms, rows[2].host_ms, all_reduce.c_str());
      if (audited != nullptr) {
        // Plain and audited hybrid over the same number of steps, means (the audited steps are the
        // tail of the distribution, which a median would hide).
        LYCHEE_ASSIGN_OR_RETURN(const Measurement plain,
                                bench.Measure(Attention::kHybrid, batch, flags.audit_warmup(), flags.audit_steps()));
        LYCHEE_ASSIGN_OR_RETURN(const Measurement with_audit,
                                bench.Measure(Attention::kAudited, batch, flags.audit_warmup(), flags.audit_steps()));
        std::printf(
            "%5lld %6lldK | audit every %lld steps: hybrid mean %.3f ms, with the audit %.3f ms (%+.1f%%) over %d "
            "steps; graphs captured %lld, replays %lld, eager steps %lld\n",
            static_cast<long long>(batch), static_cast<long long>(context / 1024),
            static_cast<long long>(flags.audit_every), plain.mean_ms, with_audit.mean_ms,
            100 * (with_audit.mean_ms / plain.mean_ms - 1), flags.audit_steps(),
            static_cast<long long>(with_audit.stats.graph_captures),
            static_cast<long long>(with_audit.stats.graph_replays),
            static_cast<long long>(with_audit.stats.eager_steps));
        if (json != nullptr) {
          std::fprintf(json,
                       "{\"attention\": \"hybrid+audit\", \"audit_every\": %lld, \"batch\": %lld, \"context\": %lld, "
                       "\"mean_ms\": %.4f, \"hybrid_mean_ms\": %.4f}\n",
                       static_cast<long long>(flags.audit_every), static_cast<long long>(batch),
                       static_cast<long long>(context), with_audit.mean_ms, plain.mean_ms);
        }
      }
      std::fflush(stdout);
      if (json != nullptr) {
        for (size_t k = 0; k < kinds.size(); ++k) {
          std::fprintf(json,
                       "{\"attention\": \"%s\", \"batch\": %lld, \"context\": %lld, \"ms\": %.4f, \"limit_ms\": %.4f, "
                       "\"host_ms\": %.4f, \"graphs\": %s, \"copy_gbs\": %.1f}\n",
                       Name(kinds[k]), static_cast<long long>(batch), static_cast<long long>(context),
                       rows[k].median_ms, limits[k], rows[k].host_ms, flags.graphs ? "true" : "false", copy_gbs);
        }
        std::fflush(json);
      }
    }
  }
  if (json != nullptr) std::fclose(json);
  for (const std::string& note : notes) std::printf("note: %s\n", note.c_str());
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("usage: e2e_bench --model DIR [flags]");
  absl::Status status = lychee::ParseFlags(argc, argv, __FILE__);
  absl::StatusOr<Flags> flags = status.ok() ? FlagsFromCommandLine() : status;
  status = flags.status();
  if (status.ok()) {
    const lychee::WorkerRankFlags worker = lychee::WorkerRankFromFlags();
    status = lychee::RunAsRank(lychee::RankDevice::kCuda, flags->tensor_parallel, worker.rank, worker.rendezvous_file,
                               std::vector<std::string>(argv + 1, argv + argc),
                               [&](std::shared_ptr<lychee::TensorParallelGroup> group) -> absl::Status {
                                 try {
                                   return Run(*flags, std::move(group));
                                 } catch (const c10::OutOfMemoryError& error) {
                                   return absl::ResourceExhaustedError(error.what_without_backtrace());
                                 }
                               });
  }
  if (!status.ok()) {
    std::fprintf(stderr, "e2e_bench: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
