#include "trainer/paths.h"

#include <algorithm>
#include <filesystem>

#include "absl/strings/str_cat.h"

namespace lychee {
namespace fs = std::filesystem;
namespace {

// Whether canonical `path` is `root` or lies below it (both canonical).
bool IsWithin(const fs::path& path, const fs::path& root) {
  auto [root_end, path_it] = std::mismatch(root.begin(), root.end(), path.begin(), path.end());
  return root_end == root.end();
}

}  // namespace

absl::StatusOr<std::string> ResolveModelDir(const std::string& model_root, const std::string& name) {
  if (name.empty()) return absl::InvalidArgumentError("model: required (a directory name under the model root)");
  if (name == "." || name == ".." || name.find('/') != std::string::npos || name.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("model: '", name, "' is not a directory name (no '/', '.' or '..'): models are named by their directory under the model root"));
  }
  const fs::path dir = fs::path(model_root) / name;
  std::error_code error;
  if (!fs::is_regular_file(dir / "config.json", error)) {
    return absl::InvalidArgumentError(absl::StrCat("model: unknown model '", name, "' (no ", name,
                                                   "/config.json under the model root ", model_root, ")"));
  }
  return dir.string();
}

absl::StatusOr<std::string> ResolveCorpusPath(const std::string& data_root, const std::string& relative,
                                              const std::string& field) {
  const fs::path path(relative);
  if (relative.empty()) return absl::InvalidArgumentError(absl::StrCat(field, ": empty path"));
  if (path.is_absolute()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": '", relative, "' is absolute; give a path relative to the data root"));
  }
  for (const fs::path& part : path) {
    if (part == "..") {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": '", relative, "' has '..'; it must stay under the data root"));
    }
  }
  if (data_root.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, ": the trainer was started without --data-root; leave it empty"));
  }
  std::error_code error;
  const fs::path root = fs::canonical(data_root, error);
  if (error) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, ": the data root ", data_root, " is unusable: ", error.message()));
  }
  const fs::path resolved = fs::weakly_canonical(root / path, error);
  if (error || !IsWithin(resolved, root)) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": '", relative, "' leads outside the data root"));
  }
  if (!fs::is_regular_file(resolved, error)) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": no file '", relative, "' under the data root ", data_root));
  }
  return resolved.string();
}

}  // namespace lychee
