#include "trainer/calibration.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/optim/adamw.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/base/retrieval_tasks.h"
#include "common/base/status_macros.h"
#include "common/model/model.h"
#include "common/model/tensor_parallel.h"
#include "common/model/torch_errors.h"
#include "kernels/dense_attention.h"
#include "trainer/gated_attention.h"
#include "trainer/hard_kuma.h"

namespace lychee {
namespace {

// How the density is held at the target. AdamW steps on the distillation loss alone; after every
// step a projection puts the gates back on the constraint "expected density = scheduled target":
// every head's (log a, log b) moves by the same (s, -s), s found by bisection (ProjectDensity). That
// raises or lowers every head's P(z != 0) together, so the projection takes no side among heads;
// which heads keep the density is the distillation's choice. The constraint then holds exactly,
// from above and from below, whatever the number of steps and the scale of the loss.
// Why not a multiplier on a density term in the loss, raised by dual ascent: AdamW divides every
// gradient by its own running magnitude, so a multiplier's pull saturates and depends on the
// gradients of earlier steps. On the bundled model, dual ascent through it (an augmented Lagrangian,
// lambda += (20 / steps)(rho - target), the distillation loss normalised by its running mean)
// overshot to 0.14 for a target of 0.3 and came back too slowly, ending at 0.25 after 300 steps; with
// integration paused while the density approached the target, it ended at 0.306 or at 0.275
// depending on how the two terms were scaled. The multiplier is still reported: the one the
// distillation gradient implies at each step (see lambda below).
// The optimizer works on log a and log b: its steps and the projection's shifts are then in the same
// units, a head the distillation wants open keeps up with the shifts, and no gate is pushed to a
// parameter bound within a few steps (from where, its gradients vanishing, it could not come back).
// The target is not imposed at once: it falls linearly from the initial density (0.92, every gate at
// a = b = 1) to the target over the first half of the job, as in gradual pruning (Zhu and Gupta
// 2017), so that the distillation sees every head open before it must choose which to close; the
// second half trains at the target.
constexpr double kDescentShare = 0.5;
// Halvings of a bracket 37 wide (the log of the bounds' ratio, both ways): far below float resolution.
constexpr int kBisectionSteps = 60;
// Smoothing of the multiplier estimate, which one sample's gradient makes noisy.
constexpr double kLambdaSmoothing = 0.9;
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

// The density the constraint holds after step `step`: the initial density moving linearly to the
// target over the first kDescentShare of the steps.
double ScheduledDensity(const CalibrationConfig& config, double initial_density, int64_t step) {
  const double descent = std::max(1.0, kDescentShare * static_cast<double>(config.steps));
  const double remaining = std::max(0.0, 1.0 - static_cast<double>(step + 1) / descent);
  return config.target_density + (initial_density - config.target_density) * remaining;
}

// Share of gated heads expected to be retrieval heads: the mean of P(z != 0) over the gates given by
// their log a and log b. With no gated head (one layer) every head is a retrieval head, as
// HeadPartition::RetrievalDensity counts it.
at::Tensor ExpectedDensity(const at::Tensor& log_a, const at::Tensor& log_b) {
  if (log_a.numel() == 0) return at::ones({}, log_a.options());
  return (1.0 - hard_kuma::ProbabilityZero(log_a.exp(), log_b.exp())).mean();
}

// A gate's log a or log b moved by `shift`, within the bounds the parameters are kept in.
at::Tensor Shifted(const at::Tensor& log_parameter, double shift) {
  return (log_parameter + shift).clamp(std::log(hard_kuma::kMinParameter), std::log(hard_kuma::kMaxParameter));
}

// Puts the gates on "expected density = target": every log a moves by s and every log b by -s, s
// found by bisection. P(z != 0) = (1 - (1/12)^a)^b rises with a and falls with b, so the expected
// density rises monotonically with s, from about 0 (every a at its lower bound, every b at its upper
// one) to about 1, over a bracket that spans the bounds; a target beyond what the bounds allow ends
// at the nearest it can. The shift also brings back within the bounds a parameter that the
// optimizer's step took past them. Done in double on the CPU: the gates are a few hundred numbers.
void ProjectDensity(at::Tensor& log_a, at::Tensor& log_b, double target) {
  const at::Tensor log_a_cpu = log_a.detach().to(at::kCPU, at::kDouble);
  const at::Tensor log_b_cpu = log_b.detach().to(at::kCPU, at::kDouble);
  double low = -std::log(hard_kuma::kMaxParameter / hard_kuma::kMinParameter);
  double high = -low;
  for (int i = 0; i < kBisectionSteps; ++i) {
    const double middle = 0.5 * (low + high);
    const double density = ExpectedDensity(Shifted(log_a_cpu, middle), Shifted(log_b_cpu, -middle)).item<double>();
    (density < target ? low : high) = middle;
  }
  const double shift = 0.5 * (low + high);
  at::NoGradGuard no_grad;
  log_a.copy_(Shifted(log_a_cpu, shift));
  log_b.copy_(Shifted(log_b_cpu, -shift));
}

// The deployed roles, from the gate means (a CPU tensor of doubles, one per gated head, layer-major):
// the round-down of target x (gated heads) heads with the highest means are retrieval heads, the
// other gated heads sparse; layer 0 stays dense. The count comes from the target, not from a
// threshold on the means: a threshold deploys however many heads happen to cross it (at 0.5, one
// head of ten on the bundled model for a target of 0.25), while the training held the expected
// density at the target. With N gated heads the reachable densities are the multiples of 1/N;
// rounding down keeps the deployed density at most the target.
void AssignRoles(const at::Tensor& means, double target_density, HeadPartition& partition) {
  const int64_t gated_heads = means.numel();
  // The epsilon keeps a product such as 0.3 x 10 = 3.0000000000000004, or 0.29 x 100 =
  // 28.999999999999996, on the side of the whole number it stands for.
  const int64_t retrieval_heads = static_cast<int64_t>(std::floor(target_density * gated_heads + 1e-9));
  const at::Tensor flat = means.reshape({-1}).contiguous();
  const double* mean = flat.data_ptr<double>();
  std::vector<int64_t> order(gated_heads);
  std::iota(order.begin(), order.end(), 0);
  // Stable: among equal means the lower layer, then the lower head, comes first.
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return mean[x] > mean[y]; });
  for (int64_t rank = retrieval_heads; rank < gated_heads; ++rank) {
    partition.set_role(1 + order[rank] / partition.num_kv_heads(), order[rank] % partition.num_kv_heads(),
                       HeadRole::kSparse);
  }
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
  if (samples_per_step <= 0) {
    return FieldError("samples_per_step", absl::StrCat("must be > 0, got ", samples_per_step));
  }
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
                                             const std::atomic<bool>& cancelled,
                                             const TensorParallelGroup* data_parallel) {
  LYCHEE_RETURN_IF_ERROR(config.Validate());
  const int rank = data_parallel == nullptr ? 0 : data_parallel->rank();
  const int ranks = data_parallel == nullptr ? 1 : data_parallel->world_size();
  if (config.samples_per_step % ranks != 0) {
    return FieldError("samples_per_step", absl::StrCat("must be a multiple of the ", ranks,
                                                       " data-parallel ranks, got ", config.samples_per_step));
  }
  LYCHEE_ASSIGN_OR_RETURN(HaystackBuilder builder, HaystackBuilder::Create(tokenizer, haystack));
  if (builder.corpus_tokens() < config.max_context_tokens) {
    return absl::FailedPreconditionError(absl::StrCat("calibration corpus has ", builder.corpus_tokens(),
                                                      " tokens, fewer than max_context_tokens ",
                                                      config.max_context_tokens));
  }
  const ModelConfig& shape = model.config();
  const at::TensorOptions gate_options = at::TensorOptions().dtype(at::kFloat).device(model.options().device);
  // Gates of layers 1 and up (layer 0 stays dense), as log a and log b, from a = b = 1.
  at::Tensor log_a = at::zeros({shape.num_layers - 1, shape.num_kv_heads}, gate_options).set_requires_grad(true);
  at::Tensor log_b = at::zeros({shape.num_layers - 1, shape.num_kv_heads}, gate_options).set_requires_grad(true);
  torch::optim::AdamW optimizer({log_a, log_b}, torch::optim::AdamWOptions(config.learning_rate));
  const DenseAttentionBackend teacher;
  const GatedTrainingAttention student(
      SparseTrainingParams{config.sparse_keep_ratio, config.sparse_sink_tokens, config.sparse_recent_tokens});
  const bool recompute_layers = RecomputesLayers(config, model);
  std::mt19937_64 rng(config.seed);
  std::uniform_int_distribution<int64_t> context_length(config.min_context_tokens, config.max_context_tokens);
  std::uniform_real_distribution<double> uniform(0.001, 0.999);

  // Adds one sample's distillation gradient to the gates' and returns its loss; `noise` is the
  // sample's uniform draw for the gates.
  const auto accumulate_sample = [&](const std::vector<int32_t>& ids, int64_t first, int64_t count,
                                     const std::vector<float>& noise) -> absl::StatusOr<double> {
    at::Tensor teacher_hidden;
    {
      at::NoGradGuard no_grad;
      LYCHEE_ASSIGN_OR_RETURN(teacher_hidden, model.HiddenStates(ids, teacher, nullptr));
    }
    at::Tensor u = at::tensor(noise).view(log_a.sizes()).to(log_a.device());
    auto state = student.NewSequenceState();
    auto& gated = static_cast<GatedSequenceState&>(*state);
    at::Tensor gates =
        at::cat({at::ones({1, shape.num_kv_heads}, gate_options), hard_kuma::Sample(log_a.exp(), log_b.exp(), u)}, 0)
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
    return distillation.item<double>();
  };

  // Sums `tensor` in place over the data-parallel ranks, if any.
  const auto sum_over_ranks = [&](at::Tensor& tensor) -> absl::Status {
    if (data_parallel == nullptr) return absl::OkStatus();
    try {
      data_parallel->AllReduceSum(tensor);
    } catch (const std::exception& error) {
      return StatusFromException(error, "data-parallel calibration step");
    }
    return absl::OkStatus();
  };

  CalibrationProgress progress;
  progress.total_steps = config.steps;
  const double initial_density = ExpectedDensity(log_a, log_b).item<double>();
  // The multiplier of the density constraint that the distillation gradient implies, smoothed: how
  // much distillation loss one more unit of expected density would save (negative where it would
  // cost some).
  double lambda = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < config.steps; ++step) {
    if (cancelled.load()) return absl::CancelledError(absl::StrCat("calibration cancelled after ", step, " steps"));
    const auto step_start = std::chrono::steady_clock::now();
    for (auto& group : optimizer.param_groups()) {
      static_cast<torch::optim::AdamWOptions&>(group.options()).lr(LearningRate(config, step));
    }
    optimizer.zero_grad();
    // This rank's loss sum and tokens; all-reduced below with the gradients.
    // On the gates' device, where an NCCL group sums.
    at::Tensor sums = at::zeros({2}, log_a.options().dtype(at::kDouble));
    for (int64_t index = 0; index < config.samples_per_step; ++index) {
      // Every rank draws every sample's numbers, so that a sample does not depend on which rank takes it.
      const int64_t length = context_length(rng);
      const uint64_t sample_seed = rng();
      std::vector<float> noise(log_a.numel());
      for (float& u : noise) u = static_cast<float>(uniform(rng));
      if (index % ranks != rank) continue;
      RetrievalOptions sample_options;
      sample_options.num_needles = static_cast<int>(config.passkeys_per_sample);
      LYCHEE_ASSIGN_OR_RETURN(RetrievalSample sample,
                              builder.Build(RetrievalTask::kCalibration, length, sample_seed, sample_options));
      std::vector<int32_t> ids = sample.prompt_ids;
      ids.insert(ids.end(), sample.answer_ids.begin(), sample.answer_ids.end());
      // The positions whose next-token prediction is an answer token.
      const int64_t first = static_cast<int64_t>(sample.prompt_ids.size()) - 1;
      const int64_t count = static_cast<int64_t>(sample.answer_ids.size());
      LYCHEE_ASSIGN_OR_RETURN(const double loss, accumulate_sample(ids, first, count, noise));
      sums[0] += loss;
      sums[1] += static_cast<double>(ids.size());
    }
    // The batch's mean gradient: summed over the ranks' samples, then divided by their count.
    for (at::Tensor* parameter : {&log_a, &log_b}) {
      at::Tensor gradient = parameter->mutable_grad();
      if (!gradient.defined()) continue;
      LYCHEE_RETURN_IF_ERROR(sum_over_ranks(gradient));
      gradient.div_(static_cast<double>(config.samples_per_step));
    }
    LYCHEE_RETURN_IF_ERROR(sum_over_ranks(sums));
    // The least-squares multiplier at this point, -<grad D, grad rho> / |grad rho|^2: at a
    // constrained optimum grad D + lambda grad rho = 0.
    const at::Tensor density_before = ExpectedDensity(log_a, log_b);
    if (log_a.grad().defined() && density_before.requires_grad()) {
      const std::vector<at::Tensor> density_gradient = torch::autograd::grad({density_before}, {log_a, log_b});
      const double along = (log_a.grad() * density_gradient[0]).sum().item<double>() +
                           (log_b.grad() * density_gradient[1]).sum().item<double>();
      const double norm2 =
          density_gradient[0].pow(2).sum().item<double>() + density_gradient[1].pow(2).sum().item<double>();
      const double estimate = norm2 > 0 ? -along / norm2 : 0.0;
      lambda = step == 0 ? estimate : kLambdaSmoothing * lambda + (1 - kLambdaSmoothing) * estimate;
    }
    optimizer.step();
    // How far the distillation step took the density off the constraint, priced by the multiplier:
    // the Lagrangian's density term, which the projection then takes back.
    const double scheduled_density = ScheduledDensity(config, initial_density, step);
    const double density_penalty = lambda * (ExpectedDensity(log_a, log_b).item<double>() - scheduled_density);
    ProjectDensity(log_a, log_b, scheduled_density);

    const double step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    progress.step = step + 1;
    progress.distillation_loss = sums[0].item<double>() / static_cast<double>(config.samples_per_step);
    progress.density_penalty = density_penalty;
    progress.loss = progress.distillation_loss + density_penalty;
    progress.expected_density = ExpectedDensity(log_a, log_b).item<double>();
    progress.lambda = lambda;
    progress.tokens_per_second = sums[1].item<double>() / step_seconds;
    progress.eta_seconds = elapsed / progress.step * static_cast<double>(config.steps - progress.step);
    progress.step_seconds = step_seconds;
    on_progress(progress);
  }

  HeadPartition partition = HeadPartition::AllRetrieval(shape.num_layers, shape.num_kv_heads, config.selection);
  const at::Tensor a = log_a.detach().exp().to(at::kCPU, at::kDouble);
  const at::Tensor b = log_b.detach().exp().to(at::kCPU, at::kDouble);
  const at::Tensor means = hard_kuma::Mean(a, b);
  AssignRoles(means, config.target_density, partition);
  for (int64_t layer = 1; layer < shape.num_layers; ++layer) {
    for (int64_t head = 0; head < shape.num_kv_heads; ++head) {
      partition.gates.push_back({layer, head, a[layer - 1][head].item<double>(), b[layer - 1][head].item<double>(),
                                 means[layer - 1][head].item<double>()});
    }
  }
  partition.training.steps = config.steps;
  partition.training.final_loss = progress.loss;
  partition.training.final_distillation_loss = progress.distillation_loss;
  partition.training.expected_density = progress.expected_density;
  partition.training.deployed_density = partition.RetrievalDensity();
  partition.training.target_density = config.target_density;
  partition.training.lambda = lambda;
  partition.training.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return partition;
}

}  // namespace lychee
