// lychee-inference's OpenAI-compatible HTTP API in process, over loopback HTTP: completions and
// chat completions whole and streamed (and the same text as gRPC's Generate), the router gauges
// on /metrics, error objects and statuses, tokens, request size, overload, clients that go away,
// HTTPS; and the official openai npm client streaming from it (the [node] case, a ctest entry of
// its own that skips where node and npm are not installed).
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "harness/temp_dir.h"
#include "inference/service.h"
#include "lychee/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/http_get.h"
#include "tests/run_command.h"
#include "tests/security/test_pki.h"

namespace lychee {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using testing::HttpRequest;
using testing::HttpResponse;
using testing::OpenRequest;

const std::filesystem::path kBundledModel = "models/tiny-llama-retrieval";
constexpr char kClientToken[] = "client-token-0123456789abcdef";
constexpr char kAdminToken[] = "admin-token-0123456789abcdef";

// ChatML, refusing roles other than system, user and assistant as real templates do. The bundled
// model's vocabulary has <|im_start|> and <|im_end|>.
constexpr char kChatTemplate[] =
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('Unexpected role: ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}";

struct Setup {
  // The bundled model as it is (no chat template), or a copy with kChatTemplate.
  bool chat_template = true;
  bool tokens = false;
  const testing::TestPki* tls = nullptr;
  int max_batch = 16;
  int max_queued = 64;
  int64_t max_context = 0;
};

struct Fixture {
  testing::TempDir dir;
  std::unique_ptr<InferenceServer> server;
  int port = 0;

  explicit Fixture(const Setup& setup = {}) {
    absl::StatusOr<std::unique_ptr<InferenceServer>> started = InferenceServer::Start(Options(setup));
    INFO(started.status());
    REQUIRE(started.ok());
    server = *std::move(started);
    port = server->http_port();
    REQUIRE(port != 0);
  }

  ~Fixture() { server->Shutdown(); }

  InferenceServerOptions Options(const Setup& setup) {
    InferenceServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.http_address = "127.0.0.1:0";
    options.state_dir = (dir.path / "state").string();
    options.engine.model_dir = setup.chat_template ? ChatModelCopy() : kBundledModel.string();
    options.engine.max_batch = setup.max_batch;
    options.engine.max_queued = setup.max_queued;
    options.engine.max_context_tokens = setup.max_context;
    if (setup.tokens) {
      options.access.admin_token_file = WriteFile("admin.token", kAdminToken);
      options.access.client_token_file = WriteFile("client.token", kClientToken);
    }
    if (setup.tls != nullptr) {
      options.tls.cert_file = setup.tls->Cert("server");
      options.tls.key_file = setup.tls->Key("server");
    }
    return options;
  }

  std::string WriteFile(const std::string& name, const std::string& content) {
    std::ofstream(dir.path / name) << content;
    return (dir.path / name).string();
  }

  // The bundled model's files, linked, under a directory named tiny-chat with a chat template.
  std::string ChatModelCopy() {
    const std::filesystem::path model = dir.path / "tiny-chat";
    std::filesystem::create_directories(model);
    for (const char* file : {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}) {
      if (!std::filesystem::exists(model / file)) {
        std::filesystem::create_symlink(std::filesystem::absolute(kBundledModel / file), model / file);
      }
    }
    std::ofstream(model / "tokenizer_config.json")
        << json{{"eos_token", "<|endoftext|>"}, {"chat_template", kChatTemplate}}.dump();
    return model.string();
  }

  HttpResponse Post(const std::string& path, const std::string& body,
                    const std::vector<std::string>& headers = {}) const {
    return HttpRequest(port, "POST", path, body, headers);
  }

  HttpResponse Get(const std::string& path, const std::vector<std::string>& headers = {}) const {
    return HttpRequest(port, "GET", path, "", headers);
  }

  // The value of an unlabelled gauge or counter line of /metrics on the HTTP port.
  double Metric(const std::string& series) const {
    const std::string metrics = Get("/metrics").body;
    const size_t at = metrics.find("\n" + series + " ");
    REQUIRE(at != std::string::npos);
    return std::stod(metrics.substr(at + series.size() + 2));
  }

  void WaitForMetric(const std::string& series, const std::function<bool(double)>& condition) const {
    const auto until = std::chrono::steady_clock::now() + 10s;
    while (!condition(Metric(series))) {
      INFO(series << " = " << Metric(series));
      REQUIRE(std::chrono::steady_clock::now() < until);
      std::this_thread::sleep_for(20ms);
    }
  }
};

json BodyJson(const HttpResponse& response) {
  INFO(response.status << " " << response.body);
  REQUIRE(response.status != 0);
  return json::parse(response.body);
}

// The JSON of each "data:" event; "[DONE]" as a string.
std::vector<json> Events(const std::string& body) {
  std::vector<json> events;
  for (size_t start = 0; start < body.size();) {
    const size_t end = body.find("\n\n", start);
    REQUIRE(end != std::string::npos);
    const std::string event = body.substr(start, end - start);
    REQUIRE(event.rfind("data: ", 0) == 0);
    events.push_back(event == "data: [DONE]" ? json("[DONE]") : json::parse(event.substr(6)));
    start = end + 2;
  }
  return events;
}

struct Streamed {
  std::string text;
  json finish_reason;
  json usage;
  json lychee;
  std::vector<json> events;
};

Streamed Collect(const HttpResponse& response, bool chat) {
  INFO(response.status << " " << response.body);
  REQUIRE(response.status == 200);
  REQUIRE(response.headers.find("Content-Type: text/event-stream") != std::string::npos);
  Streamed streamed;
  streamed.events = Events(response.body);
  REQUIRE(streamed.events.back() == "[DONE]");
  for (const json& event : streamed.events) {
    if (!event.is_object()) continue;
    if (event.contains("usage") && !event["usage"].is_null()) streamed.usage = event["usage"];
    if (event.contains("lychee")) streamed.lychee = event["lychee"];
    for (const json& choice : event["choices"]) {
      const json& text = chat ? choice["delta"].value("content", json("")) : choice["text"];
      streamed.text += text.get<std::string>();
      if (!choice["finish_reason"].is_null()) streamed.finish_reason = choice["finish_reason"];
    }
  }
  return streamed;
}

constexpr char kPrompt[] = "The harbour was quiet that morning and";

std::string CompletionBody(const std::string& extra = "") {
  return std::string(R"({"prompt": ")") + kPrompt + R"(", "max_tokens": 10, "temperature": 0)" + extra + "}";
}

std::string ChatBody(const std::string& extra = "") {
  return R"({"messages": [{"role": "user", "content": "Where is the harbour?"}], "max_tokens": 10, "temperature": 0)" +
         extra + "}";
}

TEST_CASE("completions and chat completions, whole and streamed, with gRPC's text") {
  Fixture fixture;
  const json models = BodyJson(fixture.Get("/v1/models"));
  REQUIRE(models["data"].size() == 1);
  CHECK(models["data"][0]["id"] == "tiny-chat");
  CHECK(BodyJson(fixture.Get("/v1/models/tiny-chat"))["id"] == "tiny-chat");
  CHECK(fixture.Get("/v1/models/gpt-4o").status == 404);
  const HttpResponse health = fixture.Get("/health");
  CHECK(health.status == 200);

  const HttpResponse whole = fixture.Post("/v1/completions", CompletionBody(R"(, "model": "tiny-chat")"));
  REQUIRE(whole.status == 200);
  CHECK(whole.headers.find("Content-Type: application/json") != std::string::npos);
  const json completion = BodyJson(whole);
  CHECK(completion["object"] == "text_completion");
  CHECK(completion["id"].get<std::string>().rfind("cmpl-", 0) == 0);
  const std::string text = completion["choices"][0]["text"];
  CHECK_FALSE(text.empty());
  CHECK(completion["choices"][0]["finish_reason"] == "length");
  CHECK(completion["usage"]["completion_tokens"] == 10);
  CHECK(completion["usage"]["total_tokens"] ==
        completion["usage"]["prompt_tokens"].get<int>() + completion["usage"]["completion_tokens"].get<int>());
  CHECK(completion["lychee"]["attention_mode"] == "dense");
  CHECK(completion["lychee"]["finish_reason"] == "max_tokens");
  CHECK(completion["lychee"]["timings"]["time_to_first_token_seconds"] > 0);

  // The gRPC service, given the same prompt, says the same.
  auto stub = v1::InferenceService::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(fixture.server->port()), grpc::InsecureChannelCredentials()));
  v1::GenerateRequest generate;
  generate.set_text(kPrompt);
  generate.set_max_new_tokens(10);
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, generate);
  std::string grpc_text;
  for (v1::GenerateResponse response; reader->Read(&response);) grpc_text += response.text();
  REQUIRE(reader->Finish().ok());
  CHECK(grpc_text == text);

  const Streamed streamed = Collect(
      fixture.Post("/v1/completions", CompletionBody(R"(, "stream": true, "stream_options": {"include_usage": true})")),
      /*chat=*/false);
  CHECK(streamed.text == text);
  CHECK(streamed.finish_reason == "length");
  CHECK(streamed.usage == completion["usage"]);
  CHECK(streamed.lychee["finish_reason"] == "max_tokens");
  CHECK(streamed.events.size() >= 4);  // text, the finish, the usage, [DONE]

  // A stop sequence: the text ends before it.
  REQUIRE(text.find(' ', 1) != std::string::npos);
  const std::string stop = text.substr(text.find(' ', 1), 4);
  const json stopped = BodyJson(fixture.Post("/v1/completions", CompletionBody(R"(, "stop": ")" + stop + R"(")")));
  CHECK(stopped["choices"][0]["text"] == text.substr(0, text.find(stop)));
  CHECK(stopped["choices"][0]["finish_reason"] == "stop");
  CHECK(stopped["lychee"]["finish_reason"] == "stop_sequence");

  const json chat = BodyJson(fixture.Post("/v1/chat/completions", ChatBody()));
  CHECK(chat["object"] == "chat.completion");
  CHECK(chat["choices"][0]["message"]["role"] == "assistant");
  const std::string reply = chat["choices"][0]["message"]["content"];
  CHECK_FALSE(reply.empty());
  const Streamed streamed_chat = Collect(fixture.Post("/v1/chat/completions", ChatBody(R"(, "stream": true)")),
                                         /*chat=*/true);
  CHECK(streamed_chat.events.front()["choices"][0]["delta"]["role"] == "assistant");
  CHECK(streamed_chat.events.front()["object"] == "chat.completion.chunk");
  CHECK(streamed_chat.text == reply);
  CHECK(streamed_chat.finish_reason == chat["choices"][0]["finish_reason"]);
  CHECK(streamed_chat.usage.is_null());  // not asked for
}

TEST_CASE("bad requests get OpenAI error objects with their HTTP status, and the server goes on") {
  Setup setup;
  setup.max_context = 256;
  Fixture fixture(setup);
  struct Bad {
    std::string path;
    std::string body;
    int status;
    json param;
  };
  const std::vector<Bad> cases = {
      {"/v1/completions", R"({"prompt": "Hi", )", 400, nullptr},
      {"/v1/completions", R"({"prompt": "Hi", "n": 2})", 400, "n"},
      {"/v1/completions", R"({"prompt": "Hi", "max_tokens": "many"})", 400, "max_tokens"},
      {"/v1/completions", R"({"prompt": "Hi", "max_tokens": 300})", 400, "max_tokens"},
      {"/v1/completions", R"({"prompt": "Hi", "model": "gpt-4o"})", 404, "model"},
      {"/v1/completions", R"({"prompt": "Hi", "attention": {"mode": "hybrid", "policy": "quest"}})", 400, nullptr},
      {"/v1/completions", R"({"prompt": "Hi", "attention": {"partition_version": 9}})", 404, nullptr},
      {"/v1/chat/completions", R"({"messages": []})", 400, "messages"},
      {"/v1/chat/completions", R"({"messages": [{"role": "robot", "content": "Beep"}]})", 400, "messages"},
  };
  for (const Bad& bad : cases) {
    const HttpResponse response = fixture.Post(bad.path, bad.body);
    INFO(bad.body << " -> " << response.status << " " << response.body);
    CHECK(response.status == bad.status);
    const json error = json::parse(response.body)["error"];
    CHECK(error["param"] == bad.param);
    CHECK(error["type"] == (bad.status == 404 ? "not_found_error" : "invalid_request_error"));
    CHECK_FALSE(error["message"].get<std::string>().empty());
  }
  CHECK(json::parse(fixture.Post("/v1/completions", R"({"prompt": "Hi", "max_tokens": 300})").body)["error"]["message"]
            .get<std::string>()
            .find("context of 256 tokens") != std::string::npos);

  const HttpResponse unknown = fixture.Get("/v1/engines");
  CHECK(unknown.status == 404);
  CHECK(json::parse(unknown.body)["error"]["message"].get<std::string>().find("/v1/engines") != std::string::npos);
  const HttpResponse wrong_method = fixture.Get("/v1/chat/completions");
  CHECK(wrong_method.status == 405);
  CHECK(wrong_method.headers.find("Allow: POST") != std::string::npos);
  CHECK(fixture.Post("/health", "{}").status == 405);

  // Refused from its Content-Length alone: the body is never sent.
  const int fd = testing::ConnectLoopback(fixture.port);
  REQUIRE(testing::SendAll(fd, "POST /v1/completions HTTP/1.0\r\nContent-Length: 100000000\r\n\r\n"));
  const HttpResponse too_large = testing::ParseHttpResponse(testing::ReadToEnd(fd));
  close(fd);
  CHECK(too_large.status == 413);
  CHECK(json::parse(too_large.body)["error"]["message"].get<std::string>().find("at most 16777216") !=
        std::string::npos);
  // A chunked body announces no length: the connection is closed once it passes the limit.
  const int chunked = testing::ConnectLoopback(fixture.port);
  REQUIRE(testing::SendAll(chunked, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"));
  const std::string chunk = "100000\r\n" + std::string(1 << 20, ' ') + "\r\n";
  int chunks_sent = 0;
  while (chunks_sent < 64 && testing::SendAll(chunked, chunk)) ++chunks_sent;
  CHECK(chunks_sent < 64);
  CHECK(testing::ParseHttpResponse(testing::ReadToEnd(chunked)).status == 0);
  close(chunked);

  CHECK(fixture.Post("/v1/completions", CompletionBody()).status == 200);
}

TEST_CASE("the API takes the client token as Authorization: Bearer; health and metrics are open") {
  Setup setup;
  setup.tokens = true;
  Fixture fixture(setup);
  const HttpResponse anonymous = fixture.Post("/v1/completions", CompletionBody());
  CHECK(anonymous.status == 401);
  CHECK(anonymous.headers.find("WWW-Authenticate: Bearer") != std::string::npos);
  CHECK(json::parse(anonymous.body)["error"]["type"] == "authentication_error");
  const std::string client = std::string("Authorization: Bearer ") + kClientToken;
  const std::string admin = std::string("Authorization: Bearer ") + kAdminToken;
  CHECK(fixture.Post("/v1/completions", CompletionBody(), {"Authorization: Bearer not-the-token"}).status == 401);
  CHECK(fixture.Get("/v1/models").status == 401);
  CHECK(fixture.Post("/v1/completions", CompletionBody(), {client}).status == 200);
  CHECK(fixture.Post("/v1/chat/completions", ChatBody(), {admin}).status == 200);
  CHECK(fixture.Get("/v1/models", {client}).status == 200);
  CHECK(fixture.Get("/health").status == 200);
  CHECK(fixture.Get("/metrics").status == 200);
}

TEST_CASE("the router gauges follow a full server, which answers 429; a model without a chat template 400") {
  Setup setup;
  setup.chat_template = false;
  setup.max_batch = 1;
  setup.max_queued = 1;
  Fixture fixture(setup);
  const std::string long_stream = R"({"prompt": "Tell me a long story.", "max_tokens": 4000, "stream": true})";
  OpenRequest running(fixture.port, "/v1/completions", long_stream);
  REQUIRE(running.ReadUntil("data: "));
  OpenRequest waiting(fixture.port, "/v1/completions", long_stream);
  fixture.WaitForMetric("lychee_waiting_requests", [](double value) { return value == 1; });
  CHECK(fixture.Metric("lychee_running_requests") == 1);
  const double usage = fixture.Metric("lychee_kv_cache_usage");
  CHECK(usage > 0);
  CHECK(usage < 1);

  const HttpResponse full = fixture.Post("/v1/completions", CompletionBody());
  CHECK(full.status == 429);
  CHECK(json::parse(full.body)["error"]["type"] == "rate_limit_error");

  const HttpResponse chat = fixture.Post("/v1/chat/completions", ChatBody());
  CHECK(chat.status == 400);
  CHECK(json::parse(chat.body)["error"]["message"].get<std::string>().find("no chat_template") != std::string::npos);
  CHECK(fixture.server->chat_template_status().code() == absl::StatusCode::kNotFound);

  running.Close();
  waiting.Close();
  fixture.WaitForMetric("lychee_running_requests", [](double value) { return value == 0; });
  fixture.WaitForMetric("lychee_waiting_requests", [](double value) { return value == 0; });
  CHECK(fixture.Metric("lychee_kv_cache_usage") == 0);
}

TEST_CASE("a client that goes away cancels its generation, streamed or not") {
  Fixture fixture;
  const auto cancelled = [&] {
    const std::string metrics = fixture.Get("/metrics").body;
    const std::string series = "lychee_requests_total{outcome=\"cancelled\"} ";
    return std::stod(metrics.substr(metrics.find(series) + series.size()));
  };
  {
    OpenRequest stream(fixture.port, "/v1/completions",
                       R"({"prompt": "Tell me a long story.", "max_tokens": 4000, "stream": true})");
    REQUIRE(stream.ReadUntil("data: "));
    CHECK(fixture.Metric("lychee_running_requests") == 1);
  }
  fixture.WaitForMetric("lychee_running_requests", [](double value) { return value == 0; });
  CHECK(cancelled() == 1);
  {
    OpenRequest whole(fixture.port, "/v1/chat/completions",
                      R"({"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 4000})");
    fixture.WaitForMetric("lychee_running_requests", [](double value) { return value == 1; });
  }
  fixture.WaitForMetric("lychee_running_requests", [](double value) { return value == 0; });
  CHECK(cancelled() == 2);
  CHECK(fixture.Metric("lychee_kv_cache_usage") == 0);
}

TEST_CASE("HTTPS with the gRPC server's certificate; no mutual TLS") {
  const testing::TestPki pki;
  Setup setup;
  setup.tls = &pki;
  Fixture fixture(setup);
  const testing::CommandResult https = testing::RunCommand(
      "printf 'GET /health HTTP/1.0\\r\\n\\r\\n' | openssl s_client -quiet -verify_return_error -CAfile " +
      pki.Cert("ca") + " -servername localhost -connect 127.0.0.1:" + std::to_string(fixture.port));
  INFO(https.output);
  CHECK(https.output.find(" 200 OK") != std::string::npos);
  CHECK(https.output.find("serving") != std::string::npos);
  CHECK(fixture.Get("/health").status == 0);  // plaintext is not spoken

  InferenceServerOptions mutual = fixture.Options(setup);
  mutual.tls.client_ca_file = pki.Cert("ca");
  mutual.state_dir = (fixture.dir.path / "state2").string();
  const absl::StatusOr<std::unique_ptr<InferenceServer>> refused = InferenceServer::Start(mutual);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(refused.status().message().find("client certificates") != absl::string_view::npos);
}

// The official client of OpenAI's API for node, installed by npm from the committed lockfile into
// the build tree (once; again when the lockfile changes).
std::string InstallOpenAiClient() {
  const std::filesystem::path source = "tests/inference/openai_client";
  const std::filesystem::path install = LYCHEE_OPENAI_CLIENT_DIR;
  std::filesystem::create_directories(install);
  const auto read = [](const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  const bool installed = std::filesystem::exists(install / "node_modules/openai/package.json") &&
                         read(install / "package-lock.json") == read(source / "package-lock.json");
  for (const char* file : {"package.json", "package-lock.json", "openai_client_test.mjs"}) {
    std::filesystem::copy_file(source / file, install / file, std::filesystem::copy_options::overwrite_existing);
  }
  if (!installed) {
    const testing::CommandResult npm =
        testing::RunCommand("cd '" + install.string() + "' && npm ci --no-audit --no-fund --ignore-scripts");
    INFO("npm ci (it needs the npm registry):\n" << npm.output);
    REQUIRE(npm.exit_code == 0);
  }
  return (install / "openai_client_test.mjs").string();
}

TEST_CASE("the openai npm client streams a chat completion and a completion", "[node]") {
  if (testing::RunCommand("command -v node && command -v npm").exit_code != 0) {
    WARN("SKIPPED: node and npm are not installed (Debian packages nodejs and npm, in scripts/debian-packages.txt)");
    return;
  }
  const std::string script = InstallOpenAiClient();
  Setup setup;
  setup.tokens = true;
  Fixture fixture(setup);
  const testing::CommandResult client = testing::RunCommand(
      "node '" + script + "' http://127.0.0.1:" + std::to_string(fixture.port) + "/v1 " + kClientToken);
  INFO(client.output);
  REQUIRE(client.exit_code == 0);
  const json result = json::parse(client.output.substr(client.output.rfind("\n{") + 1));

  // What the server answers unstreamed to the requests the client streamed.
  const std::vector<std::string> token = {std::string("Authorization: Bearer ") + kClientToken};
  const json chat = BodyJson(fixture.Post(
      "/v1/chat/completions",
      R"({"messages": [{"role": "user", "content": "Where is the harbour?"}], "max_tokens": 12, "temperature": 0})",
      token));
  const json completion = BodyJson(
      fixture.Post("/v1/completions",
                   std::string(R"({"prompt": ")") + kPrompt + R"(", "max_tokens": 12, "temperature": 0})", token));

  CHECK(result["model"] == "tiny-chat");
  CHECK(result["chat"]["text"] == chat["choices"][0]["message"]["content"]);
  CHECK(result["chat"]["finish_reason"] == "length");
  CHECK(result["chat"]["usage"] == chat["usage"]);
  CHECK(result["chat"]["usage"]["completion_tokens"] == 12);
  CHECK(result["chat"]["lychee"]["attention_mode"] == "dense");
  CHECK(result["completion"]["text"] == completion["choices"][0]["text"]);
  CHECK(result["completion"]["finish_reason"] == "length");
  CHECK(result["completion"]["usage"] == completion["usage"]);
  CHECK(result["completion"]["chunks"] > 3);
  CHECK(result["error"] == json::parse(R"({"name": "BadRequestError", "status": 400, "param": "n"})"));
}

}  // namespace
}  // namespace lychee
