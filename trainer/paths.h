// Where a job's inputs may come from. Clients name a model by its directory under the model
// root and a corpus by a path under the data root; nothing outside those roots is reachable, so
// that a client cannot make the trainer read arbitrary files.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace lychee {

// `<model_root>/<name>` when `name` is a single directory name holding a config.json;
// INVALID_ARGUMENT naming the field "model" otherwise.
absl::StatusOr<std::string> ResolveModelDir(const std::string& model_root, const std::string& name);

// The regular file `relative` names under `data_root`, symlinks resolved. INVALID_ARGUMENT naming
// `field` when the path is absolute, has "..", leads outside the data root through a symlink, or
// names no regular file; FAILED_PRECONDITION when the trainer has no data root.
absl::StatusOr<std::string> ResolveCorpusPath(const std::string& data_root, const std::string& relative,
                                              const std::string& field = "corpus");

}  // namespace lychee
