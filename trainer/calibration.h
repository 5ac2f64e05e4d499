// Learning a head partition: HardKuma gates per (layer, KV head), trained by distilling the
// dense model (teacher) into the gated model (student) on passkey retrieval samples, then
// exported as a HeadPartition. The trainer service runs this; tests drive it directly.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "common/base/head_partition.h"

namespace lychee {

class Model;
class Tokenizer;
class TensorParallelGroup;

struct CalibrationConfig {
  double target_density = 0.25;      // share of retrieval heads outside layer 0, in (0, 1]
  int64_t steps = 300;
  // Samples whose gradients one optimizer step averages; data-parallel ranks split them.
  int64_t samples_per_step = 1;
  int64_t min_context_tokens = 1024;
  int64_t max_context_tokens = 2048;
  int64_t passkeys_per_sample = 10;
  double learning_rate = 0.01;
  // Token-level sparse attention the student's sparse side uses in training.
  double sparse_keep_ratio = 0.3;
  int64_t sparse_sink_tokens = 128;
  int64_t sparse_recent_tokens = 256;
  // Whether the student's backward recomputes each layer from its input instead of keeping every
  // layer's activations: then one layer's T x T attention weights are alive at a time, for two more
  // forward passes (the layer's own, and the layer below's, whose scores its sparse side selects from).
  // kAuto recomputes on CUDA, where memory binds, and keeps activations on the CPU.
  enum class Checkpointing { kAuto, kOn, kOff };
  Checkpointing activation_checkpointing = Checkpointing::kAuto;
  // Selection parameters the exported partition carries for decoding.
  SelectionParams selection;
  uint64_t seed = 0;

  // INVALID_ARGUMENT naming the field.
  absl::Status Validate() const;
};

struct CalibrationProgress {
  int64_t step = 0;  // steps done
  int64_t total_steps = 0;
  double loss = 0;  // distillation_loss + density_penalty: the Lagrangian
  double distillation_loss = 0;
  // lambda times how far this step's optimizer update took the expected density off its scheduled
  // target, before the projection took it back.
  double density_penalty = 0;
  // After the step: on the schedule from the initial density down to the target, reached at half
  // the steps and held from then on.
  double expected_density = 0;
  // The density constraint's multiplier that the distillation gradient implies, smoothed over
  // steps: distillation loss saved per unit of expected density added (negative: lost).
  double lambda = 0;
  double tokens_per_second = 0;
  double eta_seconds = 0;
  double step_seconds = 0;  // wall time of this step
};

// Runs a calibration to the end, calling `on_progress` after every step; returns CANCELLED
// within one step of `cancelled` becoming true. `haystack` is the text the samples are built from.
// The learned gates end with their expected density at the target; the partition makes the
// round-down of target x (gated heads) heads with the highest gate means retrieval heads, so that its
// deployed density is at most the target (with N gated heads, densities are multiples of 1/N).
//
// With `data_parallel`, this is one rank of a data-parallel calibration (Gloo on the CPU, NCCL on GPUs): every
// rank runs it with the same arguments (cancelled on all or none), rank r takes the step's samples
// r, r + N, ..., and the gate gradients are all-reduced before each optimizer step, so that every
// rank holds the same gates, those of one process over the whole batch (up to the order of the
// sums). samples_per_step must be a multiple of the rank count; a lost rank is UNAVAILABLE.
absl::StatusOr<HeadPartition> RunCalibration(const Model& model, const Tokenizer& tokenizer,
                                             const std::string& haystack, const CalibrationConfig& config,
                                             const std::function<void(const CalibrationProgress&)>& on_progress,
                                             const std::atomic<bool>& cancelled,
                                             const TensorParallelGroup* data_parallel = nullptr);

}  // namespace lychee
