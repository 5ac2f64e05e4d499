// The OpenAI-compatible HTTP API's requests and responses, as pure functions: a request body
// becomes a lychee.v1.GenerateRequest (the one the gRPC service takes, so that both go through
// ToGenerationRequest and the engine's checks), checked field by field; the engine's events
// become JSON responses or server-sent events; absl::Status errors become OpenAI error objects
// with their HTTP status. No network and no engine here: inference/http_server.h does the I/O.
// Free of LibTorch.
//
// Supported: POST /v1/completions and /v1/chat/completions with model, prompt or messages (and
// tools, tool_choice auto or none, chat_template_kwargs), max_tokens (max_completion_tokens),
// temperature, top_p, seed, stop, n = 1, stream and stream_options.include_usage; Lychee's own
// `attention` object {mode, policy, budget, partition_version, audit, max_dropped_mass}. Fields that change the
// output in ways Lychee does not implement (penalties, logit_bias, logprobs, echo, best_of,
// suffix, response_format other than text) are refused unless they hold their default; other
// unknown fields are ignored, as OpenAI's own clients send extra ones (user, metadata).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/base/chat_template.h"
#include "common/base/tokenizer.h"
#include "inference/engine.h"
#include "lychee/v1/inference.pb.h"
#include "nlohmann/json_fwd.hpp"

namespace lychee::openai {

enum class Endpoint { kCompletions, kChatCompletions };

// What translating a request needs to know of the served model.
struct ServedModel {
  // What clients name in `model`: the model directory's name.
  std::string name;
  const Tokenizer* tokenizer = nullptr;
  int64_t max_context_tokens = 0;
  int64_t max_new_tokens_limit = 0;
  // The chat template of the model's tokenizer_config.json, or why there is no usable one;
  // /v1/chat/completions then answers 400 with that reason.
  absl::StatusOr<ChatTemplate> chat_template = absl::NotFoundError("no chat template was loaded");
  // When the server started (Unix seconds), the model's `created` in /v1/models.
  int64_t created = 0;
};

struct ApiRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  // The prompt as token ids, and every parameter; what the gRPC service would be sent.
  v1::GenerateRequest generate;
  bool stream = false;
  // stream_options.include_usage: a last event with the usage, after the one with the finish
  // reason.
  bool include_usage = false;
};

// The request in `body` (JSON). A request that gives no seed samples with `unseeded_seed` (the
// server draws one per request, as OpenAI's sampling without a seed differs from call to call).
// INVALID_ARGUMENT naming the field (also in the error object's "param", see ParamOf) for
// malformed JSON, wrong types, values out of range, unsupported values, a prompt or max_tokens
// beyond the context, and a chat the template refuses; FAILED_PRECONDITION for a chat request to
// a model without a usable chat template; NOT_FOUND for a model other than the served one.
absl::StatusOr<ApiRequest> ParseRequest(Endpoint endpoint, std::string_view body, const ServedModel& model,
                                        uint64_t unseeded_seed);

// INVALID_ARGUMENT "param: message" that remembers `param` for the error object.
absl::Status BadParameter(const std::string& param, const std::string& message);
// The field a status names (BadParameter's), or "" for none.
std::string ParamOf(const absl::Status& status);

// The HTTP status of an error's code, as Google's HTTP mapping of the canonical codes gives it
// (google/rpc/code.proto): 400 for INVALID_ARGUMENT, FAILED_PRECONDITION and OUT_OF_RANGE, 401
// UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND, 409 ALREADY_EXISTS and ABORTED, 429
// RESOURCE_EXHAUSTED, 499 CANCELLED, 501 UNIMPLEMENTED, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED,
// 500 otherwise.
int HttpStatusOf(absl::StatusCode code);
// {"error": {"message", "type", "param", "code"}}: the type from `http_status` (what OpenAI's
// clients branch on), the code the canonical one in lower case (e.g. "resource_exhausted").
std::string ErrorBody(const absl::Status& status, int http_status);

// GET /v1/models, and GET /v1/models/{name}.
std::string ModelList(const ServedModel& model);
std::string ModelObject(const ServedModel& model);

// The JSON of one response: server-sent events (each "data: {...}\n\n"), or the whole body.
class ResponseFormatter {
 public:
  ResponseFormatter(Endpoint endpoint, std::string id, int64_t created, std::string model, bool include_usage);

  // Streamed: what opens the stream (chat: a delta with the assistant's role; completions:
  // nothing), a text delta, then either the end (a chunk with the finish reason and the
  // `lychee` object; the usage chunk when asked for; "data: [DONE]") or an error event.
  std::string StreamStart() const;
  std::string StreamText(std::string_view text) const;
  std::string StreamEnd(const GenerationSummary& summary) const;
  std::string StreamError(const absl::Status& error) const;

  // Unstreamed: the whole completion.
  std::string Whole(std::string_view text, const GenerationSummary& summary) const;

 private:
  const char* ChunkObject() const;
  // One streamed chunk with `choice`, and `lychee` (the summary) on the last one.
  std::string Chunk(const nlohmann::ordered_json& choice, const nlohmann::ordered_json& lychee) const;

  const Endpoint endpoint_;
  const std::string id_;
  const int64_t created_;
  const std::string model_;
  const bool include_usage_;
};

// "cmpl-…" or "chatcmpl-…" and 32 hex digits of `random_high` and `random_low`.
std::string ResponseId(Endpoint endpoint, uint64_t random_high, uint64_t random_low);

}  // namespace lychee::openai
