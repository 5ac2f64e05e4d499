#include "trainer/calibration_config_proto.h"

namespace lychee {

CalibrationConfig CalibrationConfigFromProto(const v1::CalibrationConfig& proto) {
  CalibrationConfig config;
  if (proto.has_target_density()) config.target_density = proto.target_density();
  if (proto.has_steps()) config.steps = proto.steps();
  if (proto.has_samples_per_step()) config.samples_per_step = proto.samples_per_step();
  if (proto.has_min_context_tokens()) config.min_context_tokens = proto.min_context_tokens();
  if (proto.has_max_context_tokens()) config.max_context_tokens = proto.max_context_tokens();
  if (proto.has_passkeys_per_sample()) config.passkeys_per_sample = proto.passkeys_per_sample();
  if (proto.has_learning_rate()) config.learning_rate = proto.learning_rate();
  if (proto.has_sparse_keep_ratio()) config.sparse_keep_ratio = proto.sparse_keep_ratio();
  if (proto.has_sparse_sink_tokens()) config.sparse_sink_tokens = proto.sparse_sink_tokens();
  if (proto.has_sparse_recent_tokens()) config.sparse_recent_tokens = proto.sparse_recent_tokens();
  if (proto.has_block_size()) config.selection.block_size = proto.block_size();
  if (proto.has_token_budget()) config.selection.token_budget = proto.token_budget();
  if (proto.has_sink_tokens()) config.selection.sink_tokens = proto.sink_tokens();
  if (proto.has_recent_tokens()) config.selection.recent_tokens = proto.recent_tokens();
  if (proto.has_seed()) config.seed = proto.seed();
  return config;
}

v1::CalibrationConfig CalibrationConfigToProto(const CalibrationConfig& config) {
  v1::CalibrationConfig proto;
  proto.set_target_density(config.target_density);
  proto.set_steps(config.steps);
  proto.set_samples_per_step(config.samples_per_step);
  proto.set_min_context_tokens(config.min_context_tokens);
  proto.set_max_context_tokens(config.max_context_tokens);
  proto.set_passkeys_per_sample(config.passkeys_per_sample);
  proto.set_learning_rate(config.learning_rate);
  proto.set_sparse_keep_ratio(config.sparse_keep_ratio);
  proto.set_sparse_sink_tokens(config.sparse_sink_tokens);
  proto.set_sparse_recent_tokens(config.sparse_recent_tokens);
  proto.set_block_size(config.selection.block_size);
  proto.set_token_budget(config.selection.token_budget);
  proto.set_sink_tokens(config.selection.sink_tokens);
  proto.set_recent_tokens(config.selection.recent_tokens);
  proto.set_seed(config.seed);
  return proto;
}

}  // namespace lychee
