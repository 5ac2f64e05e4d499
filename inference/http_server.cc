#include "inference/http_server.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>

#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iterator>
#include <optional>
#include <random>
#include <string_view>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/service/grpc_status.h"
#include "inference/generate_request.h"

namespace lychee {
namespace {

// How long a connection's thread waits for its generation's next event before it looks again
// whether the client is still there and whether the server is stopping.
constexpr std::chrono::milliseconds kEventPoll(100);
// Connections served at once, each on a thread of its own. The engine's queue bounds the
// generations; this bounds idle keep-alive connections and clients slow to send.
constexpr unsigned kMaxConnections = 512;
// An idle keep-alive connection, or a client that stalls while sending its request, is closed
// after this. A connection waiting on its generation is exempt (its thread sets no timeout then).
constexpr unsigned kIdleTimeoutSeconds = 60;
// What a streamed response asks libmicrohttpd to read at a time (it may ask for less or more).
constexpr size_t kStreamBlockBytes = 4096;
constexpr char kJson[] = "application/json";
constexpr char kModelsPath[] = "/v1/models";

enum class Route { kCompletions, kChatCompletions, kModels, kModel, kHealth, kMetrics };

std::optional<Route> RouteOf(const std::string& path) {
  if (path == "/v1/completions") return Route::kCompletions;
  if (path == "/v1/chat/completions") return Route::kChatCompletions;
  if (path == kModelsPath) return Route::kModels;
  if (absl::StartsWith(path, absl::StrCat(kModelsPath, "/"))) return Route::kModel;
  if (path == "/health") return Route::kHealth;
  if (path == "/metrics") return Route::kMetrics;
  return std::nullopt;
}

bool IsGeneration(Route route) { return route == Route::kCompletions || route == Route::kChatCompletions; }

// Whether the peer of `fd` closed its end (or the socket failed): what a client that gives up on
// a request does. Polled without waiting; data it sent meanwhile (a pipelined request) is no sign.
bool ClientGone(int fd) {
  pollfd watched{fd, POLLRDHUP, 0};
  return poll(&watched, 1, 0) > 0 && (watched.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

uint64_t RandomBits() {
  std::random_device device;
  return (static_cast<uint64_t>(device()) << 32) | device();
}

MHD_Result Reply(MHD_Connection* connection, unsigned status, std::string_view body, const char* content_type,
                 const std::vector<std::pair<const char*, std::string>>& headers = {}) {
  MHD_Response* response =
      MHD_create_response_from_buffer(body.size(), const_cast<char*>(body.data()), MHD_RESPMEM_MUST_COPY);
  MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
  for (const auto& [name, value] : headers) MHD_add_response_header(response, name, value.c_str());
  const MHD_Result result = MHD_queue_response(connection, status, response);
  MHD_destroy_response(response);
  return result;
}

// An OpenAI error object, with the HTTP status of the error's code unless `http_status` says
// otherwise (405 and 413 have no canonical code of their own).
MHD_Result ReplyError(MHD_Connection* connection, const absl::Status& error, int http_status = 0) {
  if (http_status == 0) http_status = openai::HttpStatusOf(error.code());
  std::vector<std::pair<const char*, std::string>> headers;
  if (http_status == MHD_HTTP_UNAUTHORIZED) headers.emplace_back(MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
  return Reply(connection, static_cast<unsigned>(http_status), openai::ErrorBody(error, http_status), kJson, headers);
}

std::optional<std::string_view> Header(MHD_Connection* connection, const char* name) {
  const char* value = MHD_lookup_connection_value(connection, MHD_HEADER_KIND, name);
  return value == nullptr ? std::nullopt : std::optional<std::string_view>(value);
}

int ClientSocket(MHD_Connection* connection) {
  const MHD_ConnectionInfo* info = MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);
  return info == nullptr ? -1 : info->connect_fd;
}

struct ListenAddress {
  sockaddr_storage address{};
  bool ipv6 = false;
};

absl::StatusOr<ListenAddress> ParseListenAddress(const std::string& text) {
  const absl::Status malformed = absl::InvalidArgumentError(
      absl::StrCat("HTTP address '", text,
                   "' is not [HOST:]PORT with HOST a numeric IPv4 address, [IPv6] or localhost (e.g. 8000, "
                   "127.0.0.1:8000, 0.0.0.0:8000 or [::]:8000)"));
  const size_t colon = text.rfind(':');
  std::string host = colon == std::string::npos ? "127.0.0.1" : text.substr(0, colon);
  const std::string port_text = colon == std::string::npos ? text : text.substr(colon + 1);
  int port = -1;
  if (!absl::SimpleAtoi(port_text, &port) || port < 0 || port > 65535) return malformed;
  if (host == "localhost") host = "127.0.0.1";
  ListenAddress listen;
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    auto* address = reinterpret_cast<sockaddr_in6*>(&listen.address);
    address->sin6_family = AF_INET6;
    address->sin6_port = htons(static_cast<uint16_t>(port));
    if (inet_pton(AF_INET6, host.substr(1, host.size() - 2).c_str(), &address->sin6_addr) != 1) return malformed;
    listen.ipv6 = true;
  } else {
    auto* address = reinterpret_cast<sockaddr_in*>(&listen.address);
    address->sin_family = AF_INET;
    address->sin_port = htons(static_cast<uint16_t>(port));
    if (inet_pton(AF_INET, host.c_str(), &address->sin_addr) != 1) return malformed;
  }
  return listen;
}

// libmicrohttpd's own messages (a client that went away mid-response, a failed TLS handshake),
// marked as the HTTP API's in the server's log.
void LogHttpError(void*, const char* format, va_list arguments) {
  std::fputs("lychee-inference: HTTP: ", stderr);
  std::vfprintf(stderr, format, arguments);
}

absl::StatusOr<std::string> ReadPemFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

class HttpServer::Handler {
 public:
  Handler(openai::ServedModel model, int64_t max_body_bytes, InferenceEngine& engine, const AccessControl& access,
          const MetricsRegistry& metrics)
      : model_(std::move(model)),
        max_body_bytes_(max_body_bytes),
        engine_(engine),
        access_(access),
        metrics_(metrics) {}

  void Stop() { stopping_ = true; }

  static MHD_Result OnRequest(void* handler, MHD_Connection* connection, const char* url, const char* method,
                              const char*, const char* upload_data, size_t* upload_data_size, void** exchange) {
    auto& self = *static_cast<Handler*>(handler);
    if (*exchange == nullptr) return self.Admit(connection, url, method, exchange);
    auto& request = *static_cast<Exchange*>(*exchange);
    if (*upload_data_size > 0) {
      // Only a chunked body, which announced no length, gets here past the limit; libmicrohttpd
      // cannot answer in the middle of a body, so the connection is closed.
      if (static_cast<int64_t>(request.body.size() + *upload_data_size) > self.max_body_bytes_) return MHD_NO;
      request.body.append(upload_data, *upload_data_size);
      *upload_data_size = 0;
      return MHD_YES;
    }
    return self.Answer(connection, request);
  }

  static void OnCompleted(void*, MHD_Connection* connection, void** exchange, MHD_RequestTerminationCode) {
    delete static_cast<Exchange*>(*exchange);
    *exchange = nullptr;
    // Back to the idle timeout, which a generation lifted (the connection may be kept alive).
    MHD_set_connection_option(connection, MHD_CONNECTION_OPTION_TIMEOUT, kIdleTimeoutSeconds);
  }

 private:
  // One request: its route, and its body as it arrives.
  struct Exchange {
    Route route;
    std::string path;
    std::string body;
  };

  // A streamed generation, as libmicrohttpd reads it: server-sent events, each made when the
  // engine's next event comes.
  struct EventStream {
    std::shared_ptr<GenerationStream> generation;
    openai::ResponseFormatter formatter;
    int client_socket;
    const std::atomic<bool>* stopping;
    std::string pending;  // made, not yet handed to libmicrohttpd
    size_t handed = 0;    // of `pending`
    bool ended = false;   // the last event is made

    static ssize_t Read(void* stream, uint64_t, char* buffer, size_t max) {
      auto& self = *static_cast<EventStream*>(stream);
      while (self.handed == self.pending.size()) {
        if (self.ended) return MHD_CONTENT_READER_END_OF_STREAM;
        if (*self.stopping || ClientGone(self.client_socket)) {
          self.generation->Cancel();
          return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        self.pending = self.NextEvents();
        self.handed = 0;
      }
      const size_t size = std::min(max, self.pending.size() - self.handed);
      std::memcpy(buffer, self.pending.data() + self.handed, size);
      self.handed += size;
      return static_cast<ssize_t>(size);
    }

    // Also when the client went away or a write failed: a generation still running is cancelled,
    // so that its KV pages are freed at the next step.
    static void Free(void* stream) {
      auto* self = static_cast<EventStream*>(stream);
      if (!self->ended) self->generation->Cancel();
      delete self;
    }

    // What the next event of the generation adds to the stream ("" while none came).
    std::string NextEvents() {
      GenerationEvent event = generation->Next(kEventPoll);
      switch (event.kind) {
        case GenerationEvent::Kind::kNothingYet:
          return "";
        case GenerationEvent::Kind::kChunk:
          return event.text.empty() ? "" : formatter.StreamText(event.text);
        case GenerationEvent::Kind::kDone:
          ended = true;
          return formatter.StreamEnd(event.summary);
        case GenerationEvent::Kind::kError:
          ended = true;
          return formatter.StreamError(event.error);
      }
      return "";
    }
  };

  MHD_Result Admit(MHD_Connection* connection, const std::string& path, const std::string& method, void** exchange) {
    const std::optional<Route> route = RouteOf(path);
    if (!route) {
      return ReplyError(connection, absl::NotFoundError(absl::StrCat(
                                        "no such endpoint: ", path,
                                        "; this server has POST /v1/completions, POST /v1/chat/completions, GET "
                                        "/v1/models, GET /health and GET /metrics")));
    }
    const char* allowed = IsGeneration(*route) ? MHD_HTTP_METHOD_POST : MHD_HTTP_METHOD_GET;
    if (method != allowed && !(method == MHD_HTTP_METHOD_HEAD && !IsGeneration(*route))) {
      std::vector<std::pair<const char*, std::string>> headers = {{MHD_HTTP_HEADER_ALLOW, allowed}};
      const std::string body = openai::ErrorBody(
          absl::InvalidArgumentError(absl::StrCat(method, " ", path, ": this endpoint takes ", allowed)),
          MHD_HTTP_METHOD_NOT_ALLOWED);
      return Reply(connection, MHD_HTTP_METHOD_NOT_ALLOWED, body, kJson, headers);
    }
    // The API's endpoints need the client token, as the gRPC service's client RPCs do; /health and
    // /metrics are open, as the gRPC health service and --metrics-listen are, for the probes and
    // scrapers of load balancers and routers.
    if (IsGeneration(*route) || *route == Route::kModels || *route == Route::kModel) {
      const absl::Status allowed_caller = FromGrpcStatus(access_.CheckClient(Header(connection, "Authorization")));
      if (!allowed_caller.ok()) return ReplyError(connection, allowed_caller);
    }
    if (const std::optional<std::string_view> length = Header(connection, MHD_HTTP_HEADER_CONTENT_LENGTH)) {
      uint64_t bytes = 0;
      if (absl::SimpleAtoi(absl::string_view(length->data(), length->size()), &bytes) &&
          bytes > static_cast<uint64_t>(max_body_bytes_)) {
        return ReplyError(connection,
                          absl::ResourceExhaustedError(absl::StrCat(
                              "the body has ", bytes, " bytes; this server takes at most ", max_body_bytes_)),
                          MHD_HTTP_CONTENT_TOO_LARGE);
      }
    }
    *exchange = new Exchange{*route, path, ""};
    return MHD_YES;
  }

  MHD_Result Answer(MHD_Connection* connection, const Exchange& exchange) {
    switch (exchange.route) {
      case Route::kCompletions:
        return Generate(connection, openai::Endpoint::kCompletions, exchange.body);
      case Route::kChatCompletions:
        return Generate(connection, openai::Endpoint::kChatCompletions, exchange.body);
      case Route::kModels:
        return Reply(connection, MHD_HTTP_OK, openai::ModelList(model_), kJson);
      case Route::kModel: {
        const std::string name = exchange.path.substr(std::strlen(kModelsPath) + 1);
        if (name != model_.name) {
          return ReplyError(connection,
                            absl::NotFoundError(absl::StrCat(
                                "model '", name, "' is not served here; this server serves '", model_.name, "'")));
        }
        return Reply(connection, MHD_HTTP_OK, openai::ModelObject(model_), kJson);
      }
      case Route::kHealth:
        if (stopping_) return ReplyError(connection, absl::UnavailableError("shutting down"));
        if (absl::Status serving = engine_.serving_status(); !serving.ok()) return ReplyError(connection, serving);
        return Reply(connection, MHD_HTTP_OK, "{\"status\":\"serving\"}", kJson);
      case Route::kMetrics:
        return Reply(connection, MHD_HTTP_OK, metrics_.Render(), "text/plain; version=0.0.4");
    }
    return MHD_NO;
  }

  MHD_Result Generate(MHD_Connection* connection, openai::Endpoint endpoint, const std::string& body) {
    const absl::StatusOr<openai::ApiRequest> request = openai::ParseRequest(endpoint, body, model_, RandomBits());
    if (!request.ok()) return ReplyError(connection, request.status());
    absl::StatusOr<GenerationRequest> generation =
        ToGenerationRequest(request->generate, *model_.tokenizer, std::chrono::system_clock::time_point::max());
    if (!generation.ok()) return ReplyError(connection, generation.status());
    const absl::StatusOr<std::shared_ptr<GenerationStream>> stream = engine_.Submit(*std::move(generation));
    if (!stream.ok()) return ReplyError(connection, stream.status());
    // The thread now waits on the generation, which may stay queued or silent longer than the idle
    // timeout; OnCompleted puts the timeout back.
    MHD_set_connection_option(connection, MHD_CONNECTION_OPTION_TIMEOUT, 0u);
    openai::ResponseFormatter formatter(endpoint, openai::ResponseId(endpoint, RandomBits(), RandomBits()),
                                        static_cast<int64_t>(std::time(nullptr)), model_.name, request->include_usage);
    const int client_socket = ClientSocket(connection);
    if (request->stream) {
      auto* events = new EventStream{*stream, std::move(formatter), client_socket, &stopping_};
      events->pending = events->formatter.StreamStart();
      MHD_Response* response = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, kStreamBlockBytes,
                                                                 &EventStream::Read, events, &EventStream::Free);
      MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
      MHD_add_response_header(response, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
      // Proxies (nginx) would otherwise hold the events back to fill their buffers.
      MHD_add_response_header(response, "X-Accel-Buffering", "no");
      const MHD_Result queued = MHD_queue_response(connection, MHD_HTTP_OK, response);
      MHD_destroy_response(response);
      return queued;
    }
    std::string text;
    while (!stopping_ && !ClientGone(client_socket)) {
      GenerationEvent event = (*stream)->Next(kEventPoll);
      switch (event.kind) {
        case GenerationEvent::Kind::kNothingYet:
          continue;
        case GenerationEvent::Kind::kChunk:
          text += event.text;
          continue;
        case GenerationEvent::Kind::kDone:
          return Reply(connection, MHD_HTTP_OK, formatter.Whole(text, event.summary), kJson);
        case GenerationEvent::Kind::kError:
          return ReplyError(connection, event.error);
      }
    }
    (*stream)->Cancel();
    return MHD_NO;
  }

  const openai::ServedModel model_;
  const int64_t max_body_bytes_;
  InferenceEngine& engine_;
  const AccessControl& access_;
  const MetricsRegistry& metrics_;
  std::atomic<bool> stopping_{false};
};

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const HttpServerOptions& options,
                                                              openai::ServedModel model, InferenceEngine& engine,
                                                              const AccessControl& access,
                                                              const MetricsRegistry& metrics) {
  LYCHEE_ASSIGN_OR_RETURN(ListenAddress listen, ParseListenAddress(options.listen_address));
  std::unique_ptr<HttpServer> server(new HttpServer());
  unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL_INTERNAL_THREAD | MHD_USE_ERROR_LOG;
  if (listen.ipv6) flags |= MHD_USE_IPv6;
  std::vector<MHD_OptionItem> items = {
      // First, so that it gets every message (libmicrohttpd says so otherwise).
      {MHD_OPTION_EXTERNAL_LOGGER, reinterpret_cast<intptr_t>(&LogHttpError), nullptr},
      {MHD_OPTION_SOCK_ADDR, 0, &listen.address},
      {MHD_OPTION_NOTIFY_COMPLETED, reinterpret_cast<intptr_t>(&Handler::OnCompleted), nullptr},
      {MHD_OPTION_CONNECTION_LIMIT, kMaxConnections, nullptr},
      {MHD_OPTION_CONNECTION_TIMEOUT, kIdleTimeoutSeconds, nullptr},
  };
  if (options.tls.enabled()) {
    if (!options.tls.client_ca_file.empty()) {
      return absl::FailedPreconditionError(
          "the HTTP API does not check client certificates, so it is not served with mutual TLS "
          "(--tls-client-ca); leave out --http-listen, or the client CA");
    }
    if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES) {
      return absl::FailedPreconditionError("this libmicrohttpd was built without TLS; the HTTP API cannot serve HTTPS");
    }
    LYCHEE_ASSIGN_OR_RETURN(server->tls_key_, ReadPemFile(options.tls.key_file));
    LYCHEE_ASSIGN_OR_RETURN(server->tls_cert_, ReadPemFile(options.tls.cert_file));
    flags |= MHD_USE_TLS;
    items.push_back({MHD_OPTION_HTTPS_MEM_KEY, 0, server->tls_key_.data()});
    items.push_back({MHD_OPTION_HTTPS_MEM_CERT, 0, server->tls_cert_.data()});
  }
  items.push_back({MHD_OPTION_END, 0, nullptr});
  server->handler_ = std::make_unique<Handler>(std::move(model), options.max_body_bytes, engine, access, metrics);
  for (MHD_OptionItem& item : items) {
    if (item.option == MHD_OPTION_NOTIFY_COMPLETED) item.ptr_value = server->handler_.get();
  }
  server->daemon_ = MHD_start_daemon(flags, 0, nullptr, nullptr, &Handler::OnRequest, server->handler_.get(),
                                     MHD_OPTION_ARRAY, items.data(), MHD_OPTION_END);
  if (server->daemon_ == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot serve HTTP on ", options.listen_address,
                                               ": the port is taken, or the address is not one of this machine's"));
  }
  const MHD_DaemonInfo* info = MHD_get_daemon_info(server->daemon_, MHD_DAEMON_INFO_BIND_PORT);
  server->port_ = info == nullptr ? 0 : info->port;
  return server;
}

HttpServer::~HttpServer() {
  if (daemon_ == nullptr) return;
  handler_->Stop();
  // Joins the connection threads, which see the stop within kEventPoll.
  MHD_stop_daemon(daemon_);
}

}  // namespace lychee
