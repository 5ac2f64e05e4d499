#include "common/base/model_config.h"

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/base/json_parse.h"
#include "common/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace lychee {
namespace {

using nlohmann::json;

struct ArchitectureNames {
  Architecture architecture;
  const char* model_type;
  const char* class_name;  // as listed in "architectures"
};

constexpr ArchitectureNames kArchitectures[] = {
    {Architecture::kLlama, "llama", "LlamaForCausalLM"},
    {Architecture::kQwen2, "qwen2", "Qwen2ForCausalLM"},
    {Architecture::kQwen3, "qwen3", "Qwen3ForCausalLM"},
    {Architecture::kMistral, "mistral", "MistralForCausalLM"},
};

const ArchitectureNames& NamesOf(Architecture architecture) {
  for (const ArchitectureNames& names : kArchitectures) {
    if (names.architecture == architecture) return names;
  }
  return kArchitectures[0];
}

// Debian's Abseil has its own string_view, which absl::StrCat takes but std::string_view does
// not convert to.
absl::string_view Absl(std::string_view text) { return {text.data(), text.size()}; }

// Typed access to the fields of one JSON object; errors name the source and the field's full
// path (e.g. rope_scaling.factor). Absent and null fields read alike, as transformers does.
class FieldReader {
 public:
  FieldReader(const json& object, absl::string_view source, std::string prefix = "")
      : object_(object), source_(source), prefix_(std::move(prefix)) {}

  absl::Status Error(absl::string_view field, absl::string_view problem) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", prefix_, field, " ", problem));
  }

  bool Has(absl::string_view field) const {
    const auto found = object_.find(std::string(field));
    return found != object_.end() && !found->is_null();
  }

  FieldReader Nested(absl::string_view field) const {
    return FieldReader(object_.at(std::string(field)), source_, absl::StrCat(prefix_, field, "."));
  }

  absl::StatusOr<std::optional<int64_t>> OptionalInt(absl::string_view field) const {
    if (!Has(field)) return std::nullopt;
    const json& value = object_.at(std::string(field));
    const bool fits = value.is_number_integer() &&
                      !(value.is_number_unsigned() &&
                        value.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()));
    if (!fits) return Error(field, absl::StrCat("must be an integer, got ", value.dump()));
    return value.get<int64_t>();
  }

  absl::StatusOr<int64_t> Int(absl::string_view field) const {
    LYCHEE_ASSIGN_OR_RETURN(std::optional<int64_t> value, OptionalInt(field));
    if (!value) return MissingError(field);
    return *value;
  }

  // A size: positive and within int32_t, so that the model's products of two sizes (heads times
  // head_dim, rows times columns) cannot overflow int64_t.
  absl::StatusOr<int64_t> PositiveInt(absl::string_view field) const {
    LYCHEE_ASSIGN_OR_RETURN(int64_t value, Int(field));
    if (value <= 0) return Error(field, absl::StrCat("must be positive, got ", value));
    if (value > std::numeric_limits<int32_t>::max()) {
      return Error(field, absl::StrCat("must be at most ", std::numeric_limits<int32_t>::max(), ", got ", value));
    }
    return value;
  }

  absl::StatusOr<std::optional<double>> OptionalNumber(absl::string_view field) const {
    if (!Has(field)) return std::nullopt;
    const json& value = object_.at(std::string(field));
    if (!value.is_number()) return Error(field, absl::StrCat("must be a number, got ", value.dump()));
    return value.get<double>();
  }

  absl::StatusOr<double> PositiveNumber(absl::string_view field) const {
    LYCHEE_ASSIGN_OR_RETURN(std::optional<double> value, OptionalNumber(field));
    if (!value) return MissingError(field);
    if (!(*value > 0)) return Error(field, absl::StrCat("must be positive, got ", *value));
    return *value;
  }

  absl::StatusOr<bool> Bool(absl::string_view field, bool default_value) const {
    if (!Has(field)) return default_value;
    const json& value = object_.at(std::string(field));
    if (!value.is_boolean()) return Error(field, absl::StrCat("must be true or false, got ", value.dump()));
    return value.get<bool>();
  }

  absl::StatusOr<std::optional<std::string>> OptionalString(absl::string_view field) const {
    if (!Has(field)) return std::nullopt;
    const json& value = object_.at(std::string(field));
    if (!value.is_string()) return Error(field, absl::StrCat("must be a string, got ", value.dump()));
    return value.get<std::string>();
  }

  // nullptr when absent.
  absl::StatusOr<const json*> OptionalObject(absl::string_view field) const {
    if (!Has(field)) return nullptr;
    const json& value = object_.at(std::string(field));
    if (!value.is_object()) return Error(field, absl::StrCat("must be an object, got ", value.dump()));
    return &value;
  }

  // An integer or a list of integers, as eos_token_id may be; empty when absent.
  absl::StatusOr<std::vector<int64_t>> IntOrIntList(absl::string_view field) const {
    if (!Has(field)) return std::vector<int64_t>{};
    const json& value = object_.at(std::string(field));
    if (!value.is_array()) {
      LYCHEE_ASSIGN_OR_RETURN(int64_t single, Int(field));
      return std::vector<int64_t>{single};
    }
    std::vector<int64_t> values;
    for (const json& element : value) {
      if (!element.is_number_integer()) {
        return Error(field, absl::StrCat("must be an integer or a list of integers, got ", value.dump()));
      }
      values.push_back(element.get<int64_t>());
    }
    return values;
  }

 private:
  absl::Status MissingError(absl::string_view field) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": missing required field ", prefix_, field));
  }

  const json& object_;
  absl::string_view source_;
  std::string prefix_;
};

absl::StatusOr<Architecture> ParseArchitecture(const FieldReader& fields, const json& config) {
  LYCHEE_ASSIGN_OR_RETURN(std::optional<std::string> model_type, fields.OptionalString("model_type"));
  if (!model_type) return fields.Error("model_type", "is missing; it names the architecture");
  const ArchitectureNames* names = nullptr;
  for (const ArchitectureNames& candidate : kArchitectures) {
    if (candidate.model_type == *model_type) names = &candidate;
  }
  if (names == nullptr) {
    return fields.Error("model_type", absl::StrCat("\"", *model_type,
                                                   "\" is not an architecture Lychee serves (llama, qwen2, qwen3, "
                                                   "mistral)"));
  }
  if (fields.Has("architectures")) {
    const json& classes = config.at("architectures");
    const bool listed = classes.is_array() && std::any_of(classes.begin(), classes.end(), [&](const json& name) {
                          return name.is_string() && name.get<std::string>() == names->class_name;
                        });
    if (!listed) {
      return fields.Error("architectures", absl::StrCat(classes.dump(), " does not list ", names->class_name,
                                                        ", which model_type \"", *model_type, "\" implies"));
    }
  }
  return names->architecture;
}

// rope_theta and the rope type sit at the top level (rope_theta, rope_scaling) in older configs
// and under rope_parameters in newer ones; a config giving both must agree with itself.
absl::Status ParseRope(const FieldReader& fields, ModelConfig& config) {
  LYCHEE_ASSIGN_OR_RETURN(const json* rope_parameters, fields.OptionalObject("rope_parameters"));
  LYCHEE_ASSIGN_OR_RETURN(const json* rope_scaling, fields.OptionalObject("rope_scaling"));

  LYCHEE_ASSIGN_OR_RETURN(std::optional<double> theta, fields.OptionalNumber("rope_theta"));
  absl::string_view theta_field = "rope_theta";
  if (rope_parameters != nullptr) {
    LYCHEE_ASSIGN_OR_RETURN(std::optional<double> nested_theta,
                            fields.Nested("rope_parameters").OptionalNumber("rope_theta"));
    if (theta && nested_theta && *theta != *nested_theta) {
      return fields.Error("rope_theta", absl::StrCat(*theta, " disagrees with rope_parameters.rope_theta ",
                                                     *nested_theta));
    }
    if (nested_theta) {
      theta = nested_theta;
      theta_field = "rope_parameters.rope_theta";
    }
  }
  if (theta) {
    if (!(*theta > 0)) return fields.Error(theta_field, absl::StrCat("must be positive, got ", *theta));
    config.rope_theta = *theta;
  }

  // The object that says which rope type applies: rope_scaling, or rope_parameters when it has a type.
  struct Candidate {
    absl::string_view field;
    const json* object;
  };
  std::optional<FieldReader> scaling;
  for (const Candidate& candidate :
       {Candidate{"rope_scaling", rope_scaling}, Candidate{"rope_parameters", rope_parameters}}) {
    if (candidate.object == nullptr ||
        !(candidate.object->contains("rope_type") || candidate.object->contains("type"))) {
      continue;
    }
    if (scaling) return fields.Error("rope_parameters", "and rope_scaling both give a rope type");
    scaling.emplace(fields.Nested(candidate.field));
  }
  if (!scaling) {
    if (rope_scaling != nullptr) return fields.Error("rope_scaling", "has no rope_type");
    return absl::OkStatus();
  }
  // "type" is the older spelling of "rope_type".
  LYCHEE_ASSIGN_OR_RETURN(std::optional<std::string> rope_type, scaling->OptionalString("rope_type"));
  if (!rope_type) {
    LYCHEE_ASSIGN_OR_RETURN(rope_type, scaling->OptionalString("type"));
  }
  if (rope_type == "default") return absl::OkStatus();
  if (rope_type != "llama3") {
    return scaling->Error("rope_type", absl::StrCat("\"", rope_type.value_or(""),
                                                    "\" is not supported (default, llama3)"));
  }
  RopeScaling& llama3 = config.rope_scaling;
  llama3.type = RopeScaling::Type::kLlama3;
  LYCHEE_ASSIGN_OR_RETURN(llama3.factor, scaling->PositiveNumber("factor"));
  LYCHEE_ASSIGN_OR_RETURN(llama3.low_freq_factor, scaling->PositiveNumber("low_freq_factor"));
  LYCHEE_ASSIGN_OR_RETURN(llama3.high_freq_factor, scaling->PositiveNumber("high_freq_factor"));
  LYCHEE_ASSIGN_OR_RETURN(llama3.original_max_position_embeddings,
                          scaling->PositiveInt("original_max_position_embeddings"));
  // The smoothing between the two wavelength bands divides by their difference.
  if (llama3.high_freq_factor <= llama3.low_freq_factor) {
    return scaling->Error("high_freq_factor", absl::StrCat(llama3.high_freq_factor,
                                                           " must exceed low_freq_factor ", llama3.low_freq_factor));
  }
  return absl::OkStatus();
}

absl::Status ParseSlidingWindow(const FieldReader& fields, ModelConfig& config) {
  if (config.architecture == Architecture::kQwen2 || config.architecture == Architecture::kQwen3) {
    // Qwen configs carry a sliding_window that applies only with use_sliding_window, and then
    // only to the layers from max_window_layers on: a per-layer mix this struct cannot express.
    LYCHEE_ASSIGN_OR_RETURN(bool use_sliding_window, fields.Bool("use_sliding_window", false));
    if (use_sliding_window) return fields.Error("use_sliding_window", "true is not supported");
    return absl::OkStatus();
  }
  if (config.architecture != Architecture::kMistral) return absl::OkStatus();
  LYCHEE_ASSIGN_OR_RETURN(config.sliding_window, fields.OptionalInt("sliding_window"));
  if (config.sliding_window && *config.sliding_window <= 0) {
    return fields.Error("sliding_window", absl::StrCat("must be positive or null, got ", *config.sliding_window));
  }
  return absl::OkStatus();
}

absl::Status CheckTokenId(const FieldReader& fields, absl::string_view field, int64_t id, int64_t vocab_size) {
  if (id < 0 || id >= vocab_size) {
    return fields.Error(field, absl::StrCat("holds ", id, ", outside the vocabulary of ", vocab_size));
  }
  return absl::OkStatus();
}

}  // namespace

std::string_view ArchitectureName(Architecture arch) { return NamesOf(arch).model_type; }

absl::StatusOr<ModelConfig> ModelConfig::FromJson(std::string_view json_text, std::string_view source) {
  absl::StatusOr<json> parsed = ParseJson(json_text);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(Absl(source), ": invalid JSON: ", parsed.status().message()));
  }
  const json root = *std::move(parsed);
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(Absl(source), ": not a JSON object but ", root.type_name()));
  }
  const FieldReader fields(root, Absl(source));
  ModelConfig config;
  LYCHEE_ASSIGN_OR_RETURN(config.architecture, ParseArchitecture(fields, root));

  LYCHEE_ASSIGN_OR_RETURN(config.vocab_size, fields.PositiveInt("vocab_size"));
  LYCHEE_ASSIGN_OR_RETURN(config.hidden_size, fields.PositiveInt("hidden_size"));
  LYCHEE_ASSIGN_OR_RETURN(config.intermediate_size, fields.PositiveInt("intermediate_size"));
  LYCHEE_ASSIGN_OR_RETURN(config.num_layers, fields.PositiveInt("num_hidden_layers"));
  LYCHEE_ASSIGN_OR_RETURN(config.num_attention_heads, fields.PositiveInt("num_attention_heads"));
  LYCHEE_ASSIGN_OR_RETURN(config.max_position_embeddings, fields.PositiveInt("max_position_embeddings"));

  config.num_kv_heads = config.num_attention_heads;
  if (fields.Has("num_key_value_heads")) {
    LYCHEE_ASSIGN_OR_RETURN(config.num_kv_heads, fields.PositiveInt("num_key_value_heads"));
  }
  if (config.num_attention_heads % config.num_kv_heads != 0) {
    return fields.Error("num_key_value_heads", absl::StrCat(config.num_kv_heads, " does not divide num_attention_heads ",
                                                            config.num_attention_heads));
  }

  if (fields.Has("head_dim")) {
    LYCHEE_ASSIGN_OR_RETURN(config.head_dim, fields.PositiveInt("head_dim"));
  } else if (config.hidden_size % config.num_attention_heads != 0) {
    return fields.Error("hidden_size", absl::StrCat(config.hidden_size, " is not a multiple of num_attention_heads ",
                                                    config.num_attention_heads, " and there is no head_dim"));
  } else {
    config.head_dim = config.hidden_size / config.num_attention_heads;
  }
  // RoPE rotates the two halves of each head against each other.
  if (config.head_dim % 2 != 0) return fields.Error("head_dim", absl::StrCat("must be even, got ", config.head_dim));

  if (fields.Has("rms_norm_eps")) {
    LYCHEE_ASSIGN_OR_RETURN(config.rms_norm_eps, fields.PositiveNumber("rms_norm_eps"));
  }
  LYCHEE_RETURN_IF_ERROR(ParseRope(fields, config));

  LYCHEE_ASSIGN_OR_RETURN(std::optional<std::string> hidden_act, fields.OptionalString("hidden_act"));
  if (hidden_act && *hidden_act != "silu") {
    return fields.Error("hidden_act", absl::StrCat("\"", *hidden_act, "\" is not supported (silu)"));
  }
  // The model has no MLP biases to load.
  LYCHEE_ASSIGN_OR_RETURN(bool mlp_bias, fields.Bool("mlp_bias", false));
  if (mlp_bias) return fields.Error("mlp_bias", "true is not supported");

  LYCHEE_ASSIGN_OR_RETURN(config.tie_word_embeddings, fields.Bool("tie_word_embeddings", false));
  switch (config.architecture) {
    case Architecture::kQwen2:
      // Qwen2 always has q, k and v biases; its configs do not say so.
      config.attention_bias = true;
      break;
    case Architecture::kMistral:
      config.attention_bias = false;
      break;
    case Architecture::kLlama:
    case Architecture::kQwen3:
      LYCHEE_ASSIGN_OR_RETURN(config.attention_bias, fields.Bool("attention_bias", false));
      break;
  }
  config.qk_norm = config.architecture == Architecture::kQwen3;
  LYCHEE_RETURN_IF_ERROR(ParseSlidingWindow(fields, config));

  LYCHEE_ASSIGN_OR_RETURN(config.eos_token_ids, fields.IntOrIntList("eos_token_id"));
  for (int64_t id : config.eos_token_ids) {
    LYCHEE_RETURN_IF_ERROR(CheckTokenId(fields, "eos_token_id", id, config.vocab_size));
  }
  LYCHEE_ASSIGN_OR_RETURN(config.bos_token_id, fields.OptionalInt("bos_token_id"));
  if (config.bos_token_id) {
    LYCHEE_RETURN_IF_ERROR(CheckTokenId(fields, "bos_token_id", *config.bos_token_id, config.vocab_size));
  }
  return config;
}

absl::StatusOr<ModelConfig> ModelConfig::FromFile(const std::string& path) {
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::ErrnoToStatus(errno != 0 ? errno : EIO, absl::StrCat(path, ": cannot open"));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read failed"));
  return FromJson(text.str(), path);
}

}  // namespace lychee
