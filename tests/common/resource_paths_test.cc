#include "common/service/resource_paths.h"

#include <stdlib.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <optional>
#include <string>

#include "harness/temp_dir.h"

namespace lychee {
namespace {

// Sets LYCHEE_SHARE_DIR (or unsets it, given nullopt) for one test case, then restores it.
class ShareDirVariable {
 public:
  explicit ShareDirVariable(const std::optional<std::string>& value) {
    if (const char* before = getenv(kShareDirVariable)) before_ = before;
    if (value) {
      setenv(kShareDirVariable, value->c_str(), 1);
    } else {
      unsetenv(kShareDirVariable);
    }
  }
  ~ShareDirVariable() {
    if (before_) {
      setenv(kShareDirVariable, before_->c_str(), 1);
    } else {
      unsetenv(kShareDirVariable);
    }
  }

 private:
  std::optional<std::string> before_;
};

TEST_CASE("LYCHEE_SHARE_DIR names the resource directory when it holds models/") {
  testing::TempDir dir;
  std::filesystem::create_directory(dir.path / "models");
  ShareDirVariable variable(dir.str());
  REQUIRE(ResourceDir().value() == dir.str());
  REQUIRE(ResourcePath(kBundledModelPath).value() == dir.str() + "/models/tiny-llama-retrieval");
}

TEST_CASE("a LYCHEE_SHARE_DIR without models/ is an error that names it, not passed over") {
  testing::TempDir dir;
  ShareDirVariable variable(dir.str());
  const absl::StatusOr<std::string> found = ResourceDir();
  REQUIRE(found.status().code() == absl::StatusCode::kNotFound);
  REQUIRE(std::string(found.status().message()).find("LYCHEE_SHARE_DIR=" + dir.str()) != std::string::npos);
  REQUIRE(ResourcePathOrEmpty(kBundledModelPath).empty());
  const absl::StatusOr<std::string> required = RequireFlagPath("", "--model");
  REQUIRE(std::string(required.status().message()).find("give --model") != std::string::npos);
}

TEST_CASE("in the build tree, without LYCHEE_SHARE_DIR, the source tree holds the resources") {
  ShareDirVariable variable(std::nullopt);
  REQUIRE(std::filesystem::equivalent(ResourceDir().value(), LYCHEE_SOURCE_DIR));
}

TEST_CASE("a flag's value wins over the resource directory") {
  ShareDirVariable variable(std::nullopt);
  REQUIRE(RequireFlagPath("/some/model", "--model").value() == "/some/model");
  REQUIRE(RequireFlagPath("", "--model").status().code() == absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lychee
