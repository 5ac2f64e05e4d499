// Byte-level BPE from a Hugging Face tokenizer.json. The pipeline follows the Rust `tokenizers`
// crate step by step (added tokens on the raw text, normalizer, pre-tokenizers, BPE,
// post-processor, decoder) because matching its ids exactly depends on details such as where the
// normalizer runs, how empty regex matches advance and which stale merges the BPE queue still
// accepts.
#include "common/base/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <utility>
#include <variant>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/base/json_parse.h"
#include "common/base/status_macros.h"
#include "common/base/tokenizer_unicode_tables.h"
#include "common/base/utf8.h"
#include "nlohmann/json.hpp"

namespace lychee {
namespace {

using Json = nlohmann::json;

// Debian's Abseil has its own string_view, which absl::StrCat takes but std::string_view does
// not convert to.
absl::string_view Absl(std::string_view text) { return {text.data(), text.size()}; }

// ---------------------------------------------------------------------------------------------
// UTF-8

struct Utf8Prefix {
  size_t valid_length;     // bytes from the start that can still begin a valid character
  size_t expected_length;  // bytes the lead byte announces; 0 when it is no lead byte
};

// The second byte is narrower than 0x80..0xBF after these leads: that is what excludes overlong
// forms, surrogates and code points past U+10FFFF.
Utf8Prefix ScanUtf8Character(std::string_view text, size_t pos) {
  const auto lead = static_cast<unsigned char>(text[pos]);
  const size_t expected = Utf8SequenceLength(lead);
  if (expected <= 1) return {expected, expected};
  unsigned char second_min = 0x80, second_max = 0xBF;
  if (lead == 0xE0) second_min = 0xA0;
  if (lead == 0xED) second_max = 0x9F;
  if (lead == 0xF0) second_min = 0x90;
  if (lead == 0xF4) second_max = 0x8F;
  size_t valid = 1;
  while (valid < expected && pos + valid < text.size()) {
    const auto byte = static_cast<unsigned char>(text[pos + valid]);
    const bool in_range =
        valid == 1 ? byte >= second_min && byte <= second_max : byte >= 0x80 && byte <= 0xBF;
    if (!in_range) break;
    ++valid;
  }
  return {valid, expected};
}

std::optional<size_t> FirstInvalidUtf8Offset(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    if (static_cast<unsigned char>(text[pos]) < 0x80) {
      ++pos;
      continue;
    }
    const Utf8Prefix prefix = ScanUtf8Character(text, pos);
    if (prefix.expected_length == 0 || prefix.valid_length < prefix.expected_length) return pos;
    pos += prefix.valid_length;
  }
  return std::nullopt;
}

// Appends `bytes` as Rust's String::from_utf8_lossy does (one U+FFFD per maximal invalid
// subpart). With `hold_incomplete_tail`, a last character cut short by the end of `bytes` is left
// out and its length returned, so that a later call can complete it.
size_t AppendUtf8Lossy(std::string_view bytes, bool hold_incomplete_tail, std::string* out) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    if (static_cast<unsigned char>(bytes[pos]) < 0x80) {
      out->push_back(bytes[pos++]);
      continue;
    }
    const Utf8Prefix prefix = ScanUtf8Character(bytes, pos);
    if (prefix.expected_length != 0 && prefix.valid_length == prefix.expected_length) {
      out->append(bytes.substr(pos, prefix.valid_length));
      pos += prefix.valid_length;
      continue;
    }
    if (hold_incomplete_tail && prefix.expected_length != 0 &&
        pos + prefix.valid_length == bytes.size()) {
      return bytes.size() - pos;
    }
    AppendUtf8(0xFFFD, out);
    pos += std::max<size_t>(prefix.valid_length, 1);
  }
  return 0;
}

size_t StartOfLastCharacter(std::string_view text) {
  size_t pos = text.size() - 1;
  while (pos > 0 && (static_cast<unsigned char>(text[pos]) & 0xC0) == 0x80) --pos;
  return pos;
}

// ---------------------------------------------------------------------------------------------
// Rust's `regex` crate's \s, which decides added-token whitespace stripping.

bool IsUnicodeWhiteSpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

size_t LeadingWhiteSpaceLength(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t length;
    if (!IsUnicodeWhiteSpace(DecodeUtf8At(text, pos, &length))) break;
    pos += length;
  }
  return pos;
}

size_t StartOfTrailingWhiteSpace(std::string_view text) {
  size_t end = text.size();
  while (end > 0) {
    const size_t start = StartOfLastCharacter(text.substr(0, end));
    size_t length;
    if (!IsUnicodeWhiteSpace(DecodeUtf8At(text, start, &length))) break;
    end = start;
  }
  return end;
}

// ---------------------------------------------------------------------------------------------
// GPT-2's byte-to-unicode table: printable bytes stand for themselves and the others are moved
// to U+0100 onwards, so that every byte is a visible character of the vocabulary.

struct ByteLevelAlphabet {
  std::array<std::string, 256> byte_to_utf8;
  // Indexed by code point; -1 where the character stands for no byte.
  std::array<int16_t, 0x144> code_point_to_byte;
};

const ByteLevelAlphabet& GetByteLevelAlphabet() {
  static const ByteLevelAlphabet* alphabet = [] {
    auto* result = new ByteLevelAlphabet;
    result->code_point_to_byte.fill(-1);
    char32_t next_shifted = 0x100;
    for (int byte = 0; byte < 256; ++byte) {
      const bool printable = (byte >= 0x21 && byte <= 0x7E) || (byte >= 0xA1 && byte <= 0xAC) ||
                             (byte >= 0xAE && byte <= 0xFF);
      const char32_t code_point = printable ? static_cast<char32_t>(byte) : next_shifted++;
      AppendUtf8(code_point, &result->byte_to_utf8[byte]);
      result->code_point_to_byte[code_point] = static_cast<int16_t>(byte);
    }
    return result;
  }();
  return *alphabet;
}

std::string ToByteLevel(std::string_view text) {
  const ByteLevelAlphabet& alphabet = GetByteLevelAlphabet();
  std::string mapped;
  mapped.reserve(text.size() * 2);
  for (char byte : text) mapped += alphabet.byte_to_utf8[static_cast<unsigned char>(byte)];
  return mapped;
}

// The ByteLevel decoder's view of one token: its characters turned back into bytes, or the
// token's own text when some character stands for no byte (as added tokens may contain).
std::string FromByteLevel(std::string_view token) {
  const ByteLevelAlphabet& alphabet = GetByteLevelAlphabet();
  std::string bytes;
  size_t pos = 0;
  while (pos < token.size()) {
    size_t length;
    const char32_t code_point = DecodeUtf8At(token, pos, &length);
    if (code_point >= alphabet.code_point_to_byte.size() ||
        alphabet.code_point_to_byte[code_point] < 0) {
      return std::string(token);
    }
    bytes.push_back(static_cast<char>(alphabet.code_point_to_byte[code_point]));
    pos += length;
  }
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// Regular expressions. tokenizer.json patterns are written for Oniguruma (what `tokenizers`
// compiles them with); PCRE2 runs them once rewritten to put the same characters in each class.

std::string HexEscape(char32_t code_point) {
  std::string escape = "\\x{";
  absl::StrAppend(&escape, absl::Hex(static_cast<uint32_t>(code_point)), "}");
  return escape;
}

// The items of a PCRE2 character class matching general category `name` as Oniguruma does,
// or nullopt when `name` is no general category (PCRE2 then takes it as written).
absl::StatusOr<std::optional<std::string>> CategoryClassItems(std::string_view name) {
  for (const tokenizer_unicode::CategoryExtras& extras : tokenizer_unicode::kCategoryExtras) {
    if (name != extras.category) continue;
    if (extras.pcre2_has_more) {
      return absl::UnimplementedError(
          absl::StrCat("\\p{", Absl(name),
                       "}: PCRE2's Unicode tables put characters in it that Oniguruma's do not"));
    }
    std::string items = absl::StrCat("\\p{", Absl(name), "}");
    for (int i = 0; i < extras.range_count; ++i) {
      const tokenizer_unicode::CodePointRange& range = extras.ranges[i];
      absl::StrAppend(&items, HexEscape(range.first));
      if (range.last != range.first) absl::StrAppend(&items, "-", HexEscape(range.last));
    }
    return items;
  }
  return std::nullopt;
}

// Class items for one of the categories the shorthands are made of (none of them is refused).
std::string ShorthandCategoryItems(std::string_view name) {
  absl::StatusOr<std::optional<std::string>> items = CategoryClassItems(name);
  return items.ok() && items->has_value() ? **items : absl::StrCat("\\p{", Absl(name), "}");
}

// Class items for the shorthands whose Unicode meaning differs between the two engines:
// Oniguruma's \s is White_Space (it includes U+0085, PCRE2's does not) and its \w includes marks
// but only decimal digits among numbers.
const std::string& ShorthandClassItems(char shorthand) {
  static const std::string* const kSpace =
      new std::string(absl::StrCat("\\t-\\r\\x{85}", ShorthandCategoryItems("Z")));
  static const std::string* const kWord =
      new std::string(absl::StrCat(ShorthandCategoryItems("L"), ShorthandCategoryItems("M"),
                                   ShorthandCategoryItems("Nd"), ShorthandCategoryItems("Pc")));
  static const std::string* const kDigit = new std::string(ShorthandCategoryItems("Nd"));
  switch (shorthand) {
    case 's':
      return *kSpace;
    case 'w':
      return *kWord;
    default:
      return *kDigit;
  }
}

// Rewrites an Oniguruma pattern for PCRE2: shorthands and general categories are spelled out so
// that both engines put the same characters in them (PCRE2 10.42 knows Unicode 14, the Oniguruma
// in `tokenizers` Unicode 16); what cannot be rewritten faithfully is refused.
absl::StatusOr<std::string> OnigurumaToPcre2(std::string_view pattern) {
  std::string translated;
  bool in_class = false;
  // Appends class items, wrapped in a class of their own outside one.
  auto append_set = [&](const std::string& items, bool negated,
                        std::string_view original) -> absl::Status {
    if (!in_class) {
      absl::StrAppend(&translated, negated ? "[^" : "[", items, "]");
    } else if (!negated) {
      translated += items;
    } else {
      return absl::UnimplementedError(absl::StrCat(
          Absl(original), " inside a character class cannot be matched as Oniguruma does"));
    }
    return absl::OkStatus();
  };
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\') {
      if (i + 1 == pattern.size()) return absl::InvalidArgumentError("ends with a lone backslash");
      const size_t escape_start = i;
      const char escaped = pattern[++i];
      switch (escaped) {
        case 's':
        case 'w':
        case 'd':
        case 'S':
        case 'W':
        case 'D': {
          const char lower = static_cast<char>(escaped | 0x20);
          LYCHEE_RETURN_IF_ERROR(append_set(ShorthandClassItems(lower), escaped != lower,
                                            pattern.substr(escape_start, 2)));
          continue;
        }
        case 'p':
        case 'P': {
          std::string_view name;
          if (i + 1 < pattern.size() && pattern[i + 1] == '{') {
            const size_t close = pattern.find('}', i + 2);
            if (close == std::string_view::npos) {
              return absl::InvalidArgumentError("unterminated \\p{...}");
            }
            name = pattern.substr(i + 2, close - i - 2);
            i = close;
          } else if (i + 1 < pattern.size()) {
            name = pattern.substr(++i, 1);
          }
          const std::string_view original = pattern.substr(escape_start, i + 1 - escape_start);
          bool negated = escaped == 'P';
          if (!name.empty() && name[0] == '^') {
            negated = !negated;
            name.remove_prefix(1);
          }
          LYCHEE_ASSIGN_OR_RETURN(std::optional<std::string> items, CategoryClassItems(name));
          if (!items.has_value()) {
            translated += original;
          } else if (in_class && negated && *items == absl::StrCat("\\p{", Absl(name), "}")) {
            absl::StrAppend(&translated, "\\P{", Absl(name), "}");
          } else {
            LYCHEE_RETURN_IF_ERROR(append_set(*items, negated, original));
          }
          continue;
        }
        case 'h':
        case 'H':
          return absl::UnimplementedError(
              "\\h and \\H (hex digits in Oniguruma) are not supported");
        case 'u':
          // Oniguruma's \uHHHH is PCRE2's \x{HHHH}.
          if (i + 4 >= pattern.size()) return absl::InvalidArgumentError("truncated \\u escape");
          absl::StrAppend(&translated, "\\x{", Absl(pattern.substr(i + 1, 4)), "}");
          i += 4;
          continue;
        default:
          translated += '\\';
          translated += escaped;
          continue;
      }
    }
    if (in_class) {
      if (c == '[') {
        if (pattern.substr(i, 2) != "[:") {
          return absl::UnimplementedError("nested character classes are not supported");
        }
        const size_t end = pattern.find(":]", i + 2);
        if (end == std::string_view::npos) {
          return absl::InvalidArgumentError("unterminated POSIX bracket expression");
        }
        translated += pattern.substr(i, end + 2 - i);
        i = end + 1;
        continue;
      }
      if (c == '&' && i + 1 < pattern.size() && pattern[i + 1] == '&') {
        return absl::UnimplementedError("character class intersection (&&) is not supported");
      }
      if (c == ']') in_class = false;
      translated += c;
      continue;
    }
    translated += c;
    if (c == '[') {
      in_class = true;
      // A ']' first in a class is a literal in both dialects.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') translated += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') translated += pattern[++i];
    }
  }
  if (in_class) return absl::InvalidArgumentError("unterminated character class");
  return translated;
}

struct Span {
  size_t start;
  size_t end;
};

class Regex {
 public:
  static absl::StatusOr<Regex> FromOniguruma(std::string_view pattern) {
    LYCHEE_ASSIGN_OR_RETURN(std::string translated, OnigurumaToPcre2(pattern));
    // Oniguruma's Ruby syntax makes ^ and $ line anchors. \C would match single bytes and cut
    // characters apart, and the pieces must stay valid UTF-8 (later splits match them unchecked,
    // BPE walks them character by character).
    return Compile(translated, PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE | PCRE2_NEVER_BACKSLASH_C);
  }
  static absl::StatusOr<Regex> Literal(std::string_view text) {
    return Compile(text, PCRE2_UTF | PCRE2_LITERAL);
  }

  // Whether the pattern matches at `pos` of `text` (valid UTF-8).
  bool MatchesAt(std::string_view text, size_t pos) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> match_data(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr), &pcre2_match_data_free);
    return match_data != nullptr &&
           pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), pos,
                       PCRE2_ANCHORED | PCRE2_NO_UTF_CHECK, match_data.get(), nullptr) >= 0;
  }

  // The matches in `text` (valid UTF-8) as Oniguruma's find_iter yields them: after an empty
  // match, the search moves on one character instead of retrying at the same place.
  absl::Status FindAll(std::string_view text, std::vector<Span>* matches) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> match_data(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr), &pcre2_match_data_free);
    if (match_data == nullptr) return absl::ResourceExhaustedError("PCRE2 match data");
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t search_from = 0;
    std::optional<size_t> last_match_end;
    while (search_from <= text.size()) {
      const int rc = pcre2_match(code_.get(), subject, text.size(), search_from, PCRE2_NO_UTF_CHECK,
                                 match_data.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) return absl::InternalError(absl::StrCat("PCRE2 match failed: ", ErrorText(rc)));
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match_data.get());
      const Span match{ovector[0], std::max(ovector[0], ovector[1])};
      if (match.start == match.end && last_match_end == match.end) {
        search_from +=
            search_from < text.size() ? Utf8SequenceLength(text[search_from]) : size_t{1};
        continue;
      }
      matches->push_back(match);
      search_from = match.end;
      last_match_end = match.end;
    }
    return absl::OkStatus();
  }

 private:
  static std::string ErrorText(int code) {
    PCRE2_UCHAR buffer[256];
    pcre2_get_error_message(code, buffer, sizeof(buffer));
    return reinterpret_cast<const char*>(buffer);
  }

  static absl::StatusOr<Regex> Compile(std::string_view pattern, uint32_t options) {
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     options, &error_code, &error_offset, nullptr);
    if (code == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("PCRE2 cannot compile it (at offset ",
                                                     error_offset, "): ", ErrorText(error_code)));
    }
    // Without JIT support pcre2_match interprets the pattern: slower, same matches.
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    Regex regex;
    regex.code_ = std::shared_ptr<pcre2_code>(code, &pcre2_code_free);
    return regex;
  }

  std::shared_ptr<pcre2_code> code_;
};

// The byte-level pre-tokenizer's own pattern when use_regex is true (the GPT-2 one).
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Rust's Unicode \w, which decides added-token word boundaries: Alphabetic, marks, decimal
// digits, connector punctuation and the joiners. Alphabetic is letters, letter numbers and the
// Other_Alphabetic characters that are not marks (circled and squared Latin letters).
bool IsWordCharacterAt(std::string_view text, size_t pos) {
  static const Regex* const kWordCharacter = new Regex(*Regex::FromOniguruma(
      R"([\p{L}\p{Nl}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}\x{24B6}-\x{24E9}\x{1F130}-\x{1F149})"
      R"(\x{1F150}-\x{1F169}\x{1F170}-\x{1F189}])"));
  return kWordCharacter->MatchesAt(text, pos);
}

bool StartsWithWordCharacter(std::string_view text) {
  return !text.empty() && IsWordCharacterAt(text, 0);
}

bool EndsWithWordCharacter(std::string_view text) {
  return !text.empty() && IsWordCharacterAt(text, StartOfLastCharacter(text));
}

// ---------------------------------------------------------------------------------------------
// Pipeline pieces.

// A stretch of text on its way to the model, or an added token already recognized.
struct Piece {
  std::string text;
  std::optional<int32_t> added_token_id;
};

enum class NormalForm { kNfc, kNfd, kNfkc, kNfkd };

bool IsUnknownToNormalizers(char32_t code_point) {
  const auto& ranges = tokenizer_unicode::kUnknownToNormalizers;
  auto it = std::upper_bound(std::begin(ranges), std::end(ranges), code_point,
                             [](char32_t value, const tokenizer_unicode::CodePointRange& range) {
                               return value < range.first;
                             });
  return it != std::begin(ranges) && code_point <= std::prev(it)->last;
}

// A private-use character: a starter without decomposition, as unassigned characters are.
constexpr char32_t kNormalizationPlaceholder = 0xF0000;

// utf8proc knows a newer Unicode than the normalization tables inside `tokenizers`, so the
// characters those tables lack are swapped for a placeholder that utf8proc leaves alone, and put
// back afterwards. Normalization keeps the order of starters, so they come back in order.
std::string Normalize(std::string_view text, absl::Span<const NormalForm> forms) {
  std::string result(text);
  if (forms.empty()) return result;
  // ASCII is invariant under every normal form, and most text is ASCII.
  if (std::all_of(text.begin(), text.end(), [](char c) { return (c & 0x80) == 0; })) return result;
  std::vector<char32_t> hidden;
  std::string masked;
  for (size_t pos = 0; pos < text.size();) {
    size_t length;
    const char32_t code_point = DecodeUtf8At(text, pos, &length);
    if (code_point == kNormalizationPlaceholder || IsUnknownToNormalizers(code_point)) {
      if (hidden.empty()) masked.assign(text.substr(0, pos));
      hidden.push_back(code_point);
      AppendUtf8(kNormalizationPlaceholder, &masked);
    } else if (!hidden.empty()) {
      masked.append(text.substr(pos, length));
    }
    pos += length;
  }
  if (!hidden.empty()) result = masked;
  for (NormalForm form : forms) {
    int options = UTF8PROC_STABLE;
    switch (form) {
      case NormalForm::kNfc:
        options |= UTF8PROC_COMPOSE;
        break;
      case NormalForm::kNfd:
        options |= UTF8PROC_DECOMPOSE;
        break;
      case NormalForm::kNfkc:
        options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
        break;
      case NormalForm::kNfkd:
        options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
        break;
    }
    utf8proc_uint8_t* mapped = nullptr;
    const utf8proc_ssize_t length =
        utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(result.data()),
                     static_cast<utf8proc_ssize_t>(result.size()), &mapped,
                     static_cast<utf8proc_option_t>(options));
    // The input is valid UTF-8, so utf8proc can only fail on memory; the text is then kept.
    if (length >= 0) result.assign(reinterpret_cast<const char*>(mapped), length);
    std::free(mapped);
  }
  if (hidden.empty()) return result;
  std::string placeholder;
  AppendUtf8(kNormalizationPlaceholder, &placeholder);
  std::string restored;
  size_t next_hidden = 0;
  for (size_t pos = 0; pos < result.size();) {
    const size_t found = result.find(placeholder, pos);
    restored.append(result, pos, found == std::string::npos ? std::string::npos : found - pos);
    if (found == std::string::npos) break;
    // Normalization makes no placeholder of its own, so there is one hidden character for each.
    AppendUtf8(next_hidden < hidden.size() ? hidden[next_hidden++] : kNormalizationPlaceholder,
               &restored);
    pos = found + placeholder.size();
  }
  return restored;
}

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
  bool special = false;
};

// Leftmost-longest search over a fixed set of strings (the aho-corasick mode `tokenizers` uses).
// Added tokens are few, so candidates are bucketed by first byte, longest first.
class AddedTokenMatcher {
 public:
  struct Match {
    size_t start;
    size_t end;
    size_t token_index;
  };

  void Add(std::string pattern, size_t token_index) {
    auto& bucket = by_first_byte_[static_cast<unsigned char>(pattern[0])];
    bucket.push_back({std::move(pattern), token_index});
    std::stable_sort(bucket.begin(), bucket.end(), [](const Candidate& a, const Candidate& b) {
      return a.pattern.size() > b.pattern.size();
    });
    empty_ = false;
  }

  bool empty() const { return empty_; }

  std::optional<Match> Find(std::string_view text, size_t from) const {
    for (size_t start = from; start < text.size(); ++start) {
      for (const Candidate& candidate : by_first_byte_[static_cast<unsigned char>(text[start])]) {
        if (text.compare(start, candidate.pattern.size(), candidate.pattern) == 0) {
          return Match{start, start + candidate.pattern.size(), candidate.token_index};
        }
      }
    }
    return std::nullopt;
  }

 private:
  struct Candidate {
    std::string pattern;
    size_t token_index;
  };
  std::array<std::vector<Candidate>, 256> by_first_byte_;
  bool empty_ = true;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct SplitPreTokenizer {
  Regex regex;
  SplitBehavior behavior;
  bool invert;
};

struct ByteLevelPreTokenizer {
  bool add_prefix_space;
  std::optional<Regex> gpt2_regex;  // set when use_regex is true
};

using PreTokenizer = std::variant<SplitPreTokenizer, ByteLevelPreTokenizer>;

// Where the pieces of `text` lie after a split, as NormalizedString::split computes them.
absl::StatusOr<std::vector<Span>> SplitSpans(const Regex& regex, std::string_view text,
                                             SplitBehavior behavior, bool invert) {
  std::vector<Span> matches;
  LYCHEE_RETURN_IF_ERROR(regex.FindAll(text, &matches));
  struct Run {
    Span span;
    bool is_match;
  };
  std::vector<Run> runs;  // the matches and the gaps between them, covering all of `text`
  size_t previous_end = 0;
  for (const Span& match : matches) {
    if (previous_end != match.start) runs.push_back({{previous_end, match.start}, invert});
    runs.push_back({match, !invert});
    previous_end = match.end;
  }
  if (previous_end != text.size()) runs.push_back({{previous_end, text.size()}, invert});

  std::vector<Span> spans;
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const Run& run : runs) spans.push_back(run.span);
      break;
    case SplitBehavior::kRemoved:
      for (const Run& run : runs) {
        if (!run.is_match) spans.push_back(run.span);
      }
      break;
    case SplitBehavior::kContiguous:
      for (const Run& run : runs) {
        if (run.is_match == previous_match && !spans.empty()) {
          spans.back().end = run.span.end;
        } else {
          spans.push_back(run.span);
        }
        previous_match = run.is_match;
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const Run& run : runs) {
        if (run.is_match && !previous_match && !spans.empty()) {
          spans.back().end = run.span.end;
        } else {
          spans.push_back(run.span);
        }
        previous_match = run.is_match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto run = runs.rbegin(); run != runs.rend(); ++run) {
        if (run->is_match && !previous_match && !spans.empty()) {
          spans.back().start = run->span.start;
        } else {
          spans.push_back(run->span);
        }
        previous_match = run->is_match;
      }
      std::reverse(spans.begin(), spans.end());
      break;
  }
  return spans;
}

void AppendNonEmptyPieces(std::string_view text, absl::Span<const Span> spans,
                          std::vector<Piece>* out) {
  for (const Span& span : spans) {
    if (span.end > span.start) {
      out->push_back({std::string(text.substr(span.start, span.end - span.start)), std::nullopt});
    }
  }
}

absl::Status ApplyPreTokenizer(const PreTokenizer& pre_tokenizer, std::vector<Piece>* pieces) {
  std::vector<Piece> result;
  result.reserve(pieces->size());
  for (Piece& piece : *pieces) {
    if (piece.added_token_id.has_value()) {
      result.push_back(std::move(piece));
      continue;
    }
    if (const auto* split = std::get_if<SplitPreTokenizer>(&pre_tokenizer)) {
      LYCHEE_ASSIGN_OR_RETURN(std::vector<Span> spans,
                              SplitSpans(split->regex, piece.text, split->behavior, split->invert));
      AppendNonEmptyPieces(piece.text, spans, &result);
      continue;
    }
    const auto& byte_level = std::get<ByteLevelPreTokenizer>(pre_tokenizer);
    std::string text = std::move(piece.text);
    if (byte_level.add_prefix_space && text[0] != ' ') text.insert(0, 1, ' ');
    const size_t first_new = result.size();
    if (byte_level.gpt2_regex.has_value()) {
      LYCHEE_ASSIGN_OR_RETURN(
          std::vector<Span> spans,
          SplitSpans(*byte_level.gpt2_regex, text, SplitBehavior::kIsolated, /*invert=*/false));
      AppendNonEmptyPieces(text, spans, &result);
    } else {
      result.push_back({std::move(text), std::nullopt});
    }
    for (size_t i = first_new; i < result.size(); ++i) result[i].text = ToByteLevel(result[i].text);
  }
  *pieces = std::move(result);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// The BPE model.

class BpeModel {
 public:
  struct Merge {
    uint32_t rank;
    int32_t merged_id;
  };

  // Filled in by TokenizerJsonReader, then IndexSingleCharacters() is called.
  std::unordered_map<std::string, int32_t> vocab;
  std::unordered_map<uint64_t, Merge> merges;  // by PairKey
  bool ignore_merges = false;
  std::optional<int32_t> unknown_id;
  bool fuse_unknown = false;

  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }

  // Single characters are looked up in a table when their code point is small, which covers
  // the whole byte-level alphabet.
  void IndexSingleCharacters() {
    single_character_ids_.fill(-1);
    for (const auto& [token, id] : vocab) {
      size_t length;
      if (token.empty() || Utf8SequenceLength(token[0]) != token.size()) continue;
      const char32_t code_point = DecodeUtf8At(token, 0, &length);
      if (code_point < single_character_ids_.size()) single_character_ids_[code_point] = id;
    }
  }

  void Tokenize(const std::string& word, std::vector<int32_t>* ids) const {
    if (word.empty()) return;
    if (ignore_merges) {
      if (auto it = vocab.find(word); it != vocab.end()) {
        ids->push_back(it->second);
        return;
      }
    }
    {
      absl::MutexLock lock(&cache_mutex_);
      if (auto it = cache_.find(word); it != cache_.end()) {
        ids->insert(ids->end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> word_ids = MergeWord(word);
    ids->insert(ids->end(), word_ids.begin(), word_ids.end());
    if (word.size() <= kMaxCachedWordLength) {
      absl::MutexLock lock(&cache_mutex_);
      if (cache_.size() < kMaxCachedWords) cache_.emplace(word, std::move(word_ids));
    }
  }

 private:
  static constexpr size_t kMaxCachedWords = 100000;
  static constexpr size_t kMaxCachedWordLength = 256;

  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool merged_away;
  };

  struct Candidate {
    uint32_t rank;
    int32_t pos;
    int32_t merged_id;
  };

  // Orders the queue as `tokenizers` does: lowest rank first, then leftmost.
  struct ComesLater {
    bool operator()(const Candidate& a, const Candidate& b) const {
      return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
    }
  };

  std::optional<int32_t> CharacterId(std::string_view character) const {
    size_t length;
    const char32_t code_point = DecodeUtf8At(character, 0, &length);
    if (code_point < single_character_ids_.size()) {
      const int32_t id = single_character_ids_[code_point];
      return id >= 0 ? std::optional<int32_t>(id) : std::nullopt;
    }
    auto it = vocab.find(std::string(character));
    return it != vocab.end() ? std::optional<int32_t>(it->second) : std::nullopt;
  }

  const Merge* FindMerge(int32_t left, int32_t right) const {
    auto it = merges.find(PairKey(left, right));
    return it != merges.end() ? &it->second : nullptr;
  }

  // A port of BPE::merge_word and Word::merge_all: characters missing from the vocabulary
  // become the unknown token (fused if asked) or vanish when there is none, as in `tokenizers`.
  std::vector<int32_t> MergeWord(std::string_view word) const {
    std::vector<Symbol> symbols;
    symbols.reserve(word.size());
    bool pending_unknown = false;
    auto flush_unknown = [&] {
      if (pending_unknown) symbols.push_back({*unknown_id, 0, 0, false});
      pending_unknown = false;
    };
    for (size_t pos = 0; pos < word.size();) {
      const size_t length = Utf8SequenceLength(word[pos]);
      if (std::optional<int32_t> id = CharacterId(word.substr(pos, length))) {
        flush_unknown();
        symbols.push_back({*id, 0, 0, false});
      } else if (unknown_id.has_value()) {
        if (!fuse_unknown) flush_unknown();
        pending_unknown = true;
      }
      pos += length;
    }
    flush_unknown();
    const auto count = static_cast<int32_t>(symbols.size());
    for (int32_t i = 0; i < count; ++i) {
      symbols[i].prev = i - 1;
      symbols[i].next = i + 1 < count ? i + 1 : -1;
    }

    std::priority_queue<Candidate, std::vector<Candidate>, ComesLater> queue;
    for (int32_t i = 0; i + 1 < count; ++i) {
      if (const Merge* merge = FindMerge(symbols[i].id, symbols[i + 1].id)) {
        queue.push({merge->rank, i, merge->merged_id});
      }
    }
    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      Symbol& left = symbols[top.pos];
      if (left.merged_away || left.next < 0) continue;
      const int32_t right_pos = left.next;
      const Symbol right = symbols[right_pos];
      // The entry may be stale; like `tokenizers`, only the merged id is checked, not the rank.
      const Merge* current = FindMerge(left.id, right.id);
      if (current == nullptr || current->merged_id != top.merged_id) continue;
      left.id = top.merged_id;
      left.next = right.next;
      symbols[right_pos].merged_away = true;
      if (right.next >= 0) symbols[right.next].prev = top.pos;
      if (left.prev >= 0) {
        if (const Merge* merge = FindMerge(symbols[left.prev].id, left.id)) {
          queue.push({merge->rank, left.prev, merge->merged_id});
        }
      }
      if (left.next >= 0) {
        if (const Merge* merge = FindMerge(left.id, symbols[left.next].id)) {
          queue.push({merge->rank, top.pos, merge->merged_id});
        }
      }
    }
    std::vector<int32_t> ids;
    for (const Symbol& symbol : symbols) {
      if (!symbol.merged_away) ids.push_back(symbol.id);
    }
    return ids;
  }

  std::array<int32_t, 0x180> single_character_ids_;
  mutable absl::Mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_ ABSL_GUARDED_BY(cache_mutex_);
};

// ---------------------------------------------------------------------------------------------
// The tokenizer.

// One TemplateProcessing template for a single sequence: special-token ids around it.
struct SingleTemplate {
  std::vector<int32_t> before;
  std::vector<int32_t> after;
};

class ByteLevelBpeTokenizer final : public Tokenizer {
 public:
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens) const override {
    if (std::optional<size_t> offset = FirstInvalidUtf8Offset(text)) {
      return absl::InvalidArgumentError(
          absl::StrCat("Encode: the text is not valid UTF-8 at byte offset ", *offset));
    }
    std::vector<Piece> raw_pieces;
    SplitOnAddedTokens(text, raw_matcher_, &raw_pieces);
    // Tokens marked `normalized` are found in the normalized text of what is left.
    std::vector<Piece> pieces;
    for (Piece& piece : raw_pieces) {
      if (piece.added_token_id.has_value()) {
        pieces.push_back(std::move(piece));
      } else {
        SplitOnAddedTokens(Normalize(piece.text, normal_forms_), normalized_matcher_, &pieces);
      }
    }
    for (const PreTokenizer& pre_tokenizer : pre_tokenizers_) {
      LYCHEE_RETURN_IF_ERROR(ApplyPreTokenizer(pre_tokenizer, &pieces));
    }
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 3 + 8);
    for (const Piece& piece : pieces) {
      if (piece.added_token_id.has_value()) {
        ids.push_back(*piece.added_token_id);
      } else {
        model_.Tokenize(piece.text, &ids);
      }
    }
    if (add_special_tokens) {
      for (const SingleTemplate& single : templates_) {
        ids.insert(ids.begin(), single.before.begin(), single.before.end());
        ids.insert(ids.end(), single.after.begin(), single.after.end());
      }
    }
    return ids;
  }

  absl::StatusOr<std::string> DecodeBytes(absl::Span<const int32_t> ids,
                                          bool skip_special_tokens) const override {
    std::string bytes;
    for (size_t position = 0; position < ids.size(); ++position) {
      const int32_t id = ids[position];
      if (!IsKnownId(id)) {
        return absl::OutOfRangeError(absl::StrCat("Decode: id ", id, " at position ", position,
                                                  " is not in the vocabulary (size ", vocab_size(),
                                                  ")"));
      }
      if (skip_special_tokens && (id_flags_[id] & kSpecialId) != 0) continue;
      bytes.append(decoded_bytes_, decoded_offsets_[id],
                   decoded_offsets_[id + 1] - decoded_offsets_[id]);
    }
    return bytes;
  }

  int32_t vocab_size() const override { return static_cast<int32_t>(id_flags_.size()); }

  std::optional<int32_t> TokenToId(std::string_view token) const override {
    const std::string key(token);
    if (auto it = added_token_ids_.find(key); it != added_token_ids_.end()) return it->second;
    if (auto it = model_.vocab.find(key); it != model_.vocab.end()) return it->second;
    return std::nullopt;
  }

  bool IsSpecial(int32_t id) const override {
    return id >= 0 && id < vocab_size() && (id_flags_[id] & kSpecialId) != 0;
  }

 private:
  friend class TokenizerJsonReader;

  // AddedVocabulary::find_matches: cuts `text` at added tokens, honouring single_word, lstrip
  // and rstrip, and appends the non-empty pieces.
  void SplitOnAddedTokens(std::string_view text, const AddedTokenMatcher& matcher,
                          std::vector<Piece>* out) const {
    size_t piece_start = 0;
    size_t search_from = 0;
    while (!matcher.empty()) {
      std::optional<AddedTokenMatcher::Match> match = matcher.Find(text, search_from);
      if (!match.has_value()) break;
      search_from = match->end;
      const AddedToken& token = added_tokens_[match->token_index];
      size_t start = match->start;
      size_t stop = match->end;
      if (token.single_word && ((start > 0 && EndsWithWordCharacter(text.substr(0, start))) ||
                                StartsWithWordCharacter(text.substr(stop)))) {
        continue;
      }
      if (token.lstrip) {
        // Whitespace a previous token already took stays with it.
        start = std::max(StartOfTrailingWhiteSpace(text.substr(0, start)), piece_start);
      }
      if (token.rstrip) stop += LeadingWhiteSpaceLength(text.substr(stop));
      if (piece_start < start) {
        out->push_back({std::string(text.substr(piece_start, start - piece_start)), std::nullopt});
      }
      out->push_back({std::string(text.substr(start, stop - start)), token.id});
      piece_start = stop;
    }
    if (piece_start < text.size()) {
      out->push_back({std::string(text.substr(piece_start)), std::nullopt});
    }
  }

  bool IsKnownId(int32_t id) const {
    return id >= 0 && id < vocab_size() && (id_flags_[id] & kKnownId) != 0;
  }

  std::vector<AddedToken> added_tokens_;
  std::unordered_map<std::string, int32_t> added_token_ids_;
  AddedTokenMatcher raw_matcher_;
  AddedTokenMatcher normalized_matcher_;
  std::vector<NormalForm> normal_forms_;
  std::vector<PreTokenizer> pre_tokenizers_;
  BpeModel model_;
  std::vector<SingleTemplate> templates_;
  // What each id decodes to, back to back: id i is decoded_bytes_[decoded_offsets_[i]] up to
  // decoded_bytes_[decoded_offsets_[i + 1]].
  std::string decoded_bytes_;
  std::vector<uint32_t> decoded_offsets_;
  static constexpr uint8_t kKnownId = 1;  // some token has the id
  static constexpr uint8_t kSpecialId = 2;
  std::vector<uint8_t> id_flags_;
};

// ---------------------------------------------------------------------------------------------
// Reading tokenizer.json.

// Ids index flat tables, so absurd ids are refused rather than allocated for.
constexpr int64_t kMaxTokenId = (int64_t{1} << 22) - 1;

class TokenizerJsonReader {
 public:
  explicit TokenizerJsonReader(std::string_view source) : source_(source) {}

  absl::StatusOr<std::unique_ptr<Tokenizer>> Read(const Json& root) {
    if (!root.is_object()) return Invalid("(root)", "must be a JSON object");
    auto tokenizer = std::make_unique<ByteLevelBpeTokenizer>();
    for (const char* field : {"truncation", "padding"}) {
      if (Optional(root, field) != nullptr) {
        return Unsupported(field,
                           "only null is supported (the encoding must not be cut or padded)");
      }
    }
    LYCHEE_ASSIGN_OR_RETURN(const Json* model, Required(root, "model", ""));
    LYCHEE_RETURN_IF_ERROR(ReadModel(*model, &tokenizer->model_));
    // The normalizer comes before the added tokens: normalized ones are matched normalized.
    if (const Json* normalizer = Optional(root, "normalizer")) {
      LYCHEE_RETURN_IF_ERROR(ReadNormalizer(*normalizer, "normalizer", &tokenizer->normal_forms_));
    }
    if (const Json* added_tokens = Optional(root, "added_tokens")) {
      LYCHEE_RETURN_IF_ERROR(ReadAddedTokens(*added_tokens, tokenizer.get()));
    }
    if (const Json* pre_tokenizer = Optional(root, "pre_tokenizer")) {
      LYCHEE_RETURN_IF_ERROR(
          ReadPreTokenizer(*pre_tokenizer, "pre_tokenizer", &tokenizer->pre_tokenizers_));
    }
    BuildDecodeTable(tokenizer.get());
    if (const Json* post_processor = Optional(root, "post_processor")) {
      LYCHEE_RETURN_IF_ERROR(ReadPostProcessor(*post_processor, "post_processor", tokenizer.get()));
    }
    const Json* decoder = Optional(root, "decoder");
    if (decoder == nullptr) {
      return Unsupported("decoder", "is missing; only the ByteLevel decoder is supported");
    }
    LYCHEE_ASSIGN_OR_RETURN(std::string decoder_type, TypeOf(*decoder, "decoder"));
    if (decoder_type != "ByteLevel") {
      return Unsupported("decoder.type",
                         absl::StrCat("'", decoder_type, "' is not supported (only ByteLevel)"));
    }
    return std::unique_ptr<Tokenizer>(std::move(tokenizer));
  }

 private:
  absl::Status Invalid(absl::string_view field, absl::string_view problem) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", field, ": ", problem));
  }
  absl::Status Unsupported(absl::string_view field, absl::string_view problem) const {
    return absl::UnimplementedError(absl::StrCat(source_, ": ", field, ": ", problem));
  }

  static std::string Path(absl::string_view parent, absl::string_view key) {
    return parent.empty() ? std::string(key) : absl::StrCat(parent, ".", key);
  }

  // The member, or nullptr when it is absent or null.
  static const Json* Optional(const Json& object, const char* key) {
    auto it = object.find(key);
    return it == object.end() || it->is_null() ? nullptr : &*it;
  }

  absl::StatusOr<const Json*> Required(const Json& object, const char* key,
                                       absl::string_view parent) const {
    if (!object.is_object()) return Invalid(parent, "must be a JSON object");
    const Json* value = Optional(object, key);
    if (value == nullptr) return Invalid(Path(parent, key), "is missing");
    return value;
  }

  absl::StatusOr<std::string> String(const Json& object, const char* key,
                                     absl::string_view parent) const {
    LYCHEE_ASSIGN_OR_RETURN(const Json* value, Required(object, key, parent));
    if (!value->is_string()) return Invalid(Path(parent, key), "must be a string");
    return value->get<std::string>();
  }

  absl::StatusOr<bool> Bool(const Json& object, const char* key, absl::string_view parent,
                            bool default_value) const {
    const Json* value = Optional(object, key);
    if (value == nullptr) return default_value;
    if (!value->is_boolean()) return Invalid(Path(parent, key), "must be true or false");
    return value->get<bool>();
  }

  absl::StatusOr<int32_t> TokenId(const Json& value, absl::string_view path) const {
    if (!value.is_number_integer() || value.get<int64_t>() < 0 ||
        value.get<int64_t>() > kMaxTokenId) {
      return Invalid(path,
                     absl::StrCat("must be a token id (an integer from 0 to ", kMaxTokenId, ")"));
    }
    return static_cast<int32_t>(value.get<int64_t>());
  }

  absl::StatusOr<std::string> TypeOf(const Json& component, absl::string_view path) const {
    if (!component.is_object()) return Invalid(path, "must be a JSON object");
    return String(component, "type", path);
  }

  absl::Status ReadModel(const Json& model, BpeModel* bpe) {
    if (!model.is_object()) return Invalid("model", "must be a JSON object");
    // Files from before `type` was written are BPE when they have merges.
    const Json* type = Optional(model, "type");
    if (type != nullptr || !model.contains("merges")) {
      LYCHEE_ASSIGN_OR_RETURN(std::string type_name, TypeOf(model, "model"));
      if (type_name != "BPE") {
        return Unsupported("model.type",
                           absl::StrCat("'", type_name, "' is not supported (only BPE)"));
      }
    }
    if (const Json* dropout = Optional(model, "dropout");
        dropout != nullptr && !(dropout->is_number() && dropout->get<double>() == 0.0)) {
      return Unsupported("model.dropout", "only null is supported (dropout is random)");
    }
    LYCHEE_ASSIGN_OR_RETURN(bool byte_fallback, Bool(model, "byte_fallback", "model", false));
    if (byte_fallback) return Unsupported("model.byte_fallback", "only false is supported");
    for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (const Json* value = Optional(model, affix);
          value != nullptr && !(value->is_string() && value->get<std::string>().empty())) {
        return Unsupported(Path("model", affix), "only null or \"\" is supported");
      }
    }
    LYCHEE_ASSIGN_OR_RETURN(bpe->ignore_merges, Bool(model, "ignore_merges", "model", false));
    LYCHEE_ASSIGN_OR_RETURN(bpe->fuse_unknown, Bool(model, "fuse_unk", "model", false));

    LYCHEE_ASSIGN_OR_RETURN(const Json* vocab, Required(model, "vocab", "model"));
    if (!vocab->is_object()) return Invalid("model.vocab", "must be an object of token: id");
    bpe->vocab.reserve(vocab->size());
    for (const auto& [token, id_value] : vocab->items()) {
      LYCHEE_ASSIGN_OR_RETURN(int32_t id,
                              TokenId(id_value, absl::StrCat("model.vocab[\"", token, "\"]")));
      bpe->vocab.emplace(token, id);
    }
    bpe->IndexSingleCharacters();

    if (const Json* unknown = Optional(model, "unk_token")) {
      if (!unknown->is_string()) return Invalid("model.unk_token", "must be a string or null");
      auto it = bpe->vocab.find(unknown->get<std::string>());
      if (it == bpe->vocab.end()) return Invalid("model.unk_token", "is not in model.vocab");
      bpe->unknown_id = it->second;
    }

    LYCHEE_ASSIGN_OR_RETURN(const Json* merges, Required(model, "merges", "model"));
    if (!merges->is_array()) return Invalid("model.merges", "must be an array");
    bpe->merges.reserve(merges->size());
    for (size_t rank = 0; rank < merges->size(); ++rank) {
      const std::string path = absl::StrCat("model.merges[", rank, "]");
      const Json& merge = (*merges)[rank];
      std::string left, right;
      if (merge.is_string()) {
        const std::string& text = merge.get_ref<const std::string&>();
        const size_t space = text.find(' ');
        if (space == std::string::npos) {
          return Invalid(path, "must be two tokens separated by a space");
        }
        left = text.substr(0, space);
        right = text.substr(space + 1);
      } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
                 merge[1].is_string()) {
        left = merge[0].get<std::string>();
        right = merge[1].get<std::string>();
      } else {
        return Invalid(path, "must be \"left right\" or [\"left\", \"right\"]");
      }
      int32_t ids[3];
      const std::string parts[3] = {left, right, left + right};
      for (int i = 0; i < 3; ++i) {
        auto it = bpe->vocab.find(parts[i]);
        if (it == bpe->vocab.end()) {
          return Invalid(path, absl::StrCat("token '", parts[i], "' is not in model.vocab"));
        }
        ids[i] = it->second;
      }
      // A pair listed twice keeps its last rank, as when `tokenizers` collects them in a map.
      bpe->merges[BpeModel::PairKey(ids[0], ids[1])] = {static_cast<uint32_t>(rank), ids[2]};
    }
    return absl::OkStatus();
  }

  absl::Status ReadNormalizer(const Json& normalizer, const std::string& path,
                              std::vector<NormalForm>* forms) {
    LYCHEE_ASSIGN_OR_RETURN(std::string type, TypeOf(normalizer, path));
    if (type == "Sequence") {
      LYCHEE_ASSIGN_OR_RETURN(const Json* steps, Required(normalizer, "normalizers", path));
      if (!steps->is_array()) return Invalid(Path(path, "normalizers"), "must be an array");
      for (size_t i = 0; i < steps->size(); ++i) {
        LYCHEE_RETURN_IF_ERROR(
            ReadNormalizer((*steps)[i], absl::StrCat(path, ".normalizers[", i, "]"), forms));
      }
      return absl::OkStatus();
    }
    static const auto* const kForms =
        new std::unordered_map<std::string, NormalForm>{{"NFC", NormalForm::kNfc},
                                                        {"NFD", NormalForm::kNfd},
                                                        {"NFKC", NormalForm::kNfkc},
                                                        {"NFKD", NormalForm::kNfkd}};
    auto it = kForms->find(type);
    if (it == kForms->end()) {
      return Unsupported(
          Path(path, "type"),
          absl::StrCat("normalizer '", type,
                       "' is not supported (NFC, NFD, NFKC, NFKD and Sequence are)"));
    }
    forms->push_back(it->second);
    return absl::OkStatus();
  }

  // AddedVocabulary::add_tokens: the id the content already has, else the next free one.
  static int32_t IdTokenizersAssigns(const std::string& content,
                                     const ByteLevelBpeTokenizer& tokenizer) {
    if (auto it = tokenizer.added_token_ids_.find(content);
        it != tokenizer.added_token_ids_.end()) {
      return it->second;
    }
    const BpeModel& model = tokenizer.model_;
    if (auto it = model.vocab.find(content); it != model.vocab.end()) return it->second;
    const auto model_size = static_cast<int32_t>(model.vocab.size());
    if (tokenizer.added_token_ids_.empty()) return model_size;
    int32_t max_added = 0;
    for (const auto& [added_content, added_id] : tokenizer.added_token_ids_) {
      max_added = std::max(max_added, added_id);
    }
    return max_added >= model_size || model_size == 0 ? max_added + 1 : model_size;
  }

  absl::Status ReadAddedTokens(const Json& added_tokens, ByteLevelBpeTokenizer* tokenizer) {
    if (!added_tokens.is_array()) return Invalid("added_tokens", "must be an array");
    for (size_t i = 0; i < added_tokens.size(); ++i) {
      const std::string path = absl::StrCat("added_tokens[", i, "]");
      const Json& entry = added_tokens[i];
      AddedToken token;
      LYCHEE_ASSIGN_OR_RETURN(const Json* id, Required(entry, "id", path));
      LYCHEE_ASSIGN_OR_RETURN(token.id, TokenId(*id, Path(path, "id")));
      LYCHEE_ASSIGN_OR_RETURN(token.content, String(entry, "content", path));
      if (token.content.empty()) return Invalid(Path(path, "content"), "must not be empty");
      LYCHEE_ASSIGN_OR_RETURN(token.special, Bool(entry, "special", path, false));
      LYCHEE_ASSIGN_OR_RETURN(token.single_word, Bool(entry, "single_word", path, false));
      LYCHEE_ASSIGN_OR_RETURN(token.lstrip, Bool(entry, "lstrip", path, false));
      LYCHEE_ASSIGN_OR_RETURN(token.rstrip, Bool(entry, "rstrip", path, false));
      LYCHEE_ASSIGN_OR_RETURN(token.normalized, Bool(entry, "normalized", path, !token.special));

      // `tokenizers` ignores the id written in the file and assigns its own. A file where the
      // two differ would be tokenized with other ids than it says, so it is refused.
      const int32_t assigned = IdTokenizersAssigns(token.content, *tokenizer);
      if (assigned != token.id) {
        return Invalid(Path(path, "id"),
                       absl::StrCat("is ", token.id, " but Hugging Face tokenizers would give '",
                                    token.content, "' the id ", assigned));
      }
      if (!tokenizer->added_token_ids_.emplace(token.content, token.id).second) {
        return Invalid(Path(path, "content"),
                       absl::StrCat("'", token.content, "' is listed twice"));
      }
      const size_t index = tokenizer->added_tokens_.size();
      if (token.normalized) {
        std::string pattern = Normalize(token.content, tokenizer->normal_forms_);
        if (!pattern.empty()) tokenizer->normalized_matcher_.Add(std::move(pattern), index);
      } else {
        tokenizer->raw_matcher_.Add(token.content, index);
      }
      tokenizer->added_tokens_.push_back(std::move(token));
    }
    return absl::OkStatus();
  }

  absl::Status ReadPreTokenizer(const Json& pre_tokenizer, const std::string& path,
                                std::vector<PreTokenizer>* steps) {
    LYCHEE_ASSIGN_OR_RETURN(std::string type, TypeOf(pre_tokenizer, path));
    if (type == "Sequence") {
      LYCHEE_ASSIGN_OR_RETURN(const Json* list, Required(pre_tokenizer, "pretokenizers", path));
      if (!list->is_array()) return Invalid(Path(path, "pretokenizers"), "must be an array");
      for (size_t i = 0; i < list->size(); ++i) {
        LYCHEE_RETURN_IF_ERROR(
            ReadPreTokenizer((*list)[i], absl::StrCat(path, ".pretokenizers[", i, "]"), steps));
      }
      return absl::OkStatus();
    }
    if (type == "ByteLevel") {
      ByteLevelPreTokenizer byte_level;
      LYCHEE_ASSIGN_OR_RETURN(byte_level.add_prefix_space,
                              Bool(pre_tokenizer, "add_prefix_space", path, true));
      LYCHEE_ASSIGN_OR_RETURN(bool use_regex, Bool(pre_tokenizer, "use_regex", path, true));
      if (use_regex) {
        absl::StatusOr<Regex> regex = Regex::FromOniguruma(kGpt2Pattern);
        if (!regex.ok()) return Invalid(path, regex.status().message());
        byte_level.gpt2_regex = *std::move(regex);
      }
      steps->push_back(std::move(byte_level));
      return absl::OkStatus();
    }
    if (type == "Split") {
      const std::string pattern_path = Path(path, "pattern");
      LYCHEE_ASSIGN_OR_RETURN(const Json* pattern, Required(pre_tokenizer, "pattern", path));
      absl::StatusOr<Regex> regex =
          absl::InvalidArgumentError("must be {\"Regex\": ...} or {\"String\": ...}");
      std::string pattern_field = pattern_path;
      if (pattern->is_object() && pattern->size() == 1 && pattern->begin().value().is_string()) {
        const std::string& text = pattern->begin().value().get_ref<const std::string&>();
        pattern_field = Path(pattern_path, pattern->begin().key());
        if (pattern->begin().key() == "Regex") {
          regex = Regex::FromOniguruma(text);
        } else if (pattern->begin().key() == "String") {
          regex = Regex::Literal(text);
        }
      }
      if (!regex.ok()) {
        return regex.status().code() == absl::StatusCode::kUnimplemented
                   ? Unsupported(pattern_field, regex.status().message())
                   : Invalid(pattern_field, regex.status().message());
      }
      static const auto* const kBehaviors = new std::unordered_map<std::string, SplitBehavior>{
          {"Removed", SplitBehavior::kRemoved},
          {"Isolated", SplitBehavior::kIsolated},
          {"MergedWithPrevious", SplitBehavior::kMergedWithPrevious},
          {"MergedWithNext", SplitBehavior::kMergedWithNext},
          {"Contiguous", SplitBehavior::kContiguous}};
      LYCHEE_ASSIGN_OR_RETURN(std::string behavior, String(pre_tokenizer, "behavior", path));
      auto it = kBehaviors->find(behavior);
      if (it == kBehaviors->end()) {
        return Invalid(Path(path, "behavior"), absl::StrCat("unknown behavior '", behavior, "'"));
      }
      LYCHEE_ASSIGN_OR_RETURN(bool invert, Bool(pre_tokenizer, "invert", path, false));
      steps->push_back(SplitPreTokenizer{*std::move(regex), it->second, invert});
      return absl::OkStatus();
    }
    return Unsupported(Path(path, "type"),
                       absl::StrCat("pre-tokenizer '", type,
                                    "' is not supported (Split, ByteLevel and Sequence are)"));
  }

  absl::Status ReadPostProcessor(const Json& processor, const std::string& path,
                                 ByteLevelBpeTokenizer* tokenizer) {
    LYCHEE_ASSIGN_OR_RETURN(std::string type, TypeOf(processor, path));
    if (type == "ByteLevel") return absl::OkStatus();  // it only trims offsets
    if (type == "Sequence") {
      LYCHEE_ASSIGN_OR_RETURN(const Json* list, Required(processor, "processors", path));
      if (!list->is_array()) return Invalid(Path(path, "processors"), "must be an array");
      for (size_t i = 0; i < list->size(); ++i) {
        LYCHEE_RETURN_IF_ERROR(
            ReadPostProcessor((*list)[i], absl::StrCat(path, ".processors[", i, "]"), tokenizer));
      }
      return absl::OkStatus();
    }
    if (type != "TemplateProcessing") {
      return Unsupported(Path(path, "type"),
                         absl::StrCat("post-processor '", type,
                                      "' is not supported (TemplateProcessing, ByteLevel and "
                                      "Sequence are)"));
    }
    const std::string single_path = Path(path, "single");
    LYCHEE_ASSIGN_OR_RETURN(const Json* single, Required(processor, "single", path));
    if (!single->is_array()) return Invalid(single_path, "must be an array of pieces");
    LYCHEE_ASSIGN_OR_RETURN(const Json* special_tokens,
                            Required(processor, "special_tokens", path));
    SingleTemplate result;
    bool seen_sequence = false;
    for (size_t i = 0; i < single->size(); ++i) {
      const std::string piece_path = absl::StrCat(single_path, "[", i, "]");
      const Json& piece = (*single)[i];
      if (const Json* sequence = piece.is_object() ? Optional(piece, "Sequence") : nullptr) {
        LYCHEE_ASSIGN_OR_RETURN(std::string id,
                                String(*sequence, "id", Path(piece_path, "Sequence")));
        if (id != "A" || seen_sequence) {
          return Invalid(Path(piece_path, "Sequence.id"),
                         "a single-sequence template must hold sequence A exactly once");
        }
        seen_sequence = true;
        continue;
      }
      const Json* special = piece.is_object() ? Optional(piece, "SpecialToken") : nullptr;
      if (special == nullptr) {
        return Invalid(piece_path, "must be {\"Sequence\": ...} or {\"SpecialToken\": ...}");
      }
      LYCHEE_ASSIGN_OR_RETURN(std::string name,
                              String(*special, "id", Path(piece_path, "SpecialToken")));
      const std::string entry_path = absl::StrCat(path, ".special_tokens[\"", name, "\"]");
      auto entry = special_tokens->find(name);
      if (!special_tokens->is_object() || entry == special_tokens->end()) {
        return Invalid(entry_path, "is missing");
      }
      LYCHEE_ASSIGN_OR_RETURN(const Json* ids, Required(*entry, "ids", entry_path));
      if (!ids->is_array()) return Invalid(Path(entry_path, "ids"), "must be an array");
      for (size_t k = 0; k < ids->size(); ++k) {
        const std::string id_path = absl::StrCat(entry_path, ".ids[", k, "]");
        LYCHEE_ASSIGN_OR_RETURN(int32_t id, TokenId((*ids)[k], id_path));
        if (!tokenizer->IsKnownId(id)) {
          return Invalid(id_path, absl::StrCat("id ", id, " is not in the vocabulary"));
        }
        (seen_sequence ? result.after : result.before).push_back(id);
      }
    }
    if (!seen_sequence) return Invalid(single_path, "does not hold sequence A");
    tokenizer->templates_.push_back(std::move(result));
    return absl::OkStatus();
  }

  void BuildDecodeTable(ByteLevelBpeTokenizer* tokenizer) {
    int32_t max_id = -1;
    for (const auto& [token, id] : tokenizer->model_.vocab) max_id = std::max(max_id, id);
    for (const AddedToken& token : tokenizer->added_tokens_) max_id = std::max(max_id, token.id);
    std::vector<const std::string*> token_of_id(max_id + 1, nullptr);
    for (const auto& [token, id] : tokenizer->model_.vocab) {
      // Of tokens sharing an id, one is taken regardless of hash order.
      if (token_of_id[id] == nullptr || token < *token_of_id[id]) token_of_id[id] = &token;
    }
    tokenizer->id_flags_.assign(max_id + 1, 0);
    // An added token's content wins over a model token with the same id, as in `tokenizers`.
    for (const AddedToken& token : tokenizer->added_tokens_) {
      token_of_id[token.id] = &token.content;
      if (token.special) tokenizer->id_flags_[token.id] |= ByteLevelBpeTokenizer::kSpecialId;
    }
    tokenizer->decoded_offsets_.assign(max_id + 2, 0);
    for (int32_t id = 0; id <= max_id; ++id) {
      if (token_of_id[id] != nullptr) {
        tokenizer->decoded_bytes_ += FromByteLevel(*token_of_id[id]);
        tokenizer->id_flags_[id] |= ByteLevelBpeTokenizer::kKnownId;
      }
      tokenizer->decoded_offsets_[id + 1] = static_cast<uint32_t>(tokenizer->decoded_bytes_.size());
    }
  }

  std::string source_;
};

absl::StatusOr<std::string> ReadFileBytes(const std::string& path) {
  if (absl::EndsWith(path, ".gz")) {
    gzFile file = gzopen(path.c_str(), "rb");
    if (file == nullptr) {
      return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
    }
    std::string contents;
    std::vector<char> buffer(1 << 16);
    int read;
    while ((read = gzread(file, buffer.data(), static_cast<unsigned>(buffer.size()))) > 0) {
      contents.append(buffer.data(), read);
    }
    int error_code = Z_OK;
    const std::string error = gzerror(file, &error_code);
    gzclose(file);
    if (read < 0 || error_code != Z_OK) {
      return absl::DataLossError(absl::StrCat(path, ": cannot decompress: ", error));
    }
    return contents;
  }
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  std::ostringstream contents;
  contents << file.rdbuf();
  if (file.bad()) return absl::DataLossError(absl::StrCat(path, ": read failed"));
  return contents.str();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  LYCHEE_ASSIGN_OR_RETURN(std::string contents, ReadFileBytes(path));
  return FromJson(contents, path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view json_text,
                                                               std::string_view source) {
  absl::StatusOr<Json> root = ParseJson(json_text);
  if (!root.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(Absl(source), ": malformed JSON: ", root.status().message()));
  }
  try {
    return TokenizerJsonReader(source).Read(*root);
  } catch (const Json::exception& e) {
    // The reader checks types before reading values; this is a backstop, not a path.
    return absl::InvalidArgumentError(absl::StrCat(Absl(source), ": unexpected JSON: ", e.what()));
  }
}

absl::StatusOr<std::string> Tokenizer::Decode(absl::Span<const int32_t> ids,
                                              bool skip_special_tokens) const {
  LYCHEE_ASSIGN_OR_RETURN(std::string bytes, DecodeBytes(ids, skip_special_tokens));
  std::string text;
  AppendUtf8Lossy(bytes, /*hold_incomplete_tail=*/false, &text);
  return text;
}

IncrementalDecoder::IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

absl::StatusOr<std::string> IncrementalDecoder::Push(int32_t id) {
  LYCHEE_ASSIGN_OR_RETURN(
      std::string bytes, tokenizer_.DecodeBytes(absl::MakeConstSpan(&id, 1), skip_special_tokens_));
  pending_ += bytes;
  std::string text;
  const size_t held = AppendUtf8Lossy(pending_, /*hold_incomplete_tail=*/true, &text);
  pending_.erase(0, pending_.size() - held);
  return text;
}

std::string IncrementalDecoder::Flush() {
  std::string text;
  AppendUtf8Lossy(pending_, /*hold_incomplete_tail=*/false, &text);
  pending_.clear();
  return text;
}

}  // namespace lychee
