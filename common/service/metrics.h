// Metrics in the Prometheus text exposition format (version 0.0.4), served over HTTP at /metrics
// by libmicrohttpd. Debian bookworm does not package prometheus-cpp, so the few metric kinds a
// servers need are here: counters, gauges read at scrape time, and histograms. Thread-safe;
// free of LibTorch.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

struct MHD_Daemon;

namespace lychee {

using MetricLabels = std::map<std::string, std::string>;

class Counter {
 public:
  void Increment(double amount = 1);
  double value() const;

 private:
  mutable absl::Mutex mutex_;
  double value_ ABSL_GUARDED_BY(mutex_) = 0;
};

class Histogram {
 public:
  // Upper bounds, ascending; +Inf is implicit.
  explicit Histogram(std::vector<double> bounds);
  void Observe(double value);

 private:
  friend class MetricsRegistry;
  const std::vector<double> bounds_;
  mutable absl::Mutex mutex_;
  std::vector<uint64_t> counts_ ABSL_GUARDED_BY(mutex_);  // per bucket, not cumulative; the last is +Inf
  double sum_ ABSL_GUARDED_BY(mutex_) = 0;
  uint64_t count_ ABSL_GUARDED_BY(mutex_) = 0;
};

class MetricsRegistry {
 public:
  // The returned metric lives as long as the registry. One name, one help text and one kind;
  // several label sets per name.
  Counter& AddCounter(const std::string& name, const std::string& help, MetricLabels labels = {});
  Histogram& AddHistogram(const std::string& name, const std::string& help, std::vector<double> bounds,
                          MetricLabels labels = {});
  // A gauge whose value `read` gives at each scrape.
  void AddGauge(const std::string& name, const std::string& help, std::function<double()> read,
                MetricLabels labels = {});
  // A counter kept elsewhere, read at each scrape; `read` must never decrease.
  void AddCounterFunction(const std::string& name, const std::string& help, std::function<double()> read,
                          MetricLabels labels = {});

  // Every metric in the text exposition format.
  std::string Render() const;

 private:
  enum class Kind { kCounter, kGauge, kHistogram };
  struct Series {
    MetricLabels labels;
    std::unique_ptr<Counter> counter;
    std::unique_ptr<Histogram> histogram;
    std::function<double()> read;
  };
  struct Family {
    Kind kind;
    std::string help;
    std::vector<Series> series;
  };
  Family& FamilyFor(const std::string& name, const std::string& help, Kind kind) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);

  mutable absl::Mutex mutex_;
  std::map<std::string, Family> families_ ABSL_GUARDED_BY(mutex_);
};

// Serves GET /metrics from a registry on its own threads.
class MetricsHttpServer {
 public:
  // `listen_address` is HOST:PORT with a numeric IPv4 host; port 0 picks a free one.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& listen_address,
                                                                  const MetricsRegistry& registry);
  ~MetricsHttpServer();
  int port() const { return port_; }

 private:
  MetricsHttpServer() = default;
  MHD_Daemon* daemon_ = nullptr;
  int port_ = 0;
};

}  // namespace lychee
