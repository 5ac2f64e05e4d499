#include "common/service/resource_paths.h"

#include <stdlib.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "harness/temp_dir.h"

namespace lychee {
namespace {

// Sets an environment variable (or unsets it, given nullopt) for one test case, then restores it.
class EnvironmentVariable {
 public:
  EnvironmentVariable(const char* name, const std::optional<std::string>& value) : name_(name) {
    if (const char* before = getenv(name)) before_ = before;
    Set(value);
  }
  ~EnvironmentVariable() { Set(before_); }

 private:
  void Set(const std::optional<std::string>& value) {
    if (value) {
      setenv(name_, value->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

  const char* name_;
  std::optional<std::string> before_;
};

TEST_CASE("LYCHEE_SHARE_DIR names the resource directory when it holds models/") {
  testing::TempDir dir;
  std::filesystem::create_directory(dir.path / "models");
  EnvironmentVariable variable(kShareDirVariable, dir.str());
  REQUIRE(ResourceDir().value() == dir.str());
  REQUIRE(ResourcePath(kBundledModelPath).value() == dir.str() + "/models/tiny-llama-retrieval");
}

TEST_CASE("a LYCHEE_SHARE_DIR without models/ is an error that names it, not passed over") {
  testing::TempDir dir;
  EnvironmentVariable variable(kShareDirVariable, dir.str());
  const absl::StatusOr<std::string> found = ResourceDir();
  REQUIRE(found.status().code() == absl::StatusCode::kNotFound);
  REQUIRE(std::string(found.status().message()).find("LYCHEE_SHARE_DIR=" + dir.str()) != std::string::npos);
  REQUIRE(ResourcePathOrEmpty(kBundledModelPath).empty());
  const absl::StatusOr<std::string> required = RequireFlagPath("", "--model");
  REQUIRE(std::string(required.status().message()).find("give --model") != std::string::npos);
}

TEST_CASE("in the build tree, without LYCHEE_SHARE_DIR, the source tree holds the resources") {
  EnvironmentVariable variable(kShareDirVariable, std::nullopt);
  REQUIRE(std::filesystem::equivalent(ResourceDir().value(), LYCHEE_SOURCE_DIR));
}

TEST_CASE("a flag's value wins over the resource directory") {
  EnvironmentVariable variable(kShareDirVariable, std::nullopt);
  REQUIRE(RequireFlagPath("/some/model", "--model").value() == "/some/model");
  REQUIRE(RequireFlagPath("", "--model").status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("a program is found beside the running executable before $PATH") {
  testing::TempDir dir;
  const std::filesystem::path impostor = dir.path / "resource_paths_test";
  std::ofstream(impostor) << "#!/bin/sh\n";
  std::filesystem::permissions(impostor, std::filesystem::perms::owner_all);
  EnvironmentVariable path("PATH", dir.str());
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe");
  REQUIRE(FindProgram("resource_paths_test").value() == self.string());
}

TEST_CASE("a program not beside the executable is the first executable one in $PATH") {
  testing::TempDir dir;
  std::filesystem::create_directories(dir.path / "first");
  std::filesystem::create_directories(dir.path / "second");
  std::ofstream(dir.path / "first" / "lychee-program") << "not executable\n";
  std::ofstream(dir.path / "second" / "lychee-program") << "#!/bin/sh\n";
  std::filesystem::permissions(dir.path / "second" / "lychee-program", std::filesystem::perms::owner_all);
  EnvironmentVariable path("PATH", absl::StrCat(dir.str(), "/first::", dir.str(), "/second"));
  REQUIRE(FindProgram("lychee-program").value() == dir.str() + "/second/lychee-program");
}

TEST_CASE("a program found nowhere is an error naming where it looked") {
  testing::TempDir dir;
  EnvironmentVariable path("PATH", dir.str());
  const absl::StatusOr<std::string> found = FindProgram("lychee-no-such-program");
  REQUIRE(found.status().code() == absl::StatusCode::kNotFound);
  const std::string message(found.status().message());
  REQUIRE(message.find("lychee-no-such-program") != std::string::npos);
  REQUIRE(message.find("(beside the executable)") != std::string::npos);
  REQUIRE(message.find("$PATH (" + dir.str() + ")") != std::string::npos);
}

}  // namespace
}  // namespace lychee
