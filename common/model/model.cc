#include "common/model/model.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/model/cuda_support.h"
#ifdef LYCHEE_FUSED_DECODE
#include "common/model/cuda/torch_model_kernels.h"
#endif
#include "common/base/safetensors.h"
#include "common/base/status_macros.h"
#include "common/model/torch_errors.h"

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

// Rows or columns [start, start + length) along `dim` of a checkpoint tensor: a rank's shard.
struct WeightSlice {
  int64_t dim = 0;
  int64_t start = 0;
  int64_t length = -1;  // -1: the whole tensor
};

// Copies a checkpoint tensor, or a slice of it, onto the model's device in its compute dtype, after
// checking its shape.
class WeightLoader {
 public:
  WeightLoader(const Checkpoint& checkpoint, const std::string& model_dir, const ModelOptions& options)
      : checkpoint_(checkpoint), model_dir_(model_dir), options_(options) {}

  absl::StatusOr<at::Tensor> Load(const std::string& name, std::vector<int64_t> expected_shape,
                                  WeightSlice slice = {}) const {
    LYCHEE_ASSIGN_OR_RETURN(TensorView view, checkpoint_.Get(name));
    if (view.shape != expected_shape) {
      return absl::InvalidArgumentError(absl::StrCat(model_dir_, ": tensor ", name, " has shape ",
                                                     ShapeString(view.shape), ", config.json implies ",
                                                     ShapeString(expected_shape)));
    }
    // from_blob does not own the mapped bytes; the copy below does.
    at::Tensor mapped = at::from_blob(const_cast<std::byte*>(view.data), view.shape,
                                      at::TensorOptions().dtype(TorchDType(view.dtype)));
    // Narrowed before the copy, so that only the slice's bytes of the mapping are read.
    if (slice.length >= 0) mapped = mapped.narrow(slice.dim, slice.start, slice.length);
    return mapped.to(options_.device, options_.dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
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

Sequence::Sequence(std::shared_ptr<KvPool> pool, std::shared_ptr<const AttentionBackend> attention)
    : pool_(std::move(pool)), attention_(std::move(attention)), attention_state_(attention_->NewSequenceState()) {}

Sequence::~Sequence() { pool_->Free(pages_); }

void Sequence::SwitchAttention(std::shared_ptr<const AttentionBackend> attention) {
  attention_ = std::move(attention);
  attention_state_ = attention_->NewSequenceState();
}

absl::Status Sequence::Reserve(int64_t tokens) {
  const int64_t missing = pool_->PagesFor(tokens) - static_cast<int64_t>(pages_.size());
  if (missing <= 0) return absl::OkStatus();
  LYCHEE_ASSIGN_OR_RETURN(std::vector<int32_t> pages, pool_->Allocate(missing));
  pages_.insert(pages_.end(), pages.begin(), pages.end());
  return absl::OkStatus();
}

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
  const int rank = options.tensor_parallel ? options.tensor_parallel->rank() : 0;
  const int world_size = options.tensor_parallel ? options.tensor_parallel->world_size() : 1;
  LYCHEE_ASSIGN_OR_RETURN(model->shard_config_, ShardModelConfig(c, world_size));
  const ModelConfig& shard = model->shard_config_;
  model->vocab_slice_ = VocabSliceOf(c.vocab_size, rank, world_size);
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint, Checkpoint::Open(model_dir));
  const WeightLoader weights(*checkpoint, model_dir, model->options_);

  const int64_t q_rows = c.num_attention_heads * c.head_dim;
  const int64_t kv_rows = c.num_kv_heads * c.head_dim;
  // This rank's slices: a column-parallel projection's output rows, a row-parallel one's input
  // columns (the whole tensors when world_size is 1).
  const int64_t q_shard = shard.num_attention_heads * c.head_dim;
  const int64_t kv_shard = shard.num_kv_heads * c.head_dim;
  const WeightSlice q_slice{0, rank * q_shard, q_shard};
  const WeightSlice kv_slice{0, rank * kv_shard, kv_shard};
  const WeightSlice o_slice{1, rank * q_shard, q_shard};
  const WeightSlice mlp_rows{0, rank * shard.intermediate_size, shard.intermediate_size};
  const WeightSlice down_slice{1, rank * shard.intermediate_size, shard.intermediate_size};
  const WeightSlice vocab_rows{0, model->vocab_slice_.begin, model->vocab_slice_.size};
  LYCHEE_ASSIGN_OR_RETURN(model->embed_tokens_,
                          weights.Load("model.embed_tokens.weight", {c.vocab_size, c.hidden_size}, vocab_rows));
  LYCHEE_ASSIGN_OR_RETURN(model->final_norm_, weights.Load("model.norm.weight", {c.hidden_size}));
  if (c.tie_word_embeddings) {
    model->lm_head_ = model->embed_tokens_;
  } else {
    LYCHEE_ASSIGN_OR_RETURN(model->lm_head_, weights.Load("lm_head.weight", {c.vocab_size, c.hidden_size}, vocab_rows));
  }
  // Grown layer by layer, not sized from config.json up front: a layer count the checkpoint does
  // not back ends at its first missing tensor instead of in an allocation.
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string prefix = absl::StrCat("model.layers.", i, ".");
    Layer layer;
    LYCHEE_ASSIGN_OR_RETURN(layer.input_norm, weights.Load(prefix + "input_layernorm.weight", {c.hidden_size}));
    LYCHEE_ASSIGN_OR_RETURN(layer.post_attention_norm,
                            weights.Load(prefix + "post_attention_layernorm.weight", {c.hidden_size}));
    LYCHEE_ASSIGN_OR_RETURN(at::Tensor q,
                            weights.Load(prefix + "self_attn.q_proj.weight", {q_rows, c.hidden_size}, q_slice));
    LYCHEE_ASSIGN_OR_RETURN(at::Tensor k,
                            weights.Load(prefix + "self_attn.k_proj.weight", {kv_rows, c.hidden_size}, kv_slice));
    LYCHEE_ASSIGN_OR_RETURN(at::Tensor v,
                            weights.Load(prefix + "self_attn.v_proj.weight", {kv_rows, c.hidden_size}, kv_slice));
    layer.qkv_weight = at::cat({q, k, v}, 0);
    if (c.attention_bias) {
      LYCHEE_ASSIGN_OR_RETURN(at::Tensor qb, weights.Load(prefix + "self_attn.q_proj.bias", {q_rows}, q_slice));
      LYCHEE_ASSIGN_OR_RETURN(at::Tensor kb, weights.Load(prefix + "self_attn.k_proj.bias", {kv_rows}, kv_slice));
      LYCHEE_ASSIGN_OR_RETURN(at::Tensor vb, weights.Load(prefix + "self_attn.v_proj.bias", {kv_rows}, kv_slice));
      layer.qkv_bias = at::cat({qb, kb, vb}, 0);
    }
    if (c.qk_norm) {
      LYCHEE_ASSIGN_OR_RETURN(layer.q_norm, weights.Load(prefix + "self_attn.q_norm.weight", {c.head_dim}));
      LYCHEE_ASSIGN_OR_RETURN(layer.k_norm, weights.Load(prefix + "self_attn.k_norm.weight", {c.head_dim}));
    }
    LYCHEE_ASSIGN_OR_RETURN(layer.o_weight,
                            weights.Load(prefix + "self_attn.o_proj.weight", {c.hidden_size, q_rows}, o_slice));
    if (c.attention_bias && c.architecture != Architecture::kQwen2) {
      LYCHEE_ASSIGN_OR_RETURN(layer.o_bias, weights.Load(prefix + "self_attn.o_proj.bias", {c.hidden_size}));
    }
    LYCHEE_ASSIGN_OR_RETURN(
        at::Tensor gate, weights.Load(prefix + "mlp.gate_proj.weight", {c.intermediate_size, c.hidden_size}, mlp_rows));
    LYCHEE_ASSIGN_OR_RETURN(
        at::Tensor up, weights.Load(prefix + "mlp.up_proj.weight", {c.intermediate_size, c.hidden_size}, mlp_rows));
    layer.gate_up_weight = at::cat({gate, up}, 0);
    LYCHEE_ASSIGN_OR_RETURN(layer.down_weight, weights.Load(prefix + "mlp.down_proj.weight",
                                                            {c.hidden_size, c.intermediate_size}, down_slice));
    model->layers_.push_back(std::move(layer));
  }
  model->rope_inv_freq_ = RopeInverseFrequencies(c).to(options.device);
  return model;
}

absl::StatusOr<std::shared_ptr<KvPool>> Model::NewKvPool(int64_t num_pages, int64_t page_size) const {
  KvPool::Options options;
  options.page_size = page_size;
  options.num_pages = num_pages;
  return KvPool::Create(shard_config_, at::TensorOptions().dtype(options_.dtype).device(options_.device), options);
}

std::unique_ptr<Sequence> Model::NewSequence(std::shared_ptr<KvPool> pool,
                                             std::shared_ptr<const AttentionBackend> attention) const {
  return std::make_unique<Sequence>(std::move(pool), std::move(attention));
}

std::unique_ptr<Sequence> Model::NewSequence(std::shared_ptr<const AttentionBackend> attention) const {
  KvPool::Options options;
  options.num_pages = 4;
  options.growable = true;
  absl::StatusOr<std::shared_ptr<KvPool>> pool =
      KvPool::Create(shard_config_, at::TensorOptions().dtype(options_.dtype).device(options_.device), options);
  // Four pages of the model's own shape: only an allocation failure could refuse them.
  TORCH_CHECK(pool.ok(), pool.status().ToString());
  return NewSequence(*std::move(pool), std::move(attention));
}

absl::StatusOr<std::unique_ptr<Sequence>> Model::Fork(Sequence& source,
                                                      std::shared_ptr<const AttentionBackend> attention) const {
  auto fork = NewSequence(source.pool_, std::move(attention));
  LYCHEE_RETURN_IF_ERROR(fork->Reserve(source.length()));
  source.pool_->Copy(source.pages_, fork->pages_, source.length());
  fork->length_ = source.length();
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
  input.scale = Scale();
  input.sliding_window = config_.sliding_window;
  input.state = state;
  return input;
}

double Model::Scale() const { return 1.0 / std::sqrt(static_cast<double>(config_.head_dim)); }

at::Tensor Model::Attention(const Layer& layer, int layer_index, const at::Tensor& normed, const at::Tensor& cos,
                            const at::Tensor& sin, const AttendFn& attend) const {
  const int64_t n = normed.size(0);
  const int64_t t = normed.size(1);
  const int64_t d = config_.head_dim;
  at::Tensor qkv = layer.qkv_bias.defined() ? at::linear(normed, layer.qkv_weight, layer.qkv_bias)
                                            : at::linear(normed, layer.qkv_weight);
  const int64_t heads = shard_config_.num_attention_heads, kv_heads = shard_config_.num_kv_heads;
  const int64_t q_width = heads * d;
  const int64_t kv_width = kv_heads * d;
  at::Tensor q = qkv.narrow(-1, 0, q_width).view({n, t, heads, d});
  at::Tensor k = qkv.narrow(-1, q_width, kv_width).view({n, t, kv_heads, d});
  at::Tensor v = qkv.narrow(-1, q_width + kv_width, kv_width).view({n, t, kv_heads, d});
  if (config_.qk_norm) {
    q = RmsNorm(q, layer.q_norm);
    k = RmsNorm(k, layer.k_norm);
  }
  q = q.transpose(1, 2);  // [n, heads, t, d]
  k = k.transpose(1, 2);
  v = v.transpose(1, 2);
  q = q * cos + RotateHalf(q) * sin;
  k = k * cos + RotateHalf(k) * sin;
  at::Tensor attended = attend(layer_index, q, k, v).transpose(1, 2).reshape({n, t, q_width});
  return RowParallelLinear(attended, layer.o_weight, layer.o_bias);
}

at::Tensor Model::RowParallelLinear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) const {
  if (options_.tensor_parallel == nullptr) return bias.defined() ? at::linear(x, weight, bias) : at::linear(x, weight);
  at::Tensor partial = at::linear(x, weight);
  options_.tensor_parallel->AllReduceSum(partial);
  return bias.defined() ? partial + bias : partial;
}

at::Tensor Model::EmbedRows(const at::Tensor& ids) const {
  if (options_.tensor_parallel == nullptr) return at::embedding(embed_tokens_, ids);
  const at::Tensor local = ids - vocab_slice_.begin;
  const at::Tensor outside = (local < 0).logical_or(local >= vocab_slice_.size);
  at::Tensor rows = at::embedding(embed_tokens_, local.masked_fill(outside, 0));
  rows.masked_fill_(outside.unsqueeze(-1), 0);
  options_.tensor_parallel->AllReduceSum(rows);
  return rows;
}

at::Tensor Model::Logits(const at::Tensor& normed) const {
  at::Tensor local = at::linear(normed, lm_head_).to(at::kFloat);
  return options_.tensor_parallel == nullptr ? local : JoinVocabSlices(local);
}

at::Tensor Model::JoinVocabSlices(const at::Tensor& local) const {
  // An all-reduce of zero-padded rows rather than an all-gather: exact (x + 0), and the slices may
  // differ in size.
  std::vector<int64_t> shape = local.sizes().vec();
  shape.back() = config_.vocab_size;
  at::Tensor logits = at::zeros(shape, local.options());
  logits.narrow(-1, vocab_slice_.begin, vocab_slice_.size).copy_(local);
  options_.tensor_parallel->AllReduceSum(logits);
  return logits;
}

at::Tensor Model::DecoderLayer(int layer_index, at::Tensor hidden, const at::Tensor& cos, const at::Tensor& sin,
                               const AttendFn& attend) const {
  const Layer& layer = layers_[layer_index];
  hidden = hidden + Attention(layer, layer_index, RmsNorm(hidden, layer.input_norm), cos, sin, attend);
  at::Tensor gate_up = at::linear(RmsNorm(hidden, layer.post_attention_norm), layer.gate_up_weight);
  const int64_t intermediate = shard_config_.intermediate_size;
  at::Tensor gate = gate_up.narrow(-1, 0, intermediate);
  at::Tensor up = gate_up.narrow(-1, intermediate, intermediate);
  return hidden + RowParallelLinear(at::silu(gate) * up, layer.down_weight, at::Tensor());
}

at::Tensor Model::Forward(at::Tensor hidden, const at::Tensor& positions, const AttendFn& attend) const {
  auto [cos, sin] = RopeCosSin(positions);
  cos = cos.unsqueeze(1);  // [n, 1, t, d]: every head alike
  sin = sin.unsqueeze(1);
  for (size_t i = 0; i < layers_.size(); ++i) hidden = DecoderLayer(static_cast<int>(i), hidden, cos, sin, attend);
  return hidden;
}

at::Tensor Model::Embed(absl::Span<const int32_t> ids) const {
  at::Tensor tensor = at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong).to(options_.device);
  return EmbedRows(tensor);
}

absl::StatusOr<at::Tensor> Model::Prefill(Sequence& sequence, absl::Span<const int32_t> ids) const {
  if (ids.empty()) return absl::InvalidArgumentError("prefill needs at least one token");
  LYCHEE_RETURN_IF_ERROR(CheckGroup("prefill"));
  LYCHEE_RETURN_IF_ERROR(CheckIds(ids));
  LYCHEE_RETURN_IF_ERROR(sequence.Reserve(sequence.length() + static_cast<int64_t>(ids.size())));
  try {
    return RunPrefill(sequence, ids);
  } catch (const std::exception& error) {
    return StatusFromException(error, "prefill");
  }
}

at::Tensor Model::RunPrefill(Sequence& sequence, absl::Span<const int32_t> ids) const {
  at::NoGradGuard no_grad;
  KvPool& pool = *sequence.pool_;
  at::Tensor last_hidden;
  for (size_t start = 0; start < ids.size(); start += kPrefillChunk) {
    const absl::Span<const int32_t> chunk = ids.subspan(start, kPrefillChunk);
    const int64_t first = sequence.length();
    const int64_t end = first + static_cast<int64_t>(chunk.size());
    const AttendFn attend = [&](int layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
      pool.Write(layer, sequence.pages_, first, k[0], v[0]);
      AttentionInput input = MakeInput(layer, q[0], pool.GatherKeys(layer, sequence.pages_, end),
                                       pool.GatherValues(layer, sequence.pages_, end), sequence.attention_state_.get());
      return sequence.attention().Attend(input).unsqueeze(0);
    };
    at::Tensor positions =
        (at::arange(static_cast<int64_t>(chunk.size()), at::TensorOptions().dtype(at::kLong).device(options_.device)) +
         first)
            .unsqueeze(0);
    at::Tensor hidden = Forward(Embed(chunk).unsqueeze(0), positions, attend);
    sequence.length_ = end;
    last_hidden = hidden.select(1, static_cast<int64_t>(chunk.size()) - 1);
  }
  return Logits(RmsNorm(last_hidden, final_norm_)).squeeze(0);
}

// ---- Decode ------------------------------------------------------------------------------------

// The inputs of one step on the device for a batch of up to `rows` sequences of one backend and
// pool, the backend's workspace, and on CUDA the step's captured graph. The step's inputs are int32:
// ids [rows], positions [rows], write slots [rows] (page * page_size + offset of the new position),
// then the page tables [rows, width].
struct DecodeContext::Bucket {
  const AttentionBackend* backend = nullptr;
  std::weak_ptr<const AttentionBackend> backend_alive;
  const KvPool* pool = nullptr;
  int64_t pool_generation = 0;
  int64_t rows = 0;
  int64_t width = 0;
  bool for_graph = false;
  std::unique_ptr<DecodeWorkspace> workspace;
  at::Tensor inputs;
  at::Tensor ids, positions, slots, page_table;
  // Per graph variant of the workspace's steps (DecodeWorkspace::graph_variant).
  struct Graph {
    int64_t eager_steps = 0;
    std::unique_ptr<CapturedGraph> captured;
    DecodeStepOutput output;
  };
  Graph graphs[DecodeWorkspace::kGraphVariants];

  bool Matches(const AttentionBackend* b, const KvPool* p, int64_t r, bool g) const {
    return backend == b && pool == p && rows == r && for_graph == g;
  }
  bool Stale() const { return backend_alive.expired() || pool->generation() != pool_generation; }
};

DecodeContext::DecodeContext(DecodeOptions options) : options_(options) {}
DecodeContext::~DecodeContext() = default;

namespace {

int64_t NextPowerOfTwo(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

}  // namespace

// Rows of the batch that share a backend and a pool, and the step they decode together.
struct Model::DecodeGroup {
  const AttentionBackend* backend = nullptr;
  KvPool* pool = nullptr;
  std::vector<int64_t> rows;  // of the batch
  at::Tensor row_index;       // int64 on the device; undefined when the group is the whole batch
  DecodeContext::Bucket* bucket = nullptr;
  DecodeStep step;
};

absl::StatusOr<DecodeContext::Bucket*> Model::BucketFor(DecodeContext& context, const Sequence& first,
                                                        int64_t batch, int64_t width, bool whole_batch) const {
  const AttentionBackend* backend = &first.attention();
  const KvPool* pool = &first.pool();
  const bool for_graph = whole_batch && context.options().cuda_graphs && !context.graphs_failed_ &&
                         options_.device.is_cuda() && CollectivesCapturable() && backend->CapturesDecode() &&
                         batch <= context.options().max_graph_batch;
  const int64_t rows = for_graph ? NextPowerOfTwo(batch) : batch;
  auto& buckets = context.buckets_;
  buckets.erase(std::remove_if(buckets.begin(), buckets.end(),
                               [&](const std::unique_ptr<DecodeContext::Bucket>& b) {
                                 return b->Stale() || (b->for_graph && context.graphs_failed_);
                               }),
                buckets.end());
  for (auto it = buckets.begin(); it != buckets.end(); ++it) {
    if (!(*it)->Matches(backend, pool, rows, for_graph)) continue;
    if ((*it)->width >= width) return it->get();
    buckets.erase(it);  // outgrown: made again below, wider
    break;
  }
  auto bucket = std::make_unique<DecodeContext::Bucket>();
  bucket->backend = backend;
  bucket->backend_alive = first.attention_ptr();
  bucket->pool = pool;
  bucket->pool_generation = pool->generation();
  bucket->rows = rows;
  // Graph buckets hold tables for the longest sequence the pool or the model allows, so that one
  // capture serves every later step; eager ones grow by doubling.
  bucket->width = for_graph ? std::min(pool->num_pages() + 1, pool->PagesFor(config_.max_position_embeddings))
                            : NextPowerOfTwo(width);
  bucket->width = std::max(bucket->width, width);
  bucket->for_graph = for_graph;
  DecodeCapacity capacity;
  capacity.max_batch = rows;
  capacity.max_pages = bucket->width;
  capacity.for_graph = for_graph;
  bucket->workspace = backend->NewDecodeWorkspace(*pool, capacity);
  if (bucket->workspace == nullptr) return absl::InternalError("the attention backend made no decode workspace");
  bucket->inputs = at::zeros({rows * (3 + bucket->width)}, at::TensorOptions().dtype(at::kInt).device(options_.device));
  bucket->ids = bucket->inputs.narrow(0, 0, rows);
  bucket->positions = bucket->inputs.narrow(0, rows, rows);
  bucket->slots = bucket->inputs.narrow(0, 2 * rows, rows);
  bucket->page_table = bucket->inputs.narrow(0, 3 * rows, rows * bucket->width).view({rows, bucket->width});
  buckets.push_back(std::move(bucket));
  return buckets.back().get();
}

void Model::StageInputs(DecodeGroup& group, absl::Span<Sequence* const> sequences,
                        absl::Span<const int32_t> ids) const {
  DecodeContext::Bucket& bucket = *group.bucket;
  const at::TensorOptions host = at::TensorOptions().dtype(at::kInt).pinned_memory(options_.device.is_cuda());
  at::Tensor staging = at::zeros({bucket.inputs.numel()}, host);
  int32_t* words = staging.data_ptr<int32_t>();
  const int64_t page_size = group.pool->page_size();
  for (size_t r = 0; r < group.rows.size(); ++r) {
    const Sequence& sequence = *sequences[group.rows[r]];
    const int64_t position = sequence.length();
    words[r] = ids[group.rows[r]];
    words[bucket.rows + r] = static_cast<int32_t>(position);
    words[2 * bucket.rows + r] = static_cast<int32_t>(sequence.pages_[position / page_size] * page_size + position % page_size);
    std::copy(sequence.pages_.begin(), sequence.pages_.end(), words + 3 * bucket.rows + r * bucket.width);
  }
  // Padding rows write their keys into the reserved page 0 and read nothing.
  bucket.inputs.copy_(staging, /*non_blocking=*/true);

  DecodeStep& step = group.step;
  step = DecodeStep();
  for (int64_t row : group.rows) {
    Sequence& sequence = *sequences[row];
    step.lengths.push_back(sequence.length() + 1);
    step.states.push_back(sequence.attention_state_.get());
    step.pages.push_back(&sequence.pages_);
  }
  step.pool = group.pool;
  step.page_table = bucket.page_table;
  step.scale = Scale();
  step.sliding_window = config_.sliding_window;
}

DecodeStepOutput Model::DecodeForward(const at::Tensor& ids, const at::Tensor& positions,
                                std::vector<DecodeGroup>& groups) const {
  if (UsesFusedDecode()) return FusedDecodeForward(ids, groups);
  std::vector<at::Tensor> slots;
  for (DecodeGroup& group : groups) slots.push_back(group.bucket->slots.to(at::kLong));
  const AttendFn attend = [&](int layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    at::Tensor out = groups.size() == 1 ? at::Tensor() : at::empty_like(q);
    for (size_t g = 0; g < groups.size(); ++g) {
      DecodeGroup& group = groups[g];
      const bool whole = !group.row_index.defined();
      const at::Tensor group_k = whole ? k : k.index_select(0, group.row_index);
      const at::Tensor group_v = whole ? v : v.index_select(0, group.row_index);
      // [rows, kv_heads, 1, D] -> [kv_heads, rows, D] into the flattened pages of the layer.
      const int64_t kv_heads = shard_config_.num_kv_heads,
                    flat = group.pool->keys(layer).size(1) * group.pool->page_size();
      group.pool->keys(layer).view({kv_heads, flat, config_.head_dim}).index_copy_(1, slots[g], group_k.select(2, 0).transpose(0, 1));
      group.pool->values(layer).view({kv_heads, flat, config_.head_dim}).index_copy_(1, slots[g], group_v.select(2, 0).transpose(0, 1));
      const at::Tensor group_q = (whole ? q : q.index_select(0, group.row_index)).select(2, 0);
      at::Tensor attended =
          group.backend->AttendDecode(layer, group_q, group.step, *group.bucket->workspace).unsqueeze(2);
      if (whole) return attended;
      out.index_copy_(0, group.row_index, attended);
    }
    return out;
  };
  at::Tensor hidden = Forward(EmbedRows(ids).unsqueeze(1), positions.to(at::kLong).unsqueeze(1), attend);
  DecodeStepOutput output;
  output.logits = Logits(RmsNorm(hidden.squeeze(1), final_norm_));
  output.greedy = output.logits.argmax(-1).to(at::kInt);
  return output;
}

absl::Status Model::CheckGroup(absl::string_view step) const {
  if (options_.tensor_parallel == nullptr) return absl::OkStatus();
  try {
    options_.tensor_parallel->ThrowIfAborted();
  } catch (const CollectiveError& error) {
    return StatusFromException(error, step);
  }
  return absl::OkStatus();
}

bool Model::CollectivesCapturable() const {
  return options_.tensor_parallel == nullptr || options_.tensor_parallel->capturable_in_cuda_graphs();
}

bool Model::UsesFusedDecode() const {
#ifdef LYCHEE_FUSED_DECODE
  return options_.fused_decode && options_.device.is_cuda() && options_.dtype == at::kBFloat16 &&
         !config_.sliding_window;
#else
  return false;
#endif
}

#ifdef LYCHEE_FUSED_DECODE
DecodeStepOutput Model::FusedDecodeForward(const at::Tensor& ids, std::vector<DecodeGroup>& groups) const {
  const int64_t rows = ids.size(0);
  const double eps = config_.rms_norm_eps;
  const bool gemv = options_.small_batch_gemv && rows <= 8;
  const bool overlap = options_.overlap_kernel_launches;
  const TensorParallelGroup* const tensor_parallel = options_.tensor_parallel.get();
  const auto linear = [&](const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
    if (bias.defined()) return at::linear(x, weight, bias);
    return gemv ? cuda::Gemv(x, weight, at::Tensor(), overlap) : at::linear(x, weight);
  };
  // residual += x weight^T + bias (one rounding with one rank; under tensor parallelism the ranks'
  // partial products are summed first), then normed = RmsNorm(residual, norm).
  at::Tensor normed;
  const auto add_row_parallel_and_norm = [&](at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& bias, const at::Tensor& norm) {
    if (tensor_parallel != nullptr) {
      at::Tensor partial = linear(x, weight, at::Tensor());
      tensor_parallel->AllReduceSum(partial);
      if (bias.defined()) partial.add_(bias);
      // After a collective on another stream, not an overlapped launch.
      cuda::AddRmsNorm(partial, residual, norm, eps, normed, /*overlap_previous=*/false);
      return;
    }
    if (bias.defined()) {
      residual.add_(at::linear(x, weight, bias));
    } else if (gemv) {
      cuda::GemvOut(x, weight, residual, residual, overlap);
    } else {
      residual.addmm_(x, weight.t());
    }
    cuda::AddRmsNorm(at::Tensor(), residual, norm, eps, normed, overlap);
  };
  at::Tensor residual = EmbedRows(ids);  // [rows, hidden], the residual stream
  normed = cuda::AddRmsNorm(at::Tensor(), residual, layers_[0].input_norm, eps, overlap && tensor_parallel == nullptr);
  const int64_t heads = shard_config_.num_attention_heads;
  const int64_t q_width = heads * config_.head_dim;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& layer = layers_[i];
    const int index = static_cast<int>(i);
    const at::Tensor qkv = linear(normed, layer.qkv_weight, layer.qkv_bias);
    at::Tensor attended;
    for (DecodeGroup& group : groups) {
      const bool whole = !group.row_index.defined();
      at::Tensor keys = group.pool->keys(index), values = group.pool->values(index);
      const at::Tensor queries =
          cuda::RopeAppend(whole ? qkv : qkv.index_select(0, group.row_index), group.bucket->positions, rope_inv_freq_,
                           layer.q_norm, layer.k_norm, eps, heads, group.bucket->slots, keys, values, overlap);
      at::Tensor out = group.backend->AttendDecode(index, queries, group.step, *group.bucket->workspace);
      if (whole) {
        attended = out;
      } else {
        if (!attended.defined()) attended = at::empty({rows, heads, config_.head_dim}, out.options());
        attended.index_copy_(0, group.row_index, out);
      }
    }
    add_row_parallel_and_norm(residual, attended.reshape({rows, q_width}), layer.o_weight, layer.o_bias,
                              layer.post_attention_norm);
    const at::Tensor activated = cuda::SiluMul(linear(normed, layer.gate_up_weight, at::Tensor()), overlap);
    add_row_parallel_and_norm(residual, activated, layer.down_weight, at::Tensor(),
                              i + 1 < layers_.size() ? layers_[i + 1].input_norm : final_norm_);
  }
  DecodeStepOutput output;
  output.logits = linear(normed, lm_head_, at::Tensor()).to(at::kFloat);
  if (tensor_parallel != nullptr) output.logits = JoinVocabSlices(output.logits);
  output.greedy = cuda::ArgmaxRows(output.logits);
  return output;
}
#else
DecodeStepOutput Model::FusedDecodeForward(const at::Tensor&, std::vector<DecodeGroup>&) const {
  TORCH_CHECK(false, "this build has no fused decode kernels");
  return {};
}
#endif

absl::StatusOr<at::Tensor> Model::Decode(absl::Span<Sequence* const> sequences, absl::Span<const int32_t> ids,
                                         DecodeContext* context) const {
  if (sequences.size() != ids.size() || sequences.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("decode needs one token per sequence, got ", ids.size(), " for ", sequences.size()));
  }
  // Before anything is launched: a captured step would replay the collectives of an aborted group.
  LYCHEE_RETURN_IF_ERROR(CheckGroup("decode"));
  LYCHEE_RETURN_IF_ERROR(CheckIds(ids));
  int64_t width = 1;
  for (Sequence* sequence : sequences) {
    if (sequence->length() == 0) return absl::FailedPreconditionError("decode of a sequence that was never prefilled");
    LYCHEE_RETURN_IF_ERROR(sequence->Reserve(sequence->length() + 1));
    width = std::max<int64_t>(width, static_cast<int64_t>(sequence->pages_.size()));
  }
  DecodeContext own_context(DecodeOptions{/*cuda_graphs=*/false});
  try {
    return RunDecode(sequences, ids, width, context != nullptr ? *context : own_context);
  } catch (const std::exception& error) {
    // A kernel's check or an allocation: the step is not taken, and the caller's other work goes on.
    return StatusFromException(error, "decode step");
  }
}

absl::StatusOr<at::Tensor> Model::RunDecode(absl::Span<Sequence* const> sequences, absl::Span<const int32_t> ids,
                                            int64_t width, DecodeContext& decode_context) const {
  at::NoGradGuard no_grad;
  DecodeContext* context = &decode_context;
  std::vector<DecodeGroup> groups;
  for (size_t row = 0; row < sequences.size(); ++row) {
    const Sequence& sequence = *sequences[row];
    auto it = std::find_if(groups.begin(), groups.end(), [&](const DecodeGroup& g) {
      return g.backend == &sequence.attention() && g.pool == sequence.pool_.get();
    });
    if (it == groups.end()) {
      groups.push_back(DecodeGroup{&sequence.attention(), sequence.pool_.get()});
      it = groups.end() - 1;
    }
    it->rows.push_back(static_cast<int64_t>(row));
  }
  const bool whole_batch = groups.size() == 1;
  for (DecodeGroup& group : groups) {
    LYCHEE_ASSIGN_OR_RETURN(group.bucket, BucketFor(*context, *sequences[group.rows[0]],
                                                    static_cast<int64_t>(group.rows.size()), width, whole_batch));
    if (!whole_batch) group.row_index = at::tensor(group.rows, at::kLong).to(options_.device);
    StageInputs(group, sequences, ids);
    LYCHEE_RETURN_IF_ERROR(group.backend->PlanDecodeStep(group.step, *group.bucket->workspace));
  }

  DecodeStepOutput output;
  DecodeStats& stats = context->stats_;
  if (whole_batch) {
    DecodeContext::Bucket& bucket = *groups[0].bucket;
    DecodeContext::Bucket::Graph& graph = bucket.graphs[bucket.workspace->graph_variant()];
    if (bucket.for_graph && graph.captured == nullptr && graph.eager_steps > 0) {
      // Captured after one eager step of the bucket's variant, which set up what is made on first use
      // (cuBLAS handles, kernel attributes), so that none of it happens during capture.
      absl::StatusOr<std::unique_ptr<CapturedGraph>> captured =
          CaptureCudaGraph([&] { graph.output = DecodeForward(bucket.ids, bucket.positions, groups); });
      if (captured.ok()) {
        graph.captured = *std::move(captured);
        ++stats.graph_captures;
      } else {
        // Eager from now on: this step runs on the bucket's buffers, later ones on eager buckets.
        context->graphs_failed_ = true;
        ++stats.capture_failures;
        stats.last_capture_error = std::string(captured.status().message());
      }
    }
    if (graph.captured != nullptr) {
      graph.captured->Replay();
      ++stats.graph_replays;
      output = graph.output;
    } else {
      output = DecodeForward(bucket.ids, bucket.positions, groups);
      ++graph.eager_steps;
      ++stats.eager_steps;
    }
  } else {
    at::Tensor id_tensor = at::tensor(std::vector<int32_t>(ids.begin(), ids.end()), at::kInt).to(options_.device);
    std::vector<int32_t> positions;
    for (Sequence* sequence : sequences) positions.push_back(static_cast<int32_t>(sequence->length()));
    output = DecodeForward(id_tensor, at::tensor(positions, at::kInt).to(options_.device), groups);
    ++stats.eager_steps;
  }
  for (Sequence* sequence : sequences) ++sequence->length_;
  const int64_t batch = static_cast<int64_t>(sequences.size());
  context->last_greedy_ = output.greedy.narrow(0, 0, batch);
  return output.logits.narrow(0, 0, batch);
}

absl::Status Model::PrepareDecodeGraphs(const std::shared_ptr<const AttentionBackend>& attention,
                                        const std::shared_ptr<KvPool>& pool, DecodeContext& context) const {
  // Under tensor parallelism the warm-up steps below would make collectives that the other ranks do
  // not join: there the graphs are captured on the first steps that every rank makes.
  if (!context.options().cuda_graphs || context.graphs_failed_ || !options_.device.is_cuda() ||
      !attention->CapturesDecode() || options_.tensor_parallel != nullptr) {
    return absl::OkStatus();
  }
  const DecodeStats counted = context.stats_;
  const int64_t max_batch = context.options().max_graph_batch;
  absl::Status status;
  for (int64_t rows = 1; status.ok() && rows < 2 * max_batch; rows *= 2) {
    const int64_t batch = std::min(rows, max_batch);  // the bucket of `rows` rows
    std::vector<std::unique_ptr<Sequence>> owned;
    std::vector<Sequence*> sequences;
    const std::vector<int32_t> ids(static_cast<size_t>(batch), 0);
    for (int64_t i = 0; i < batch && status.ok(); ++i) {
      owned.push_back(NewSequence(pool, attention));
      sequences.push_back(owned.back().get());
      status = Prefill(*owned.back(), {ids[0]}).status();
    }
    for (int step = 0; step < 2 && status.ok(); ++step) status = Decode(sequences, ids, &context).status();
    if (status.ok() && context.graphs_failed_) status = absl::InternalError(context.stats_.last_capture_error);
  }
  context.stats_.eager_steps = counted.eager_steps;
  context.stats_.graph_replays = counted.graph_replays;
  return status;
}

std::vector<int32_t> DecodeContext::GreedyTokens() const {
  if (!last_greedy_.defined()) return {};
  const at::Tensor host = last_greedy_.to(at::kCPU).contiguous();
  return std::vector<int32_t>(host.data_ptr<int32_t>(), host.data_ptr<int32_t>() + host.numel());
}

Model::AttendFn Model::WholeSequenceAttend(const AttentionBackend& attention, SequenceAttentionState* state) const {
  return [this, &attention, state](int layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    return attention.Attend(MakeInput(layer, q[0], k[0], v[0], state)).unsqueeze(0);
  };
}

at::Tensor Model::WholeSequencePositions(int64_t length) const {
  return at::arange(length, at::TensorOptions().dtype(at::kLong).device(options_.device)).unsqueeze(0);
}

absl::StatusOr<at::Tensor> Model::HiddenStates(absl::Span<const int32_t> ids, const AttentionBackend& attention,
                                               SequenceAttentionState* state) const {
  if (ids.empty()) return absl::InvalidArgumentError("hidden states of an empty sequence");
  LYCHEE_RETURN_IF_ERROR(CheckIds(ids));
  const at::Tensor positions = WholeSequencePositions(static_cast<int64_t>(ids.size()));
  return FinalNorm(Forward(Embed(ids).unsqueeze(0), positions, WholeSequenceAttend(attention, state)));
}

absl::StatusOr<at::Tensor> Model::EmbedForTraining(absl::Span<const int32_t> ids) const {
  if (ids.empty()) return absl::InvalidArgumentError("hidden states of an empty sequence");
  LYCHEE_RETURN_IF_ERROR(CheckIds(ids));
  return Embed(ids).unsqueeze(0);
}

at::Tensor Model::LayerForTraining(int layer, const at::Tensor& hidden, const AttentionBackend& attention,
                                   SequenceAttentionState* state) const {
  auto [cos, sin] = RopeCosSin(WholeSequencePositions(hidden.size(1)));
  return DecoderLayer(layer, hidden, cos.unsqueeze(1), sin.unsqueeze(1), WholeSequenceAttend(attention, state));
}

at::Tensor Model::FinalNorm(const at::Tensor& hidden) const { return RmsNorm(hidden, final_norm_).squeeze(0); }

absl::StatusOr<std::unique_ptr<Model>> Model::SharingWeights(std::shared_ptr<const TensorParallelGroup> group) const {
  const TensorParallelGroup* own = options_.tensor_parallel.get();
  if (group == nullptr || own == nullptr || group->rank() != own->rank() || group->world_size() != own->world_size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("a model sharing the weights of rank ", own == nullptr ? 0 : own->rank(), " of ",
                     own == nullptr ? 1 : own->world_size(), " needs a group of the same rank and size, got ",
                     group == nullptr ? "none" : absl::StrCat("rank ", group->rank(), " of ", group->world_size())));
  }
  std::unique_ptr<Model> model(new Model(*this));
  model->options_.tensor_parallel = std::move(group);
  return model;
}

}  // namespace lychee
