#include "trainer/calibration.h"

#include <ATen/core/grad_mode.h>
#include <torch/optim/adamw.h>

#include <chrono>
#include <cmath>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/model.h"
#include "common/retrieval_tasks.h"
#include "common/status_macros.h"
#include "kernels/dense_attention.h"
#include "trainer/gated_attention.h"
#include "trainer/hard_kuma.h"

namespace lychee {
namespace {

constexpr double kInitialLambda = 2.0;
constexpr double kLambdaRate = 0.001;
constexpr double kMinLambda = 1e-12;
constexpr double kMaxLambda = 20.0;
constexpr double kPenaltySmoothing = 0.9;
constexpr double kWarmupShare = 0.2;
constexpr double kDecayShare = 0.2;
constexpr double kFinalLearningRateShare = 0.1;

// Linear warmup over the first 20% of steps, constant, then linear decay to 10% over the last 20%.
double LearningRate(const CalibrationConfig& config, int64_t step) {
  const double steps = static_cast<double>(config.steps);
  const double warmup = std::max(1.0, kWarmupShare * steps);
  const double decay_start = steps - kDecayShare * steps;
  if (step < warmup) return config.learning_rate * (step + 1) / warmup;
  if (step < decay_start) return config.learning_rate;
  const double progress = (step - decay_start) / std::max(1.0, steps - decay_start);
  return config.learning_rate * (1.0 - (1.0 - kFinalLearningRateShare) * progress);
}

// Mean squared distance of the answer positions' hidden states.
at::Tensor Distillation(const at::Tensor& student_hidden, const at::Tensor& teacher_hidden, int64_t first,
                        int64_t count) {
  return (student_hidden.narrow(0, first, count).to(at::kFloat) - teacher_hidden.narrow(0, first, count).to(at::kFloat))
      .pow(2)
      .mean();
}

// The distillation loss with its gradient left in `state.gates` (a leaf), computed without keeping
// every layer's activations: the forward keeps each layer's input alone; the backward walks down the
// layers, recomputing each from its input and passing the gradient of its input on. A layer's sparse
// side selects from the scores of the layer below, which the state holds after the forward of that
// layer, so the layer below is run again (without autograd) before each layer is recomputed. Layer 0
// has no gate, so the walk stops above it.
absl::StatusOr<at::Tensor> DistillLayerByLayer(const Model& model, absl::Span<const int32_t> ids,
                                               const GatedTrainingAttention& student, GatedSequenceState& state,
                                               const at::Tensor& teacher_hidden, int64_t first, int64_t count) {
  const int num_layers = static_cast<int>(model.config().num_layers);
  std::vector<at::Tensor> layer_inputs(num_layers);
  at::Tensor hidden;
  {
    at::NoGradGuard no_grad;
    LYCHEE_ASSIGN_OR_RETURN(hidden, model.EmbedForTraining(ids));
    for (int layer = 0; layer < num_layers; ++layer) {
      layer_inputs[layer] = hidden;
      hidden = model.LayerForTraining(layer, hidden, student, &state);
    }
  }
  at::Tensor last = hidden.detach().set_requires_grad(true);
  at::Tensor distillation = Distillation(model.FinalNorm(last), teacher_hidden, first, count);
  distillation.backward();
  at::Tensor gradient = last.grad();
  for (int layer = num_layers - 1; layer >= 1; --layer) {
    {
      at::NoGradGuard no_grad;
      model.LayerForTraining(layer - 1, layer_inputs[layer - 1], student, &state);
    }
    at::Tensor input = layer_inputs[layer].set_requires_grad(true);
    model.LayerForTraining(layer, input, student, &state).backward(gradient);
    gradient = input.grad();
    layer_inputs[layer] = at::Tensor();
  }
  return distillation.detach();
}

bool RecomputesLayers(const CalibrationConfig& config, const Model& model) {
  switch (config.activation_checkpointing) {
    case CalibrationConfig::Checkpointing::kOn:
      return true;
    case CalibrationConfig::Checkpointing::kOff:
      return false;
    case CalibrationConfig::Checkpointing::kAuto:
      break;
  }
  return model.options().device.is_cuda();
}

absl::Status FieldError(const std::string& field, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat("calibration config: ", field, " ", problem));
}

}  // namespace

absl::Status CalibrationConfig::Validate() const {
  if (!(target_density > 0 && target_density <= 1)) {
    return FieldError("target_density", absl::StrCat("must be in (0, 1], got ", target_density));
  }
  if (steps <= 0) return FieldError("steps", absl::StrCat("must be > 0, got ", steps));
  if (min_context_tokens < 64) return FieldError("min_context_tokens", absl::StrCat("must be >= 64, got ", min_context_tokens));
  if (max_context_tokens < min_context_tokens) {
    return FieldError("max_context_tokens", absl::StrCat("must be >= min_context_tokens ", min_context_tokens, ", got ",
                                                         max_context_tokens));
  }
  if (passkeys_per_sample < 1 || passkeys_per_sample > 10) {
    return FieldError("passkeys_per_sample", absl::StrCat("must be in [1, 10], got ", passkeys_per_sample));
  }
  if (!(learning_rate > 0 && std::isfinite(learning_rate))) {
    return FieldError("learning_rate", absl::StrCat("must be > 0, got ", learning_rate));
  }
  if (!(sparse_keep_ratio > 0 && sparse_keep_ratio <= 1)) {
    return FieldError("sparse_keep_ratio", absl::StrCat("must be in (0, 1], got ", sparse_keep_ratio));
  }
  if (sparse_sink_tokens < 0 || sparse_recent_tokens < 0) {
    return FieldError("sparse_sink_tokens and sparse_recent_tokens", "must be >= 0");
  }
  // The exported partition's selection parameters are checked as a partition would check them.
  return HeadPartition::AllRetrieval(1, 1, selection).Validate();
}

absl::StatusOr<HeadPartition> RunCalibration(const Model& model, const Tokenizer& tokenizer,
                                             const std::string& haystack, const CalibrationConfig& config,
                                             const std::function<void(const CalibrationProgress&)>& on_progress,
                                             const std::atomic<bool>& cancelled) {
  LYCHEE_RETURN_IF_ERROR(config.Validate());
  LYCHEE_ASSIGN_OR_RETURN(HaystackBuilder builder, HaystackBuilder::Create(tokenizer, haystack));
  if (builder.corpus_tokens() < config.max_context_tokens) {
    return absl::FailedPreconditionError(absl::StrCat("calibration corpus has ", builder.corpus_tokens(),
                                                      " tokens, fewer than max_context_tokens ",
                                                      config.max_context_tokens));
  }
  const ModelConfig& shape = model.config();
  const at::TensorOptions gate_options = at::TensorOptions().dtype(at::kFloat).device(model.options().device);
  // Gates of layers 1 and up; layer 0 stays dense.
  at::Tensor a = at::ones({shape.num_layers - 1, shape.num_kv_heads}, gate_options).set_requires_grad(true);
  at::Tensor b = at::ones({shape.num_layers - 1, shape.num_kv_heads}, gate_options).set_requires_grad(true);
  torch::optim::AdamW optimizer({a, b}, torch::optim::AdamWOptions(config.learning_rate));
  const DenseAttentionBackend teacher;
  const GatedTrainingAttention student(
      SparseTrainingParams{config.sparse_keep_ratio, config.sparse_sink_tokens, config.sparse_recent_tokens});
  const bool recompute_layers = RecomputesLayers(config, model);
  std::mt19937_64 rng(config.seed);
  std::uniform_int_distribution<int64_t> context_length(config.min_context_tokens, config.max_context_tokens);
  std::uniform_real_distribution<double> uniform(0.001, 0.999);

  CalibrationProgress progress;
  progress.total_steps = config.steps;
  double lambda = kInitialLambda;
  double smoothed_penalty = -1;  // set from the first step's penalty
  const auto start = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < config.steps; ++step) {
    if (cancelled.load()) return absl::CancelledError(absl::StrCat("calibration cancelled after ", step, " steps"));
    const auto step_start = std::chrono::steady_clock::now();
    RetrievalOptions sample_options;
    sample_options.num_needles = static_cast<int>(config.passkeys_per_sample);
    LYCHEE_ASSIGN_OR_RETURN(RetrievalSample sample,
                            builder.Build(RetrievalTask::kCalibration, context_length(rng), rng(), sample_options));
    std::vector<int32_t> ids = sample.prompt_ids;
    ids.insert(ids.end(), sample.answer_ids.begin(), sample.answer_ids.end());
    // The positions whose next-token prediction is an answer token.
    const int64_t first = static_cast<int64_t>(sample.prompt_ids.size()) - 1;
    const int64_t count = static_cast<int64_t>(sample.answer_ids.size());

    at::Tensor teacher_hidden;
    {
      at::NoGradGuard no_grad;
      LYCHEE_ASSIGN_OR_RETURN(teacher_hidden, model.HiddenStates(ids, teacher, nullptr));
    }
    std::vector<float> noise(a.numel());
    for (float& u : noise) u = static_cast<float>(uniform(rng));
    at::Tensor u = at::tensor(noise).view(a.sizes()).to(a.device());
    for (auto& group : optimizer.param_groups()) {
      static_cast<torch::optim::AdamWOptions&>(group.options()).lr(LearningRate(config, step));
    }
    optimizer.zero_grad();
    auto state = student.NewSequenceState();
    auto& gated = static_cast<GatedSequenceState&>(*state);
    at::Tensor gates = at::cat({at::ones({1, shape.num_kv_heads}, gate_options), hard_kuma::Sample(a, b, u)}, 0)
                           .to(model.options().dtype);
    at::Tensor distillation;
    if (recompute_layers) {
      gated.gates = gates.detach().set_requires_grad(true);
      LYCHEE_ASSIGN_OR_RETURN(distillation,
                              DistillLayerByLayer(model, ids, student, gated, teacher_hidden, first, count));
      if (gated.gates.grad().defined()) gates.backward(gated.gates.grad());
    } else {
      gated.gates = gates;
      LYCHEE_ASSIGN_OR_RETURN(at::Tensor student_hidden, model.HiddenStates(ids, student, state.get()));
      distillation = Distillation(student_hidden, teacher_hidden, first, count);
      // A one-layer model has no gated layer for the loss to depend on.
      if (distillation.requires_grad()) distillation.backward();
    }
    at::Tensor expected_density = (1.0 - hard_kuma::ProbabilityZero(a, b)).mean();
    at::Tensor penalty = at::relu(expected_density - config.target_density);
    const double penalty_value = penalty.item<double>();
    if (smoothed_penalty < 0) smoothed_penalty = penalty_value;
    at::Tensor smoothed = kPenaltySmoothing * smoothed_penalty + (1.0 - kPenaltySmoothing) * penalty;
    smoothed_penalty = smoothed.item<double>();
    at::Tensor density_term = lambda * smoothed;
    density_term.backward();
    const double loss = distillation.item<double>() + density_term.item<double>();
    optimizer.step();
    {
      at::NoGradGuard no_grad;
      a.clamp_(hard_kuma::kMinParameter, hard_kuma::kMaxParameter);
      b.clamp_(hard_kuma::kMinParameter, hard_kuma::kMaxParameter);
    }
    lambda = std::clamp(lambda * std::exp(kLambdaRate * penalty_value), kMinLambda, kMaxLambda);

    const double step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    progress.step = step + 1;
    progress.loss = loss;
    progress.distillation_loss = distillation.item<double>();
    progress.density_penalty = smoothed_penalty;
    progress.expected_density = expected_density.item<double>();
    progress.lambda = lambda;
    progress.tokens_per_second = static_cast<double>(ids.size()) / step_seconds;
    progress.eta_seconds = elapsed / progress.step * static_cast<double>(config.steps - progress.step);
    on_progress(progress);
  }

  HeadPartition partition = HeadPartition::AllRetrieval(shape.num_layers, shape.num_kv_heads, config.selection);
  at::Tensor means = hard_kuma::Mean(a, b).detach().to(at::kCPU);
  at::Tensor a_cpu = a.detach().to(at::kCPU), b_cpu = b.detach().to(at::kCPU);
  for (int64_t layer = 1; layer < shape.num_layers; ++layer) {
    for (int64_t head = 0; head < shape.num_kv_heads; ++head) {
      const double mean = means[layer - 1][head].item<double>();
      if (mean <= 0.5) partition.set_role(layer, head, HeadRole::kSparse);
      partition.gates.push_back(
          {layer, head, a_cpu[layer - 1][head].item<double>(), b_cpu[layer - 1][head].item<double>(), mean});
    }
  }
  partition.training.steps = config.steps;
  partition.training.final_loss = progress.loss;
  partition.training.final_distillation_loss = progress.distillation_loss;
  partition.training.expected_density = progress.expected_density;
  partition.training.target_density = config.target_density;
  partition.training.lambda = lambda;
  partition.training.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return partition;
}

}  // namespace lychee
