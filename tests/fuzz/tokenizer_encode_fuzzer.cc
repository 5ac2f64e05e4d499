// Encode and decode arbitrary input with real tokenizers (the bundled one, with Llama-3's
// pre-tokenizer regex; GPT-2's; Qwen3's, with NFC): text from users reaches Encode, ids from a
// model reach Decode. The input is used both as text and, three bytes an id, as ids.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/base/tokenizer.h"
#include "tests/fuzz/fuzz_support.h"
#include "tests/fuzz/tokenizer_checks.h"

namespace {

struct LoadedTokenizer {
  std::unique_ptr<lychee::Tokenizer> tokenizer;
  // Decoding gives the text back: byte-level BPE without a normalizer loses nothing.
  bool lossless;
};

std::vector<LoadedTokenizer>& Tokenizers() {
  static auto* tokenizers = [] {
    auto* loaded = new std::vector<LoadedTokenizer>;
    const std::pair<const char*, bool> files[] = {
        {LYCHEE_SOURCE_DIR "/models/tiny-llama-retrieval/tokenizer.json", true},
        {LYCHEE_SOURCE_DIR "/tests/data/tokenizers/gpt2.tokenizer.json.gz", true},
        {LYCHEE_SOURCE_DIR "/tests/data/tokenizers/qwen3.tokenizer.json.gz", false},
    };
    for (const auto& [path, lossless] : files) {
      auto tokenizer = lychee::Tokenizer::FromFile(path);
      if (!tokenizer.ok()) {
        std::fprintf(stderr, "%s\n", tokenizer.status().ToString().c_str());
        std::abort();
      }
      loaded->push_back({*std::move(tokenizer), lossless});
    }
    return loaded;
  }();
  return *tokenizers;
}

bool IsAscii(std::string_view text) {
  for (const char c : text) {
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  Tokenizers();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text = lychee::fuzz::AsText(data, size);
  for (const LoadedTokenizer& loaded : Tokenizers()) {
    const lychee::Tokenizer& tokenizer = *loaded.tokenizer;
    const std::optional<std::vector<int32_t>> ids = lychee::fuzz::CheckEncoding(tokenizer, text);
    if (ids && (loaded.lossless || IsAscii(text))) {
      LYCHEE_FUZZ_CHECK(tokenizer.Decode(*ids).value() == text);
    }

    // Ids a little past the vocabulary too, which must be refused.
    std::vector<int32_t> raw_ids;
    for (size_t i = 0; i + 3 <= size; i += 3) {
      const uint32_t bits = data[i] | (data[i + 1] << 8) | (static_cast<uint32_t>(data[i + 2]) << 16);
      raw_ids.push_back(static_cast<int32_t>(bits % (static_cast<uint32_t>(tokenizer.vocab_size()) + 16)));
    }
    lychee::fuzz::CheckDecoding(tokenizer, raw_ids, /*skip_special_tokens=*/false);
    lychee::fuzz::CheckDecoding(tokenizer, raw_ids, /*skip_special_tokens=*/true);
  }
  return 0;
}
