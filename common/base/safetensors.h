// Memory-mapped reader of safetensors checkpoints, single file or sharded
// (model.safetensors.index.json). Free of LibTorch: it hands out typed byte views that the model
// turns into tensors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace lychee {

enum class DType { kBF16, kF16, kF32 };

std::string_view DTypeName(DType dtype);
size_t DTypeSize(DType dtype);

// A tensor inside a mapped file; valid while the file (or the Checkpoint holding it) lives.
struct TensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const std::byte* data;
  size_t num_bytes;

  int64_t NumElements() const;
};

// One .safetensors file, mapped read-only. The header is validated on open: known dtypes,
// shapes whose element count matches the byte range, ranges inside the data section and not
// overlapping. A truncated or lying file is an error naming the file and the tensor.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // The JSON header exactly as stored (used for the model fingerprint).
  std::string_view header() const { return header_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  std::string_view header_;
  std::map<std::string, TensorView> tensors_;
};

// All tensors of a model directory: model.safetensors, or the shards that
// model.safetensors.index.json names (every name in its weight_map must exist in its shard).
class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& model_dir);

  // NOT_FOUND naming the tensor and the directory when absent.
  absl::StatusOr<TensorView> Get(std::string_view name) const;
  bool Has(std::string_view name) const;
  std::vector<std::string> Names() const;
  // The headers of all files in a fixed order, concatenated: what the fingerprint hashes.
  std::string HeadersDigestInput() const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;  // sorted by file name
  std::vector<std::string> file_names_;                  // of files_, relative to dir_
  std::map<std::string, const TensorView*, std::less<>> index_;
};

}  // namespace lychee
