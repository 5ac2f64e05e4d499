// Parsing untrusted JSON (config.json, tokenizer.json, safetensors headers and indexes, the HTTP
// API's request bodies) into nlohmann::json, with errors as values and a bound on nesting. Only
// for .cc files of libraries that link nlohmann_json (lychee_common, lychee_inference_service).
#pragma once

#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace lychee {

// nlohmann::json's dump() and the readers of nested structures (tokenizer Sequence components)
// recurse once per level, so a file nested a few hundred thousand levels deep would overflow the
// stack. Real files nest a handful of levels.
inline constexpr int kMaxJsonDepth = 64;

// The JSON value of `text`; INVALID_ARGUMENT saying what is wrong with it (no source named: the
// caller adds that). `callback`, when given, sees every parse event as in nlohmann::json::parse.
// `Json` may be nlohmann::ordered_json, for text whose objects' key order matters.
template <typename Json = nlohmann::json>
absl::StatusOr<Json> ParseJson(std::string_view text, typename Json::parser_callback_t callback = nullptr) {
  using json = Json;
  bool too_deep = false;
  // Values deeper than the bound are dropped while parsing, so none is ever built.
  const typename json::parser_callback_t bounded = [&](int depth, typename json::parse_event_t event, json& parsed) {
    if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
        depth >= kMaxJsonDepth) {
      too_deep = true;
      return false;
    }
    return callback == nullptr || callback(depth, event, parsed);
  };
  json parsed;
  try {
    parsed = json::parse(text.begin(), text.end(), bounded);
  } catch (const typename json::exception& e) {
    // Not only parse_error: a number too large for a double (1e400) is an out_of_range.
    return absl::InvalidArgumentError(e.what());
  }
  if (too_deep) return absl::InvalidArgumentError(absl::StrCat("nested more than ", kMaxJsonDepth, " levels deep"));
  return parsed;
}

}  // namespace lychee
