// RULER-style long-context retrieval prompts (pass key, multi-key needles) built from a haystack
// corpus with the model's own tokenizer, in the exact templates the bundled tiny model was
// trained on. Used to measure retrieval quality of sparse decoding and to give the head-partition
// trainer samples whose answers depend on text far back in the context. Free of LibTorch.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/tokenizer.h"

namespace lychee {

// The whole file as text; gzip-compressed files (.txt.gz) are decompressed, plain files are
// read as they are.
absl::StatusOr<std::string> ReadTextCorpus(const std::string& path);

enum class RetrievalTask {
  // One needle " The pass key is {key}. Remember it. {key} is the pass key. " with a 5-digit key.
  kPasskey,
  // 2 to 6 needles " One of the special magic numbers for {word} is: {value}. " with random
  // 5-9 letter words of the corpus and 7-digit values; the query asks for one of them, chosen at
  // random.
  kMultiKey,
  // RULER's multi-value: 2 to 6 needles (default 4) of the multi-key template, all for the same
  // word, each with its own value; the query asks for all of them, and the answer lists them in
  // the order they appear: " {v1}, {v2}, {v3}, {v4}.". The bundled model was not trained on it.
  kMultiValue,
  // RULER's variable tracking: a chain of 2 to 10 assignments (default 5) " VAR {X1} = {value}. ",
  // " VAR {X2} = VAR {X1}. ", ... in this order through the text, with 5-letter upper-case names
  // and a 5-digit value; the answer names the chain: " {X1} {X2} {X3} {X4} {X5}.". The bundled
  // model was not trained on it.
  kVariableTracking,
  // For calibrating head partitions: up to 10 multi-key needles spread evenly from 5% to 95%
  // deep, so that one sample exercises retrieval across the whole context. Multi-key rather
  // than pass-key needles, so that the query names one of them and the answer is unambiguous.
  kCalibration,
};

struct RetrievalOptions {
  // 0 takes the task's default: kPasskey exactly 1, kMultiKey and kMultiValue 2 to 6 (default 4),
  // kVariableTracking 2 to 10 (default 5), kCalibration 1 to 10 (default 10).
  int num_needles = 0;
  // Where the needles go, one per needle, as fractions of the haystack in [0, 1]; each lands on
  // the nearest sentence boundary (or word boundary where no sentence ends nearby). Empty:
  // random depths for kPasskey, kMultiKey, kMultiValue and kVariableTracking, evenly from 0.05
  // to 0.95 for kCalibration. kMultiValue and kVariableTracking take them in ascending order, so
  // that their needles appear in the order the answer lists them.
  std::vector<double> depths;
};

// "passkey", "multikey", "multivalue", "vartrack" (the calibration task has no name);
// INVALID_ARGUMENT listing them otherwise.
absl::StatusOr<RetrievalTask> ParseRetrievalTask(const std::string& name);
std::string RetrievalTaskName(RetrievalTask task);

struct TokenRange {
  int64_t begin = 0;
  int64_t end = 0;  // exclusive
};

struct RetrievalSample {
  // Haystack with the needles in it, then the query; no special tokens (prepend a BOS if the
  // model wants one).
  std::string prompt_text;
  std::vector<int32_t> prompt_ids;
  // " {key}." or " {value}.": the text a correct model continues the prompt with, and its ids
  // as they tokenize after the prompt (the tail of tokenizing prompt + answer).
  std::string answer_text;
  std::vector<int32_t> answer_ids;
  // Per needle, in the order they appear: the prompt tokens it covers, and its depth, the
  // fraction of the haystack's tokens (the prompt less needles and query) that come before it.
  std::vector<TokenRange> needle_token_ranges;
  std::vector<double> needle_depths;
  // Index into the two vectors above of the needle the query asks for.
  int asked_needle = 0;
};

// The ids `answer_text` takes right after a prompt that tokenizes as `prompt_ids` (no special
// tokens): the tail of tokenizing prompt + answer. INVALID_ARGUMENT when the tokenizer merges the
// answer into the prompt's last tokens, so that it has no tokens of its own.
absl::StatusOr<std::vector<int32_t>> ContinuationIds(const Tokenizer& tokenizer, const std::string& prompt_text,
                                                     const std::vector<int32_t>& prompt_ids,
                                                     const std::string& answer_text);

class HaystackBuilder {
 public:
  // Prompts never exceed the requested context and fall short of it by at most this many
  // tokens (usually none): the haystack can only end at a word boundary.
  static constexpr int64_t kLengthTolerance = 8;

  // Tokenizes the corpus once. `tokenizer` must outlive the builder.
  static absl::StatusOr<HaystackBuilder> Create(const Tokenizer& tokenizer,
                                                std::string haystack_text);

  // A prompt of `context_tokens` tokens (haystack + needles + query) whose haystack is a window
  // of the corpus chosen by `seed`, as are the keys, the values and the asked needle; the same
  // seed always gives the same sample. A context too small for the needles, the query and a
  // little haystack is INVALID_ARGUMENT; one longer than the corpus can fill is
  // FAILED_PRECONDITION.
  absl::StatusOr<RetrievalSample> Build(RetrievalTask task, int64_t context_tokens, uint64_t seed,
                                        const RetrievalOptions& options = {}) const;

  int64_t corpus_tokens() const { return static_cast<int64_t>(token_offsets_.size()) - 1; }

 private:
  HaystackBuilder(const Tokenizer& tokenizer, std::string text, std::vector<size_t> token_offsets,
                  std::vector<std::string> key_words)
      : tokenizer_(&tokenizer),
        text_(std::move(text)),
        token_offsets_(std::move(token_offsets)),
        key_words_(std::move(key_words)) {}

  const Tokenizer* tokenizer_;
  // The corpus as its tokens spell it (the tokenizer may normalize), so that token_offsets_
  // index it exactly.
  std::string text_;
  // Byte offset in text_ where each corpus token starts, then text_.size().
  std::vector<size_t> token_offsets_;
  // The corpus's distinct lower-case words of 5 to 9 letters, sorted: the multi-key needles'
  // keys. Real words, as the bundled model was trained with (random letter strings took its
  // multi-key accuracy at 2K tokens from 0.95 to 0.55).
  std::vector<std::string> key_words_;
};

}  // namespace lychee
