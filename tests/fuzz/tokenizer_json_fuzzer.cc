// Tokenizer::FromJson on arbitrary tokenizer.json text. A file that loads is then used: a few
// texts (and the start of the input itself) are encoded and decoded, and every id up to a bound
// is decoded, with the properties of tokenizer_checks.h.
#include <algorithm>
#include <cstdint>

#include "common/base/tokenizer.h"
#include "tests/fuzz/fuzz_support.h"
#include "tests/fuzz/tokenizer_checks.h"

namespace {

// What the pipeline treats specially: contractions, digits, whitespace runs, combining marks,
// scripts, emoji joiners, the special tokens of the real files.
constexpr std::string_view kTexts[] = {
    "Hello world! It's 2024, we'll see: 12345 apples.",
    "  leading\t\ttabs\r\n\n trailing   ",
    "Caf\u00e9 vs Cafe\u0301; \uFB01 \u2460 \uFF21",
    "\u65E5\u672C\u8A9E \uD55C\uAD6D\uC5B4 \u0645\u0631\u062D\u0628\u0627 \U0001F468\u200D\U0001F469\u200D\U0001F467",
    "<|endoftext|>x<|im_start|>user\n<|im_end|> <|begin_of_text|><mask>",
};

constexpr int32_t kMaxIdsDecodedOneByOne = 2048;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view json = lychee::fuzz::AsText(data, size);
  auto tokenizer = lychee::Tokenizer::FromJson(json, "tokenizer.json");
  if (!tokenizer.ok()) return 0;
  const lychee::Tokenizer& loaded = **tokenizer;
  for (const std::string_view text : kTexts) lychee::fuzz::CheckEncoding(loaded, text);
  lychee::fuzz::CheckEncoding(loaded, json.substr(0, 64));

  const int32_t decoded_ids = std::min(loaded.vocab_size(), kMaxIdsDecodedOneByOne);
  for (int32_t id = -1; id <= decoded_ids; ++id) lychee::fuzz::CheckDecoding(loaded, {id}, false);
  return 0;
}
