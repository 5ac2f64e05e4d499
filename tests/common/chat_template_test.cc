#include "common/base/chat_template.h"

#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"

namespace lychee {
namespace {

namespace fs = std::filesystem;
// Key order matters: templates print tool definitions with tojson in the order given.
using Json = nlohmann::ordered_json;

const fs::path kFixtures = "tests/data/chat_templates";

std::string ReadFile(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  REQUIRE(file.good());
  std::ostringstream contents;
  contents << file.rdbuf();
  return contents.str();
}

// The fixtures' "now" (an ISO local time), the clock strftime_now read when they were made.
std::tm FixtureNow(const Json& fixtures) {
  std::tm now{};
  std::istringstream text(fixtures.at("now").get<std::string>());
  text >> std::get_time(&now, "%Y-%m-%dT%H:%M:%S");
  REQUIRE(!text.fail());
  now.tm_isdst = -1;
  // Fills in the day of the week and of the year, which %A and %j print.
  std::mktime(&now);
  return now;
}

std::vector<fs::path> RenderFixtures() {
  std::vector<fs::path> paths;
  for (const auto& entry : fs::directory_iterator(kFixtures)) {
    const std::string name = entry.path().filename().string();
    if (name.size() > 13 && name.substr(name.size() - 13) == ".renders.json") paths.push_back(entry.path());
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

absl::StatusOr<std::string> RenderSource(const std::string& source, const std::string& messages_json = "[]",
                                         const std::string& variables_json = "") {
  absl::StatusOr<ChatTemplate> chat_template = ChatTemplate::Parse(source);
  if (!chat_template.ok()) return chat_template.status();
  ChatRequest request;
  request.messages_json = messages_json;
  request.variables_json = variables_json;
  return chat_template->Render(request);
}

TEST_CASE("the real templates render as transformers' apply_chat_template does", "[chat_template]") {
  const std::vector<fs::path> fixtures = RenderFixtures();
  REQUIRE(fixtures.size() == 11);
  for (const fs::path& path : fixtures) {
    const std::string name = path.filename().string();
    const std::string model = name.substr(0, name.size() - std::string(".renders.json").size());
    absl::StatusOr<ChatTemplate> chat_template =
        ChatTemplate::FromTokenizerConfig((kFixtures / (model + ".tokenizer_config.json")).string());
    INFO(model << ": " << chat_template.status());
    REQUIRE(chat_template.ok());
    const Json renders = Json::parse(ReadFile(path));
    for (const Json& render : renders.at("cases")) {
      ChatRequest request;
      request.messages_json = render.at("messages").dump();
      if (render.contains("tools")) request.tools_json = render.at("tools").dump();
      if (render.contains("variables")) request.variables_json = render.at("variables").dump();
      request.add_generation_prompt = render.value("add_generation_prompt", false);
      request.now = FixtureNow(renders);
      const absl::StatusOr<std::string> text = chat_template->Render(request);
      INFO(model << " / " << render.at("name").get<std::string>() << ": " << text.status());
      if (render.contains("expected")) {
        REQUIRE(text.ok());
        CHECK(*text == render.at("expected").get<std::string>());
      } else {
        // The template's raise_exception: its message, as is.
        REQUIRE(text.status().code() == absl::StatusCode::kInvalidArgument);
        CHECK(text.status().message() == render.at("expected_error").get<std::string>());
      }
    }
  }
}

TEST_CASE("each construct of the subset renders as Jinja renders it", "[chat_template]") {
  const Json snippets = Json::parse(ReadFile(kFixtures / "jinja_snippets.json"));
  for (const Json& snippet : snippets.at("cases")) {
    absl::StatusOr<ChatTemplate> chat_template = ChatTemplate::Parse(snippet.at("template").get<std::string>());
    INFO(snippet.at("name").get<std::string>() << ": " << chat_template.status());
    REQUIRE(chat_template.ok());
    // The snippets' variables go in as template variables; "messages" is the request's own.
    Json variables = snippet.at("variables");
    ChatRequest request;
    request.messages_json = variables.contains("messages") ? variables.at("messages").dump() : "[]";
    variables.erase("messages");
    request.variables_json = variables.dump();
    request.now = FixtureNow(snippets);
    const absl::StatusOr<std::string> text = chat_template->Render(request);
    INFO(text.status());
    REQUIRE(text.ok());
    CHECK(*text == snippet.at("expected").get<std::string>());
  }
}

TEST_CASE("a construct outside the subset is an error naming it and its line", "[chat_template]") {
  const struct {
    std::string source;
    std::string message;
  } cases[] = {
      {"{{ messages }}\n\n{{ messages | wordcount }}", "chat template line 3: unsupported filter 'wordcount'"},
      {"{% call greet('x') %}hi{% endcall %}", "chat template line 1: unsupported tag 'call'"},
      {"{% for m in messages %}\n{% macro greet() %}hi{% endmacro %}{% endfor %}",
       "chat template line 2: unsupported macro defined inside a for loop, set block or macro"},
      {"{% if x is escaped %}{% endif %}", "chat template line 1: unsupported test 'escaped'"},
      {"line\n{% for x in y recursive %}{% endfor %}", "chat template line 2: unsupported recursive for loop"},
      {"{{ f(*args) }}", "chat template line 1: unsupported *args or **kwargs in a call"},
  };
  for (const auto& c : cases) {
    const absl::StatusOr<ChatTemplate> chat_template = ChatTemplate::Parse(c.source);
    INFO(c.source);
    REQUIRE(chat_template.status().code() == absl::StatusCode::kUnimplemented);
    CHECK(chat_template.status().message() == c.message);
  }
  // What only the values reveal fails at render time, naming it too.
  const absl::StatusOr<std::string> upper =
      RenderSource("\n{{ messages[0].content.upper() }}", R"([{"content": "straße"}])");
  CHECK(upper.status().code() == absl::StatusCode::kUnimplemented);
  CHECK(upper.status().message() == "chat template line 2: unsupported case conversion of non-ASCII text");
  const absl::StatusOr<std::string> method = RenderSource("{{ 'a'.zfill(3) }}");
  CHECK(method.status().code() == absl::StatusCode::kUnimplemented);
  CHECK(method.status().message() == "chat template line 1: unsupported string method 'zfill'");
  const absl::StatusOr<std::string> generator = RenderSource("{{ [1, 2] | select('odd') }}");
  CHECK(generator.status().code() == absl::StatusCode::kUnimplemented);
}

TEST_CASE("raise_exception fails the render with the template's message", "[chat_template]") {
  const std::string source =
      "{% for message in messages %}{% if message.role not in ['user', 'assistant'] %}"
      "{{ raise_exception('Unsupported role: ' + message.role) }}{% endif %}{{ message.content }}{% endfor %}";
  const absl::StatusOr<std::string> rejected =
      RenderSource(source, R"([{"role": "user", "content": "a"}, {"role": "developer", "content": "b"}])");
  CHECK(rejected.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(rejected.status().message() == "Unsupported role: developer");
  const absl::StatusOr<std::string> accepted = RenderSource(source, R"([{"role": "user", "content": "a"}])");
  REQUIRE(accepted.ok());
  CHECK(*accepted == "a");
}

TEST_CASE("malformed templates fail to parse with the line", "[chat_template]") {
  const struct {
    std::string source;
    std::string message;
  } cases[] = {
      {"{% if true %}unclosed", "chat template line 1: unexpected end of template, expected 'elif'"},
      {"a\n{{ 1 + }}", "chat template line 2: expected an expression, got end of print statement '}}'"},
      {"{% for x in y %}{% endif %}", "chat template line 1: unknown tag 'endif'"},
      {"{{ 'unterminated }}", "chat template line 1: unterminated string"},
      {"{# comment", "chat template line 1: missing end of comment tag"},
      {"{{ x ) }}", "chat template line 1: unexpected ')'"},
      {"{% break %}", "chat template line 1: 'break' outside a for loop"},
      {"{% frobnicate %}", "chat template line 1: unknown tag 'frobnicate'"},
      {"{{ x is defined if y }}", "chat template line 1: expected end of print statement '}}', got 'y'"},
  };
  for (const auto& c : cases) {
    const absl::StatusOr<ChatTemplate> chat_template = ChatTemplate::Parse(c.source);
    INFO(c.source);
    REQUIRE(chat_template.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(chat_template.status().message() == c.message);
  }
  CHECK(ChatTemplate::Parse("\xff").status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("errors Jinja raises at render time are errors here", "[chat_template]") {
  const struct {
    std::string source;
    std::string message;
  } cases[] = {
      {"{{ missing.attribute }}", "chat template line 1: 'missing' is undefined"},
      {"{{ messages[0].nothing.deeper }}", "chat template line 1: 'dict object' has no attribute 'nothing'"},
      {"{{ 'a' + 1 }}", "chat template line 1: unsupported operand type(s) for +: 'str' and 'int'"},
      {"{{ 1 < 'a' }}", "chat template line 1: '<' not supported between instances of 'int' and 'str'"},
      {"{{ 'x' in none }}", "chat template line 1: argument of type 'NoneType' is not iterable"},
      {"{{ 1 // 0 }}", "chat template line 1: integer division or modulo by zero"},
      {"{% set x = 1 %}{% set x.a = 2 %}", "chat template line 1: cannot assign attribute on non-namespace object"},
      {"{{ missing | tojson }}", "chat template line 1: Object of type Undefined is not JSON serializable"},
      {"{% macro m(x) %}{{ x }}{% endmacro %}{{ m(1, 2) }}",
       "chat template line 1: macro 'm' takes not more than 1 argument(s)"},
      {"{% macro m(x) %}{{ m(x) }}{% endmacro %}{{ m(1) }}", "chat template line 1: macro calls nested too deeply"},
  };
  for (const auto& c : cases) {
    const absl::StatusOr<std::string> text = RenderSource(c.source, R"([{"role": "user"}])");
    INFO(c.source);
    REQUIRE(text.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(text.status().message() == c.message);
  }
}

TEST_CASE("malformed requests are INVALID_ARGUMENT", "[chat_template]") {
  const absl::StatusOr<ChatTemplate> chat_template = ChatTemplate::Parse("{{ messages | length }}");
  REQUIRE(chat_template.ok());
  ChatRequest request;
  request.messages_json = "{\"role\": \"user\"}";
  CHECK(chat_template->Render(request).status().code() == absl::StatusCode::kInvalidArgument);
  request.messages_json = "[";
  CHECK(chat_template->Render(request).status().code() == absl::StatusCode::kInvalidArgument);
  request.messages_json = "[]";
  request.tools_json = "[1]";
  CHECK(chat_template->Render(request).status().message() == "tools[0] must be a JSON object");
  request.tools_json = "";
  request.variables_json = R"({"messages": []})";
  CHECK(chat_template->Render(request).status().code() == absl::StatusCode::kInvalidArgument);
  request.variables_json = R"({"enable_thinking": false})";
  const absl::StatusOr<std::string> text = chat_template->Render(request);
  REQUIRE(text.ok());
  CHECK(*text == "0");
}

TEST_CASE("transformers' {% generation %} block renders its body", "[chat_template]") {
  const absl::StatusOr<std::string> text = RenderSource(
      "{% for m in messages %}{% generation %}{% set x = m.content %}[{{ x }}]{% endgeneration %}{% endfor %}{{ x }}",
      R"([{"content": "a"}, {"content": "b"}])");
  REQUIRE(text.ok());
  CHECK(*text == "[a][b]");
}

struct TemporaryDirectory {
  TemporaryDirectory() : path(fs::temp_directory_path() / ("chat_template_test_" + std::to_string(::getpid()))) {
    fs::create_directories(path);
  }
  ~TemporaryDirectory() { fs::remove_all(path); }
  void Write(const std::string& name, const std::string& contents) const { std::ofstream(path / name) << contents; }
  fs::path path;
};

TEST_CASE("tokenizer_config.json: the template, named templates and the special tokens", "[chat_template]") {
  TemporaryDirectory model;
  ChatRequest request;
  request.messages_json = R"([{"role": "user", "content": "hi"}])";

  model.Write("tokenizer_config.json", R"({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
      "unk_token": null, "chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}{{ unk_token is defined }}"})");
  absl::StatusOr<ChatTemplate> chat_template = ChatTemplate::FromTokenizerConfig(model.path.string());
  REQUIRE(chat_template.ok());
  CHECK(*chat_template->Render(request) == "<s>hi</s>False");

  model.Write("tokenizer_config.json", R"({"chat_template": [{"name": "tool_use", "template": "tools"},
      {"name": "default", "template": "default {{ messages | length }}"}]})");
  chat_template = ChatTemplate::FromTokenizerConfig((model.path / "tokenizer_config.json").string());
  REQUIRE(chat_template.ok());
  CHECK(*chat_template->Render(request) == "default 1");

  model.Write("tokenizer_config.json", R"({"chat_template": [{"name": "rag", "template": "x"}]})");
  chat_template = ChatTemplate::FromTokenizerConfig(model.path.string());
  CHECK(chat_template.status().code() == absl::StatusCode::kNotFound);
  CHECK(chat_template.status().message().find("no default chat template (it has: rag)") != std::string::npos);

  model.Write("tokenizer_config.json", R"({"eos_token": "</s>"})");
  chat_template = ChatTemplate::FromTokenizerConfig(model.path.string());
  CHECK(chat_template.status().code() == absl::StatusCode::kNotFound);
  CHECK(chat_template.status().message().find("has no chat_template") != std::string::npos);

  // transformers' chat_template.jinja beside the config comes first.
  model.Write("chat_template.jinja", "jinja {{ eos_token }}\n");
  chat_template = ChatTemplate::FromTokenizerConfig(model.path.string());
  REQUIRE(chat_template.ok());
  CHECK(*chat_template->Render(request) == "jinja </s>");

  model.Write("tokenizer_config.json", R"({"chat_template": "{{ messages | frobnicate }}"})");
  fs::remove(model.path / "chat_template.jinja");
  chat_template = ChatTemplate::FromTokenizerConfig(model.path.string());
  CHECK(chat_template.status().code() == absl::StatusCode::kUnimplemented);
  CHECK(chat_template.status().message().find("unsupported filter 'frobnicate'") != std::string::npos);

  CHECK(ChatTemplate::FromTokenizerConfig((model.path / "absent").string()).status().code() ==
        absl::StatusCode::kNotFound);
}

TEST_CASE("the bundled model's chat template, if it has one", "[chat_template]") {
  const absl::StatusOr<ChatTemplate> chat_template = ChatTemplate::FromTokenizerConfig("models/tiny-llama-retrieval");
  if (!chat_template.ok()) {
    // It was trained on plain text and ships no template.
    CHECK(chat_template.status().code() == absl::StatusCode::kNotFound);
    return;
  }
  ChatRequest request;
  request.messages_json = R"([{"role": "user", "content": "What is the passkey?"}])";
  request.add_generation_prompt = true;
  const absl::StatusOr<std::string> text = chat_template->Render(request);
  INFO(text.status());
  REQUIRE(text.ok());
  CHECK(text->find("What is the passkey?") != std::string::npos);
}

}  // namespace
}  // namespace lychee
