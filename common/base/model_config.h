// config.json of the decoder families Lychee serves: Llama (Llama-3 rope scaling included),
// Qwen2, Qwen3 and Mistral. Free of LibTorch.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace lychee {

enum class Architecture { kLlama, kQwen2, kQwen3, kMistral };

std::string_view ArchitectureName(Architecture arch);

struct RopeScaling {
  enum class Type { kNone, kLlama3 };
  Type type = Type::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 0;
};

struct ModelConfig {
  Architecture architecture = Architecture::kLlama;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_kv_heads = 0;
  // Explicit head_dim when config.json gives one, else hidden_size / num_attention_heads.
  int64_t head_dim = 0;
  double rms_norm_eps = 1e-6;
  // At the top level or under rope_parameters.
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  // Biases on the q, k and v projections (Qwen2; Llama's attention_bias).
  bool attention_bias = false;
  // Per-head RMSNorm of q and k before RoPE (Qwen3).
  bool qk_norm = false;
  // Mistral's sliding window; absent means full attention.
  std::optional<int64_t> sliding_window;
  std::vector<int64_t> eos_token_ids;
  std::optional<int64_t> bos_token_id;

  int64_t group_size() const { return num_attention_heads / num_kv_heads; }

  // Parses and validates; errors name the source and the field.
  static absl::StatusOr<ModelConfig> FromJson(std::string_view json_text, std::string_view source);
  static absl::StatusOr<ModelConfig> FromFile(const std::string& path);
};

}  // namespace lychee
