#include "common/base/retrieval_tasks.h"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/base/status_macros.h"

namespace lychee {
namespace {

// A haystack shorter than this leaves needle depths meaningless.
constexpr int64_t kMinHaystackTokens = 16;
// Corpus tokens kept in reserve past the requested haystack, for fitting its length.
constexpr int64_t kWindowSlackTokens = 64;
constexpr int kMaxFitAttempts = 8;
// How far (in bytes) a needle may move from its requested depth to sit at a sentence end rather
// than merely between two words.
constexpr size_t kSentenceReach = 200;

// std::uniform_*_distribution differ between standard libraries; this keeps a seed's samples the
// same everywhere (std::mt19937_64 itself is fully specified).
class SeededRandom {
 public:
  explicit SeededRandom(uint64_t seed) : engine_(seed) {}
  // Uniform in [low, high]; the modulo bias is below 2^-40 for the ranges used here.
  int64_t Int(int64_t low, int64_t high) {
    return low + static_cast<int64_t>(engine_() % static_cast<uint64_t>(high - low + 1));
  }
  // Uniform in [0, 1).
  double Fraction() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

 private:
  std::mt19937_64 engine_;
};

bool IsSpace(char c) {
  return c == ' ' || c == '\n' || c == '\r' || c == '\t' || c == '\f' || c == '\v';
}

std::string PasskeyNeedle(const std::string& key) {
  return absl::StrCat(" The pass key is ", key, ". Remember it. ", key, " is the pass key. ");
}
constexpr char kPasskeyQuery[] = " What is the pass key? The pass key is";

std::string MultiKeyNeedle(const std::string& word, const std::string& value) {
  return absl::StrCat(" One of the special magic numbers for ", word, " is: ", value, ". ");
}
std::string MultiKeyQuery(const std::string& word) {
  return absl::StrCat(" What is the special magic number for ", word,
                      " mentioned in the provided text? The special magic number for ", word,
                      " mentioned in the provided text is");
}

std::string MultiValueQuery(const std::string& word) {
  return absl::StrCat(" What are all the special magic numbers for ", word,
                      " mentioned in the provided text? The special magic numbers for ", word,
                      " mentioned in the provided text are");
}

std::string FirstAssignment(const std::string& name, const std::string& value) {
  return absl::StrCat(" VAR ", name, " = ", value, ". ");
}
std::string ChainedAssignment(const std::string& name, const std::string& previous) {
  return absl::StrCat(" VAR ", name, " = VAR ", previous, ". ");
}
std::string VariableTrackingQuery(const std::string& value, int count) {
  return absl::StrCat(" Find all variables that are assigned the value ", value,
                      " in the text above. According to the chain of variable assignments in the text above, ",
                      count, " variables are assigned the value ", value, ", they are:");
}

std::string Answer(const std::string& value) { return absl::StrCat(" ", value, "."); }

// The distinct words of 5 to 9 lower-case letters in `text`, sorted so that a seed picks the
// same words on every machine.
std::vector<std::string> KeyWords(const std::string& text) {
  std::set<std::string> words;
  size_t start = 0;
  while (start < text.size()) {
    if (!std::isalpha(static_cast<unsigned char>(text[start]))) {
      ++start;
      continue;
    }
    size_t end = start;
    while (end < text.size() && std::isalpha(static_cast<unsigned char>(text[end]))) ++end;
    const std::string word = text.substr(start, end - start);
    const bool lower = std::all_of(word.begin(), word.end(), [](char c) { return c >= 'a' && c <= 'z'; });
    if (lower && word.size() >= 5 && word.size() <= 9) words.insert(word);
    start = end;
  }
  return std::vector<std::string>(words.begin(), words.end());
}

absl::Status CheckNeedleCount(const char* task_name, int count, int low, int high) {
  if (count >= low && count <= high) return absl::OkStatus();
  const std::string allowed =
      low == high ? absl::StrCat("exactly ", low) : absl::StrCat(low, " to ", high);
  return absl::InvalidArgumentError(
      absl::StrCat(task_name, " takes ", allowed, " needle(s), not ", count));
}

std::vector<double> EvenDepths(int count, double first, double last) {
  if (count == 1) return {(first + last) / 2};
  std::vector<double> depths(count);
  for (int i = 0; i < count; ++i) depths[i] = first + (last - first) * i / (count - 1);
  return depths;
}

struct Needles {
  std::vector<std::string> texts;
  std::vector<double> depths;  // one per text
  int asked = 0;
  std::string query;
  std::string answer;
};

absl::StatusOr<Needles> MakeNeedles(RetrievalTask task, const RetrievalOptions& options,
                                    const std::vector<std::string>& key_words, SeededRandom& random) {
  Needles needles;
  int count = options.num_needles;
  switch (task) {
    case RetrievalTask::kPasskey: {
      if (count == 0) count = 1;
      LYCHEE_RETURN_IF_ERROR(CheckNeedleCount("the pass-key task", count, 1, 1));
      const std::string key = std::to_string(random.Int(10000, 99999));
      needles.texts.push_back(PasskeyNeedle(key));
      needles.query = kPasskeyQuery;
      needles.answer = Answer(key);
      break;
    }
    case RetrievalTask::kMultiValue: {
      if (count == 0) count = 4;
      LYCHEE_RETURN_IF_ERROR(CheckNeedleCount("the multi-value task", count, 2, 6));
      const std::string& word = key_words[random.Int(0, static_cast<int64_t>(key_words.size()) - 1)];
      std::vector<std::string> values;
      while (static_cast<int>(values.size()) < count) {
        const std::string value = std::to_string(random.Int(1000000, 9999999));
        if (std::find(values.begin(), values.end(), value) == values.end()) values.push_back(value);
      }
      for (const std::string& value : values) needles.texts.push_back(MultiKeyNeedle(word, value));
      needles.query = MultiValueQuery(word);
      needles.answer = Answer(absl::StrJoin(values, ", "));
      break;
    }
    case RetrievalTask::kVariableTracking: {
      if (count == 0) count = 5;
      LYCHEE_RETURN_IF_ERROR(CheckNeedleCount("the variable-tracking task", count, 2, 10));
      std::vector<std::string> names;
      while (static_cast<int>(names.size()) < count) {
        std::string name;
        for (int letter = 0; letter < 5; ++letter) name += static_cast<char>('A' + random.Int(0, 25));
        if (std::find(names.begin(), names.end(), name) == names.end()) names.push_back(name);
      }
      const std::string value = std::to_string(random.Int(10000, 99999));
      needles.texts.push_back(FirstAssignment(names[0], value));
      for (int i = 1; i < count; ++i) needles.texts.push_back(ChainedAssignment(names[i], names[i - 1]));
      needles.query = VariableTrackingQuery(value, count);
      needles.answer = Answer(absl::StrJoin(names, " "));
      break;
    }
    case RetrievalTask::kMultiKey:
    case RetrievalTask::kCalibration: {
      const bool calibration = task == RetrievalTask::kCalibration;
      if (count == 0) count = calibration ? 10 : 4;
      LYCHEE_RETURN_IF_ERROR(calibration ? CheckNeedleCount("the calibration task", count, 1, 10)
                                         : CheckNeedleCount("the multi-key task", count, 2, 6));
      std::vector<std::string> words;
      std::vector<int64_t> values;
      while (static_cast<int>(words.size()) < count) {
        const std::string& word = key_words[random.Int(0, static_cast<int64_t>(key_words.size()) - 1)];
        if (std::find(words.begin(), words.end(), word) == words.end()) words.push_back(word);
      }
      while (static_cast<int>(values.size()) < count) {
        const int64_t value = random.Int(1000000, 9999999);
        if (std::find(values.begin(), values.end(), value) == values.end()) values.push_back(value);
      }
      needles.asked = static_cast<int>(random.Int(0, count - 1));
      for (int i = 0; i < count; ++i) {
        needles.texts.push_back(MultiKeyNeedle(words[i], std::to_string(values[i])));
      }
      needles.query = MultiKeyQuery(words[needles.asked]);
      needles.answer = Answer(std::to_string(values[needles.asked]));
      break;
    }
  }

  if (!options.depths.empty()) {
    if (static_cast<int>(options.depths.size()) != count) {
      return absl::InvalidArgumentError(
          absl::StrCat(options.depths.size(), " depths given for ", count, " needles"));
    }
    for (double depth : options.depths) {
      if (!(depth >= 0 && depth <= 1)) {
        return absl::InvalidArgumentError(
            absl::StrCat("needle depth ", depth, " is outside [0, 1]"));
      }
    }
    needles.depths = options.depths;
  } else if (task == RetrievalTask::kCalibration) {
    needles.depths = EvenDepths(count, 0.05, 0.95);
  } else {
    for (int i = 0; i < count; ++i) needles.depths.push_back(random.Fraction());
  }
  if (task == RetrievalTask::kMultiValue || task == RetrievalTask::kVariableTracking) {
    std::sort(needles.depths.begin(), needles.depths.end());
  }
  return needles;
}

// The prompt text and where its parts lie in it, needles in order of appearance.
struct Assembly {
  std::string text;
  std::vector<size_t> needle_begins;
  std::vector<size_t> needle_ends;
  int asked = 0;
  size_t query_begin = 0;
};

// Where a needle aimed at byte `target` of corpus[window_begin, window_end) goes: the nearest
// sentence end within reach, else the nearest space between two words, else the window start.
// Needles go on a space so that their own leading and trailing spaces read naturally.
size_t InsertionPoint(const std::string& corpus, size_t window_begin, size_t window_end,
                      size_t target) {
  auto between_words = [&](size_t point) {
    return point == window_begin || (point > window_begin && point < window_end &&
                                     !IsSpace(corpus[point - 1]) && IsSpace(corpus[point]));
  };
  auto after_sentence = [&](size_t point) {
    if (!between_words(point)) return false;
    if (point == window_begin) return true;
    char last = corpus[point - 1];
    if ((last == '"' || last == '\'') && point - 1 > window_begin) last = corpus[point - 2];
    return last == '.' || last == '!' || last == '?';
  };
  auto nearest = [&](auto&& acceptable, size_t reach) -> std::optional<size_t> {
    for (size_t distance = 0; distance <= reach; ++distance) {
      if (target >= window_begin + distance && acceptable(target - distance)) {
        return target - distance;
      }
      if (target + distance < window_end && acceptable(target + distance)) {
        return target + distance;
      }
    }
    return std::nullopt;
  };
  if (auto point = nearest(after_sentence, kSentenceReach)) return *point;
  return nearest(between_words, window_end - window_begin).value_or(window_begin);
}

// The prompt text for the haystack of corpus tokens [first_token, first_token + haystack_tokens)
// trimmed to whole words, with the needles inserted and the query appended. `token_offsets`
// holds the byte offset of each corpus token and then the corpus size.
Assembly Assemble(const std::string& corpus, const std::vector<size_t>& token_offsets,
                  const Needles& needles, int64_t first_token, int64_t haystack_tokens) {
  // The window starts at a word's first letter and ends after a word's last, so that neither
  // a needle at depth 0 nor the query (which starts with a space) lands inside a word.
  size_t window_begin = token_offsets[first_token];
  while (
      window_begin < corpus.size() &&
      (IsSpace(corpus[window_begin]) || (window_begin > 0 && !IsSpace(corpus[window_begin - 1])))) {
    ++window_begin;
  }
  const int64_t end_token = std::min<int64_t>(first_token + haystack_tokens,
                                              static_cast<int64_t>(token_offsets.size()) - 1);
  size_t window_end = token_offsets[end_token];
  while (window_end > window_begin &&
         (IsSpace(corpus[window_end - 1]) ||
          (window_end < corpus.size() && !IsSpace(corpus[window_end])))) {
    --window_end;
  }

  std::vector<std::pair<size_t, int>> points;  // (byte offset in the corpus, needle)
  for (int needle = 0; needle < static_cast<int>(needles.texts.size()); ++needle) {
    const int64_t target_token =
        first_token + std::llround(needles.depths[needle] * (end_token - first_token));
    const size_t target = std::clamp(token_offsets[target_token], window_begin, window_end);
    points.emplace_back(InsertionPoint(corpus, window_begin, window_end, target), needle);
  }
  std::sort(points.begin(), points.end());

  Assembly assembly;
  size_t cursor = window_begin;
  for (const auto& [point, needle] : points) {
    if (point > cursor) assembly.text.append(corpus, cursor, point - cursor);
    cursor = std::max(cursor, point);
    if (needle == needles.asked) assembly.asked = static_cast<int>(assembly.needle_begins.size());
    assembly.needle_begins.push_back(assembly.text.size());
    assembly.text += needles.texts[needle];
    assembly.needle_ends.push_back(assembly.text.size());
    // The needle's trailing space takes the place of the single space it was put in.
    if (cursor == point && point > window_begin && corpus[point] == ' ') ++cursor;
  }
  if (window_end > cursor) assembly.text.append(corpus, cursor, window_end - cursor);
  assembly.query_begin = assembly.text.size();
  assembly.text += needles.query;
  return assembly;
}

}  // namespace

absl::StatusOr<RetrievalTask> ParseRetrievalTask(const std::string& name) {
  for (RetrievalTask task : {RetrievalTask::kPasskey, RetrievalTask::kMultiKey, RetrievalTask::kMultiValue,
                             RetrievalTask::kVariableTracking}) {
    if (name == RetrievalTaskName(task)) return task;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown task '", name, "' (passkey, multikey, multivalue, vartrack)"));
}

std::string RetrievalTaskName(RetrievalTask task) {
  switch (task) {
    case RetrievalTask::kPasskey:
      return "passkey";
    case RetrievalTask::kMultiKey:
      return "multikey";
    case RetrievalTask::kMultiValue:
      return "multivalue";
    case RetrievalTask::kVariableTracking:
      return "vartrack";
    case RetrievalTask::kCalibration:
      return "calibration";
  }
  return "unknown";
}

absl::StatusOr<std::string> ReadTextCorpus(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) {
    return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  std::string text;
  char buffer[1 << 16];
  int bytes_read;
  while ((bytes_read = gzread(file, buffer, sizeof(buffer))) > 0) text.append(buffer, bytes_read);
  int error_code = Z_OK;
  const std::string error_message = gzerror(file, &error_code);
  gzclose(file);
  if (bytes_read < 0 || (error_code != Z_OK && error_code != Z_STREAM_END)) {
    return absl::DataLossError(absl::StrCat(path, ": ", error_message));
  }
  return text;
}

absl::StatusOr<HaystackBuilder> HaystackBuilder::Create(const Tokenizer& tokenizer,
                                                        std::string haystack_text) {
  if (haystack_text.empty()) return absl::InvalidArgumentError("the haystack corpus is empty");
  LYCHEE_ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                          tokenizer.Encode(haystack_text, /*add_special_tokens=*/false));
  std::string text;
  text.reserve(haystack_text.size());
  std::vector<size_t> token_offsets;
  token_offsets.reserve(ids.size() + 1);
  for (const int32_t& id : ids) {
    token_offsets.push_back(text.size());
    LYCHEE_ASSIGN_OR_RETURN(std::string bytes, tokenizer.DecodeBytes(absl::MakeConstSpan(&id, 1)));
    text += bytes;
  }
  token_offsets.push_back(text.size());
  std::vector<std::string> key_words = KeyWords(text);
  if (key_words.size() < 10) {
    return absl::FailedPreconditionError(absl::StrCat("the haystack corpus has ", key_words.size(),
                                                      " distinct lower-case words of 5 to 9 letters; the "
                                                      "multi-key needles need at least 10"));
  }
  return HaystackBuilder(tokenizer, std::move(text), std::move(token_offsets), std::move(key_words));
}

absl::StatusOr<RetrievalSample> HaystackBuilder::Build(RetrievalTask task, int64_t context_tokens,
                                                       uint64_t seed,
                                                       const RetrievalOptions& options) const {
  SeededRandom random(seed);
  LYCHEE_ASSIGN_OR_RETURN(Needles needles, MakeNeedles(task, options, key_words_, random));

  int64_t fixed_tokens = 0;
  std::vector<const std::string*> fixed_parts = {&needles.query};
  for (const std::string& needle : needles.texts) fixed_parts.push_back(&needle);
  for (const std::string* part : fixed_parts) {
    LYCHEE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer_->Encode(*part, false));
    fixed_tokens += static_cast<int64_t>(ids.size());
  }
  const int64_t haystack_tokens = context_tokens - fixed_tokens;
  if (haystack_tokens < kMinHaystackTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("a context of ", context_tokens, " tokens cannot hold ", needles.texts.size(),
                     " needle(s) and the query (", fixed_tokens,
                     " tokens) besides a haystack of at least ", kMinHaystackTokens, " tokens"));
  }
  if (haystack_tokens + kWindowSlackTokens > corpus_tokens()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the haystack corpus has ", corpus_tokens(), " tokens; a context of ",
                     context_tokens, " tokens needs ", haystack_tokens + kWindowSlackTokens, " (",
                     haystack_tokens, " of haystack and ", kWindowSlackTokens, " to spare)"));
  }
  const int64_t first_token = random.Int(0, corpus_tokens() - haystack_tokens - kWindowSlackTokens);

  // Tokens do not simply add up across the joins (BPE tokenizes a word differently next to a
  // needle), so the haystack is resized until the whole prompt fits the context.
  std::optional<Assembly> best;
  std::vector<int32_t> best_ids;
  std::set<int64_t> tried_lengths;
  int64_t length = haystack_tokens;
  for (int attempt = 0; attempt < kMaxFitAttempts && tried_lengths.insert(length).second;
       ++attempt) {
    Assembly assembly = Assemble(text_, token_offsets_, needles, first_token, length);
    LYCHEE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer_->Encode(assembly.text, false));
    const int64_t excess = static_cast<int64_t>(ids.size()) - context_tokens;
    if (excess <= 0 && (!best || ids.size() > best_ids.size())) {
      best = std::move(assembly);
      best_ids = std::move(ids);
    }
    if (excess == 0) break;
    length = std::clamp<int64_t>(length - excess, 1, corpus_tokens() - first_token);
  }
  if (!best || static_cast<int64_t>(best_ids.size()) < context_tokens - kLengthTolerance) {
    return absl::InternalError(absl::StrCat("could not fit a prompt to ", context_tokens,
                                            " tokens; the closest had ", best_ids.size()));
  }

  RetrievalSample sample;
  sample.prompt_text = std::move(best->text);
  sample.prompt_ids = std::move(best_ids);
  sample.answer_text = needles.answer;
  sample.asked_needle = best->asked;

  // Byte offsets of the prompt's tokens, to find the tokens each needle covers.
  std::vector<size_t> token_offsets = {0};
  for (const int32_t& id : sample.prompt_ids) {
    LYCHEE_ASSIGN_OR_RETURN(std::string bytes,
                            tokenizer_->DecodeBytes(absl::MakeConstSpan(&id, 1)));
    token_offsets.push_back(token_offsets.back() + bytes.size());
  }
  if (token_offsets.back() != sample.prompt_text.size()) {
    return absl::InternalError("the prompt's tokens do not spell the prompt text");
  }
  auto token_at = [&](size_t byte) {
    return std::upper_bound(token_offsets.begin(), token_offsets.end(), byte) -
           token_offsets.begin() - 1;
  };
  int64_t needle_tokens = 0;
  for (size_t i = 0; i < best->needle_begins.size(); ++i) {
    const TokenRange range{token_at(best->needle_begins[i]),
                           token_at(best->needle_ends[i] - 1) + 1};
    sample.needle_token_ranges.push_back(range);
    needle_tokens += range.end - range.begin;
  }
  const int64_t haystack_total = std::max<int64_t>(1, token_at(best->query_begin) - needle_tokens);
  int64_t needle_tokens_before = 0;
  for (const TokenRange& range : sample.needle_token_ranges) {
    sample.needle_depths.push_back(static_cast<double>(range.begin - needle_tokens_before) /
                                   static_cast<double>(haystack_total));
    needle_tokens_before += range.end - range.begin;
  }

  LYCHEE_ASSIGN_OR_RETURN(sample.answer_ids,
                          ContinuationIds(*tokenizer_, sample.prompt_text, sample.prompt_ids, sample.answer_text));
  return sample;
}

absl::StatusOr<std::vector<int32_t>> ContinuationIds(const Tokenizer& tokenizer, const std::string& prompt_text,
                                                     const std::vector<int32_t>& prompt_ids,
                                                     const std::string& answer_text) {
  LYCHEE_ASSIGN_OR_RETURN(std::vector<int32_t> with_answer, tokenizer.Encode(prompt_text + answer_text, false));
  if (with_answer.size() <= prompt_ids.size() ||
      !std::equal(prompt_ids.begin(), prompt_ids.end(), with_answer.begin())) {
    return absl::InvalidArgumentError(
        "the tokenizer merges the answer into the end of the prompt, so the answer has no tokens "
        "of its own");
  }
  return std::vector<int32_t>(with_answer.begin() + static_cast<std::ptrdiff_t>(prompt_ids.size()), with_answer.end());
}

}  // namespace lychee
