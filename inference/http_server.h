// lychee-inference's OpenAI-compatible HTTP API (the translation is inference/openai_api.h's) on
// libmicrohttpd, which parses HTTP: POST /v1/completions and /v1/chat/completions, streamed as
// server-sent events or whole; GET /v1/models (and /v1/models/{name}), /health and /metrics (the
// registry's Prometheus text, so that a router scraping the serving port finds its gauges).
//
// Each connection has a thread of its own (libmicrohttpd's thread-per-connection mode), which
// blocks while it waits for its generation's next event; every 100 ms it also looks whether the
// client closed its socket, and cancels the generation when it did, so that an abandoned request
// frees its KV pages at the next step even while it is still queued. Tokens are checked as on the
// gRPC service (`Authorization: Bearer`, the client token when there is one); bodies above the
// limit are refused before they are read. Free of LibTorch.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/service/metrics.h"
#include "common/service/security.h"
#include "inference/engine.h"
#include "inference/openai_api.h"

struct MHD_Daemon;

namespace lychee {

struct HttpServerOptions {
  // [HOST:]PORT, HOST a numeric IPv4 address, [IPv6] or localhost; a bare port listens on
  // 127.0.0.1. Port 0 picks a free one (see HttpServer::port).
  std::string listen_address;
  // A body longer than this is refused: with 413 when its Content-Length says so, before it is
  // read; a chunked one (no length announced) by closing the connection once it passes the limit.
  int64_t max_body_bytes = 16 << 20;
  // HTTPS with this certificate and key (the gRPC server's) when they are set. Client
  // certificates are not checked, so a client CA is refused.
  TlsServerConfig tls;
};

class HttpServer {
 public:
  // `engine`, `access` and `metrics` must outlive the server.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const HttpServerOptions& options, openai::ServedModel model,
                                                           InferenceEngine& engine, const AccessControl& access,
                                                           const MetricsRegistry& metrics);
  // Ends the generations it still streams (their clients see the stream break off) and stops.
  ~HttpServer();

  int port() const { return port_; }

 private:
  // What libmicrohttpd calls back: the routes, the checks, the generations.
  class Handler;

  HttpServer() = default;

  std::unique_ptr<Handler> handler_;
  // PEM text that libmicrohttpd reads while it starts TLS.
  std::string tls_key_;
  std::string tls_cert_;
  MHD_Daemon* daemon_ = nullptr;
  int port_ = 0;
};

}  // namespace lychee
