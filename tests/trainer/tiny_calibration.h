// A calibration short enough for a test on the bundled model: 3 steps of 256-384-token samples.
#pragma once

#include "trainer/calibration.h"

namespace lychee::testing {

inline CalibrationConfig TinyCalibration() {
  CalibrationConfig config;
  config.steps = 3;
  config.min_context_tokens = 256;
  config.max_context_tokens = 384;
  config.passkeys_per_sample = 2;
  config.selection.token_budget = 512;
  config.seed = 5;
  return config;
}

}  // namespace lychee::testing
