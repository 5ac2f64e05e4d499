#include "common/model.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/safetensors.h"
#include "common/status_macros.h"

namespace lychee {
namespace {

// Prompts are run through the model in chunks of this many tokens, which bounds the size of
// the MLP activations and attention scores whatever the prompt length.
constexpr int64_t kPrefillChunk = 2048;

at::ScalarType TorchDType(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return at::kBFloat16;
    case DType::kF16:
      return at::kHalf;
    case DType::kF32:
      return at::kFloat;
  }
  return at::kFloat;
}

std::string ShapeString(at::IntArrayRef shape) { return absl::StrCat("[", absl::StrJoin(shape, ", "), "]"); }

// Copies a checkpoint tensor onto the model's device in its compute dtype, after checking its shape.
class WeightLoader {
 public:
  WeightLoader(const Checkpoint& checkpoint, const std::string& model_dir, const ModelOptions& options)
      : checkpoint_(checkpoint), model_dir_(model_dir), options_(options) {}

  absl::StatusOr<at::Tensor> Load(const std::string& name, std::vector<int64_t> expected_shape) const {
    LYCHEE_ASSIGN_OR_RETURN(TensorView view, checkpoint_.Get(name));
    if (view.shape != expected_shape) {
      return absl::InvalidArgumentError(absl::StrCat(model_dir_, ": tensor ", name, " has shape ",
                                                     ShapeString(view.shape), ", config.json implies ",
                                                     ShapeString(expected_shape)));
    }
    // from_blob does not own the mapped bytes; the copy below does.
    at::Tensor mapped = at::from_blob(const_cast<std::byte*>(view.data), view.shape,
                                      at::TensorOptions().dtype(TorchDType(view.dtype)));
    return mapped.to(options_.device, options_.dtype, /*non_blocking=*/false, /*copy=*/true);
  }

 private:
  const Checkpoint& checkpoint_;
  const std::string& model_dir_;
  const ModelOptions& options_;
};

at::Tensor RopeInverseFrequencies(const ModelConfig& config) {
  // As transformers computes them, in float32: rounding them differently moves logits by 1e-2.
  at::Tensor exponents =
      at::arange(0, config.head_dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(config.head_dim);
  at::Tensor inv_freq = 1.0 / at::pow(config.rope_theta, exponents);
  const RopeScaling& scaling = config.rope_scaling;
  if (scaling.type == RopeScaling::Type::kLlama3) {
    const double old_context = static_cast<double>(scaling.original_max_position_embeddings);
    const double low_freq_wavelen = old_context / scaling.low_freq_factor;
    const double high_freq_wavelen = old_context / scaling.high_freq_factor;
    at::Tensor wavelen = 2.0 * M_PI / inv_freq;
    at::Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq);
    at::Tensor smooth = (old_context / wavelen - scaling.low_freq_factor) /
                        (scaling.high_freq_factor - scaling.low_freq_factor);
    at::Tensor smoothed = (1.0 - smooth) * scaled / scaling.factor + smooth * scaled;
    at::Tensor is_medium = (wavelen >= high_freq_wavelen).logical_and(wavelen <= low_freq_wavelen);
    inv_freq = at::where(is_medium, smoothed, scaled);
  }
  return inv_freq;
}

at::Tensor RotateHalf(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

}  // namespace

struct Model::Layer {
  at::Tensor input_norm;
  at::Tensor post_attention_norm;
  at::Tensor qkv_weight;  // q, k and v projections stacked: one matmul instead of three
  at::Tensor qkv_bias;    // undefined without attention biases
  at::Tensor q_norm;      // Qwen3 only
  at::Tensor k_norm;
  at::Tensor o_weight;
  at::Tensor o_bias;  // Llama and Qwen3 with attention_bias; Qwen2 has biases on q, k, v only
  at::Tensor gate_up_weight;  // gate and up projections stacked
  at::Tensor down_weight;
};

KvCache::KvCache(const ModelConfig& config, at::TensorOptions options)
    : keys_(config.num_layers),
      values_(config.num_layers),
      lengths_(config.num_layers, 0),
      num_kv_heads_(config.num_kv_heads),
      head_dim_(config.head_dim),
      options_(options) {}

void KvCache::Grow(int64_t min_capacity) {
  int64_t capacity = std::max<int64_t>(capacity_, 256);
  while (capacity < min_capacity) capacity *= 2;
  Reallocate(capacity);
}

void KvCache::Reserve(int64_t tokens) {
  if (tokens > capacity_) Reallocate(tokens);
}

void KvCache::Reallocate(int64_t capacity) {
  for (size_t layer = 0; layer < keys_.size(); ++layer) {
    for (at::Tensor* cache : {&keys_[layer], &values_[layer]}) {
      at::Tensor grown = at::empty({num_kv_heads_, capacity, head_dim_}, options_);
      if (lengths_[layer] > 0) {
        grown.narrow(1, 0, lengths_[layer]).copy_(cache->narrow(1, 0, lengths_[layer]));
      }
      *cache = std::move(grown);
    }
  }
  capacity_ = capacity;
}

void KvCache::Append(int layer, const at::Tensor& keys, const at::Tensor& values) {
  const int64_t added = keys.size(1);
  const int64_t length = lengths_[layer];
  if (length + added > capacity_) Grow(length + added);
  keys_[layer].narrow(1, length, added).copy_(keys);
  values_[layer].narrow(1, length, added).copy_(values);
  lengths_[layer] = length + added;
}

at::Tensor KvCache::Keys(int layer) const { return keys_[layer].narrow(1, 0, lengths_[layer]); }
at::Tensor KvCache::Values(int layer) const { return values_[layer].narrow(1, 0, lengths_[layer]); }

size_t KvCache::num_bytes() const {
  size_t bytes = 0;
  for (size_t layer = 0; layer < keys_.size(); ++layer) {
    if (keys_[layer].defined()) bytes += 2 * keys_[layer].nbytes();
  }
  return bytes;
}

Sequence::Sequence(const ModelConfig& config, at::TensorOptions cache_options,
                   std::shared_ptr<const AttentionBackend> attention)
    : cache_(config, cache_options),
      attention_(std::move(attention)),
      attention_state_(attention_->NewSequenceState()) {}

absl::StatusOr<ModelOptions> ModelOptionsForDevice(const std::string& device) {
  if (device == "cpu") return ModelOptions{at::kCPU, at::kFloat};
  if (device == "cuda") {
    if (!at::hasCUDA()) {
      return absl::FailedPreconditionError("device cuda: this LibTorch build or this machine has no CUDA device");
    }
    return ModelOptions{at::Device(at::kCUDA, 0), at::kBFloat16};
  }
  return absl::InvalidArgumentError(absl::StrCat("device must be cpu or cuda, got '", device, "'"));
}

Model::~Model() = default;

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& model_dir, ModelOptions options) {
  std::unique_ptr<Model> model(new Model());
  model->options_ = options;
  model->model_dir_ = model_dir;
  LYCHEE_ASSIGN_OR_RETURN(model->config_, ModelConfig::FromFile(model_dir + "/config.json"));
  const ModelConfig& c = model->config_;
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint, Checkpoint::Open(model_dir));
  const WeightLoader weights(*checkpoint, model_dir, model->options_);

  const int64_t q_rows = c.num_attention_heads * c.head_dim;
  const int64_t kv_rows = c.num_kv_heads * c.head_dim;
  LYCHEE_ASSIGN_OR_RETURN(model->embed_tokens_, weights.Load("model.embed_tokens.weight", {c.vocab_size, c.hidden_size}));
  LYCHEE_ASSIGN_OR_RETURN(model->final_norm_, weights.Load("model.norm.weight", {c.hidden_size}));
  if (c.tie_word_embeddings) {
    model->lm_head_ = model->embed_tokens_;
  } else {
    LYCHEE_ASSIGN_OR_RETURN(model->lm_head_, weights.Load("lm_head.weight", {c.vocab_size, c.hidden_size}));
  }
  // Grown layer by layer, not sized from config.json up front: a layer count the checkpoint does
  // not back ends at its first missing tensor instead of in an allocation.
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string prefix = absl::StrCat("model.layers.", i, ".");
    Layer layer;
    LYCHEE_ASSIGN_OR_RETURN(layer.input_norm, weights.Load(prefix + "input_layernorm.weight", {c.hidden_size}));
    LYCHEE_ASSIGN_OR_RETURN(layer.post_attention_norm,
                            weights.Load(prefix + "post_attention_layernorm.weight", {c.hidden_size}));
    LYCHEE_ASSIGN_OR_RETURN(at::Tensor q, weights.Load(prefix + "self_attn.q_proj.weight", {q_rows, c.hidden_size}));
    LYCHEE_ASSIGN_OR_RETURN(at::Tensor k, weights.Load(prefix + "self_attn.k_proj.weight", {kv_rows, c.hidden_size}));
    LYCHEE_ASSIGN_OR_RETURN(at::Tensor v, weights.Load(prefix + "self_attn.v_proj.weight", {kv_rows, c.hidden_size}));
    layer.qkv_weight = at::cat({q, k, v}, 0);
    if (c.attention_bias) {
      LYCHEE_ASSIGN_OR_RETURN(at::Tensor qb, weights.Load(prefix + "self_attn.q_proj.bias", {q_rows}));
      LYCHEE_ASSIGN_OR_RETURN(at::Tensor kb, weights.Load(prefix + "self_attn.k_proj.bias", {kv_rows}));
      LYCHEE_ASSIGN_OR_RETURN(at::Tensor vb, weights.Load(prefix + "self_attn.v_proj.bias", {kv_rows}));
      layer.qkv_bias = at::cat({qb, kb, vb}, 0);
    }
    if (c.qk_norm) {
      LYCHEE_ASSIGN_OR_RETURN(layer.q_norm, weights.Load(prefix + "self_attn.q_norm.weight", {c.head_dim}));
      LYCHEE_ASSIGN_OR_RETURN(layer.k_norm, weights.Load(prefix + "self_attn.k_norm.weight", {c.head_dim}));
    }
    LYCHEE_ASSIGN_OR_RETURN(layer.o_weight, weights.Load(prefix + "self_attn.o_proj.weight", {c.hidden_size, q_rows}));
    if (c.attention_bias && c.architecture != Architecture::kQwen2) {
      LYCHEE_ASSIGN_OR_RETURN(layer.o_bias, weights.Load(prefix + "self_attn.o_proj.bias", {c.hidden_size}));
    }
    LYCHEE_ASSIGN_OR_RETURN(at::Tensor gate,
                            weights.Load(prefix + "mlp.gate_proj.weight", {c.intermediate_size, c.hidden_size}));
    LYCHEE_ASSIGN_OR_RETURN(at::Tensor up, weights.Load(prefix + "mlp.up_proj.weight", {c.intermediate_size, c.hidden_size}));
    layer.gate_up_weight = at::cat({gate, up}, 0);
    LYCHEE_ASSIGN_OR_RETURN(layer.down_weight,
                            weights.Load(prefix + "mlp.down_proj.weight", {c.hidden_size, c.intermediate_size}));
    model->layers_.push_back(std::move(layer));
  }
  model->rope_inv_freq_ = RopeInverseFrequencies(c).to(options.device);
  return model;
}

std::unique_ptr<Sequence> Model::NewSequence(std::shared_ptr<const AttentionBackend> attention) const {
  return std::make_unique<Sequence>(config_, at::TensorOptions().dtype(options_.dtype).device(options_.device),
                                    std::move(attention));
}

std::unique_ptr<Sequence> Model::Fork(const Sequence& source,
                                      std::shared_ptr<const AttentionBackend> attention) const {
  auto fork = NewSequence(std::move(attention));
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    fork->cache_.Append(layer, source.cache_.Keys(layer), source.cache_.Values(layer));
  }
  return fork;
}

absl::Status Model::CheckIds(absl::Span<const int32_t> ids) const {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= config_.vocab_size) {
      return absl::OutOfRangeError(absl::StrCat("token id ", ids[i], " at position ", i,
                                                " is outside the vocabulary [0, ", config_.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

at::Tensor Model::RmsNorm(const at::Tensor& x, const at::Tensor& weight) const {
  // In float32 whatever the compute dtype, as transformers does, then back before the weight.
  at::Tensor x32 = x.to(at::kFloat);
  at::Tensor normed = x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + config_.rms_norm_eps);
  return weight * normed.to(x.scalar_type());
}

std::pair<at::Tensor, at::Tensor> Model::RopeCosSin(const at::Tensor& positions) const {
  at::Tensor freqs = positions.to(at::kFloat).unsqueeze(-1) * rope_inv_freq_;
  at::Tensor angles = at::cat({freqs, freqs}, -1);
  return {angles.cos().to(options_.dtype), angles.sin().to(options_.dtype)};
}

AttentionInput Model::MakeInput(int layer, const at::Tensor& queries, at::Tensor keys, at::Tensor values,
                                SequenceAttentionState* state) const {
  AttentionInput input;
  input.layer = layer;
  input.queries = queries;
  input.keys = std::move(keys);
  input.values = std::move(values);
  input.scale = 1.0 / std::sqrt(static_cast<double>(config_.head_dim));
  input.sliding_window = config_.sliding_window;
  input.state = state;
  return input;
}

at::Tensor Model::AttendCached(absl::Span<Sequence* const> sequences, int layer, const at::Tensor& queries,
                               const at::Tensor& keys, const at::Tensor& values) const {
  std::vector<AttentionInput> inputs;
  bool one_backend = true;
  for (size_t i = 0; i < sequences.size(); ++i) {
    Sequence& sequence = *sequences[i];
    sequence.cache_.Append(layer, keys[i], values[i]);
    inputs.push_back(MakeInput(layer, queries[i], sequence.cache_.Keys(layer), sequence.cache_.Values(layer),
                               sequence.attention_state_.get()));
    one_backend = one_backend && sequence.attention_ == sequences[0]->attention_;
  }
  std::vector<at::Tensor> outputs;
  if (one_backend) {
    outputs = sequences[0]->attention().AttendBatch(inputs);
  } else {
    for (size_t i = 0; i < sequences.size(); ++i) outputs.push_back(sequences[i]->attention().Attend(inputs[i]));
  }
  return at::stack(outputs);
}

at::Tensor Model::Attention(const Layer& layer, int layer_index, const at::Tensor& normed, const at::Tensor& positions,
                            const AttendFn& attend) const {
  const int64_t n = normed.size(0);
  const int64_t t = normed.size(1);
  const int64_t d = config_.head_dim;
  at::Tensor qkv = layer.qkv_bias.defined() ? at::linear(normed, layer.qkv_weight, layer.qkv_bias)
                                            : at::linear(normed, layer.qkv_weight);
  const int64_t q_width = config_.num_attention_heads * d;
  const int64_t kv_width = config_.num_kv_heads * d;
  at::Tensor q = qkv.narrow(-1, 0, q_width).view({n, t, config_.num_attention_heads, d});
  at::Tensor k = qkv.narrow(-1, q_width, kv_width).view({n, t, config_.num_kv_heads, d});
  at::Tensor v = qkv.narrow(-1, q_width + kv_width, kv_width).view({n, t, config_.num_kv_heads, d});
  if (config_.qk_norm) {
    q = RmsNorm(q, layer.q_norm);
    k = RmsNorm(k, layer.k_norm);
  }
  q = q.transpose(1, 2);  // [n, heads, t, d]
  k = k.transpose(1, 2);
  v = v.transpose(1, 2);
  auto [cos, sin] = RopeCosSin(positions);
  cos = cos.unsqueeze(1);
  sin = sin.unsqueeze(1);
  q = q * cos + RotateHalf(q) * sin;
  k = k * cos + RotateHalf(k) * sin;
  at::Tensor attended = attend(layer_index, q, k, v).transpose(1, 2).reshape({n, t, q_width});
  return layer.o_bias.defined() ? at::linear(attended, layer.o_weight, layer.o_bias)
                                : at::linear(attended, layer.o_weight);
}

at::Tensor Model::Forward(at::Tensor hidden, const at::Tensor& positions, const AttendFn& attend) const {
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& layer = layers_[i];
    hidden = hidden + Attention(layer, static_cast<int>(i), RmsNorm(hidden, layer.input_norm), positions, attend);
    at::Tensor gate_up = at::linear(RmsNorm(hidden, layer.post_attention_norm), layer.gate_up_weight);
    at::Tensor gate = gate_up.narrow(-1, 0, config_.intermediate_size);
    at::Tensor up = gate_up.narrow(-1, config_.intermediate_size, config_.intermediate_size);
    hidden = hidden + at::linear(at::silu(gate) * up, layer.down_weight);
  }
  return hidden;
}

at::Tensor Model::Embed(absl::Span<const int32_t> ids) const {
  at::Tensor tensor = at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong).to(options_.device);
  return at::embedding(embed_tokens_, tensor);
}

absl::StatusOr<at::Tensor> Model::Prefill(Sequence& sequence, absl::Span<const int32_t> ids) const {
  if (ids.empty()) return absl::InvalidArgumentError("prefill needs at least one token");
  LYCHEE_RETURN_IF_ERROR(CheckIds(ids));
  at::NoGradGuard no_grad;
  Sequence* const batch[] = {&sequence};
  const AttendFn attend = [&](int layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    return AttendCached(batch, layer, q, k, v);
  };
  at::Tensor last_hidden;
  for (size_t start = 0; start < ids.size(); start += kPrefillChunk) {
    const absl::Span<const int32_t> chunk = ids.subspan(start, kPrefillChunk);
    at::Tensor positions =
        (at::arange(static_cast<int64_t>(chunk.size()), at::TensorOptions().dtype(at::kLong).device(options_.device)) +
         sequence.length())
            .unsqueeze(0);
    at::Tensor hidden = Forward(Embed(chunk).unsqueeze(0), positions, attend);
    last_hidden = hidden.select(1, static_cast<int64_t>(chunk.size()) - 1);
  }
  at::Tensor logits = at::linear(RmsNorm(last_hidden, final_norm_), lm_head_);
  return logits.squeeze(0).to(at::kFloat);
}

absl::StatusOr<at::Tensor> Model::Decode(absl::Span<Sequence* const> sequences, absl::Span<const int32_t> ids) const {
  if (sequences.size() != ids.size() || sequences.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("decode needs one token per sequence, got ", ids.size(), " for ", sequences.size()));
  }
  LYCHEE_RETURN_IF_ERROR(CheckIds(ids));
  std::vector<int64_t> positions;
  for (Sequence* sequence : sequences) {
    if (sequence->length() == 0) return absl::FailedPreconditionError("decode of a sequence that was never prefilled");
    positions.push_back(sequence->length());
  }
  at::NoGradGuard no_grad;
  at::Tensor position_tensor = at::tensor(positions, at::kLong).to(options_.device).unsqueeze(1);
  const AttendFn attend = [&](int layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    return AttendCached(sequences, layer, q, k, v);
  };
  at::Tensor hidden = Forward(Embed(ids).unsqueeze(1), position_tensor, attend);
  at::Tensor logits = at::linear(RmsNorm(hidden.squeeze(1), final_norm_), lm_head_);
  return logits.to(at::kFloat);
}

absl::StatusOr<at::Tensor> Model::HiddenStates(absl::Span<const int32_t> ids, const AttentionBackend& attention,
                                               SequenceAttentionState* state) const {
  if (ids.empty()) return absl::InvalidArgumentError("hidden states of an empty sequence");
  LYCHEE_RETURN_IF_ERROR(CheckIds(ids));
  at::Tensor positions =
      at::arange(static_cast<int64_t>(ids.size()), at::TensorOptions().dtype(at::kLong).device(options_.device))
          .unsqueeze(0);
  const AttendFn attend = [&](int layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    return attention.Attend(MakeInput(layer, q[0], k[0], v[0], state)).unsqueeze(0);
  };
  return RmsNorm(Forward(Embed(ids).unsqueeze(0), positions, attend), final_norm_).squeeze(0);
}

}  // namespace lychee
