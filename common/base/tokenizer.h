// Hugging Face tokenizer.json for byte-level BPE (GPT-2, Llama-3, Qwen2, Qwen3): NFC normalizer,
// Split pre-tokenizers with the real regexes (PCRE2), ByteLevel, added and special tokens,
// merges in both list formats, and decoding. Free of LibTorch.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace lychee {

class Tokenizer {
 public:
  // Reads tokenizer.json; a path ending in .gz is read through zlib.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view json_text,
                                                             std::string_view source);
  virtual ~Tokenizer() = default;

  // The ids Hugging Face `tokenizers` gives for `text`; add_special_tokens applies the
  // post-processor (e.g. a BOS template) as tokenizer.encode does. Invalid UTF-8 is
  // INVALID_ARGUMENT with the byte offset.
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                      bool add_special_tokens = true) const = 0;
  // The bytes the ids stand for; may end inside a UTF-8 sequence. Ids outside the vocabulary
  // are OUT_OF_RANGE naming the id and its position.
  virtual absl::StatusOr<std::string> DecodeBytes(absl::Span<const int32_t> ids,
                                                  bool skip_special_tokens = false) const = 0;
  // DecodeBytes, with invalid UTF-8 replaced by U+FFFD as Hugging Face does.
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids,
                                     bool skip_special_tokens = false) const;

  virtual int32_t vocab_size() const = 0;
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  virtual bool IsSpecial(int32_t id) const = 0;
};

// Turns a stream of generated ids into text deltas that are always whole UTF-8: bytes of a
// character split across tokens are held back until it is complete.
class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false);
  // The text that `id` completes (possibly empty).
  absl::StatusOr<std::string> Push(int32_t id);
  // What is still held back, invalid bytes replaced by U+FFFD.
  std::string Flush();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_tokens_;
  std::string pending_;
};

}  // namespace lychee
