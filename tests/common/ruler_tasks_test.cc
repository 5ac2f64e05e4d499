// The RULER-style tasks added for the evaluation harness, multi-value and variable tracking,
// built from the held-out KJV text: needles in the order the answer lists them, the answer, the
// query, and the task names.
#include <catch2/catch.hpp>

#include <algorithm>
#include <memory>
#include <string>

#include "absl/strings/str_split.h"
#include "common/base/retrieval_tasks.h"

namespace lychee {
namespace {

const Tokenizer& BundledTokenizer() {
  static const std::unique_ptr<Tokenizer> tokenizer = [] {
    auto loaded = Tokenizer::FromFile("models/tiny-llama-retrieval/tokenizer.json");
    REQUIRE(loaded.ok());
    return std::move(loaded).value();
  }();
  return *tokenizer;
}

const HaystackBuilder& KjvBuilder() {
  static const HaystackBuilder builder = [] {
    auto corpus = ReadTextCorpus("data/corpus/kjv-heldout.txt.gz");
    REQUIRE(corpus.ok());
    auto created = HaystackBuilder::Create(BundledTokenizer(), std::move(corpus).value());
    REQUIRE(created.ok());
    return std::move(created).value();
  }();
  return builder;
}

std::string NeedleText(const RetrievalSample& sample, size_t needle) {
  const TokenRange& range = sample.needle_token_ranges[needle];
  auto text = BundledTokenizer().Decode(
      absl::MakeConstSpan(sample.prompt_ids).subspan(range.begin, range.end - range.begin));
  REQUIRE(text.ok());
  return *text;
}

TEST_CASE("task names parse both ways, and unknown ones are refused with the list") {
  for (RetrievalTask task : {RetrievalTask::kPasskey, RetrievalTask::kMultiKey, RetrievalTask::kMultiValue,
                             RetrievalTask::kVariableTracking}) {
    auto parsed = ParseRetrievalTask(RetrievalTaskName(task));
    REQUIRE(parsed.ok());
    CHECK(*parsed == task);
  }
  auto unknown = ParseRetrievalTask("qa");
  CHECK(unknown.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(unknown.status().message()).find("vartrack") != std::string::npos);
}

TEST_CASE("multi-value needles share one word, and the answer lists their values in order") {
  for (uint64_t seed : {1, 2, 3}) {
    auto sample = KjvBuilder().Build(RetrievalTask::kMultiValue, 2048, seed);
    INFO(sample.status().ToString());
    REQUIRE(sample.ok());
    CHECK(static_cast<int64_t>(sample->prompt_ids.size()) <= 2048);
    CHECK(static_cast<int64_t>(sample->prompt_ids.size()) >= 2048 - HaystackBuilder::kLengthTolerance);
    REQUIRE(sample->needle_token_ranges.size() == 4);
    // " v1, v2, v3, v4."
    const std::string listed = sample->answer_text.substr(1, sample->answer_text.size() - 2);
    const std::vector<std::string> values = absl::StrSplit(listed, ", ");
    REQUIRE(values.size() == 4);
    std::string word;
    for (size_t i = 0; i < values.size(); ++i) {
      const std::string needle = NeedleText(*sample, i);
      INFO(needle);
      CHECK(needle.find("One of the special magic numbers for ") != std::string::npos);
      CHECK(needle.find(" is: " + values[i] + ".") != std::string::npos);
      const size_t begin = needle.find(" for ") + 5;
      const std::string this_word = needle.substr(begin, needle.find(" is:") - begin);
      if (i == 0) word = this_word;
      CHECK(this_word == word);
    }
    CHECK(sample->prompt_text.find("What are all the special magic numbers for " + word) != std::string::npos);
    CHECK(std::is_sorted(sample->needle_depths.begin(), sample->needle_depths.end()));
  }
}

TEST_CASE("variable tracking chains its assignments in order, and the answer names the chain") {
  RetrievalOptions options;
  options.num_needles = 3;
  auto sample = KjvBuilder().Build(RetrievalTask::kVariableTracking, 1024, 7, options);
  INFO(sample.status().ToString());
  REQUIRE(sample.ok());
  REQUIRE(sample->needle_token_ranges.size() == 3);
  const std::vector<std::string> names =
      absl::StrSplit(sample->answer_text.substr(1, sample->answer_text.size() - 2), ' ');
  REQUIRE(names.size() == 3);
  for (const std::string& name : names) {
    CHECK(name.size() == 5);
    CHECK(std::all_of(name.begin(), name.end(), [](char c) { return c >= 'A' && c <= 'Z'; }));
  }
  CHECK(NeedleText(*sample, 0).find("VAR " + names[0] + " = ") != std::string::npos);
  CHECK(NeedleText(*sample, 1).find("VAR " + names[1] + " = VAR " + names[0] + ".") != std::string::npos);
  CHECK(NeedleText(*sample, 2).find("VAR " + names[2] + " = VAR " + names[1] + ".") != std::string::npos);
  CHECK(sample->prompt_text.find("3 variables are assigned the value") != std::string::npos);

  options.num_needles = 11;
  CHECK(KjvBuilder().Build(RetrievalTask::kVariableTracking, 1024, 7, options).status().code() ==
        absl::StatusCode::kInvalidArgument);
  options.num_needles = 1;
  CHECK(KjvBuilder().Build(RetrievalTask::kMultiValue, 1024, 7, options).status().code() ==
        absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lychee
