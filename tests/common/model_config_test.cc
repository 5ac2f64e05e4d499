#include "common/base/model_config.h"

#include <stdlib.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace lychee {
namespace {

// config.json texts with the field values their models publish on the Hugging Face hub.
constexpr char kLlama3_8B[] = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 8192,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.40.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})";

constexpr char kLlama31_8B[] = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})";

// Llama-3.1-8B-Instruct as transformers 5 writes it: the rope settings under rope_parameters.
constexpr char kLlama31_8B_InstructV5[] = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "dtype": "bfloat16",
  "eos_token_id": [128001, 128008, 128009],
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {
    "factor": 8.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rope_type": "llama3"
  },
  "tie_word_embeddings": false,
  "transformers_version": "5.0.0",
  "use_cache": true,
  "vocab_size": 128256
})";

constexpr char kQwen2_7B[] = R"({
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 3584,
  "initializer_range": 0.02,
  "intermediate_size": 18944,
  "max_position_embeddings": 131072,
  "max_window_layers": 28,
  "model_type": "qwen2",
  "num_attention_heads": 28,
  "num_hidden_layers": 28,
  "num_key_value_heads": 4,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 131072,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.37.2",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 152064
})";

constexpr char kQwen2_0_5B[] = R"({
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 896,
  "initializer_range": 0.02,
  "intermediate_size": 4864,
  "max_position_embeddings": 131072,
  "max_window_layers": 24,
  "model_type": "qwen2",
  "num_attention_heads": 14,
  "num_hidden_layers": 24,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 131072,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.40.1",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})";

constexpr char kQwen3_8B[] = R"({
  "architectures": ["Qwen3ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 12288,
  "max_position_embeddings": 40960,
  "max_window_layers": 36,
  "model_type": "qwen3",
  "num_attention_heads": 32,
  "num_hidden_layers": 36,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.51.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})";

constexpr char kMistral7B_v01[] = R"({
  "architectures": ["MistralForCausalLM"],
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mistral",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "rope_theta": 10000.0,
  "sliding_window": 4096,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.34.0.dev0",
  "use_cache": true,
  "vocab_size": 32000
})";

constexpr char kMistral7B_Instruct_v02[] = R"({
  "architectures": ["MistralForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mistral",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "rope_theta": 1000000.0,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.36.0",
  "use_cache": true,
  "vocab_size": 32000
})";

constexpr char kSource[] = "test/config.json";

ModelConfig Parse(const std::string& text) {
  auto config = ModelConfig::FromJson(text, kSource);
  INFO(config.status().ToString());
  REQUIRE(config.ok());
  return *std::move(config);
}

// `text` with its only occurrence of `from` replaced by `to`.
std::string Replaced(std::string text, const std::string& from, const std::string& to) {
  const size_t at = text.find(from);
  REQUIRE(at != std::string::npos);
  REQUIRE(text.find(from, at + 1) == std::string::npos);
  return text.replace(at, from.size(), to);
}

TEST_CASE("the bundled tiny model's config", "[model_config]") {
  const std::string path = std::string(LYCHEE_SOURCE_DIR) + "/models/tiny-llama-retrieval/config.json";
  auto config = ModelConfig::FromFile(path);
  INFO(config.status().ToString());
  REQUIRE(config.ok());
  CHECK(config->architecture == Architecture::kLlama);
  CHECK(config->vocab_size == 8192);
  CHECK(config->hidden_size == 384);
  CHECK(config->intermediate_size == 1024);
  CHECK(config->num_layers == 6);
  CHECK(config->num_attention_heads == 6);
  CHECK(config->num_kv_heads == 2);
  CHECK(config->group_size() == 3);
  CHECK(config->head_dim == 64);
  CHECK(config->rms_norm_eps == 1e-5);
  CHECK(config->rope_theta == 500000.0);
  CHECK(config->rope_scaling.type == RopeScaling::Type::kNone);
  CHECK(config->max_position_embeddings == 16384);
  CHECK(config->tie_word_embeddings);
  CHECK_FALSE(config->attention_bias);
  CHECK_FALSE(config->qk_norm);
  CHECK_FALSE(config->sliding_window.has_value());
  CHECK(config->eos_token_ids == std::vector<int64_t>{0});
  CHECK_FALSE(config->bos_token_id.has_value());
}

TEST_CASE("Llama-3-8B", "[model_config]") {
  const ModelConfig config = Parse(kLlama3_8B);
  CHECK(config.architecture == Architecture::kLlama);
  CHECK(ArchitectureName(config.architecture) == "llama");
  CHECK(config.vocab_size == 128256);
  CHECK(config.hidden_size == 4096);
  CHECK(config.intermediate_size == 14336);
  CHECK(config.num_layers == 32);
  CHECK(config.num_attention_heads == 32);
  CHECK(config.num_kv_heads == 8);
  CHECK(config.head_dim == 128);
  CHECK(config.rms_norm_eps == 1e-5);
  CHECK(config.rope_theta == 500000.0);
  CHECK(config.rope_scaling.type == RopeScaling::Type::kNone);
  CHECK(config.max_position_embeddings == 8192);
  CHECK_FALSE(config.tie_word_embeddings);
  CHECK_FALSE(config.attention_bias);
  CHECK_FALSE(config.qk_norm);
  CHECK_FALSE(config.sliding_window.has_value());
  CHECK(config.eos_token_ids == std::vector<int64_t>{128001});
  CHECK(config.bos_token_id == 128000);
}

TEST_CASE("Llama-3.1-8B and its llama3 rope scaling", "[model_config]") {
  const ModelConfig config = Parse(kLlama31_8B);
  CHECK(config.architecture == Architecture::kLlama);
  CHECK(config.rope_theta == 500000.0);
  CHECK(config.max_position_embeddings == 131072);
  CHECK(config.rope_scaling.type == RopeScaling::Type::kLlama3);
  CHECK(config.rope_scaling.factor == 8.0);
  CHECK(config.rope_scaling.low_freq_factor == 1.0);
  CHECK(config.rope_scaling.high_freq_factor == 4.0);
  CHECK(config.rope_scaling.original_max_position_embeddings == 8192);
  CHECK(config.head_dim == 128);
}

TEST_CASE("Llama-3.1-8B-Instruct in the rope_parameters layout, with several eos tokens", "[model_config]") {
  const ModelConfig config = Parse(kLlama31_8B_InstructV5);
  CHECK(config.rope_theta == 500000.0);
  CHECK(config.rope_scaling.type == RopeScaling::Type::kLlama3);
  CHECK(config.rope_scaling.factor == 8.0);
  CHECK(config.rope_scaling.low_freq_factor == 1.0);
  CHECK(config.rope_scaling.high_freq_factor == 4.0);
  CHECK(config.rope_scaling.original_max_position_embeddings == 8192);
  CHECK(config.eos_token_ids == std::vector<int64_t>{128001, 128008, 128009});
}

TEST_CASE("the older rope_scaling spelling \"type\"", "[model_config]") {
  const ModelConfig config = Parse(Replaced(kLlama31_8B, "\"rope_type\": \"llama3\"", "\"type\": \"llama3\""));
  CHECK(config.rope_scaling.type == RopeScaling::Type::kLlama3);
  CHECK(config.rope_scaling.factor == 8.0);
}

TEST_CASE("Qwen2-7B has q, k and v biases though its config does not say so", "[model_config]") {
  const ModelConfig config = Parse(kQwen2_7B);
  CHECK(config.architecture == Architecture::kQwen2);
  CHECK(ArchitectureName(config.architecture) == "qwen2");
  CHECK(config.vocab_size == 152064);
  CHECK(config.hidden_size == 3584);
  CHECK(config.intermediate_size == 18944);
  CHECK(config.num_layers == 28);
  CHECK(config.num_attention_heads == 28);
  CHECK(config.num_kv_heads == 4);
  CHECK(config.head_dim == 128);
  CHECK(config.rms_norm_eps == 1e-6);
  CHECK(config.rope_theta == 1000000.0);
  CHECK(config.max_position_embeddings == 131072);
  CHECK(config.attention_bias);
  CHECK_FALSE(config.qk_norm);
  CHECK_FALSE(config.tie_word_embeddings);
  // use_sliding_window is false: the sliding_window value does not apply.
  CHECK_FALSE(config.sliding_window.has_value());
  CHECK(config.eos_token_ids == std::vector<int64_t>{151643});
  CHECK(config.bos_token_id == 151643);
}

TEST_CASE("Qwen2-0.5B ties its embeddings explicitly", "[model_config]") {
  const ModelConfig config = Parse(kQwen2_0_5B);
  CHECK(config.tie_word_embeddings);
  CHECK(config.head_dim == 64);
  CHECK(config.num_kv_heads == 2);
  CHECK(config.group_size() == 7);
}

TEST_CASE("Qwen3-8B has an explicit head_dim and q/k norms", "[model_config]") {
  const ModelConfig config = Parse(kQwen3_8B);
  CHECK(config.architecture == Architecture::kQwen3);
  CHECK(ArchitectureName(config.architecture) == "qwen3");
  CHECK(config.vocab_size == 151936);
  CHECK(config.hidden_size == 4096);
  CHECK(config.intermediate_size == 12288);
  CHECK(config.num_layers == 36);
  CHECK(config.num_attention_heads == 32);
  CHECK(config.num_kv_heads == 8);
  CHECK(config.head_dim == 128);
  CHECK(config.rope_theta == 1000000.0);
  CHECK(config.max_position_embeddings == 40960);
  CHECK(config.qk_norm);
  CHECK_FALSE(config.attention_bias);
  CHECK_FALSE(config.tie_word_embeddings);
  CHECK_FALSE(config.sliding_window.has_value());
  CHECK(config.eos_token_ids == std::vector<int64_t>{151645});
  CHECK(config.bos_token_id == 151643);

  CHECK(Parse(Replaced(kQwen3_8B, "\"attention_bias\": false", "\"attention_bias\": true")).attention_bias);
}

TEST_CASE("Qwen3's head_dim need not be hidden_size / num_attention_heads", "[model_config]") {
  // Qwen3-4B: 2560 / 32 = 80, but its heads are 128 wide.
  const ModelConfig config = Parse(Replaced(kQwen3_8B, "\"hidden_size\": 4096", "\"hidden_size\": 2560"));
  CHECK(config.head_dim == 128);
}

TEST_CASE("Mistral-7B-v0.1 has a sliding window", "[model_config]") {
  const ModelConfig config = Parse(kMistral7B_v01);
  CHECK(config.architecture == Architecture::kMistral);
  CHECK(ArchitectureName(config.architecture) == "mistral");
  CHECK(config.vocab_size == 32000);
  CHECK(config.num_layers == 32);
  CHECK(config.num_kv_heads == 8);
  CHECK(config.head_dim == 128);
  CHECK(config.rope_theta == 10000.0);
  CHECK(config.sliding_window == 4096);
  CHECK_FALSE(config.attention_bias);
  CHECK_FALSE(config.qk_norm);
  CHECK(config.eos_token_ids == std::vector<int64_t>{2});
  CHECK(config.bos_token_id == 1);
}

TEST_CASE("Mistral-7B-Instruct-v0.2's sliding window is null", "[model_config]") {
  const ModelConfig config = Parse(kMistral7B_Instruct_v02);
  CHECK_FALSE(config.sliding_window.has_value());
  CHECK(config.rope_theta == 1000000.0);
}

TEST_CASE("defaults for fields a config leaves out", "[model_config]") {
  const ModelConfig config = Parse(R"({
    "model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 2048
  })");
  CHECK(config.num_kv_heads == 4);
  CHECK(config.head_dim == 64);
  CHECK(config.rms_norm_eps == 1e-6);
  CHECK(config.rope_theta == 10000.0);
  CHECK_FALSE(config.tie_word_embeddings);
  CHECK_FALSE(config.attention_bias);
  CHECK(config.eos_token_ids.empty());
  CHECK_FALSE(config.bos_token_id.has_value());
}

struct BadCase {
  std::string description;
  std::string text;
  std::vector<std::string> expected_in_message;
};

TEST_CASE("bad configs are errors naming the source and the field", "[model_config]") {
  const std::string llama = kLlama3_8B;
  const std::string llama31 = kLlama31_8B;
  const std::vector<BadCase> cases = {
      {"invalid JSON", "{\"model_type\": \"llama\",", {"invalid JSON"}},
      {"not an object", "[]", {"not a JSON object"}},
      {"number too large for a double", Replaced(llama, "\"rope_theta\": 500000.0", "\"rope_theta\": 1e400"),
       {"invalid JSON", "1e400"}},
      // The model multiplies sizes in int64_t: heads times head_dim here.
      {"a size beyond int32",
       Replaced(llama, "\"num_attention_heads\": 32", "\"num_attention_heads\": 8589934592"),
       {"num_attention_heads", "must be at most 2147483647"}},
      // Error messages quote the value, and printing it recurses once per level.
      {"nested deeper than any config",
       Replaced(llama, "\"architectures\": [\"LlamaForCausalLM\"]",
                "\"architectures\": " + std::string(1000000, '[') + std::string(1000000, ']')),
       {"invalid JSON", "nested more than 64 levels deep"}},
      {"unknown model_type", Replaced(llama, "\"model_type\": \"llama\"", "\"model_type\": \"gemma2\""),
       {"model_type", "gemma2"}},
      {"missing model_type", Replaced(llama, "\"model_type\": \"llama\",", ""), {"model_type"}},
      {"architectures disagreeing with model_type",
       Replaced(llama, "\"LlamaForCausalLM\"", "\"Qwen2ForCausalLM\""),
       {"architectures", "LlamaForCausalLM"}},
      {"missing hidden_size", Replaced(llama, "\"hidden_size\": 4096,", ""), {"missing", "hidden_size"}},
      {"missing vocab_size", Replaced(llama, ",\n  \"vocab_size\": 128256", ""), {"missing", "vocab_size"}},
      {"non-numeric num_hidden_layers", Replaced(llama, "\"num_hidden_layers\": 32", "\"num_hidden_layers\": \"32\""),
       {"num_hidden_layers", "integer"}},
      {"fractional intermediate_size", Replaced(llama, "\"intermediate_size\": 14336", "\"intermediate_size\": 14336.5"),
       {"intermediate_size", "integer"}},
      {"zero hidden_size", Replaced(llama, "\"hidden_size\": 4096", "\"hidden_size\": 0"), {"hidden_size", "positive"}},
      {"negative num_attention_heads",
       Replaced(llama, "\"num_attention_heads\": 32", "\"num_attention_heads\": -32"),
       {"num_attention_heads", "positive"}},
      {"zero vocab_size", Replaced(llama, "\"vocab_size\": 128256", "\"vocab_size\": 0"), {"vocab_size", "positive"}},
      {"kv heads not dividing heads", Replaced(llama, "\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5"),
       {"num_key_value_heads", "5", "32"}},
      {"zero kv heads", Replaced(llama, "\"num_key_value_heads\": 8", "\"num_key_value_heads\": 0"),
       {"num_key_value_heads", "positive"}},
      {"hidden_size not a multiple of heads", Replaced(llama, "\"hidden_size\": 4096", "\"hidden_size\": 4100"),
       {"hidden_size", "num_attention_heads"}},
      {"zero head_dim", Replaced(kQwen3_8B, "\"head_dim\": 128", "\"head_dim\": 0"), {"head_dim", "positive"}},
      {"odd head_dim", Replaced(kQwen3_8B, "\"head_dim\": 128", "\"head_dim\": 127"), {"head_dim", "even"}},
      {"zero rms_norm_eps", Replaced(llama, "\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": 0"),
       {"rms_norm_eps", "positive"}},
      {"negative rms_norm_eps", Replaced(llama, "\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": -1e-05"),
       {"rms_norm_eps", "positive"}},
      {"non-numeric rms_norm_eps", Replaced(llama, "\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": \"1e-5\""),
       {"rms_norm_eps", "number"}},
      {"zero rope_theta", Replaced(llama, "\"rope_theta\": 500000.0", "\"rope_theta\": 0"), {"rope_theta", "positive"}},
      {"negative rope_theta under rope_parameters",
       Replaced(kLlama31_8B_InstructV5, "\"rope_theta\": 500000.0", "\"rope_theta\": -1"),
       {"rope_parameters.rope_theta", "positive"}},
      {"rope_theta disagreeing with rope_parameters",
       Replaced(kLlama31_8B_InstructV5, "\"rope_parameters\": {", "\"rope_theta\": 10000.0, \"rope_parameters\": {"),
       {"rope_theta", "rope_parameters.rope_theta"}},
      {"unknown rope type", Replaced(llama31, "\"rope_type\": \"llama3\"", "\"rope_type\": \"yarn\""),
       {"rope_scaling.rope_type", "yarn"}},
      {"unknown rope type under rope_parameters",
       Replaced(kLlama31_8B_InstructV5, "\"rope_type\": \"llama3\"", "\"rope_type\": \"dynamic\""),
       {"rope_parameters.rope_type", "dynamic"}},
      {"rope_scaling without a type", Replaced(llama31, ",\n    \"rope_type\": \"llama3\"", ""),
       {"rope_scaling", "rope_type"}},
      {"llama3 scaling missing factor", Replaced(llama31, "\"factor\": 8.0,", ""), {"rope_scaling.factor"}},
      {"llama3 scaling missing low_freq_factor", Replaced(llama31, "\"low_freq_factor\": 1.0,", ""),
       {"rope_scaling.low_freq_factor"}},
      {"llama3 scaling missing high_freq_factor", Replaced(llama31, "\"high_freq_factor\": 4.0,", ""),
       {"rope_scaling.high_freq_factor"}},
      {"llama3 scaling missing original_max_position_embeddings",
       Replaced(llama31, "\"original_max_position_embeddings\": 8192,", ""),
       {"rope_scaling.original_max_position_embeddings"}},
      {"llama3 scaling with high_freq_factor not above low_freq_factor",
       Replaced(llama31, "\"high_freq_factor\": 4.0", "\"high_freq_factor\": 1.0"),
       {"rope_scaling.high_freq_factor", "low_freq_factor"}},
      {"llama3 scaling under rope_parameters missing factor",
       Replaced(kLlama31_8B_InstructV5, "\"factor\": 8.0,", ""),
       {"rope_parameters.factor"}},
      {"rope_scaling not an object", Replaced(llama, "\"rope_scaling\": null", "\"rope_scaling\": 8"),
       {"rope_scaling", "object"}},
      {"hidden_act other than silu", Replaced(llama, "\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\""),
       {"hidden_act", "gelu"}},
      {"mlp_bias", Replaced(llama31, "\"mlp_bias\": false", "\"mlp_bias\": true"), {"mlp_bias"}},
      {"non-boolean tie_word_embeddings",
       Replaced(llama, "\"tie_word_embeddings\": false", "\"tie_word_embeddings\": \"no\""),
       {"tie_word_embeddings"}},
      {"eos_token_id of strings", Replaced(llama, "\"eos_token_id\": 128001", "\"eos_token_id\": [\"</s>\"]"),
       {"eos_token_id"}},
      {"eos_token_id outside the vocabulary", Replaced(llama, "\"eos_token_id\": 128001", "\"eos_token_id\": 128256"),
       {"eos_token_id", "128256"}},
      {"negative bos_token_id", Replaced(llama, "\"bos_token_id\": 128000", "\"bos_token_id\": -1"),
       {"bos_token_id"}},
      {"zero sliding_window", Replaced(kMistral7B_v01, "\"sliding_window\": 4096", "\"sliding_window\": 0"),
       {"sliding_window", "positive"}},
      {"Qwen2 with use_sliding_window",
       Replaced(kQwen2_7B, "\"use_sliding_window\": false", "\"use_sliding_window\": true"),
       {"use_sliding_window"}},
  };
  for (const BadCase& bad : cases) {
    INFO(bad.description);
    auto config = ModelConfig::FromJson(bad.text, kSource);
    REQUIRE_FALSE(config.ok());
    const std::string message(config.status().message());
    INFO(message);
    CHECK(config.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(message, Catch::StartsWith(std::string(kSource) + ": "));
    for (const std::string& expected : bad.expected_in_message) CHECK_THAT(message, Catch::Contains(expected));
  }
}

TEST_CASE("FromFile names the file it could not read or parse", "[model_config]") {
  std::string dir_pattern = (std::filesystem::temp_directory_path() / "lychee-config-XXXXXX").string();
  REQUIRE(mkdtemp(dir_pattern.data()) != nullptr);
  const std::filesystem::path dir = dir_pattern;
  const std::string path = (dir / "config.json").string();

  auto missing = ModelConfig::FromFile(path);
  CHECK(missing.status().code() == absl::StatusCode::kNotFound);
  CHECK_THAT(std::string(missing.status().message()), Catch::Contains(path));

  std::ofstream(path) << Replaced(kLlama3_8B, "\"hidden_size\": 4096", "\"hidden_size\": -1");
  auto invalid = ModelConfig::FromFile(path);
  CHECK_THAT(std::string(invalid.status().message()), Catch::StartsWith(path) && Catch::Contains("hidden_size"));

  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace lychee
