#include "inference/openai_api.h"

#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/base/json_parse.h"
#include "common/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace lychee::openai {
namespace {

// Objects keep the order the client wrote their keys in: chat templates print tool definitions
// and tool-call arguments with tojson in that order, as transformers does.
using Json = nlohmann::ordered_json;

constexpr char kParamPayload[] = "type.lychee.dev/openai.param";
// How much of a bad value an error message quotes.
constexpr size_t kQuotedValueChars = 60;
// What /v1/completions generates when the request does not say: OpenAI's default.
constexpr int64_t kCompletionsDefaultMaxTokens = 16;
// OpenAI's sampling defaults.
constexpr double kDefaultTemperature = 1;
constexpr double kMaxTemperature = 2;

std::string Quote(const Json& value) {
  std::string text = value.dump();
  if (text.size() > kQuotedValueChars) text = text.substr(0, kQuotedValueChars) + "...";
  return text;
}

// A member of a JSON object, named for error messages by its path from the request's top
// (e.g. "attention.budget"). Absent and null are the same: OpenAI's clients send null for fields
// left unset, and both mean "the default".
class Member {
 public:
  Member(const Json& object, const std::string& prefix, const std::string& key)
      : param_(prefix + key), value_(Lookup(object, key)) {}

  const std::string& param() const { return param_; }
  const Json& value() const { return value_; }
  bool absent() const { return value_.is_null(); }

  absl::Status Bad(const std::string& expected) const {
    return BadParameter(param_, absl::StrCat(expected, ", got ", Quote(value_)));
  }

  absl::StatusOr<std::optional<int64_t>> Integer(int64_t low, int64_t high, const std::string& what = "") const {
    if (absent()) return std::nullopt;
    // Non-negative integers parse as unsigned; those beyond int64 are out of any range here.
    const bool in_range = value_.is_number_integer() &&
                          (!value_.is_number_unsigned() ||
                           value_.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) &&
                          value_.get<int64_t>() >= low && value_.get<int64_t>() <= high;
    if (!in_range) return Bad(absl::StrCat("must be an integer in [", low, ", ", high, "]", what));
    return value_.get<int64_t>();
  }

  absl::StatusOr<std::optional<double>> Number(double low, double high, bool low_excluded) const {
    if (absent()) return std::nullopt;
    const bool in_range = value_.is_number() &&
                          (low_excluded ? value_.get<double>() > low : value_.get<double>() >= low) &&
                          value_.get<double>() <= high;
    if (!in_range) return Bad(absl::StrCat("must be a number in ", low_excluded ? "(" : "[", low, ", ", high, "]"));
    return value_.get<double>();
  }

  absl::StatusOr<bool> Bool() const {
    if (absent()) return false;
    if (!value_.is_boolean()) return Bad("must be true or false");
    return value_.get<bool>();
  }

 private:
  static const Json& Lookup(const Json& object, const std::string& key) {
    static const Json kNull;
    const auto found = object.find(key);
    return found == object.end() ? kNull : *found;
  }

  std::string param_;
  const Json& value_;
};

// Fields of OpenAI's API that change the output in ways Lychee does not implement: a request
// that sets one gets a 400 rather than an answer that silently ignores it. Each is accepted at
// its default.
struct UnsupportedField {
  const char* name;
  bool completions;  // a field of /v1/completions
  bool chat;         // a field of /v1/chat/completions
  bool (*is_default)(const Json&);
};

bool IsZero(const Json& value) { return value.is_number() && value.get<double>() == 0; }
bool IsFalseOrZero(const Json& value) { return (value.is_boolean() && !value.get<bool>()) || IsZero(value); }
bool IsEmptyObject(const Json& value) { return value.is_object() && value.empty(); }
bool IsOne(const Json& value) { return value.is_number() && value.get<double>() == 1; }
bool IsEmptyString(const Json& value) { return value.is_string() && value.get<std::string>().empty(); }
bool IsTextFormat(const Json& value) { return value.is_object() && value.value("type", "") == "text"; }

constexpr UnsupportedField kUnsupportedFields[] = {
    {"presence_penalty", true, true, IsZero},
    {"frequency_penalty", true, true, IsZero},
    {"logit_bias", true, true, IsEmptyObject},
    {"logprobs", true, true, IsFalseOrZero},
    {"top_logprobs", false, true, IsZero},
    {"echo", true, false, IsFalseOrZero},
    {"best_of", true, false, IsOne},
    {"suffix", true, false, IsEmptyString},
    {"response_format", false, true, IsTextFormat},
};

absl::Status CheckUnsupportedFields(const Json& body, Endpoint endpoint) {
  for (const UnsupportedField& field : kUnsupportedFields) {
    if (!(endpoint == Endpoint::kCompletions ? field.completions : field.chat)) continue;
    const Member member(body, "", field.name);
    if (!member.absent() && !field.is_default(member.value())) {
      return member.Bad("is not supported by this server (only its default is accepted)");
    }
  }
  return absl::OkStatus();
}

absl::Status CheckModel(const Json& body, const ServedModel& model) {
  const Member member(body, "", "model");
  if (member.absent()) return absl::OkStatus();
  if (!member.value().is_string()) return member.Bad("must be a string");
  if (member.value().get<std::string>() != model.name) {
    absl::Status status = absl::NotFoundError(absl::StrCat("model: '", member.value().get<std::string>(),
                                                           "' is not served here; this server serves '", model.name,
                                                           "' (or leave model out)"));
    status.SetPayload(kParamPayload, absl::Cord("model"));
    return status;
  }
  return absl::OkStatus();
}

absl::Status SetStop(const Json& body, v1::GenerateRequest* request) {
  const Member stop(body, "", "stop");
  if (stop.absent()) return absl::OkStatus();
  if (stop.value().is_string()) {
    if (stop.value().get<std::string>().empty()) return stop.Bad("must not be empty");
    request->add_stop(stop.value().get<std::string>());
    return absl::OkStatus();
  }
  if (!stop.value().is_array()) return stop.Bad("must be a string or a list of strings");
  for (size_t i = 0; i < stop.value().size(); ++i) {
    const Json& sequence = stop.value()[i];
    if (!sequence.is_string() || sequence.get<std::string>().empty()) {
      return BadParameter(absl::StrCat("stop[", i, "]"),
                          absl::StrCat("must be a non-empty string, got ", Quote(sequence)));
    }
    request->add_stop(sequence.get<std::string>());
  }
  return absl::OkStatus();
}

absl::Status SetPolicy(const Member& policy, v1::AttentionOptions* attention) {
  if (policy.value().is_string()) {
    attention->mutable_policy()->set_name(policy.value().get<std::string>());
    return absl::OkStatus();
  }
  if (!policy.value().is_object()) {
    return policy.Bad("must be a policy name or an object of lychee.v1.PolicyOptions fields");
  }
  // The object's fields are lychee.v1.PolicyOptions', so protobuf's JSON parser checks their names
  // and types.
  const auto parsed = google::protobuf::util::JsonStringToMessage(policy.value().dump(), attention->mutable_policy());
  if (!parsed.ok()) return BadParameter(policy.param(), std::string(parsed.message()));
  if (attention->policy().name().empty()) return BadParameter(policy.param() + ".name", "required");
  return absl::OkStatus();
}

// The nested form of the attention object: lychee.v1.AttentionOptions' JSON, one policy object
// ("dense", "lychee", "quest", "prhs", "double_p", "streaming" or "tidal", with its message's
// fields), "audit", "audit_every" and "max_dropped_mass"; protobuf's JSON parser checks the names
// and types.
absl::Status SetNestedAttention(const Member& attention, v1::AttentionOptions* options) {
  for (const char* flat : {"mode", "policy", "budget", "partition_version"}) {
    if (attention.value().contains(flat)) {
      return BadParameter(absl::StrCat("attention.", flat),
                          "belongs to the flat form; give it or a nested policy object (dense, lychee, quest, prhs, "
                          "double_p, streaming, tidal), not both");
    }
  }
  LYCHEE_RETURN_IF_ERROR(
      Member(attention.value(), "attention.", "max_dropped_mass").Number(0, 1, /*low_excluded=*/false).status());
  const auto parsed = google::protobuf::util::JsonStringToMessage(attention.value().dump(), options);
  if (!parsed.ok()) return BadParameter(attention.param(), std::string(parsed.message()));
  return absl::OkStatus();
}

// Lychee's `attention` object onto GenerateRequest.attention, in one of two forms. The flat one:
// {"mode": "dense"|"hybrid", "policy": NAME or {"name": NAME, PolicyOptions fields...}, "budget":
// TOKENS, "partition_version": V, "audit": BOOL, "max_dropped_mass": M}, onto the deprecated
// fields; the nested one (SetNestedAttention), onto `choice`. ToGenerationRequest checks how they
// combine.
absl::Status SetAttention(const Json& body, v1::GenerateRequest* request) {
  const Member attention(body, "", "attention");
  if (attention.absent()) return absl::OkStatus();
  if (!attention.value().is_object()) return attention.Bad("must be an object");
  const std::string prefix = "attention.";
  static const std::vector<std::string> kFlat = {"mode",  "policy",          "budget", "partition_version",
                                                 "audit", "max_dropped_mass"};
  static const std::vector<std::string> kNested = {"dense",   "lychee",    "quest", "prhs",        "double_p",
                                                   "doubleP", "streaming", "tidal", "audit_every", "auditEvery"};
  bool nested = false;
  for (const auto& [key, value] : attention.value().items()) {
    if (std::find(kNested.begin(), kNested.end(), key) != kNested.end()) {
      nested = true;
    } else if (std::find(kFlat.begin(), kFlat.end(), key) == kFlat.end()) {
      return BadParameter(prefix + key,
                          "unknown; the attention object takes mode, policy, budget, partition_version, audit and "
                          "max_dropped_mass, or a policy object (dense, lychee, quest, prhs, double_p, streaming, "
                          "tidal) with audit, audit_every and max_dropped_mass");
    }
  }
  if (nested) return SetNestedAttention(attention, request->mutable_attention());
  v1::AttentionOptions* options = request->mutable_attention();
  const Member mode(attention.value(), prefix, "mode");
  if (mode.value() == "dense") {
    options->set_mode(v1::ATTENTION_MODE_DENSE);
  } else if (mode.value() == "hybrid") {
    options->set_mode(v1::ATTENTION_MODE_HYBRID);
  } else if (!mode.absent()) {
    return mode.Bad("must be \"dense\" or \"hybrid\"");
  }
  const Member policy(attention.value(), prefix, "policy");
  if (!policy.absent()) LYCHEE_RETURN_IF_ERROR(SetPolicy(policy, options));
  LYCHEE_ASSIGN_OR_RETURN(const std::optional<int64_t> budget,
                          Member(attention.value(), prefix, "budget").Integer(1, std::numeric_limits<uint32_t>::max()));
  if (budget) options->set_token_budget(static_cast<uint32_t>(*budget));
  LYCHEE_ASSIGN_OR_RETURN(
      const std::optional<int64_t> version,
      Member(attention.value(), prefix, "partition_version").Integer(1, std::numeric_limits<int64_t>::max()));
  if (version) options->set_partition_version(static_cast<uint64_t>(*version));
  const Member audit(attention.value(), prefix, "audit");
  LYCHEE_ASSIGN_OR_RETURN(const bool audited, audit.Bool());
  if (audited) {
    if (policy.absent()) return BadParameter(audit.param(), "goes with attention.policy (the policy audited)");
    options->mutable_policy()->set_audit(true);
  }
  LYCHEE_ASSIGN_OR_RETURN(const std::optional<double> max_dropped_mass,
                          Member(attention.value(), prefix, "max_dropped_mass").Number(0, 1, /*low_excluded=*/false));
  if (max_dropped_mass) options->set_max_dropped_mass(*max_dropped_mass);
  return absl::OkStatus();
}

// The sampling parameters, n and streaming: what both endpoints share.
absl::Status SetSampling(const Json& body, uint64_t unseeded_seed, ApiRequest* request) {
  v1::GenerateRequest& generate = request->generate;
  LYCHEE_ASSIGN_OR_RETURN(const std::optional<double> temperature,
                          Member(body, "", "temperature").Number(0, kMaxTemperature, /*low_excluded=*/false));
  generate.set_temperature(temperature.value_or(kDefaultTemperature));
  LYCHEE_ASSIGN_OR_RETURN(const std::optional<double> top_p,
                          Member(body, "", "top_p").Number(0, 1, /*low_excluded=*/true));
  if (top_p) generate.set_top_p(*top_p);
  const Member seed(body, "", "seed");
  if (seed.absent()) {
    generate.set_seed(unseeded_seed);
  } else if (!seed.value().is_number_integer()) {
    return seed.Bad("must be an integer");
  } else {
    // Negative seeds (OpenAI's seed is any integer) wrap to the engine's unsigned one.
    generate.set_seed(seed.value().is_number_unsigned() ? seed.value().get<uint64_t>()
                                                        : static_cast<uint64_t>(seed.value().get<int64_t>()));
  }
  LYCHEE_RETURN_IF_ERROR(SetStop(body, &generate));
  const Member n(body, "", "n");
  if (!n.absent() && !(n.value().is_number_integer() && n.value().get<int64_t>() == 1)) {
    return n.Bad("only 1 is supported");
  }
  LYCHEE_ASSIGN_OR_RETURN(request->stream, Member(body, "", "stream").Bool());
  const Member stream_options(body, "", "stream_options");
  if (!stream_options.absent()) {
    if (!stream_options.value().is_object()) return stream_options.Bad("must be an object");
    if (!request->stream) return BadParameter(stream_options.param(), "only allowed with stream: true");
    LYCHEE_ASSIGN_OR_RETURN(request->include_usage,
                            Member(stream_options.value(), "stream_options.", "include_usage").Bool());
  }
  return absl::OkStatus();
}

// max_tokens against the prompt: the prompt and every token asked for must fit the context.
// `requested` empty: `default_tokens`, or what room is left when less.
absl::Status SetMaxTokens(std::optional<int64_t> requested, int64_t default_tokens, const std::string& prompt_param,
                          const ServedModel& model, v1::GenerateRequest* request) {
  const int64_t prompt_tokens = request->token_ids().ids_size();
  if (prompt_tokens == 0) return BadParameter(prompt_param, "empty");
  if (prompt_tokens >= model.max_context_tokens) {
    return BadParameter(prompt_param,
                        absl::StrCat("the prompt has ", prompt_tokens, " tokens; this model's context is ",
                                     model.max_context_tokens, " tokens, generation included"));
  }
  const int64_t room = model.max_context_tokens - prompt_tokens;
  if (requested && *requested > room) {
    return BadParameter("max_tokens", absl::StrCat(*requested, " tokens after a prompt of ", prompt_tokens,
                                                   " tokens exceed this model's context of ", model.max_context_tokens,
                                                   " tokens; ask for at most ", room));
  }
  const int64_t tokens = requested ? *requested : std::min({default_tokens, room, model.max_new_tokens_limit});
  request->set_max_new_tokens(static_cast<int32_t>(tokens));
  return absl::OkStatus();
}

absl::StatusOr<std::optional<int64_t>> RequestedMaxTokens(const Json& body, Endpoint endpoint,
                                                          const ServedModel& model) {
  const std::string limit_note = " (this server's --max-new-tokens)";
  LYCHEE_ASSIGN_OR_RETURN(std::optional<int64_t> max_tokens,
                          Member(body, "", "max_tokens").Integer(1, model.max_new_tokens_limit, limit_note));
  if (endpoint == Endpoint::kChatCompletions) {
    // The chat API's newer name for the same limit.
    const Member completion_tokens(body, "", "max_completion_tokens");
    LYCHEE_ASSIGN_OR_RETURN(const std::optional<int64_t> alias,
                            completion_tokens.Integer(1, model.max_new_tokens_limit, limit_note));
    if (alias && max_tokens && *alias != *max_tokens) {
      return BadParameter("max_completion_tokens", "differs from max_tokens; give one of them");
    }
    if (alias) max_tokens = alias;
  }
  return max_tokens;
}

absl::Status AddTokenIds(const Json& ids, const std::string& param, v1::GenerateRequest* request) {
  for (size_t i = 0; i < ids.size(); ++i) {
    const Json& id = ids[i];
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      return BadParameter(absl::StrCat(param, "[", i, "]"), absl::StrCat("must be a token id, got ", Quote(id)));
    }
    request->mutable_token_ids()->add_ids(static_cast<int32_t>(id.get<int64_t>()));
  }
  return absl::OkStatus();
}

absl::Status EncodeInto(std::string_view text, bool add_special_tokens, const ServedModel& model,
                        v1::GenerateRequest* request) {
  LYCHEE_ASSIGN_OR_RETURN(const std::vector<int32_t> ids, model.tokenizer->Encode(text, add_special_tokens));
  request->mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
  return absl::OkStatus();
}

bool IsTokenIdList(const Json& value) {
  return value.is_array() && std::all_of(value.begin(), value.end(), [](const Json& id) { return id.is_number(); });
}

// `prompt`: a string (encoded with the special tokens, BOS included where the model has one, as
// vLLM does), or a list of token ids used as given. A list of one of those is that prompt; more
// would be a batch, which the one choice of n = 1 cannot answer.
absl::Status SetCompletionPrompt(const Json& body, const ServedModel& model, v1::GenerateRequest* request) {
  const Member prompt(body, "", "prompt");
  if (prompt.absent()) return BadParameter(prompt.param(), "required");
  const Json* single = &prompt.value();
  std::string param = prompt.param();
  if (single->is_array() && !IsTokenIdList(*single)) {
    if (single->size() != 1) {
      return BadParameter(
          param,
          absl::StrCat("one prompt per request (a string or a list of token ids); got a list of ", single->size()));
    }
    single = &(*single)[0];
    param += "[0]";
  }
  if (single->is_string()) return EncodeInto(single->get<std::string>(), /*add_special_tokens=*/true, model, request);
  if (IsTokenIdList(*single)) return AddTokenIds(*single, param, request);
  return BadParameter(param, absl::StrCat("must be a string or a list of token ids, got ", Quote(*single)));
}

// A message's content as the chat template reads it: a string (or null, e.g. an assistant
// message with tool calls). A list of content parts becomes their texts joined by newlines, as
// vLLM gives it to templates that take strings; parts other than text are refused.
absl::StatusOr<Json> MessageContent(const Json& content, const std::string& param) {
  if (content.is_null() || content.is_string()) return content;
  if (!content.is_array()) {
    return BadParameter(param, absl::StrCat("must be a string or a list of content parts, got ", Quote(content)));
  }
  std::string text;
  for (size_t i = 0; i < content.size(); ++i) {
    const Json& part = content[i];
    const std::string part_param = absl::StrCat(param, "[", i, "]");
    if (!part.is_object() || part.value("type", "") != "text") {
      return BadParameter(
          part_param,
          absl::StrCat("only text parts ({\"type\": \"text\", \"text\": ...}) are supported, got ", Quote(part)));
    }
    const auto part_text = part.find("text");
    if (part_text == part.end() || !part_text->is_string()) {
      return BadParameter(part_param + ".text", "must be a string");
    }
    absl::StrAppend(&text, i == 0 ? "" : "\n", part_text->get<std::string>());
  }
  return Json(text);
}

// messages, tools and chat_template_kwargs rendered with the model's chat template, with the
// assistant's turn opened, and encoded without adding special tokens again: the template writes
// the ones the model wants.
absl::Status SetChatPrompt(const Json& body, const ServedModel& model, v1::GenerateRequest* request) {
  if (!model.chat_template.ok()) {
    return absl::FailedPreconditionError(absl::StrCat("this model has no usable chat template (",
                                                      model.chat_template.status().message(),
                                                      "); use /v1/completions with a prompt"));
  }
  const Member messages(body, "", "messages");
  if (messages.absent()) return BadParameter(messages.param(), "required");
  if (!messages.value().is_array()) return messages.Bad("must be a list of messages");
  if (messages.value().empty()) return BadParameter(messages.param(), "empty; give at least one message");
  Json normalized = Json::array();
  for (size_t i = 0; i < messages.value().size(); ++i) {
    const Json& message = messages.value()[i];
    const std::string param = absl::StrCat("messages[", i, "]");
    if (!message.is_object()) return BadParameter(param, absl::StrCat("must be an object, got ", Quote(message)));
    const Member role(message, param + ".", "role");
    if (!role.value().is_string()) return role.Bad("must be a string");
    Json copy = message;
    // A message without content (an assistant's tool calls) stays without: templates tell
    // "undefined" from None.
    if (copy.contains("content")) {
      LYCHEE_ASSIGN_OR_RETURN(copy["content"], MessageContent(copy["content"], param + ".content"));
    }
    normalized.push_back(std::move(copy));
  }
  ChatRequest chat;
  chat.messages_json = normalized.dump();
  chat.add_generation_prompt = true;
  const Member tool_choice(body, "", "tool_choice");
  if (!tool_choice.absent() && tool_choice.value() != "auto" && tool_choice.value() != "none") {
    return tool_choice.Bad(
        "must be \"auto\" or \"none\": tool calls come back as the model's text, and this server "
        "cannot force one");
  }
  const Member tools(body, "", "tools");
  if (!tools.absent()) {
    if (!tools.value().is_array() ||
        !std::all_of(tools.value().begin(), tools.value().end(), [](const Json& tool) { return tool.is_object(); })) {
      return tools.Bad("must be a list of tool objects");
    }
    // "none": the model is not to call tools, so it is not shown them (as vLLM does by default).
    if (tool_choice.value() != "none") chat.tools_json = tools.value().dump();
  }
  const Member kwargs(body, "", "chat_template_kwargs");
  if (!kwargs.absent()) {
    if (!kwargs.value().is_object()) return kwargs.Bad("must be an object of template variables");
    chat.variables_json = kwargs.value().dump();
  }
  const absl::StatusOr<std::string> prompt = model.chat_template->Render(chat);
  // Whatever the template refuses (a role it raises on, a construct only these values reach) is
  // the request's doing.
  if (!prompt.ok()) return BadParameter(messages.param(), std::string(prompt.status().message()));
  return EncodeInto(*prompt, /*add_special_tokens=*/false, model, request);
}

std::string FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStopToken:
      return "stop_token";
    case FinishReason::kStopSequence:
      return "stop_sequence";
    case FinishReason::kMaxTokens:
      return "max_tokens";
    case FinishReason::kContextLimit:
      return "context_limit";
  }
  return "unknown";
}

// OpenAI's two reasons: "stop" at the end of the text or a stop sequence, "length" at a limit.
std::string OpenAiFinishReason(FinishReason reason) {
  return reason == FinishReason::kStopToken || reason == FinishReason::kStopSequence ? "stop" : "length";
}

Json Usage(const GenerationSummary& summary) {
  Json usage = Json::object();
  usage["prompt_tokens"] = summary.prompt_tokens;
  usage["completion_tokens"] = summary.completion_tokens;
  usage["total_tokens"] = summary.prompt_tokens + summary.completion_tokens;
  return usage;
}

// What the gRPC API's GenerateDone tells beyond OpenAI's fields: the attention that served the
// sequence, its timings and, where the backend keeps it, its attention telemetry.
Json LycheeSummary(const GenerationSummary& summary) {
  Json lychee = Json::object();
  lychee["finish_reason"] = FinishReasonName(summary.finish_reason);
  lychee["attention_mode"] = summary.hybrid ? "hybrid" : "dense";
  lychee["partition_version"] = summary.partition_version;
  lychee["token_budget"] = summary.token_budget;
  lychee["policy"] = summary.policy;
  lychee["preemptions"] = summary.preemptions;
  Json& timings = lychee["timings"] = Json::object();
  timings["queue_seconds"] = summary.queue_seconds;
  timings["time_to_first_token_seconds"] = summary.time_to_first_token_seconds;
  timings["mean_token_latency_seconds"] = summary.mean_token_latency_seconds;
  timings["max_token_latency_seconds"] = summary.max_token_latency_seconds;
  timings["total_seconds"] = summary.total_seconds;
  if (summary.telemetry) {
    const GenerationTelemetry& telemetry = *summary.telemetry;
    Json& json = lychee["telemetry"] = Json::object();
    json["num_layers"] = telemetry.num_layers;
    json["num_kv_heads"] = telemetry.num_kv_heads;
    json["tokens_attended"] = telemetry.tokens_attended;
    json["decode_steps"] = telemetry.decode_steps;
    json["kv_bytes_read"] = telemetry.kv_bytes_read;
    json["audited"] = telemetry.audited;
    json["max_dropped_mass"] = telemetry.max_dropped_mass;
    json["mean_dropped_mass"] = telemetry.mean_dropped_mass;
  }
  if (summary.dense_fallback) {
    const DenseFallback& fallback = *summary.dense_fallback;
    lychee["dense_fallback"] = {{"token_index", fallback.token_index},
                                {"dropped_mass", fallback.dropped_mass},
                                {"max_dropped_mass", fallback.max_dropped_mass},
                                {"reason", fallback.Reason()}};
  }
  return lychee;
}

std::string Event(const Json& data) { return absl::StrCat("data: ", data.dump(), "\n\n"); }

constexpr char kDoneEvent[] = "data: [DONE]\n\n";

std::string ErrorType(int http_status) {
  switch (http_status) {
    case 401:
      return "authentication_error";
    case 403:
      return "permission_error";
    case 404:
      return "not_found_error";
    case 429:
      return "rate_limit_error";
    default:
      return http_status >= 500 ? "server_error" : "invalid_request_error";
  }
}

Json ErrorJson(const absl::Status& status, int http_status) {
  Json error = Json::object();
  error["message"] = std::string(status.message());
  error["type"] = ErrorType(http_status);
  const std::string param = ParamOf(status);
  error["param"] = param.empty() ? Json() : Json(param);
  error["code"] = absl::AsciiStrToLower(absl::StatusCodeToString(status.code()));
  Json body = Json::object();
  body["error"] = std::move(error);
  return body;
}

}  // namespace

absl::Status BadParameter(const std::string& param, const std::string& message) {
  absl::Status status = absl::InvalidArgumentError(absl::StrCat(param, ": ", message));
  status.SetPayload(kParamPayload, absl::Cord(param));
  return status;
}

std::string ParamOf(const absl::Status& status) {
  const absl::optional<absl::Cord> param = status.GetPayload(kParamPayload);
  return param ? std::string(*param) : "";
}

absl::StatusOr<ApiRequest> ParseRequest(Endpoint endpoint, std::string_view body_text, const ServedModel& model,
                                        uint64_t unseeded_seed) {
  absl::StatusOr<Json> body = ParseJson<Json>(body_text);
  if (!body.ok()) return absl::InvalidArgumentError(absl::StrCat("the body is not JSON: ", body.status().message()));
  if (!body->is_object()) return absl::InvalidArgumentError("the body must be a JSON object");
  ApiRequest request;
  request.endpoint = endpoint;
  LYCHEE_RETURN_IF_ERROR(CheckModel(*body, model));
  LYCHEE_RETURN_IF_ERROR(CheckUnsupportedFields(*body, endpoint));
  LYCHEE_RETURN_IF_ERROR(SetSampling(*body, unseeded_seed, &request));
  LYCHEE_RETURN_IF_ERROR(SetAttention(*body, &request.generate));
  LYCHEE_ASSIGN_OR_RETURN(const std::optional<int64_t> max_tokens, RequestedMaxTokens(*body, endpoint, model));
  if (endpoint == Endpoint::kCompletions) {
    LYCHEE_RETURN_IF_ERROR(SetCompletionPrompt(*body, model, &request.generate));
    LYCHEE_RETURN_IF_ERROR(SetMaxTokens(max_tokens, kCompletionsDefaultMaxTokens, "prompt", model, &request.generate));
  } else {
    LYCHEE_RETURN_IF_ERROR(SetChatPrompt(*body, model, &request.generate));
    // A chat goes on until the model ends its turn, or the context or the server's limit.
    LYCHEE_RETURN_IF_ERROR(
        SetMaxTokens(max_tokens, std::numeric_limits<int64_t>::max(), "messages", model, &request.generate));
  }
  return request;
}

int HttpStatusOf(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kAborted:
      return 409;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kCancelled:
      return 499;
    case absl::StatusCode::kUnimplemented:
      return 501;
    case absl::StatusCode::kUnavailable:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    default:
      return 500;
  }
}

std::string ErrorBody(const absl::Status& status, int http_status) { return ErrorJson(status, http_status).dump(); }

std::string ModelObject(const ServedModel& model) {
  Json object = Json::object();
  object["id"] = model.name;
  object["object"] = "model";
  object["created"] = model.created;
  object["owned_by"] = "lychee";
  object["max_model_len"] = model.max_context_tokens;
  return object.dump();
}

std::string ModelList(const ServedModel& model) {
  Json list = Json::object();
  list["object"] = "list";
  list["data"] = Json::array({Json::parse(ModelObject(model))});
  return list.dump();
}

namespace {

// The fields every chunk and response starts with.
Json Envelope(const std::string& id, const char* object, int64_t created, const std::string& model) {
  Json json = Json::object();
  json["id"] = id;
  json["object"] = object;
  json["created"] = created;
  json["model"] = model;
  return json;
}

// The one choice of a chunk: a text (completions) or a delta (chat) and, on the last, the finish
// reason.
Json Choice(Endpoint endpoint, Json text_or_delta, Json finish_reason) {
  Json choice = Json::object();
  choice["index"] = 0;
  choice[endpoint == Endpoint::kCompletions ? "text" : "delta"] = std::move(text_or_delta);
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = std::move(finish_reason);
  return choice;
}

Json TextDelta(Endpoint endpoint, std::string_view text) {
  if (endpoint == Endpoint::kCompletions) return Json(std::string(text));
  Json delta = Json::object();
  delta["content"] = std::string(text);
  return delta;
}

}  // namespace

ResponseFormatter::ResponseFormatter(Endpoint endpoint, std::string id, int64_t created, std::string model,
                                     bool include_usage)
    : endpoint_(endpoint),
      id_(std::move(id)),
      created_(created),
      model_(std::move(model)),
      include_usage_(include_usage) {}

std::string ResponseFormatter::StreamStart() const {
  if (endpoint_ == Endpoint::kCompletions) return "";
  Json delta = Json::object();
  delta["role"] = "assistant";
  delta["content"] = "";
  return Chunk(Choice(endpoint_, std::move(delta), nullptr), nullptr);
}

std::string ResponseFormatter::StreamText(std::string_view text) const {
  return Chunk(Choice(endpoint_, TextDelta(endpoint_, text), nullptr), nullptr);
}

std::string ResponseFormatter::StreamEnd(const GenerationSummary& summary) const {
  const Json last_delta = endpoint_ == Endpoint::kCompletions ? Json("") : Json::object();
  std::string events =
      Chunk(Choice(endpoint_, last_delta, OpenAiFinishReason(summary.finish_reason)), LycheeSummary(summary));
  if (include_usage_) {
    // OpenAI's usage chunk: no choices, the usage of the whole request.
    Json usage_chunk = Envelope(id_, ChunkObject(), created_, model_);
    usage_chunk["choices"] = Json::array();
    usage_chunk["usage"] = Usage(summary);
    absl::StrAppend(&events, Event(usage_chunk));
  }
  return absl::StrCat(events, kDoneEvent);
}

std::string ResponseFormatter::StreamError(const absl::Status& error) const {
  return absl::StrCat(Event(ErrorJson(error, HttpStatusOf(error.code()))), kDoneEvent);
}

std::string ResponseFormatter::Whole(std::string_view text, const GenerationSummary& summary) const {
  Json response =
      Envelope(id_, endpoint_ == Endpoint::kCompletions ? "text_completion" : "chat.completion", created_, model_);
  Json choice = Json::object();
  choice["index"] = 0;
  if (endpoint_ == Endpoint::kCompletions) {
    choice["text"] = std::string(text);
  } else {
    Json message = Json::object();
    message["role"] = "assistant";
    message["content"] = std::string(text);
    choice["message"] = std::move(message);
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = OpenAiFinishReason(summary.finish_reason);
  response["choices"] = Json::array({std::move(choice)});
  response["usage"] = Usage(summary);
  response["lychee"] = LycheeSummary(summary);
  return response.dump();
}

const char* ResponseFormatter::ChunkObject() const {
  return endpoint_ == Endpoint::kCompletions ? "text_completion" : "chat.completion.chunk";
}

std::string ResponseFormatter::Chunk(const nlohmann::ordered_json& choice, const nlohmann::ordered_json& lychee) const {
  Json chunk = Envelope(id_, ChunkObject(), created_, model_);
  chunk["choices"] = Json::array({choice});
  // With include_usage every chunk carries "usage", null until the usage chunk.
  if (include_usage_) chunk["usage"] = nullptr;
  if (!lychee.is_null()) chunk["lychee"] = lychee;
  return Event(chunk);
}

std::string ResponseId(Endpoint endpoint, uint64_t random_high, uint64_t random_low) {
  return absl::StrFormat("%s-%016x%016x", endpoint == Endpoint::kCompletions ? "cmpl" : "chatcmpl", random_high,
                         random_low);
}

}  // namespace lychee::openai
