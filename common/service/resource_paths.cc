#include "common/service/resource_paths.h"

#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <system_error>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace lychee {
namespace {

bool HoldsModels(const std::filesystem::path& dir) {
  std::error_code error;
  return std::filesystem::is_directory(dir / "models", error);
}

bool IsExecutableFile(const std::filesystem::path& path) {
  std::error_code error;
  return std::filesystem::is_regular_file(path, error) && access(path.c_str(), X_OK) == 0;
}

// The running executable's path, as the kernel gives it (symbolic links resolved).
std::filesystem::path ExecutablePath() {
  std::error_code error;
  return std::filesystem::read_symlink("/proc/self/exe", error);
}

}  // namespace

absl::StatusOr<std::string> ResourceDir() {
  if (const char* share_dir = getenv(kShareDirVariable); share_dir != nullptr) {
    if (HoldsModels(share_dir)) return std::string(share_dir);
    return absl::NotFoundError(absl::StrCat(kShareDirVariable, "=", share_dir, " holds no models/ directory"));
  }
  std::vector<std::string> looked_at;
  const std::filesystem::path executable = ExecutablePath();
  if (!executable.empty()) {
    // LYCHEE_SHARE_FROM_BIN: where cmake --install puts models/ and data/, relative to the binaries.
    const std::filesystem::path installed = (executable.parent_path() / LYCHEE_SHARE_FROM_BIN).lexically_normal();
    if (HoldsModels(installed)) return installed.string();
    looked_at.push_back(absl::StrCat(installed.string(), " (beside the executable)"));
  }
  if (HoldsModels(LYCHEE_BUILD_SOURCE_DIR)) return std::string(LYCHEE_BUILD_SOURCE_DIR);
  looked_at.push_back(absl::StrCat(LYCHEE_BUILD_SOURCE_DIR, " (the source tree it was built from)"));
  return absl::NotFoundError(
      absl::StrCat("no bundled models and corpora: ", kShareDirVariable,
                   " is unset and none of these holds models/: ", absl::StrJoin(looked_at, ", ")));
}

absl::StatusOr<std::string> ResourcePath(absl::string_view relative) {
  absl::StatusOr<std::string> dir = ResourceDir();
  if (!dir.ok()) return dir.status();
  return absl::StrCat(*dir, "/", relative);
}

std::string ResourcePathOrEmpty(absl::string_view relative) { return ResourcePath(relative).value_or(""); }

absl::StatusOr<std::string> RequireFlagPath(std::string flag_value, absl::string_view flag) {
  if (!flag_value.empty()) return flag_value;
  const absl::Status missing = ResourceDir().status();
  if (missing.ok()) return absl::InvalidArgumentError(absl::StrCat(flag, " must not be empty"));
  return absl::NotFoundError(absl::StrCat(flag, " has no default (", missing.message(), "); give ", flag));
}

absl::StatusOr<std::string> FindProgram(absl::string_view name) {
  std::vector<std::string> looked_at;
  const std::filesystem::path executable = ExecutablePath();
  if (!executable.empty()) {
    const std::filesystem::path beside = executable.parent_path() / std::string(name);
    if (IsExecutableFile(beside)) return beside.string();
    looked_at.push_back(absl::StrCat(executable.parent_path().string(), " (beside the executable)"));
  }
  const char* search_path = getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(search_path == nullptr ? "" : search_path, ':', absl::SkipEmpty())) {
    const std::filesystem::path candidate = std::filesystem::path(std::string(dir)) / std::string(name);
    if (IsExecutableFile(candidate)) return candidate.string();
  }
  looked_at.push_back(absl::StrCat("$PATH (", search_path == nullptr ? "unset" : search_path, ")"));
  return absl::NotFoundError(absl::StrCat("no program ", name, " in ", absl::StrJoin(looked_at, " or ")));
}

}  // namespace lychee
