// Properties every loaded tokenizer must have, whatever its file and the text: the ids Encode
// gives are in the vocabulary, and IncrementalDecoder streams exactly what Decode returns.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/types/span.h"
#include "common/base/tokenizer.h"
#include "tests/fuzz/fuzz_support.h"

namespace lychee::fuzz {

// Decodes `ids` one at a time and checks that the deltas add up to Decode(ids); false when some
// id is not in the vocabulary (both must then refuse it).
inline bool CheckDecoding(const Tokenizer& tokenizer, absl::Span<const int32_t> ids, bool skip_special_tokens) {
  absl::StatusOr<std::string> whole = tokenizer.Decode(ids, skip_special_tokens);
  IncrementalDecoder incremental(tokenizer, skip_special_tokens);
  std::string streamed;
  for (const int32_t id : ids) {
    absl::StatusOr<std::string> delta = incremental.Push(id);
    LYCHEE_FUZZ_CHECK(delta.ok() == (id >= 0 && id < tokenizer.vocab_size() && tokenizer.DecodeBytes({id}).ok()));
    if (!delta.ok()) {
      LYCHEE_FUZZ_CHECK(!whole.ok());
      return false;
    }
    streamed += *delta;
  }
  streamed += incremental.Flush();
  LYCHEE_FUZZ_CHECK(whole.ok());
  LYCHEE_FUZZ_CHECK(streamed == *whole);
  return true;
}

// Encodes `text` with and without special tokens; returns the ids without them, nullopt when the
// text was refused (as invalid UTF-8 is).
inline std::optional<std::vector<int32_t>> CheckEncoding(const Tokenizer& tokenizer, std::string_view text) {
  std::optional<std::vector<int32_t>> plain;
  for (const bool add_special_tokens : {false, true}) {
    absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(text, add_special_tokens);
    if (!ids.ok()) continue;
    for (const int32_t id : *ids) LYCHEE_FUZZ_CHECK(id >= 0 && id < tokenizer.vocab_size());
    LYCHEE_FUZZ_CHECK(CheckDecoding(tokenizer, *ids, /*skip_special_tokens=*/false));
    LYCHEE_FUZZ_CHECK(CheckDecoding(tokenizer, *ids, /*skip_special_tokens=*/true));
    if (!add_special_tokens) plain = *std::move(ids);
  }
  return plain;
}

}  // namespace lychee::fuzz
