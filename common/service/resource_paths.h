// Where the binaries find the bundled model and corpora, and the programs they start. The model and
// corpora are in a resource directory holding models/ and data/ (the layout of the source tree),
// the first of
//   1. $LYCHEE_SHARE_DIR, when set (it must then hold models/: a set variable is never passed over);
//   2. <prefix>/share/lychee for a binary installed as <prefix>/bin/NAME (cmake --install), found
//      from the running executable, whatever the working directory;
//   3. the source tree the binary was built from, for binaries run from their build tree.
// Each binary's flags (--model, --model-root, --data-root, --corpus, ...) still name single paths.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lychee {

inline constexpr char kShareDirVariable[] = "LYCHEE_SHARE_DIR";
inline constexpr char kBundledModelName[] = "tiny-llama-retrieval";
// Paths under the resource directory.
inline constexpr char kBundledModelPath[] = "models/tiny-llama-retrieval";
inline constexpr char kCorpusDir[] = "data/corpus";

// The resource directory; otherwise a NotFoundError naming each place looked at.
absl::StatusOr<std::string> ResourceDir();

// ResourceDir()/`relative`, or ResourceDir()'s error.
absl::StatusOr<std::string> ResourcePath(absl::string_view relative);

// ResourcePath(`relative`), or "" where there is no resource directory: for flag defaults, which
// cannot fail; a binary given "" reports ResourceDir()'s error once it needs the path.
std::string ResourcePathOrEmpty(absl::string_view relative);

// `flag_value` unless empty (the flag given as "", or a ResourcePathOrEmpty default that found
// nothing); then ResourceDir()'s error, naming `flag` as the one to give.
absl::StatusOr<std::string> RequireFlagPath(std::string flag_value, absl::string_view flag);

// The program `name`, for a binary that starts another: the one beside the running executable
// (installed binaries share bin/), else the first executable `name` in a directory of $PATH;
// otherwise a NotFoundError naming where it looked.
absl::StatusOr<std::string> FindProgram(absl::string_view name);

}  // namespace lychee
