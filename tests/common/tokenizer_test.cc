// The tokenizer against ids and decodes that Hugging Face `tokenizers` 0.23.2 produced
// (tests/data/tokenizers/expected.json, see tools/tokenizer_refs/README.md), plus streaming
// decoding, error paths and robustness against malformed tokenizer.json files.
#include "common/base/tokenizer.h"

#include <unistd.h>
#include <zlib.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace lychee {
namespace {

using Json = nlohmann::json;

const char kTinyTokenizer[] = "models/tiny-llama-retrieval/tokenizer.json";
const char kLlama3Tokenizer[] = "tests/data/tokenizers/llama3.tokenizer.json.gz";
const char kQwen3Tokenizer[] = "tests/data/tokenizers/qwen3.tokenizer.json.gz";
const char kGpt2Tokenizer[] = "tests/data/tokenizers/gpt2.tokenizer.json.gz";

std::string ReadFile(const std::string& path) {
  std::string contents;
  if (path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0) {
    gzFile file = gzopen(path.c_str(), "rb");
    REQUIRE(file != nullptr);
    char buffer[1 << 16];
    int read;
    while ((read = gzread(file, buffer, sizeof(buffer))) > 0) contents.append(buffer, read);
    gzclose(file);
    REQUIRE(read == 0);
    return contents;
  }
  std::ifstream file(path, std::ios::binary);
  REQUIRE(file.good());
  std::ostringstream stream;
  stream << file.rdbuf();
  return stream.str();
}

const Json& Expected() {
  static const Json* expected =
      new Json(Json::parse(ReadFile("tests/data/tokenizers/expected.json")));
  return *expected;
}

// Loading the large vocabularies takes a while, so each tokenizer is loaded once per run.
const Tokenizer& LoadTokenizer(const std::string& file, const Json& patch = Json()) {
  static auto* cache = new std::map<std::string, std::unique_ptr<Tokenizer>>;
  const std::string key = file + patch.dump();
  auto it = cache->find(key);
  if (it != cache->end()) return *it->second;
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer;
  if (patch.is_null()) {
    tokenizer = Tokenizer::FromFile(file);
  } else {
    Json config = Json::parse(ReadFile(file));
    config.merge_patch(patch);
    tokenizer = Tokenizer::FromJson(config.dump(), file + " (patched)");
  }
  INFO(tokenizer.status().ToString());
  REQUIRE(tokenizer.ok());
  return *cache->emplace(key, *std::move(tokenizer)).first->second;
}

std::vector<int32_t> Encode(const Tokenizer& tokenizer, const std::string& text,
                            bool add_special_tokens = false) {
  absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(text, add_special_tokens);
  INFO(ids.status().ToString());
  REQUIRE(ids.ok());
  return *ids;
}

std::string Decode(const Tokenizer& tokenizer, const std::vector<int32_t>& ids,
                   bool skip_special_tokens = false) {
  absl::StatusOr<std::string> text = tokenizer.Decode(ids, skip_special_tokens);
  INFO(text.status().ToString());
  REQUIRE(text.ok());
  return *text;
}

bool IsValidUtf8(const std::string& text) {
  for (size_t i = 0; i < text.size();) {
    const auto lead = static_cast<unsigned char>(text[i]);
    const size_t length = lead < 0x80    ? 1
                          : lead >= 0xF0 ? 4
                          : lead >= 0xE0 ? 3
                          : lead >= 0xC2 ? 2
                                         : 0;
    if (length == 0 || i + length > text.size()) return false;
    for (size_t k = 1; k < length; ++k) {
      if ((static_cast<unsigned char>(text[i + k]) & 0xC0) != 0x80) return false;
    }
    i += length;
  }
  return true;
}

// The token that stands for one raw byte in a byte-level vocabulary (GPT-2's bytes_to_unicode).
int32_t ByteTokenId(const Tokenizer& tokenizer, unsigned char byte) {
  auto printable = [](int b) {
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
  };
  char32_t code_point = byte;
  if (!printable(byte)) {
    code_point = 0x100;
    for (int b = 0; b < byte; ++b) code_point += printable(b) ? 0 : 1;
  }
  std::string utf8;
  if (code_point < 0x80) {
    utf8 += static_cast<char>(code_point);
  } else {
    utf8 += static_cast<char>(0xC0 | (code_point >> 6));
    utf8 += static_cast<char>(0x80 | (code_point & 0x3F));
  }
  std::optional<int32_t> id = tokenizer.TokenToId(utf8);
  REQUIRE(id.has_value());
  return *id;
}

TEST_CASE("Every tokenizer gives Hugging Face's ids and decodes on every text") {
  const Json& expected = Expected();
  REQUIRE(expected.at("tokenizers").size() >= 16);
  for (const Json& definition : expected.at("tokenizers")) {
    const std::string name = definition.at("name");
    const Tokenizer& tokenizer =
        LoadTokenizer(definition.at("file"), definition.value("patch", Json()));
    REQUIRE(definition.at("cases").size() >= 40);
    for (const Json& entry : definition.at("cases")) {
      const std::string text = entry.at("text");
      const std::vector<int32_t> ids = entry.at("ids");
      const std::vector<int32_t> ids_with_special_tokens =
          entry.value("ids_with_special_tokens", ids);
      const std::string decoded = entry.value("decoded", text);
      const std::string decoded_skipping = entry.value("decoded_skipping_special_tokens", decoded);
      INFO("tokenizer " << name << ", text " << Json(text).dump());
      CHECK(Encode(tokenizer, text, false) == ids);
      CHECK(Encode(tokenizer, text, true) == ids_with_special_tokens);
      CHECK(Decode(tokenizer, ids, false) == decoded);
      CHECK(Decode(tokenizer, ids, true) == decoded_skipping);
    }
  }
}

TEST_CASE("The bundled tokenizer reproduces the ids of parity_refs.json") {
  const Tokenizer& tokenizer = LoadTokenizer(kTinyTokenizer);
  const Json refs = Json::parse(ReadFile("models/tiny-llama-retrieval/parity_refs.json"));
  REQUIRE(refs.size() == 2);
  for (const Json& ref : refs) {
    const std::string prompt = ref.at("prompt");
    const std::vector<int32_t> ids = ref.at("ids");
    CHECK(Encode(tokenizer, prompt, true) == ids);
    CHECK(Encode(tokenizer, prompt, false) == ids);
    CHECK(Decode(tokenizer, ids) == prompt);
  }
}

TEST_CASE("Vocabulary queries") {
  const Tokenizer& llama3 = LoadTokenizer(kLlama3Tokenizer);
  CHECK(llama3.vocab_size() == 128256);
  CHECK(llama3.TokenToId("<|eot_id|>") == 128009);
  CHECK(llama3.TokenToId("Ġthe") == 279);
  CHECK(llama3.TokenToId("not a token") == std::nullopt);
  CHECK(llama3.IsSpecial(128009));
  CHECK_FALSE(llama3.IsSpecial(279));
  CHECK_FALSE(llama3.IsSpecial(-1));
  CHECK_FALSE(llama3.IsSpecial(128256));

  const Tokenizer& qwen3 = LoadTokenizer(kQwen3Tokenizer);
  CHECK(qwen3.vocab_size() == 151669);
  CHECK(qwen3.TokenToId("<|im_end|>") == 151645);
  CHECK(qwen3.IsSpecial(151645));
  // <tool_call> is an added token that is not special: it survives skip_special_tokens.
  CHECK(qwen3.TokenToId("<tool_call>") == 151657);
  CHECK_FALSE(qwen3.IsSpecial(151657));
  CHECK(Decode(qwen3, {151657, 151645}, true) == "<tool_call>");

  const Tokenizer& gpt2 = LoadTokenizer(kGpt2Tokenizer);
  CHECK(gpt2.vocab_size() == 50257);
  CHECK(gpt2.TokenToId("<|endoftext|>") == 50256);

  const Tokenizer& tiny = LoadTokenizer(kTinyTokenizer);
  CHECK(tiny.vocab_size() == 8192);
  CHECK(tiny.TokenToId("<|im_start|>") == 1);
}

TEST_CASE("Decoding replaces invalid UTF-8 as Hugging Face does") {
  // Expected strings from `tokenizers` 0.23.2 decoding the same byte tokens (Rust's
  // from_utf8_lossy: one U+FFFD per maximal invalid subpart).
  const Tokenizer& tokenizer = LoadTokenizer(kTinyTokenizer);
  auto decode_bytes = [&](std::vector<unsigned char> bytes) {
    std::vector<int32_t> ids;
    for (unsigned char byte : bytes) ids.push_back(ByteTokenId(tokenizer, byte));
    absl::StatusOr<std::string> raw = tokenizer.DecodeBytes(ids);
    REQUIRE(raw.ok());
    CHECK(*raw == std::string(bytes.begin(), bytes.end()));
    return Decode(tokenizer, ids);
  };
  const std::string r = "\xEF\xBF\xBD";  // U+FFFD
  CHECK(decode_bytes({0xE2, 0x82, 0x61}) == r + "a");
  CHECK(decode_bytes({0xF0, 0x80}) == r + r);
  CHECK(decode_bytes({0xE0, 0x80, 0x61}) == r + r + "a");
  CHECK(decode_bytes({0xED, 0xA0, 0x80}) == r + r + r);
  CHECK(decode_bytes({0xF4, 0x90, 0x80, 0x80}) == r + r + r + r);
  CHECK(decode_bytes({0xC0, 0xAF}) == r + r);
  CHECK(decode_bytes({0xFF, 0x61}) == r + "a");
  CHECK(decode_bytes({0xF0, 0x9F, 0x98}) == r);
  CHECK(decode_bytes({0xF0, 0x9F, 0x98, 0x80}) == "\xF0\x9F\x98\x80");
}

TEST_CASE("IncrementalDecoder streams whole characters only") {
  const std::vector<std::string> texts = {
      "Emoji: 😀😃 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 🧑🏿‍💻",
      "我爱自然语言处理。東京は日本の首都です。",
      "한국어 텍스트도 있습니다 नमस्ते दुनिया <|im_start|>x<|endoftext|>😀",
  };
  for (const char* file : {kLlama3Tokenizer, kQwen3Tokenizer, kGpt2Tokenizer, kTinyTokenizer}) {
    const Tokenizer& tokenizer = LoadTokenizer(file);
    int held_back = 0;
    for (const std::string& text : texts) {
      for (bool skip_special_tokens : {false, true}) {
        INFO(file << " skip_special_tokens=" << skip_special_tokens << " text " << text);
        const std::vector<int32_t> ids = Encode(tokenizer, text);
        IncrementalDecoder decoder(tokenizer, skip_special_tokens);
        std::string streamed;
        for (int32_t id : ids) {
          absl::StatusOr<std::string> delta = decoder.Push(id);
          REQUIRE(delta.ok());
          CHECK(IsValidUtf8(*delta));
          std::string bytes = *tokenizer.DecodeBytes({id}, skip_special_tokens);
          if (!bytes.empty() && delta->empty()) ++held_back;
          streamed += *delta;
        }
        streamed += decoder.Flush();
        CHECK(streamed == Decode(tokenizer, ids, skip_special_tokens));
      }
    }
    // Byte-level vocabularies cut some of these characters across tokens.
    CHECK(held_back > 0);
  }
}

TEST_CASE("IncrementalDecoder completes split characters and flushes what stays incomplete") {
  const Tokenizer& tokenizer = LoadTokenizer(kTinyTokenizer);
  IncrementalDecoder decoder(tokenizer);
  auto push_byte = [&](unsigned char byte) {
    absl::StatusOr<std::string> delta = decoder.Push(ByteTokenId(tokenizer, byte));
    REQUIRE(delta.ok());
    return *delta;
  };
  const std::string r = "\xEF\xBF\xBD";  // U+FFFD
  // U+1F600 is F0 9F 98 80; fed one byte token at a time.
  CHECK(push_byte(0xF0) == "");
  CHECK(push_byte(0x9F) == "");
  CHECK(push_byte(0x98) == "");
  CHECK(push_byte(0x80) == "\xF0\x9F\x98\x80");
  CHECK(decoder.Flush() == "");
  // An invalid byte is not worth waiting for.
  CHECK(push_byte(0xFF) == r);
  CHECK(push_byte(0xE2) == "");
  CHECK(push_byte(0x82) == "");
  // 'a' cannot continue E2 82: the held bytes become one U+FFFD.
  CHECK(push_byte('a') == r + "a");
  CHECK(push_byte(0xE2) == "");
  CHECK(decoder.Flush() == r);
  CHECK(decoder.Flush() == "");

  absl::StatusOr<std::string> bad = decoder.Push(tokenizer.vocab_size());
  CHECK(bad.status().code() == absl::StatusCode::kOutOfRange);
}

TEST_CASE("Encode rejects invalid UTF-8 with the byte offset") {
  const Tokenizer& tokenizer = LoadTokenizer(kTinyTokenizer);
  const std::vector<std::pair<std::string, size_t>> cases = {
      {"abc\xFF", 3},                   // never a UTF-8 byte
      {"ab\xE2\x82", 2},                // cut short at the end
      {"x\xE2\x82y", 1},                // cut short in the middle
      {"\xC0\xAF", 0},                  // overlong
      {"ok \xED\xA0\x80", 3},           // surrogate
      {"\xF4\x90\x80\x80", 0},          // past U+10FFFF
      {"caf\xC3\xA9 \x80", 6},          // stray continuation byte
      {std::string("a\0b\xFE", 4), 3},  // NUL is valid, 0xFE is not
  };
  for (const auto& [text, offset] : cases) {
    absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(text);
    INFO(ids.status().ToString());
    CHECK(ids.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(ids.status().message()).find("byte offset " + std::to_string(offset)) !=
          std::string::npos);
  }
  CHECK(Encode(tokenizer, std::string("a\0b", 3)).size() >= 2);
}

TEST_CASE("Decode rejects ids outside the vocabulary with the id and position") {
  const Tokenizer& tokenizer = LoadTokenizer(kQwen3Tokenizer);
  for (const auto& [ids, bad_id, position] :
       std::vector<std::tuple<std::vector<int32_t>, int32_t, int>>{
           {{9707, -1}, -1, 1}, {{151669}, 151669, 0}, {{1, 2, 3, 1 << 30}, 1 << 30, 3}}) {
    for (bool skip : {false, true}) {
      absl::StatusOr<std::string> text = tokenizer.Decode(ids, skip);
      INFO(text.status().ToString());
      CHECK(text.status().code() == absl::StatusCode::kOutOfRange);
      const std::string message(text.status().message());
      CHECK(message.find("id " + std::to_string(bad_id)) != std::string::npos);
      CHECK(message.find("position " + std::to_string(position)) != std::string::npos);
      CHECK(tokenizer.DecodeBytes(ids, skip).status().code() == absl::StatusCode::kOutOfRange);
    }
  }
}

// tokenizer.json text of the bundled tokenizer after `edit`.
std::string EditedTiny(const std::function<void(Json&)>& edit) {
  Json config = Json::parse(ReadFile(kTinyTokenizer));
  edit(config);
  return config.dump();
}

void CheckLoadError(const std::string& json_text, absl::StatusCode code, const std::string& field) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::FromJson(json_text, "bad.json");
  INFO("expected an error naming " << field << "; got " << tokenizer.status().ToString());
  REQUIRE_FALSE(tokenizer.ok());
  CHECK(tokenizer.status().code() == code);
  const std::string message(tokenizer.status().message());
  CHECK(message.rfind("bad.json: ", 0) == 0);
  CHECK(message.find(field) != std::string::npos);
}

TEST_CASE("Malformed or unsupported tokenizer.json files give errors naming the field") {
  using Code = absl::StatusCode;
  const std::string tiny = ReadFile(kTinyTokenizer);
  CheckLoadError(tiny.substr(0, tiny.size() / 2), Code::kInvalidArgument, "malformed JSON");
  CheckLoadError("", Code::kInvalidArgument, "malformed JSON");
  CheckLoadError("[1, 2]", Code::kInvalidArgument, "(root)");
  // \C matches one byte of a character; the pieces after the split would not be valid UTF-8.
  CheckLoadError(EditedTiny([](Json& c) {
                   c["pre_tokenizer"] = {{"type", "Split"},
                                         {"pattern", {{"Regex", "\\C"}}},
                                         {"behavior", "Isolated"},
                                         {"invert", false}};
                 }),
                 Code::kInvalidArgument, "pre_tokenizer.pattern.Regex: PCRE2 cannot compile it");
  {
    // Each level would be one more recursion of the normalizer reader.
    constexpr int kLevels = 100000;
    std::string nested;
    for (int i = 0; i < kLevels; ++i) nested += R"({"type": "Sequence", "normalizers": [)";
    nested += R"({"type": "NFC"})";
    for (int i = 0; i < kLevels; ++i) nested += "]}";
    std::string deep = tiny;
    const std::string no_normalizer = "\"normalizer\": null";
    const size_t at = deep.find(no_normalizer);
    REQUIRE(at != std::string::npos);
    deep.replace(at, no_normalizer.size(), "\"normalizer\": " + nested);
    CheckLoadError(deep, Code::kInvalidArgument, "nested more than 64 levels deep");
  }
  CheckLoadError(EditedTiny([](Json& c) { c.erase("model"); }), Code::kInvalidArgument,
                 "model: is missing");
  CheckLoadError(EditedTiny([](Json& c) { c["model"].erase("vocab"); }), Code::kInvalidArgument,
                 "model.vocab: is missing");
  CheckLoadError(EditedTiny([](Json& c) { c["model"].erase("merges"); }), Code::kInvalidArgument,
                 "model.merges: is missing");
  CheckLoadError(EditedTiny([](Json& c) { c["model"]["type"] = "WordPiece"; }),
                 Code::kUnimplemented, "model.type: 'WordPiece'");
  CheckLoadError(EditedTiny([](Json& c) { c["model"]["type"] = "Unigram"; }), Code::kUnimplemented,
                 "model.type: 'Unigram'");
  CheckLoadError(EditedTiny([](Json& c) {
                   c["model"]["merges"][5] = {"Ġt", "no-such-token"};
                 }),
                 Code::kInvalidArgument,
                 "model.merges[5]: token 'no-such-token' is not in model.vocab");
  CheckLoadError(EditedTiny([](Json& c) { c["model"]["merges"][7] = "Ġt"; }),
                 Code::kInvalidArgument, "model.merges[7]");
  CheckLoadError(EditedTiny([](Json& c) { c["model"]["merges"][0] = 42; }), Code::kInvalidArgument,
                 "model.merges[0]");
  CheckLoadError(EditedTiny([](Json& c) { c["model"]["vocab"]["Ġt"] = -3; }),
                 Code::kInvalidArgument, "model.vocab[\"Ġt\"]");
  CheckLoadError(EditedTiny([](Json& c) { c["model"]["vocab"]["Ġt"] = "seven"; }),
                 Code::kInvalidArgument, "model.vocab[\"Ġt\"]");
  CheckLoadError(EditedTiny([](Json& c) { c["model"]["vocab"]["Ġt"] = 1 << 30; }),
                 Code::kInvalidArgument, "model.vocab[\"Ġt\"]");
  CheckLoadError(EditedTiny([](Json& c) { c["model"]["byte_fallback"] = true; }),
                 Code::kUnimplemented, "model.byte_fallback");
  CheckLoadError(EditedTiny([](Json& c) { c["model"]["dropout"] = 0.1; }), Code::kUnimplemented,
                 "model.dropout");
  CheckLoadError(EditedTiny([](Json& c) { c["model"]["unk_token"] = "<unk>"; }),
                 Code::kInvalidArgument, "model.unk_token");
  CheckLoadError(EditedTiny([](Json& c) {
                   c["normalizer"] = {{"type", "Lowercase"}};
                 }),
                 Code::kUnimplemented, "normalizer.type: normalizer 'Lowercase'");
  CheckLoadError(EditedTiny([](Json& c) {
                   c["normalizer"] = {{"type", "Sequence"},
                                      {"normalizers", {{{"type", "NFC"}}, {{"type", "Strip"}}}}};
                 }),
                 Code::kUnimplemented, "normalizer.normalizers[1].type");
  CheckLoadError(EditedTiny([](Json& c) {
                   c["pre_tokenizer"]["pretokenizers"][1] = {{"type", "Metaspace"}};
                 }),
                 Code::kUnimplemented,
                 "pre_tokenizer.pretokenizers[1].type: pre-tokenizer 'Metaspace'");
  CheckLoadError(EditedTiny([](Json& c) {
                   c["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
                 }),
                 Code::kInvalidArgument, "pre_tokenizer.pretokenizers[0].pattern.Regex");
  CheckLoadError(EditedTiny([](Json& c) {
                   c["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "[a-z[0-9]]";
                 }),
                 Code::kUnimplemented, "pre_tokenizer.pretokenizers[0].pattern.Regex");
  // Oniguruma and PCRE2 disagree on the unassigned characters; such a class is refused.
  CheckLoadError(EditedTiny([](Json& c) {
                   c["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\p{Cn}+";
                 }),
                 Code::kUnimplemented, "pre_tokenizer.pretokenizers[0].pattern.Regex: \\p{Cn}");
  CheckLoadError(
      EditedTiny([](Json& c) { c["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways"; }),
      Code::kInvalidArgument, "pre_tokenizer.pretokenizers[0].behavior");
  CheckLoadError(EditedTiny([](Json& c) {
                   c["decoder"] = {{"type", "WordPiece"}};
                 }),
                 Code::kUnimplemented, "decoder.type");
  CheckLoadError(EditedTiny([](Json& c) { c["decoder"] = nullptr; }), Code::kUnimplemented,
                 "decoder");
  CheckLoadError(EditedTiny([](Json& c) {
                   c["post_processor"] = {{"type", "RobertaProcessing"}};
                 }),
                 Code::kUnimplemented, "post_processor.type");
  CheckLoadError(EditedTiny([](Json& c) {
                   c["post_processor"]["single"][0] = {{"SpecialToken", {{"id", "<s>"}}}};
                   c["post_processor"]["single"][1] = {{"Sequence", {{"id", "A"}}}};
                 }),
                 Code::kInvalidArgument, "post_processor.special_tokens[\"<s>\"]: is missing");
  CheckLoadError(EditedTiny([](Json& c) { c["added_tokens"][1]["id"] = 7; }),
                 Code::kInvalidArgument, "added_tokens[1].id");
  CheckLoadError(EditedTiny([](Json& c) {
                   c["added_tokens"].push_back({{"id", 9000}, {"content", "<new>"}});
                 }),
                 Code::kInvalidArgument, "added_tokens[3].id: is 9000");
  CheckLoadError(EditedTiny([](Json& c) { c["added_tokens"][0].erase("content"); }),
                 Code::kInvalidArgument, "added_tokens[0].content: is missing");
  CheckLoadError(EditedTiny([](Json& c) {
                   c["truncation"] = {{"max_length", 8}};
                 }),
                 Code::kUnimplemented, "truncation");
}

TEST_CASE("No malformed tokenizer.json crashes the loader") {
  const std::string tiny = ReadFile(kTinyTokenizer);
  for (size_t length = 0; length < tiny.size(); length += tiny.size() / 40 + 1) {
    CHECK_FALSE(Tokenizer::FromJson(tiny.substr(0, length), "cut.json").ok());
  }
  const std::vector<std::string> pointers = {"/model",
                                             "/model/vocab",
                                             "/model/merges",
                                             "/model/merges/0",
                                             "/model/merges/0/1",
                                             "/model/type",
                                             "/model/ignore_merges",
                                             "/model/unk_token",
                                             "/model/fuse_unk",
                                             "/added_tokens",
                                             "/added_tokens/0",
                                             "/added_tokens/0/id",
                                             "/added_tokens/0/content",
                                             "/added_tokens/0/special",
                                             "/normalizer",
                                             "/pre_tokenizer",
                                             "/pre_tokenizer/type",
                                             "/pre_tokenizer/pretokenizers",
                                             "/pre_tokenizer/pretokenizers/0",
                                             "/pre_tokenizer/pretokenizers/0/pattern",
                                             "/pre_tokenizer/pretokenizers/0/pattern/Regex",
                                             "/pre_tokenizer/pretokenizers/0/invert",
                                             "/pre_tokenizer/pretokenizers/1/use_regex",
                                             "/post_processor",
                                             "/post_processor/single",
                                             "/post_processor/single/0",
                                             "/post_processor/special_tokens",
                                             "/decoder",
                                             "/decoder/type"};
  const std::vector<Json> replacements = {Json(42),      Json(-1),       Json("x"),
                                          Json::array(), Json::object(), Json(nullptr),
                                          Json(true),    Json(1e300),    Json({1, "a"})};
  const Json original = Json::parse(tiny);
  for (const std::string& pointer : pointers) {
    for (const Json& replacement : replacements) {
      Json config = original;
      config[Json::json_pointer(pointer)] = replacement;
      absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
          Tokenizer::FromJson(config.dump(), "mutated.json");
      INFO(pointer << " = " << replacement.dump() << ": " << tokenizer.status().ToString());
      if (tokenizer.ok()) {
        // Whatever was accepted must still encode and decode.
        absl::StatusOr<std::vector<int32_t>> ids = (*tokenizer)->Encode("Hello, world <|im_end|>");
        REQUIRE(ids.ok());
        CHECK((*tokenizer)->Decode(*ids).ok());
      } else {
        CHECK(std::string(tokenizer.status().message()).rfind("mutated.json: ", 0) == 0);
      }
    }
  }
}

TEST_CASE("FromFile reports unreadable files") {
  absl::StatusOr<std::unique_ptr<Tokenizer>> missing =
      Tokenizer::FromFile("tests/data/tokenizers/no-such-file.json");
  CHECK(missing.status().code() == absl::StatusCode::kNotFound);
  CHECK(std::string(missing.status().message()).find("no-such-file.json") != std::string::npos);

  // A gzip stream cut in the middle.
  const std::string gz = [] {
    std::ifstream file(kGpt2Tokenizer, std::ios::binary);
    std::ostringstream stream;
    stream << file.rdbuf();
    return stream.str();
  }();
  char path[] = "/tmp/lychee_tokenizer_test_XXXXXX.gz";
  const int fd = mkstemps(path, 3);
  REQUIRE(fd >= 0);
  close(fd);
  {
    std::ofstream out(path, std::ios::binary);
    out << gz.substr(0, gz.size() / 2);
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> cut = Tokenizer::FromFile(path);
  std::remove(path);
  CHECK_FALSE(cut.ok());
  CHECK(std::string(cut.status().message()).find(path) != std::string::npos);
}

TEST_CASE("Large and degenerate inputs encode and round-trip") {
  std::string emoji;
  for (int i = 0; i < 20000; ++i) emoji += "👨‍👩‍👧‍👦";
  // Llama-3's Split pattern and GPT-2's ByteLevel one, on runs that make regexes backtrack.
  for (const char* file : {kLlama3Tokenizer, kGpt2Tokenizer}) {
    const Tokenizer& tokenizer = LoadTokenizer(file);
    for (const std::string& text :
         {std::string(1 << 20, ' '), std::string(1 << 20, 'a'), std::string(1 << 18, '\n'),
          std::string(1 << 18, '<'), std::string(1 << 18, '\t') + "x", emoji}) {
      INFO(file << ", " << text.size() << " bytes starting with "
                << Json(text.substr(0, 4)).dump());
      const std::vector<int32_t> ids = Encode(tokenizer, text);
      CHECK(!ids.empty());
      CHECK(Decode(tokenizer, ids) == text);
    }
  }
}

TEST_CASE("Concurrent encodes agree") {
  const Tokenizer& tokenizer = LoadTokenizer(kQwen3Tokenizer);
  const std::vector<std::string> texts =
      Json::parse(ReadFile("tests/data/tokenizers/texts.json")).at("long_texts");
  std::vector<std::vector<int32_t>> reference;
  std::vector<std::vector<std::vector<int32_t>>> results(4);
  std::vector<std::thread> threads;
  for (auto& result : results) {
    threads.emplace_back([&tokenizer, &texts, &result] {
      for (int round = 0; round < 3; ++round) {
        for (const std::string& text : texts) result.push_back(*tokenizer.Encode(text));
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int round = 0; round < 3; ++round) {
    for (const std::string& text : texts) reference.push_back(Encode(tokenizer, text));
  }
  for (const auto& result : results) CHECK(result == reference);
}

// Hidden (run with `tokenizer_test "[perf]"`): encoding speed on about 100 KB of English.
TEST_CASE("Encoding speed", "[.][perf]") {
  const Json refs = Json::parse(ReadFile("models/tiny-llama-retrieval/parity_refs.json"));
  std::string text;
  while (text.size() < 100000) {
    for (const Json& ref : refs) text += ref.at("prompt").get<std::string>();
  }
  for (const char* file : {kLlama3Tokenizer, kQwen3Tokenizer, kGpt2Tokenizer, kTinyTokenizer}) {
    const auto load_start = std::chrono::steady_clock::now();
    absl::StatusOr<std::unique_ptr<Tokenizer>> fresh = Tokenizer::FromFile(file);
    REQUIRE(fresh.ok());
    const auto start = std::chrono::steady_clock::now();
    const std::vector<int32_t> ids = *(*fresh)->Encode(text);
    const auto cold = std::chrono::steady_clock::now();
    (void)*(*fresh)->Encode(text);
    const auto warm = std::chrono::steady_clock::now();
    using Ms = std::chrono::duration<double, std::milli>;
    WARN(file << ": load " << Ms(start - load_start).count() << " ms; " << text.size()
              << " bytes -> " << ids.size() << " ids: first encode " << Ms(cold - start).count()
              << " ms, again " << Ms(warm - cold).count() << " ms");
  }
}

}  // namespace
}  // namespace lychee
