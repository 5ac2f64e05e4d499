// The lychee command line as a user runs it: exit codes, output, and errors that name the problem.
#include <catch2/catch.hpp>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "tests/run_command.h"

namespace {

using Result = lychee::testing::CommandResult;

// Runs the CLI through the shell with `args` (already quoted) and `stdin_path` as its input.
Result Run(const std::string& args, const std::string& stdin_path = "/dev/null") {
  return lychee::testing::RunCommand(std::string(LYCHEE_CLI) + " " + args + " < " + stdin_path);
}

// Named by the process too: checkouts of the project may run this test at the same time.
std::string TempFile(const std::string& name, const std::string& content) {
  const auto path =
      std::filesystem::temp_directory_path() / ("lychee_cli_test_" + std::to_string(getpid()) + "_" + name);
  std::ofstream(path, std::ios::binary) << content;
  return path.string();
}

nlohmann::json ParityRef() {
  std::ifstream in("models/tiny-llama-retrieval/parity_refs.json");
  return nlohmann::json::parse(in)[0];
}

std::string Join(const std::vector<int>& ids) {
  std::ostringstream out;
  for (size_t i = 0; i < ids.size(); ++i) out << (i ? " " : "") << ids[i];
  return out.str();
}

std::string LastLine(const std::string& text) {
  std::string trimmed = text.substr(0, text.find_last_not_of('\n') + 1);
  return trimmed.substr(trimmed.find_last_of('\n') + 1);
}

TEST_CASE("tokenize prints the ids of stdin on one line") {
  const auto ref = ParityRef();
  const Result result = Run("tokenize", TempFile("prompt.txt", ref["prompt"].get<std::string>()));
  CHECK(result.exit_code == 0);
  CHECK(result.output == Join(ref["ids"].get<std::vector<int>>()) + "\n");
}

TEST_CASE("generate streams the greedy continuation and prints its ids last") {
  const auto ref = ParityRef();
  const std::string prompt = TempFile("generate.txt", ref["prompt"].get<std::string>());
  const Result result = Run("generate --prompt-file " + prompt + " --max-new-tokens 32 --print-ids");
  REQUIRE(result.exit_code == 0);
  CHECK(LastLine(result.output) == Join(ref["greedy32"].get<std::vector<int>>()));
}

#ifdef LYCHEE_HAVE_GLOO
TEST_CASE("generate --tensor-parallel 2 gives the single-process greedy continuation") {
  const auto ref = ParityRef();
  const std::string prompt = TempFile("generate_tp.txt", ref["prompt"].get<std::string>());
  const Result result =
      Run("generate --prompt-file " + prompt + " --max-new-tokens 32 --print-ids --tensor-parallel 2");
  REQUIRE(result.exit_code == 0);
  CHECK(LastLine(result.output) == Join(ref["greedy32"].get<std::vector<int>>()));

  const Result indivisible = Run("generate --prompt x --tensor-parallel 3");
  CHECK(indivisible.exit_code != 0);
  CHECK_THAT(indivisible.output, Catch::Contains("3 ranks") && Catch::Contains("2 KV heads"));
}

TEST_CASE("generate --policy tidal --tensor-parallel 2 gives the single-process tidal continuation") {
  const std::string generate = "generate --prompt-file scripts/demo-prompt.txt --max-new-tokens 16 --print-ids ";
  const Result dense = Run(generate);
  const Result tp1 = Run(generate + "--policy tidal --budget 256");
  const Result tp2 = Run(generate + "--policy tidal --budget 256 --tensor-parallel 2");
  INFO(dense.output << tp1.output << tp2.output);
  REQUIRE(dense.exit_code == 0);
  REQUIRE(tp1.exit_code == 0);
  REQUIRE(tp2.exit_code == 0);
  // Tidal's selection changes this continuation, so that the ranks' selections are what is compared.
  REQUIRE(LastLine(tp1.output) != LastLine(dense.output));
  CHECK(LastLine(tp2.output) == LastLine(tp1.output));
}
#endif

TEST_CASE("hybrid generation with the bundled partition runs") {
  const Result result = Run(
      "generate --prompt-file scripts/demo-prompt.txt --max-new-tokens 4 --print-ids --attention hybrid "
      "--partition models/tiny-llama-retrieval/partitions/retrieval-head-0.json --budget 256");
  CHECK(result.exit_code == 0);
  INFO(result.output);
  CHECK(std::count(result.output.begin(), result.output.end(), ' ') >= 3);
}

TEST_CASE("bad input exits non-zero with a message that names the problem") {
  struct Case {
    std::string args;
    std::string stdin_content;
    std::string expected;
  };
  const std::string bad_model = (std::filesystem::temp_directory_path() / "lychee_cli_test_bad_model").string();
  std::filesystem::create_directories(bad_model);
  std::ofstream(bad_model + "/config.json") << R"({"model_type": "gpt_neox", "hidden_size": 8})";
  std::filesystem::copy_file("models/tiny-llama-retrieval/tokenizer.json", bad_model + "/tokenizer.json",
                             std::filesystem::copy_options::overwrite_existing);
  const Case cases[] = {
      {"tokenize", "abc\xff\xfe", "UTF-8"},
      {"generate --model /nonexistent/model --prompt hi", "", "/nonexistent/model"},
      {"generate --model " + bad_model + " --prompt hi", "", "gpt_neox"},
      {"generate --prompt hi --max-new-tokens 0", "", "max-new-tokens"},
      {"generate --prompt hi --temperature -1", "", "temperature"},
      {"generate --prompt hi --top-p 2", "", "top_p"},
      {"generate --prompt-file /nonexistent/prompt.txt", "", "/nonexistent/prompt.txt"},
      {"generate", "", "--prompt"},
      {"generate --prompt hi --attention hybrid", "", "--partition"},
      {"generate --prompt hi --attention sparse", "", "dense or hybrid"},
      {"generate --prompt hi --attention hybrid --partition README.md", "", "README.md"},
      {"generate --prompt hi --attention hybrid --partition "
       "models/tiny-llama-retrieval/partitions/retrieval-head-0.json "
       "--budget 100",
       "", "token_budget"},
      {"generate --prompt hi --bogus 1", "", "--bogus"},
      {"generate --prompt hi --policy quest --audit-every 2", "", "--audit-every"},
      {"generate --prompt hi --policy streaming", "", "--partition"},
      {"frobnicate", "", "unknown command"},
  };
  for (const Case& c : cases) {
    const Result result = Run(c.args, TempFile("stdin.txt", c.stdin_content));
    INFO(c.args << "\n" << result.output);
    CHECK(result.exit_code != 0);
    CHECK(result.exit_code != -1);  // exited, not killed by a signal
    CHECK_THAT(result.output, Catch::Contains(c.expected));
  }
}

}  // namespace
