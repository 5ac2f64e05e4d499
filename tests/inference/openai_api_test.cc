// The OpenAI-compatible API's translation, without a network or an engine: request bodies into
// the GenerateRequest the gRPC service takes (and on through ToGenerationRequest), the errors
// and the fields they name, and the JSON of responses and of streamed events.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "inference/generate_request.h"
#include "inference/openai_api.h"
#include "nlohmann/json.hpp"

namespace lychee::openai {
namespace {

using nlohmann::json;

constexpr uint64_t kUnseeded = 4242;

const Tokenizer& TinyTokenizer() {
  static const std::unique_ptr<Tokenizer> tokenizer = [] {
    absl::StatusOr<std::unique_ptr<Tokenizer>> loaded =
        Tokenizer::FromFile("models/tiny-llama-retrieval/tokenizer.json");
    REQUIRE(loaded.ok());
    return *std::move(loaded);
  }();
  return *tokenizer;
}

// ChatML, with the tools printed first and roles other than system, user and assistant refused,
// as real templates do.
constexpr char kTemplate[] =
    "{%- if tools -%}{{ tools | tojson }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('Unexpected role: ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{{ message['content'] if message['content'] is defined else '(no content)' }}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}";

// A model with a small context, so that the limits are easy to reach.
ServedModel Model(bool with_template = true) {
  ServedModel model;
  model.name = "tiny-chat";
  model.tokenizer = &TinyTokenizer();
  model.max_context_tokens = 128;
  model.max_new_tokens_limit = 40;
  if (with_template) {
    absl::StatusOr<ChatTemplate> parsed = ChatTemplate::Parse(kTemplate, R"({"eos_token": "<|endoftext|>"})");
    REQUIRE(parsed.ok());
    model.chat_template = *std::move(parsed);
  } else {
    model.chat_template = absl::NotFoundError("tokenizer_config.json has no chat_template");
  }
  model.created = 1700000000;
  return model;
}

std::vector<int32_t> Ids(const v1::GenerateRequest& request) {
  return {request.token_ids().ids().begin(), request.token_ids().ids().end()};
}

std::vector<int32_t> Encode(const std::string& text, bool special) {
  absl::StatusOr<std::vector<int32_t>> ids = TinyTokenizer().Encode(text, special);
  REQUIRE(ids.ok());
  return *ids;
}

std::string Decode(const std::vector<int32_t>& ids) {
  absl::StatusOr<std::string> text = TinyTokenizer().Decode(ids, /*skip_special_tokens=*/false);
  REQUIRE(text.ok());
  return *text;
}

absl::StatusOr<ApiRequest> Completion(const std::string& body) {
  return ParseRequest(Endpoint::kCompletions, body, Model(), kUnseeded);
}

absl::StatusOr<ApiRequest> Chat(const std::string& body) {
  return ParseRequest(Endpoint::kChatCompletions, body, Model(), kUnseeded);
}

TEST_CASE("a completion request becomes the GenerateRequest the gRPC service takes") {
  const absl::StatusOr<ApiRequest> request = Completion(R"({
    "model": "tiny-chat", "prompt": "The harbour was quiet", "max_tokens": 5, "temperature": 0.5,
    "top_p": 0.9, "seed": 7, "stop": ["\n", "END"], "stream": true, "stream_options": {"include_usage": true},
    "n": 1, "presence_penalty": 0, "user": "someone",
    "attention": {"policy": "quest", "budget": 32, "audit": true, "max_dropped_mass": 0.25}})");
  REQUIRE(request.ok());
  CHECK(request->stream);
  CHECK(request->include_usage);
  const v1::GenerateRequest& generate = request->generate;
  // The prompt with the special tokens the tokenizer adds, as gRPC's text prompts are encoded.
  CHECK(Ids(generate) == Encode("The harbour was quiet", true));
  CHECK(generate.max_new_tokens() == 5);
  CHECK(generate.temperature() == 0.5);
  CHECK(generate.top_p() == 0.9);
  CHECK(generate.seed() == 7);
  CHECK(std::vector<std::string>(generate.stop().begin(), generate.stop().end()) ==
        std::vector<std::string>{"\n", "END"});
  CHECK(generate.attention().policy().name() == "quest");
  CHECK(generate.attention().policy().audit());
  CHECK(generate.attention().token_budget() == 32);
  CHECK(generate.attention().max_dropped_mass() == 0.25);

  const absl::StatusOr<GenerationRequest> generation =
      ToGenerationRequest(generate, TinyTokenizer(), std::chrono::system_clock::time_point::max());
  REQUIRE(generation.ok());
  REQUIRE(generation->attention.has_value());
  CHECK(generation->attention->kind == PolicyKind::kQuest);
  CHECK(generation->attention->token_budget == 32);
  CHECK(generation->attention->audit);
  CHECK(generation->max_dropped_mass == 0.25);
  CHECK(generation->prompt_ids == Ids(generate));
}

TEST_CASE("the attention object takes the nested form of AttentionOptions too") {
  const absl::StatusOr<ApiRequest> request = Completion(
      R"({"prompt": "Hi", "attention": {"quest": {"token_budget": 64, "page_size": 8}, "audit": true,
          "audit_every": 4, "max_dropped_mass": 0.5}})");
  REQUIRE(request.ok());
  const v1::AttentionOptions& attention = request->generate.attention();
  CHECK(attention.quest().token_budget() == 64);
  CHECK(attention.quest().page_size() == 8);
  CHECK(attention.audit());
  CHECK(attention.audit_every() == 4);
  CHECK(attention.max_dropped_mass() == 0.5);
  const absl::StatusOr<GenerationRequest> generation =
      ToGenerationRequest(request->generate, TinyTokenizer(), std::chrono::system_clock::time_point::max());
  REQUIRE(generation.ok());
  REQUIRE(generation->attention.has_value());
  CHECK(generation->attention->Describe() == "quest budget=64 page=8 dense_layers=2 sink=0 recent=0 audit every=4");

  for (const auto& [body, param] : std::vector<std::pair<std::string, std::string>>{
           {R"({"prompt": "Hi", "attention": {"lychee": {}, "budget": 64}})", "attention.budget"},
           {R"({"prompt": "Hi", "attention": {"lychee": {"colour": 1}}})", "attention"},
           {R"({"prompt": "Hi", "attention": {"dense": {}, "max_dropped_mass": 2}})", "attention.max_dropped_mass"}}) {
    const absl::StatusOr<ApiRequest> bad = Completion(body);
    INFO(body << " -> " << bad.status());
    REQUIRE_FALSE(bad.ok());
    CHECK(bad.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(ParamOf(bad.status()) == param);
  }
}

TEST_CASE("an unset field gets OpenAI's default, and the server's seed") {
  const absl::StatusOr<ApiRequest> request = Completion(R"({"prompt": "Hi", "seed": null, "stop": null})");
  REQUIRE(request.ok());
  CHECK_FALSE(request->stream);
  CHECK(request->generate.max_new_tokens() == 16);
  CHECK(request->generate.temperature() == 1);
  CHECK_FALSE(request->generate.has_top_p());
  CHECK(request->generate.seed() == kUnseeded);
  CHECK(request->generate.stop_size() == 0);
  CHECK(request->generate.attention().mode() == v1::ATTENTION_MODE_UNSPECIFIED);

  const absl::StatusOr<ApiRequest> negative_seed = Completion(R"({"prompt": "Hi", "seed": -1})");
  REQUIRE(negative_seed.ok());
  CHECK(negative_seed->generate.seed() == UINT64_MAX);

  const absl::StatusOr<ApiRequest> dense = Completion(R"({"prompt": "Hi", "attention": {"mode": "dense"}})");
  REQUIRE(dense.ok());
  CHECK(dense->generate.attention().mode() == v1::ATTENTION_MODE_DENSE);
}

TEST_CASE("a prompt is a string or token ids, or a list of one of them") {
  const std::vector<int32_t> text_ids = Encode("Hello there", true);
  for (const std::string& prompt : {R"("Hello there")", R"(["Hello there"])"}) {
    const absl::StatusOr<ApiRequest> request = Completion(R"({"prompt": )" + prompt + "}");
    REQUIRE(request.ok());
    CHECK(Ids(request->generate) == text_ids);
  }
  for (const std::string& prompt : {"[5, 6, 7]", "[[5, 6, 7]]"}) {
    const absl::StatusOr<ApiRequest> request = Completion(R"({"prompt": )" + prompt + "}");
    REQUIRE(request.ok());
    CHECK(Ids(request->generate) == std::vector<int32_t>{5, 6, 7});
  }
}

TEST_CASE("a chat is rendered with the model's template and encoded without special tokens added again") {
  const absl::StatusOr<ApiRequest> request = Chat(R"({
    "messages": [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": [{"type": "text", "text": "Where is"},
                                              {"type": "text", "text": "the harbour?"}]}],
    "tools": [{"type": "function", "function": {"name": "locate", "parameters": {"zone": 1, "area": 2}}}],
    "max_completion_tokens": 6})");
  REQUIRE(request.ok());
  // The tools as the client ordered their keys (tojson of the template), the content parts
  // joined by a newline, and the assistant's turn opened.
  const std::string expected =
      R"([{"type": "function", "function": {"name": "locate", "parameters": {"zone": 1, "area": 2}}}])"
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhere is\nthe harbour?<|im_end|>\n"
      "<|im_start|>assistant\n";
  CHECK(Decode(Ids(request->generate)) == expected);
  CHECK(Ids(request->generate) == Encode(expected, false));
  CHECK(request->generate.max_new_tokens() == 6);

  // A message without content stays without (templates tell undefined from None).
  const absl::StatusOr<ApiRequest> no_content =
      Chat(R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": []}]})");
  REQUIRE(no_content.ok());
  CHECK(Decode(Ids(no_content->generate)).find("<|im_start|>assistant\n(no content)<|im_end|>") != std::string::npos);

  // tool_choice "none": the tools are not shown to the model. No max_tokens: up to the context.
  const absl::StatusOr<ApiRequest> no_tools = Chat(R"({
    "messages": [{"role": "user", "content": "Hi"}], "tool_choice": "none",
    "tools": [{"type": "function", "function": {"name": "locate"}}]})");
  REQUIRE(no_tools.ok());
  const std::string prompt = Decode(Ids(no_tools->generate));
  CHECK(prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  CHECK(no_tools->generate.max_new_tokens() ==
        std::min<int64_t>(40, 128 - static_cast<int64_t>(Ids(no_tools->generate).size())));
}

struct BadRequest {
  Endpoint endpoint;
  std::string body;
  absl::StatusCode code;
  std::string param;  // what the error object's "param" says; "" for null
  std::string says;   // a part of the message
};

TEST_CASE("a bad request is refused with the field it got wrong") {
  std::string long_prompt;
  for (int i = 0; i < 40; ++i) long_prompt += "The harbour was quiet. ";
  std::string hundred_ids = "[1";
  for (int i = 2; i <= 100; ++i) hundred_ids += ", " + std::to_string(i);
  hundred_ids += "]";
  const std::vector<BadRequest> cases = {
      {Endpoint::kCompletions, R"({"prompt": "Hi",)", absl::StatusCode::kInvalidArgument, "", "not JSON"},
      {Endpoint::kCompletions, R"(["Hi"])", absl::StatusCode::kInvalidArgument, "", "JSON object"},
      {Endpoint::kCompletions, R"({"max_tokens": 4})", absl::StatusCode::kInvalidArgument, "prompt", "required"},
      {Endpoint::kCompletions, R"({"prompt": 5})", absl::StatusCode::kInvalidArgument, "prompt", "string"},
      {Endpoint::kCompletions, R"({"prompt": []})", absl::StatusCode::kInvalidArgument, "prompt", "empty"},
      {Endpoint::kCompletions, R"({"prompt": ["one", "two"]})", absl::StatusCode::kInvalidArgument, "prompt",
       "one prompt"},
      {Endpoint::kCompletions, R"({"prompt": [5, -1]})", absl::StatusCode::kInvalidArgument, "prompt[1]", "token id"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "max_tokens": "5"})", absl::StatusCode::kInvalidArgument,
       "max_tokens", "integer"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "max_tokens": 0})", absl::StatusCode::kInvalidArgument, "max_tokens",
       "[1, 40]"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "max_tokens": 41})", absl::StatusCode::kInvalidArgument,
       "max_tokens", "--max-new-tokens"},
      {Endpoint::kCompletions, R"({"prompt": )" + hundred_ids + R"(, "max_tokens": 40})",
       absl::StatusCode::kInvalidArgument, "max_tokens", "context of 128 tokens; ask for at most 28"},
      {Endpoint::kCompletions, R"({"prompt": ")" + long_prompt + R"("})", absl::StatusCode::kInvalidArgument, "prompt",
       "context is 128"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "temperature": 2.5})", absl::StatusCode::kInvalidArgument,
       "temperature", "[0, 2]"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "temperature": "hot"})", absl::StatusCode::kInvalidArgument,
       "temperature", "number"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "top_p": 0})", absl::StatusCode::kInvalidArgument, "top_p",
       "(0, 1]"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "seed": 1.5})", absl::StatusCode::kInvalidArgument, "seed",
       "integer"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "n": 2})", absl::StatusCode::kInvalidArgument, "n", "only 1"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "stop": 5})", absl::StatusCode::kInvalidArgument, "stop",
       "list of strings"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "stop": ["a", ""]})", absl::StatusCode::kInvalidArgument, "stop[1]",
       "non-empty"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "stream": "yes"})", absl::StatusCode::kInvalidArgument, "stream",
       "true or false"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "stream_options": {"include_usage": true}})",
       absl::StatusCode::kInvalidArgument, "stream_options", "stream: true"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "model": "gpt-4o"})", absl::StatusCode::kNotFound, "model",
       "serves 'tiny-chat'"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "model": 4})", absl::StatusCode::kInvalidArgument, "model",
       "string"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "presence_penalty": 0.5})", absl::StatusCode::kInvalidArgument,
       "presence_penalty", "not supported"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "logprobs": 2})", absl::StatusCode::kInvalidArgument, "logprobs",
       "not supported"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "echo": true})", absl::StatusCode::kInvalidArgument, "echo",
       "not supported"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "attention": "dense"})", absl::StatusCode::kInvalidArgument,
       "attention", "object"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "attention": {"mode": "sparse"}})",
       absl::StatusCode::kInvalidArgument, "attention.mode", "dense"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "attention": {"budget": 0}})", absl::StatusCode::kInvalidArgument,
       "attention.budget", "integer in [1"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "attention": {"colour": 1}})", absl::StatusCode::kInvalidArgument,
       "attention.colour", "unknown"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "attention": {"audit": true}})", absl::StatusCode::kInvalidArgument,
       "attention.audit", "attention.policy"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "attention": {"max_dropped_mass": 1.5}})",
       absl::StatusCode::kInvalidArgument, "attention.max_dropped_mass", "number in [0, 1]"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "attention": {"policy": {"name": "quest", "page_size": "big"}}})",
       absl::StatusCode::kInvalidArgument, "attention.policy", "page_size"},
      {Endpoint::kCompletions, R"({"prompt": "Hi", "attention": {"policy": {"page_size": 8}}})",
       absl::StatusCode::kInvalidArgument, "attention.policy.name", "required"},
      {Endpoint::kChatCompletions, R"({"max_tokens": 4})", absl::StatusCode::kInvalidArgument, "messages", "required"},
      {Endpoint::kChatCompletions, R"({"messages": []})", absl::StatusCode::kInvalidArgument, "messages", "empty"},
      {Endpoint::kChatCompletions, R"({"messages": {"role": "user"}})", absl::StatusCode::kInvalidArgument, "messages",
       "list"},
      {Endpoint::kChatCompletions, R"({"messages": [{"content": "Hi"}]})", absl::StatusCode::kInvalidArgument,
       "messages[0].role", "string"},
      {Endpoint::kChatCompletions, R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       absl::StatusCode::kInvalidArgument, "messages[0].content[0]", "text parts"},
      {Endpoint::kChatCompletions, R"({"messages": [{"role": "robot", "content": "Beep"}]})",
       absl::StatusCode::kInvalidArgument, "messages", "Unexpected role: robot"},
      {Endpoint::kChatCompletions, R"({"messages": [{"role": "user", "content": "Hi"}], "tools": "all"})",
       absl::StatusCode::kInvalidArgument, "tools", "tool objects"},
      {Endpoint::kChatCompletions, R"({"messages": [{"role": "user", "content": "Hi"}], "tool_choice": "required"})",
       absl::StatusCode::kInvalidArgument, "tool_choice", "cannot force"},
      {Endpoint::kChatCompletions,
       R"({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "max_completion_tokens": 5})",
       absl::StatusCode::kInvalidArgument, "max_completion_tokens", "differs"},
      {Endpoint::kChatCompletions,
       R"({"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_object"}})",
       absl::StatusCode::kInvalidArgument, "response_format", "not supported"},
      {Endpoint::kChatCompletions, R"({"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": 1})",
       absl::StatusCode::kInvalidArgument, "chat_template_kwargs", "object"},
  };
  for (const BadRequest& bad : cases) {
    const absl::StatusOr<ApiRequest> request = ParseRequest(bad.endpoint, bad.body, Model(), kUnseeded);
    INFO(bad.body << " -> " << request.status());
    REQUIRE_FALSE(request.ok());
    CHECK(request.status().code() == bad.code);
    CHECK(ParamOf(request.status()) == bad.param);
    CHECK(request.status().message().find(bad.says) != absl::string_view::npos);
  }
}

TEST_CASE("a chat to a model without a usable chat template says why") {
  const absl::StatusOr<ApiRequest> request = ParseRequest(
      Endpoint::kChatCompletions, R"({"messages": [{"role": "user", "content": "Hi"}]})", Model(false), kUnseeded);
  REQUIRE_FALSE(request.ok());
  CHECK(request.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(HttpStatusOf(request.status().code()) == 400);
  CHECK(request.status().message().find("has no chat_template") != absl::string_view::npos);
  // Completions still work.
  CHECK(ParseRequest(Endpoint::kCompletions, R"({"prompt": "Hi"})", Model(false), kUnseeded).ok());
}

TEST_CASE("the attention object goes through the gRPC service's checks") {
  const absl::StatusOr<ApiRequest> request =
      Completion(R"({"prompt": "Hi", "attention": {"mode": "hybrid", "policy": "quest"}})");
  REQUIRE(request.ok());
  const absl::StatusOr<GenerationRequest> generation =
      ToGenerationRequest(request->generate, TinyTokenizer(), std::chrono::system_clock::time_point::max());
  REQUIRE_FALSE(generation.ok());
  CHECK(generation.status().message() == "attention: give a mode or a policy, not both");

  const absl::StatusOr<ApiRequest> unknown = Completion(R"({"prompt": "Hi", "attention": {"policy": "magic"}})");
  REQUIRE(unknown.ok());
  const absl::StatusOr<GenerationRequest> unknown_generation =
      ToGenerationRequest(unknown->generate, TinyTokenizer(), std::chrono::system_clock::time_point::max());
  REQUIRE_FALSE(unknown_generation.ok());
  CHECK(unknown_generation.status().message().find("attention.policy.name") != absl::string_view::npos);
}

TEST_CASE("errors map onto HTTP statuses and OpenAI error objects") {
  CHECK(HttpStatusOf(absl::StatusCode::kInvalidArgument) == 400);
  CHECK(HttpStatusOf(absl::StatusCode::kOutOfRange) == 400);
  CHECK(HttpStatusOf(absl::StatusCode::kUnauthenticated) == 401);
  CHECK(HttpStatusOf(absl::StatusCode::kPermissionDenied) == 403);
  CHECK(HttpStatusOf(absl::StatusCode::kNotFound) == 404);
  CHECK(HttpStatusOf(absl::StatusCode::kResourceExhausted) == 429);
  CHECK(HttpStatusOf(absl::StatusCode::kUnavailable) == 503);
  CHECK(HttpStatusOf(absl::StatusCode::kDeadlineExceeded) == 504);
  CHECK(HttpStatusOf(absl::StatusCode::kInternal) == 500);

  const json bad = json::parse(ErrorBody(BadParameter("n", "only 1 is supported, got 2"), 400));
  CHECK(bad == json::parse(R"({"error": {"message": "n: only 1 is supported, got 2", "type": "invalid_request_error",
                                         "param": "n", "code": "invalid_argument"}})"));
  const json unauthenticated = json::parse(ErrorBody(absl::UnauthenticatedError("send a token"), 401));
  CHECK(unauthenticated["error"]["type"] == "authentication_error");
  CHECK(unauthenticated["error"]["param"].is_null());
  CHECK(unauthenticated["error"]["code"] == "unauthenticated");
  CHECK(json::parse(ErrorBody(absl::ResourceExhaustedError("full"), 429))["error"]["type"] == "rate_limit_error");
  CHECK(json::parse(ErrorBody(absl::UnavailableError("down"), 503))["error"]["type"] == "server_error");
}

GenerationSummary Summary(FinishReason reason) {
  GenerationSummary summary;
  summary.finish_reason = reason;
  summary.prompt_tokens = 3;
  summary.completion_tokens = 2;
  summary.hybrid = true;
  summary.partition_version = 4;
  summary.token_budget = 256;
  summary.time_to_first_token_seconds = 0.25;
  return summary;
}

// The JSON of each "data:" event of a stream; "[DONE]" as a string.
std::vector<json> Events(const std::string& stream) {
  std::vector<json> events;
  for (size_t start = 0; start < stream.size();) {
    const size_t end = stream.find("\n\n", start);
    REQUIRE(end != std::string::npos);
    const std::string event = stream.substr(start, end - start);
    REQUIRE(event.rfind("data: ", 0) == 0);
    const std::string data = event.substr(6);
    events.push_back(data == "[DONE]" ? json(data) : json::parse(data));
    start = end + 2;
  }
  return events;
}

TEST_CASE("a streamed completion: text chunks, the finish reason with Lychee's summary, the usage, [DONE]") {
  const ResponseFormatter formatter(Endpoint::kCompletions, "cmpl-1", 1700000001, "tiny-chat", true);
  CHECK(formatter.StreamStart().empty());
  const std::vector<json> text = Events(formatter.StreamText("Hello"));
  REQUIRE(text.size() == 1);
  CHECK(text[0]["id"] == "cmpl-1");
  CHECK(text[0]["object"] == "text_completion");
  CHECK(text[0]["created"] == 1700000001);
  CHECK(text[0]["model"] == "tiny-chat");
  CHECK(text[0]["choices"][0]["text"] == "Hello");
  CHECK(text[0]["choices"][0]["finish_reason"].is_null());
  CHECK(text[0].contains("usage"));
  CHECK(text[0]["usage"].is_null());

  const std::vector<json> end = Events(formatter.StreamEnd(Summary(FinishReason::kStopSequence)));
  REQUIRE(end.size() == 3);
  CHECK(end[0]["choices"][0]["finish_reason"] == "stop");
  CHECK(end[0]["lychee"]["finish_reason"] == "stop_sequence");
  CHECK(end[0]["lychee"]["attention_mode"] == "hybrid");
  CHECK(end[0]["lychee"]["partition_version"] == 4);
  CHECK(end[0]["lychee"]["token_budget"] == 256);
  CHECK(end[0]["lychee"]["timings"]["time_to_first_token_seconds"] == 0.25);
  CHECK_FALSE(end[0]["lychee"].contains("telemetry"));
  CHECK(end[1]["choices"].empty());
  CHECK(end[1]["usage"] == json::parse(R"({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})"));
  CHECK(end[2] == "[DONE]");

  const ResponseFormatter without_usage(Endpoint::kCompletions, "cmpl-2", 1700000001, "tiny-chat", false);
  CHECK_FALSE(Events(without_usage.StreamText("Hi"))[0].contains("usage"));
  const std::vector<json> short_end = Events(without_usage.StreamEnd(Summary(FinishReason::kContextLimit)));
  REQUIRE(short_end.size() == 2);
  CHECK(short_end[0]["choices"][0]["finish_reason"] == "length");
  CHECK(short_end[1] == "[DONE]");

  const std::vector<json> error = Events(without_usage.StreamError(absl::UnavailableError("shutting down")));
  REQUIRE(error.size() == 2);
  CHECK(error[0]["error"]["message"] == "shutting down");
  CHECK(error[0]["error"]["code"] == "unavailable");
  CHECK(error[1] == "[DONE]");
}

TEST_CASE("a chat completion: the role first, content deltas, a whole message when unstreamed") {
  const ResponseFormatter formatter(Endpoint::kChatCompletions, "chatcmpl-1", 1700000002, "tiny-chat", false);
  const std::vector<json> start = Events(formatter.StreamStart());
  REQUIRE(start.size() == 1);
  CHECK(start[0]["object"] == "chat.completion.chunk");
  CHECK(start[0]["choices"][0]["delta"] == json::parse(R"({"role": "assistant", "content": ""})"));
  CHECK(Events(formatter.StreamText("Hi"))[0]["choices"][0]["delta"] == json::parse(R"({"content": "Hi"})"));
  const std::vector<json> end = Events(formatter.StreamEnd(Summary(FinishReason::kStopToken)));
  CHECK(end[0]["choices"][0]["delta"] == json::object());
  CHECK(end[0]["choices"][0]["finish_reason"] == "stop");

  GenerationSummary with_telemetry = Summary(FinishReason::kMaxTokens);
  with_telemetry.telemetry = GenerationTelemetry{6, 2, std::vector<int64_t>(12, 9), 5, 1024, true, 0.5, 0.125};
  const json whole = json::parse(formatter.Whole("Hello there", with_telemetry));
  CHECK(whole["object"] == "chat.completion");
  CHECK(whole["choices"][0]["message"] == json::parse(R"({"role": "assistant", "content": "Hello there"})"));
  CHECK(whole["choices"][0]["finish_reason"] == "length");
  CHECK(whole["usage"]["total_tokens"] == 5);
  CHECK(whole["lychee"]["telemetry"]["tokens_attended"].size() == 12);
  CHECK(whole["lychee"]["telemetry"]["audited"] == true);
  CHECK(whole["lychee"]["telemetry"]["mean_dropped_mass"] == 0.125);

  const json completion = json::parse(
      ResponseFormatter(Endpoint::kCompletions, "cmpl-3", 1, "tiny-chat", false).Whole("Hi", with_telemetry));
  CHECK(completion["object"] == "text_completion");
  CHECK(completion["choices"][0]["text"] == "Hi");
}

TEST_CASE("models and response ids") {
  const json list = json::parse(ModelList(Model()));
  CHECK(list["object"] == "list");
  REQUIRE(list["data"].size() == 1);
  CHECK(list["data"][0]["id"] == "tiny-chat");
  CHECK(list["data"][0]["object"] == "model");
  CHECK(list["data"][0]["created"] == 1700000000);
  CHECK(list["data"][0]["max_model_len"] == 128);
  CHECK(ResponseId(Endpoint::kCompletions, 1, 255) == "cmpl-000000000000000100000000000000ff");
  CHECK(ResponseId(Endpoint::kChatCompletions, 0, 0).rfind("chatcmpl-", 0) == 0);
}

}  // namespace
}  // namespace lychee::openai
