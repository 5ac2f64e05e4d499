// What binds a head partition to the model it was learned on: a SHA-256 over the model's
// config.json and the headers of its safetensors files (names, dtypes, shapes and offsets of
// every tensor), so that a partition is never applied to a model of another shape or to other
// weights laid out differently. Cheap: the weights themselves are not read. Free of LibTorch.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace lychee {

// Lowercase hex SHA-256 of `bytes`.
std::string Sha256Hex(std::string_view bytes);

// Sha256Hex of config.json's bytes followed by Checkpoint::HeadersDigestInput() of `model_dir`;
// errors name the file that could not be read.
absl::StatusOr<std::string> ModelFingerprint(const std::string& model_dir);

}  // namespace lychee
