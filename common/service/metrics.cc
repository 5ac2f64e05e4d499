#include "common/service/metrics.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>

#include <cmath>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lychee {
namespace {

std::string FormatValue(double value) {
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (std::isnan(value)) return "NaN";
  return absl::StrCat(value);
}

std::string EscapeLabelValue(const std::string& value) {
  std::string escaped;
  for (char c : value) {
    if (c == '\\' || c == '"') escaped += '\\';
    if (c == '\n') {
      escaped += "\\n";
      continue;
    }
    escaped += c;
  }
  return escaped;
}

std::string LabelText(const MetricLabels& labels, const std::string& extra_name = "",
                      const std::string& extra_value = "") {
  std::vector<std::string> parts;
  for (const auto& [name, value] : labels) parts.push_back(absl::StrCat(name, "=\"", EscapeLabelValue(value), "\""));
  if (!extra_name.empty()) parts.push_back(absl::StrCat(extra_name, "=\"", extra_value, "\""));
  return parts.empty() ? "" : absl::StrCat("{", absl::StrJoin(parts, ","), "}");
}

MHD_Result AnswerRequest(void* registry, MHD_Connection* connection, const char* url, const char* method, const char*,
                         const char*, size_t*, void**) {
  if (std::strcmp(method, "GET") != 0 && std::strcmp(method, "HEAD") != 0) return MHD_NO;
  const bool found = std::strcmp(url, "/metrics") == 0;
  const std::string body =
      found ? static_cast<const MetricsRegistry*>(registry)->Render() : "not found; try /metrics\n";
  MHD_Response* response =
      MHD_create_response_from_buffer(body.size(), const_cast<char*>(body.data()), MHD_RESPMEM_MUST_COPY);
  MHD_add_response_header(response, "Content-Type", found ? "text/plain; version=0.0.4" : "text/plain");
  const MHD_Result result = MHD_queue_response(connection, found ? MHD_HTTP_OK : MHD_HTTP_NOT_FOUND, response);
  MHD_destroy_response(response);
  return result;
}

}  // namespace

void Counter::Increment(double amount) {
  absl::MutexLock lock(&mutex_);
  value_ += amount;
}

double Counter::value() const {
  absl::MutexLock lock(&mutex_);
  return value_;
}

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double value) {
  size_t bucket = 0;
  while (bucket < bounds_.size() && value > bounds_[bucket]) ++bucket;
  absl::MutexLock lock(&mutex_);
  ++counts_[bucket];
  sum_ += value;
  ++count_;
}

MetricsRegistry::Family& MetricsRegistry::FamilyFor(const std::string& name, const std::string& help, Kind kind) {
  auto [it, inserted] = families_.try_emplace(name);
  if (inserted) {
    it->second.kind = kind;
    it->second.help = help;
  }
  return it->second;
}

Counter& MetricsRegistry::AddCounter(const std::string& name, const std::string& help, MetricLabels labels) {
  absl::MutexLock lock(&mutex_);
  Family& family = FamilyFor(name, help, Kind::kCounter);
  family.series.push_back({std::move(labels), std::make_unique<Counter>(), nullptr, nullptr});
  return *family.series.back().counter;
}

Histogram& MetricsRegistry::AddHistogram(const std::string& name, const std::string& help, std::vector<double> bounds,
                                         MetricLabels labels) {
  absl::MutexLock lock(&mutex_);
  Family& family = FamilyFor(name, help, Kind::kHistogram);
  family.series.push_back({std::move(labels), nullptr, std::make_unique<Histogram>(std::move(bounds)), nullptr});
  return *family.series.back().histogram;
}

void MetricsRegistry::AddGauge(const std::string& name, const std::string& help, std::function<double()> read,
                               MetricLabels labels) {
  absl::MutexLock lock(&mutex_);
  Family& family = FamilyFor(name, help, Kind::kGauge);
  family.series.push_back({std::move(labels), nullptr, nullptr, std::move(read)});
}

void MetricsRegistry::AddCounterFunction(const std::string& name, const std::string& help, std::function<double()> read,
                                         MetricLabels labels) {
  absl::MutexLock lock(&mutex_);
  Family& family = FamilyFor(name, help, Kind::kCounter);
  family.series.push_back({std::move(labels), nullptr, nullptr, std::move(read)});
}

std::string MetricsRegistry::Render() const {
  absl::MutexLock lock(&mutex_);
  std::string text;
  for (const auto& [name, family] : families_) {
    const char* kind = family.kind == Kind::kCounter ? "counter" : family.kind == Kind::kGauge ? "gauge" : "histogram";
    absl::StrAppend(&text, "# HELP ", name, " ", family.help, "\n# TYPE ", name, " ", kind, "\n");
    for (const Series& series : family.series) {
      if (series.counter != nullptr) {
        absl::StrAppend(&text, name, LabelText(series.labels), " ", FormatValue(series.counter->value()), "\n");
      } else if (series.read) {
        absl::StrAppend(&text, name, LabelText(series.labels), " ", FormatValue(series.read()), "\n");
      } else {
        const Histogram& histogram = *series.histogram;
        absl::MutexLock histogram_lock(&histogram.mutex_);
        uint64_t cumulative = 0;
        for (size_t i = 0; i <= histogram.bounds_.size(); ++i) {
          cumulative += histogram.counts_[i];
          const std::string bound = i < histogram.bounds_.size() ? FormatValue(histogram.bounds_[i]) : "+Inf";
          absl::StrAppend(&text, name, "_bucket", LabelText(series.labels, "le", bound), " ", cumulative, "\n");
        }
        absl::StrAppend(&text, name, "_sum", LabelText(series.labels), " ", FormatValue(histogram.sum_), "\n");
        absl::StrAppend(&text, name, "_count", LabelText(series.labels), " ", histogram.count_, "\n");
      }
    }
  }
  return text;
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(const std::string& listen_address,
                                                                            const MetricsRegistry& registry) {
  const size_t colon = listen_address.rfind(':');
  int port = -1;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  if (colon == std::string::npos || !absl::SimpleAtoi(listen_address.substr(colon + 1), &port) || port < 0 ||
      port > 65535 || inet_pton(AF_INET, listen_address.substr(0, colon).c_str(), &address.sin_addr) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics address '", listen_address, "' is not IPV4:PORT (e.g. 127.0.0.1:9464)"));
  }
  address.sin_port = htons(static_cast<uint16_t>(port));
  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer());
  server->daemon_ = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, 0, nullptr, nullptr,
                                     &AnswerRequest, const_cast<MetricsRegistry*>(&registry), MHD_OPTION_SOCK_ADDR,
                                     reinterpret_cast<sockaddr*>(&address), MHD_OPTION_END);
  if (server->daemon_ == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", listen_address,
                                               ": the port is taken, or the address is not one of this machine's"));
  }
  const MHD_DaemonInfo* info = MHD_get_daemon_info(server->daemon_, MHD_DAEMON_INFO_BIND_PORT);
  server->port_ = info != nullptr ? info->port : port;
  return server;
}

MetricsHttpServer::~MetricsHttpServer() {
  if (daemon_ != nullptr) MHD_stop_daemon(daemon_);
}

}  // namespace lychee
