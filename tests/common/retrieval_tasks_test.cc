// HaystackBuilder with the bundled tokenizer and held-out novel: prompt lengths, needle and
// query placement, answer tokens, determinism, and the error cases.
#include "common/base/retrieval_tasks.h"

#include <catch2/catch.hpp>
#include <iterator>
#include <memory>
#include <regex>
#include <string>

namespace lychee {
namespace {

const std::string kTokenizerPath = "models/tiny-llama-retrieval/tokenizer.json";
const std::string kCorpusPath = "data/corpus/persuasion.txt.gz";
const std::string kPasskeyQuery = " What is the pass key? The pass key is";

const Tokenizer& BundledTokenizer() {
  static const std::unique_ptr<Tokenizer> tokenizer = [] {
    auto loaded = Tokenizer::FromFile(kTokenizerPath);
    REQUIRE(loaded.ok());
    return std::move(loaded).value();
  }();
  return *tokenizer;
}

// Tokenizing the novel takes a moment, so every test shares one builder.
const HaystackBuilder& PersuasionBuilder() {
  static const HaystackBuilder builder = [] {
    auto corpus = ReadTextCorpus(kCorpusPath);
    REQUIRE(corpus.ok());
    auto created = HaystackBuilder::Create(BundledTokenizer(), std::move(corpus).value());
    REQUIRE(created.ok());
    return std::move(created).value();
  }();
  return builder;
}

RetrievalSample BuildOrFail(RetrievalTask task, int64_t context_tokens, uint64_t seed,
                            const RetrievalOptions& options = {}) {
  auto sample = PersuasionBuilder().Build(task, context_tokens, seed, options);
  INFO(sample.status().ToString());
  REQUIRE(sample.ok());
  return std::move(sample).value();
}

std::string Decode(absl::Span<const int32_t> ids) {
  auto text = BundledTokenizer().Decode(ids);
  REQUIRE(text.ok());
  return *text;
}

std::string NeedleText(const RetrievalSample& sample, int needle) {
  const TokenRange& range = sample.needle_token_ranges[needle];
  return Decode(
      absl::MakeConstSpan(sample.prompt_ids).subspan(range.begin, range.end - range.begin));
}

bool EndsWith(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The answer's digits, from " 12345." or " 1234567.".
std::string AnswerValue(const RetrievalSample& sample) {
  return sample.answer_text.substr(1, sample.answer_text.size() - 2);
}

TEST_CASE("ReadTextCorpus reads a gzip-compressed corpus and reports a missing one") {
  auto corpus = ReadTextCorpus(kCorpusPath);
  REQUIRE(corpus.ok());
  CHECK(corpus->size() == 466853);
  CHECK(corpus->rfind("Persuasion\n\n\nby\n\nJane Austen", 0) == 0);

  auto missing = ReadTextCorpus("data/corpus/no-such-file.txt.gz");
  CHECK(missing.status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("prompts have the requested length, never more") {
  const RetrievalTask task =
      GENERATE(RetrievalTask::kPasskey, RetrievalTask::kMultiKey, RetrievalTask::kCalibration);
  const int64_t context_tokens = GENERATE(1024, 4096, 8192);
  for (uint64_t seed : {1, 2, 3}) {
    const RetrievalSample sample = BuildOrFail(task, context_tokens, seed);
    INFO("task " << static_cast<int>(task) << ", context " << context_tokens << ", seed " << seed);
    CHECK(static_cast<int64_t>(sample.prompt_ids.size()) <= context_tokens);
    CHECK(static_cast<int64_t>(sample.prompt_ids.size()) >=
          context_tokens - HaystackBuilder::kLengthTolerance);
  }
}

TEST_CASE("a pass-key prompt holds the needle and ends with the query") {
  const RetrievalSample sample = BuildOrFail(RetrievalTask::kPasskey, 4096, 7);
  REQUIRE(std::regex_match(sample.answer_text, std::regex(" [1-9][0-9]{4}\\.")));
  const std::string key = AnswerValue(sample);
  const std::string needle =
      " The pass key is " + key + ". Remember it. " + key + " is the pass key. ";

  const std::string decoded = Decode(sample.prompt_ids);
  CHECK(decoded == sample.prompt_text);
  CHECK(decoded.find(needle) != std::string::npos);
  CHECK(EndsWith(decoded, kPasskeyQuery));
  REQUIRE(sample.needle_token_ranges.size() == 1);
  CHECK(sample.asked_needle == 0);
  CHECK(NeedleText(sample, 0).find(needle.substr(1, needle.size() - 2)) != std::string::npos);
  CHECK(Decode(sample.answer_ids) == sample.answer_text);
}

TEST_CASE("a multi-key prompt holds every needle and asks for one of them") {
  for (int needles : {2, 6}) {
    RetrievalOptions options;
    options.num_needles = needles;
    const RetrievalSample sample = BuildOrFail(RetrievalTask::kMultiKey, 2048, 11, options);
    REQUIRE(std::regex_match(sample.answer_text, std::regex(" [1-9][0-9]{6}\\.")));
    REQUIRE(static_cast<int>(sample.needle_token_ranges.size()) == needles);
    REQUIRE(sample.asked_needle >= 0);
    REQUIRE(sample.asked_needle < needles);

    const std::regex needle_pattern(
        " One of the special magic numbers for ([a-z]{5,9}) is: ([0-9]{7})\\. ");
    CHECK(std::distance(std::sregex_iterator(sample.prompt_text.begin(), sample.prompt_text.end(),
                                             needle_pattern),
                        std::sregex_iterator()) == needles);

    // The needle's tokens may end before its trailing space, which can merge with the text's.
    const std::regex asked_pattern(
        " One of the special magic numbers for ([a-z]{5,9}) is: ([0-9]{7})\\.");
    const std::string asked_needle = NeedleText(sample, sample.asked_needle);
    std::smatch asked;
    REQUIRE(std::regex_search(asked_needle, asked, asked_pattern));
    CHECK(asked[2] == AnswerValue(sample));
    const std::string word = asked[1];
    const std::string query = " What is the special magic number for " + word +
                              " mentioned in the provided text? The special magic number for " +
                              word + " mentioned in the provided text is";
    CHECK(EndsWith(sample.prompt_text, query));
    CHECK(Decode(sample.prompt_ids) == sample.prompt_text);
    CHECK(Decode(sample.answer_ids) == sample.answer_text);
  }
}

TEST_CASE("needles sit between words at the requested depths") {
  RetrievalOptions options;
  options.num_needles = 3;
  options.depths = {0.0, 0.5, 0.9};
  const RetrievalSample sample = BuildOrFail(RetrievalTask::kMultiKey, 4096, 5, options);
  REQUIRE(sample.needle_depths.size() == 3);
  CHECK(sample.needle_depths[0] == Approx(0.0).margin(0.01));
  CHECK(sample.needle_depths[1] == Approx(0.5).margin(0.03));
  CHECK(sample.needle_depths[2] == Approx(0.9).margin(0.03));
  // Depth 0 is the very start; elsewhere a needle's leading space replaces one of the text's.
  CHECK(sample.prompt_text.rfind(" One of the special magic numbers for ", 0) == 0);
  CHECK_FALSE(std::regex_search(sample.prompt_text, std::regex("\\s One of the special")));

  const RetrievalSample calibration = BuildOrFail(RetrievalTask::kCalibration, 8192, 5);
  REQUIRE(calibration.needle_depths.size() == 10);
  for (int i = 0; i < 10; ++i) {
    CHECK(calibration.needle_depths[i] == Approx(0.05 + 0.1 * i).margin(0.03));
    if (i > 0) {
      CHECK(calibration.needle_token_ranges[i].begin >= calibration.needle_token_ranges[i - 1].end);
    }
  }
}

TEST_CASE("a seed always gives the same sample, and other seeds other samples") {
  const RetrievalSample first = BuildOrFail(RetrievalTask::kMultiKey, 1024, 42);
  const RetrievalSample again = BuildOrFail(RetrievalTask::kMultiKey, 1024, 42);
  CHECK(first.prompt_ids == again.prompt_ids);
  CHECK(first.answer_ids == again.answer_ids);
  CHECK(first.needle_depths == again.needle_depths);

  const RetrievalSample other = BuildOrFail(RetrievalTask::kMultiKey, 1024, 43);
  CHECK(other.prompt_text != first.prompt_text);
  CHECK(other.prompt_text.substr(0, 200) != first.prompt_text.substr(0, 200));
  CHECK(other.answer_text != first.answer_text);
}

TEST_CASE("contexts the corpus cannot fill or the needles do not fit are errors") {
  const HaystackBuilder& builder = PersuasionBuilder();
  auto too_long = builder.Build(RetrievalTask::kPasskey, 1 << 20, 1);
  CHECK(too_long.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(too_long.status().message()),
             Catch::Contains(std::to_string(builder.corpus_tokens())) &&
                 Catch::Contains(std::to_string(1 << 20)));

  CHECK(builder.Build(RetrievalTask::kPasskey, 30, 1).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(builder.Build(RetrievalTask::kCalibration, 200, 1).status().code() ==
        absl::StatusCode::kInvalidArgument);

  RetrievalOptions too_many;
  too_many.num_needles = 7;
  CHECK(builder.Build(RetrievalTask::kMultiKey, 4096, 1, too_many).status().code() ==
        absl::StatusCode::kInvalidArgument);
  RetrievalOptions wrong_depths;
  wrong_depths.depths = {0.5, 1.5};
  wrong_depths.num_needles = 2;
  CHECK(builder.Build(RetrievalTask::kMultiKey, 4096, 1, wrong_depths).status().code() ==
        absl::StatusCode::kInvalidArgument);
  wrong_depths.depths = {0.5};
  CHECK(builder.Build(RetrievalTask::kMultiKey, 4096, 1, wrong_depths).status().code() ==
        absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lychee
