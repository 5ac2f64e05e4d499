// Small records that must survive a crash (registry entries, job journals): each file is
// replaced atomically and carries a SHA-256 of its payload, so that a reader sees either a
// whole record or an error, never a torn or silently damaged one. Free of LibTorch.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace lychee {

// Writes `bytes` to a temporary file beside `path` (mode 0644), fsyncs it and renames it over
// `path`: readers see the old file or the new one, whole. The temporary is removed on failure.
absl::Status ReplaceFile(const std::string& path, std::string_view bytes);

// ReplaceFile with the record of `payload`, then fsyncs the directory: after a crash `path` holds
// the old record or the new one.
absl::Status WriteDurableFile(const std::string& path, std::string_view payload);

// The payload of a file written by WriteDurableFile. DATA_LOSS naming the file when it is
// truncated, not such a file, or its checksum does not match; NOT_FOUND when it is absent.
// It is DecodeDurableRecord(ReadDurableRecord(path)).
absl::StatusOr<std::string> ReadDurableFile(const std::string& path);

// The bytes of a record file as stored, undecoded: NOT_FOUND when it is absent.
absl::StatusOr<std::string> ReadDurableRecord(const std::string& path);

// The payload of `record`, the whole content of a file written by WriteDurableFile (read from
// `path`, which errors name): DATA_LOSS when it is truncated, not such a record, or its checksum
// does not match. Pure, so that it can be fuzzed.
absl::StatusOr<std::string> DecodeDurableRecord(std::string_view record, const std::string& path);

// What WriteDurableFile stores for `payload`: the inverse of DecodeDurableRecord.
std::string EncodeDurableRecord(std::string_view payload);

// Creates `dir` (and missing parents) so that it survives a crash: the parent directory is
// fsynced after the new entry is made. Nothing to do when it exists.
absl::Status CreateDurableDirectory(const std::string& dir);

// Whether a directory entry is a WriteDurableFile temporary (in flight, or left by a crash):
// readers scanning a directory skip these.
bool IsDurableTemporaryName(std::string_view file_name);

}  // namespace lychee
