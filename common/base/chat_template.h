// Chat templates: the Jinja2 `chat_template` of a model's tokenizer_config.json, rendered as
// transformers' apply_chat_template renders it (a sandboxed Jinja2 environment with trim_blocks,
// lstrip_blocks and loop controls; the globals raise_exception and strftime_now; a tojson filter
// that is Python's json.dumps). Lychee implements the subset of Jinja2 that the Llama-3.x, Qwen2.5,
// Qwen3 and Mistral templates use; a template that goes outside it fails to parse with an
// UNIMPLEMENTED error naming the construct and its line. Free of LibTorch.
#pragma once

#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace lychee {

namespace chat_template_internal {
struct Program;
}  // namespace chat_template_internal

// What apply_chat_template is given. JSON values come as JSON text, parsed with their objects' key
// order kept: templates print tool definitions and arguments with tojson in that order.
struct ChatRequest {
  // A JSON array of messages: objects with "role", "content" and whatever else the template reads
  // (tool_calls, tool_call_id, reasoning_content, ...).
  std::string messages_json;
  // A JSON array of tool definitions (objects); empty: the template sees tools = None.
  std::string tools_json;
  // A JSON array of documents (objects) for retrieval-augmented templates; empty: None.
  std::string documents_json;
  bool add_generation_prompt = false;
  // A JSON object of further template variables (enable_thinking, date_string, ...); empty: none.
  // Like apply_chat_template's keyword arguments they override the special tokens.
  std::string variables_json;
  // The local time that strftime_now formats; the current local time when unset.
  std::optional<std::tm> now;
};

class ChatTemplate {
 public:
  // Reads the chat template and the special tokens (bos_token, eos_token, ...: strings, or objects
  // with "content") from tokenizer_config.json. `path` is that file, or a model directory holding
  // it; a directory's chat_template.jinja, when present, is the template (as in transformers).
  // The template is `chat_template` as a string, or the entry named "default" of a list of
  // {"name", "template"} objects. NOT_FOUND when there is no template; parse errors as in Parse.
  static absl::StatusOr<ChatTemplate> FromTokenizerConfig(const std::string& path);

  // Compiles `source`. `variables_json` is a JSON object of variables every render sees (the
  // special tokens). Errors name the template line: INVALID_ARGUMENT for a syntax error,
  // UNIMPLEMENTED for a construct outside the supported subset.
  static absl::StatusOr<ChatTemplate> Parse(std::string_view source, std::string_view variables_json = "{}");

  // The prompt text. INVALID_ARGUMENT for a malformed request, for an error the template raises
  // with raise_exception (its message, as is: e.g. a role the template rejects) and for the
  // errors Jinja would raise at render time (an undefined value used, a type mismatch), which
  // name the line; UNIMPLEMENTED where rendering reaches something outside the subset that only
  // the values reveal (e.g. a case conversion of non-ASCII text). Safe to call from several
  // threads at once. The text is meant to be tokenized without adding special tokens again
  // (the template writes bos_token itself where the model wants it).
  absl::StatusOr<std::string> Render(const ChatRequest& request) const;

 private:
  explicit ChatTemplate(std::shared_ptr<const chat_template_internal::Program> program);

  std::shared_ptr<const chat_template_internal::Program> program_;
};

}  // namespace lychee
