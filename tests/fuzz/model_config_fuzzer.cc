// ModelConfig::FromJson on arbitrary text: a config.json that parses must satisfy what the
// model code relies on without checking again.
#include <cstdint>
#include <limits>

#include "common/base/model_config.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto config = lychee::ModelConfig::FromJson(lychee::fuzz::AsText(data, size), "config.json");
  if (!config.ok()) return 0;
  LYCHEE_FUZZ_CHECK(config->vocab_size > 0 && config->hidden_size > 0 && config->intermediate_size > 0);
  LYCHEE_FUZZ_CHECK(config->num_layers > 0 && config->max_position_embeddings > 0);
  LYCHEE_FUZZ_CHECK(config->num_attention_heads > 0 && config->num_kv_heads > 0);
  LYCHEE_FUZZ_CHECK(config->num_attention_heads % config->num_kv_heads == 0 && config->group_size() >= 1);
  // The model multiplies two sizes in int64_t (heads by head_dim, rows by columns).
  for (const int64_t size : {config->vocab_size, config->hidden_size, config->intermediate_size, config->num_layers,
                             config->num_attention_heads, config->num_kv_heads, config->head_dim,
                             config->max_position_embeddings}) {
    LYCHEE_FUZZ_CHECK(size <= std::numeric_limits<int32_t>::max());
  }
  LYCHEE_FUZZ_CHECK(config->head_dim > 0 && config->head_dim % 2 == 0);
  LYCHEE_FUZZ_CHECK(config->rms_norm_eps > 0 && config->rope_theta > 0);
  if (config->rope_scaling.type == lychee::RopeScaling::Type::kLlama3) {
    LYCHEE_FUZZ_CHECK(config->rope_scaling.high_freq_factor > config->rope_scaling.low_freq_factor);
    LYCHEE_FUZZ_CHECK(config->rope_scaling.original_max_position_embeddings > 0);
  }
  if (config->sliding_window) LYCHEE_FUZZ_CHECK(*config->sliding_window > 0);
  for (const int64_t id : config->eos_token_ids) LYCHEE_FUZZ_CHECK(id >= 0 && id < config->vocab_size);
  if (config->bos_token_id) LYCHEE_FUZZ_CHECK(*config->bos_token_id >= 0 && *config->bos_token_id < config->vocab_size);
  return 0;
}
