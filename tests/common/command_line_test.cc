// The flags of the servers and the benchmarks under dashed names, with booleans' separate values.
#include "common/service/command_line.h"

#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, state_dir, "", "a valued flag");
ABSL_FLAG(int64_t, kv_cache_mib, 2048, "a number");
ABSL_FLAG(bool, shadow_validation, true, "a boolean that takes a value");
ABSL_FLAG(bool, insecure_admin, false, "a boolean given bare");

namespace lychee {
namespace {

using Arguments = std::vector<std::string>;

TEST_CASE("flag names lose their dashes, values keep them") {
  const absl::StatusOr<Arguments> converted =
      ToAbslFlagArguments({"--state-dir", "/tmp/a-b", "--kv-cache-mib=64", "--unknown-flag=x-y"});
  REQUIRE(converted.ok());
  CHECK(*converted == Arguments{"--state_dir", "/tmp/a-b", "--kv_cache_mib=64", "--unknown_flag=x-y"});
}

TEST_CASE("a boolean takes a separate true or false, and nothing else") {
  absl::StatusOr<Arguments> converted =
      ToAbslFlagArguments({"--shadow-validation", "false", "--insecure-admin", "--state-dir", "s"});
  REQUIRE(converted.ok());
  CHECK(*converted == Arguments{"--shadow_validation=false", "--insecure_admin", "--state_dir", "s"});
  converted = ToAbslFlagArguments({"--state-dir", "s", "--insecure-admin"});
  REQUIRE(converted.ok());
  CHECK(converted->back() == "--insecure_admin");

  for (const Arguments& args : {Arguments{"--shadow-validation", "maybe"}, Arguments{"--shadow-validation=maybe"},
                                Arguments{"--shadow_validation", "1"}}) {
    converted = ToAbslFlagArguments(args);
    INFO(args[0]);
    CHECK(converted.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(converted.status().message()), Catch::Contains("must be true or false, got '"));
  }
  CHECK_THAT(std::string(ToAbslFlagArguments({"--shadow-validation", "maybe"}).status().message()),
             Catch::StartsWith("--shadow-validation must be"));
}

TEST_CASE("arguments after -- are left alone") {
  const absl::StatusOr<Arguments> converted = ToAbslFlagArguments({"--insecure-admin", "--", "--state-dir", "false"});
  REQUIRE(converted.ok());
  CHECK(*converted == Arguments{"--insecure_admin", "--", "--state-dir", "false"});
}

TEST_CASE("the command line sets the flags under dashed names; positional arguments are refused") {
  std::vector<std::string> storage = {"program", "--state-dir",         "/srv/state", "--kv-cache-mib",
                                      "64",      "--shadow-validation", "false",      "--insecure-admin"};
  std::vector<char*> argv;
  for (std::string& arg : storage) argv.push_back(arg.data());
  REQUIRE(ParseFlags(static_cast<int>(argv.size()), argv.data(), __FILE__).ok());
  CHECK(absl::GetFlag(FLAGS_state_dir) == "/srv/state");
  CHECK(absl::GetFlag(FLAGS_kv_cache_mib) == 64);
  CHECK(!absl::GetFlag(FLAGS_shadow_validation));
  CHECK(absl::GetFlag(FLAGS_insecure_admin));

  storage = {"program", "--kv-cache-mib", "32", "stray"};
  argv.clear();
  for (std::string& arg : storage) argv.push_back(arg.data());
  const absl::Status status = ParseFlags(static_cast<int>(argv.size()), argv.data(), __FILE__);
  CHECK(status.code() == absl::StatusCode::kInvalidArgument);
  CHECK(status.message() == "unexpected argument 'stray'");

  CHECK(FlagInRange(FLAGS_kv_cache_mib, 1, 16).status().message() == "--kv-cache-mib must be in [1, 16], got 32");
  CHECK(*FlagInRange(FLAGS_kv_cache_mib, 1, 64) == 32);
}

TEST_CASE("the help lists this file's flags by their dashed names, with defaults and help text") {
  const std::string help = FlagsHelp(__FILE__);
  CHECK_THAT(help, Catch::Contains("\n  --kv-cache-mib (default 2048)\n      a number\n"));
  CHECK_THAT(help, Catch::Contains("\n  --insecure-admin (default false)\n"));
  CHECK_THAT(help, Catch::Contains("\n  --state-dir\n      a valued flag\n"));
  CHECK_THAT(help, !Catch::Contains("--helpfull") && !Catch::Contains("_"));
}

}  // namespace
}  // namespace lychee
