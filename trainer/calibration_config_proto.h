// lychee.v1.CalibrationConfig <-> lychee::CalibrationConfig. Free of LibTorch.
#pragma once

#include "lychee/v1/trainer.pb.h"
#include "trainer/calibration.h"

namespace lychee {

// Fields the message leaves unset keep CalibrationConfig's defaults; nothing is validated here
// (CalibrationConfig::Validate names the bad field).
CalibrationConfig CalibrationConfigFromProto(const v1::CalibrationConfig& proto);
// Every field set, so that a job shows exactly what it runs with.
v1::CalibrationConfig CalibrationConfigToProto(const CalibrationConfig& config);

}  // namespace lychee
