#include "common/service/metrics.h"

#include <catch2/catch.hpp>

#include <string>

#include "absl/strings/str_cat.h"
#include "tests/http_get.h"

namespace lychee {
namespace {

using testing::HttpGet;

TEST_CASE("the registry renders the text exposition format") {
  MetricsRegistry registry;
  Counter& ok = registry.AddCounter("lychee_requests_total", "Requests", {{"outcome", "ok"}});
  Counter& error = registry.AddCounter("lychee_requests_total", "Requests", {{"outcome", "error"}});
  Histogram& latency = registry.AddHistogram("lychee_latency_seconds", "Latency", {0.1, 1});
  double version = 7;
  registry.AddGauge("lychee_active_partition_version", "Active", [&] { return version; });
  ok.Increment();
  ok.Increment(2);
  error.Increment();
  latency.Observe(0.05);
  latency.Observe(0.5);
  latency.Observe(5);
  version = 8;
  const std::string text = registry.Render();
  CHECK(text.find("# TYPE lychee_requests_total counter\n") != std::string::npos);
  CHECK(text.find("lychee_requests_total{outcome=\"ok\"} 3\n") != std::string::npos);
  CHECK(text.find("lychee_requests_total{outcome=\"error\"} 1\n") != std::string::npos);
  CHECK(text.find("# TYPE lychee_latency_seconds histogram\n") != std::string::npos);
  CHECK(text.find("lychee_latency_seconds_bucket{le=\"0.1\"} 1\n") != std::string::npos);
  CHECK(text.find("lychee_latency_seconds_bucket{le=\"1\"} 2\n") != std::string::npos);
  CHECK(text.find("lychee_latency_seconds_bucket{le=\"+Inf\"} 3\n") != std::string::npos);
  CHECK(text.find("lychee_latency_seconds_sum 5.55\n") != std::string::npos);
  CHECK(text.find("lychee_latency_seconds_count 3\n") != std::string::npos);
  CHECK(text.find("lychee_active_partition_version 8\n") != std::string::npos);
}

TEST_CASE("label values are escaped") {
  MetricsRegistry registry;
  registry.AddCounter("c_total", "C", {{"reason", "a \"quoted\"\\path\nline"}}).Increment();
  CHECK(registry.Render().find("c_total{reason=\"a \\\"quoted\\\"\\\\path\\nline\"} 1\n") != std::string::npos);
}

TEST_CASE("metrics are served over HTTP at /metrics") {
  MetricsRegistry registry;
  registry.AddCounter("lychee_generated_tokens_total", "Tokens").Increment(42);
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server = MetricsHttpServer::Start("127.0.0.1:0", registry);
  REQUIRE(server.ok());
  REQUIRE((*server)->port() > 0);
  const std::string response = HttpGet((*server)->port(), "/metrics");
  CHECK(response.rfind("HTTP/1.", 0) == 0);
  CHECK(response.find(" 200 ") != std::string::npos);
  CHECK(response.find("text/plain; version=0.0.4") != std::string::npos);
  CHECK(response.find("lychee_generated_tokens_total 42\n") != std::string::npos);
  CHECK(HttpGet((*server)->port(), "/other").find(" 404 ") != std::string::npos);
}

TEST_CASE("a bad metrics address is refused with its reason") {
  MetricsRegistry registry;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server = MetricsHttpServer::Start("localhost", registry);
  CHECK(server.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(server.status().message()).find("localhost") != std::string::npos);

  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> first = MetricsHttpServer::Start("127.0.0.1:0", registry);
  REQUIRE(first.ok());
  const std::string taken = absl::StrCat("127.0.0.1:", (*first)->port());
  server = MetricsHttpServer::Start(taken, registry);
  CHECK(server.status().code() == absl::StatusCode::kUnavailable);
  CHECK(std::string(server.status().message()).find(taken + ": the port is taken") != std::string::npos);
}

}  // namespace
}  // namespace lychee
