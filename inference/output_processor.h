// What a client sees of its generation: each sampled token's text (whole UTF-8 characters, text
// that may begin a stop sequence held back until decided), the end by a stop token, a stop
// sequence, the token limit or the context limit, the final summary, or an error; and the request
// metrics that go with them. Free of LibTorch.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "common/service/metrics.h"
#include "inference/engine.h"
#include "inference/engine_request.h"

namespace lychee {

struct OutputMetrics {
  Counter* succeeded = nullptr;
  Counter* failed = nullptr;
  Counter* cancelled = nullptr;
  Counter* generated_tokens = nullptr;
  Counter* prompt_tokens = nullptr;
  Histogram* time_to_first_token = nullptr;
  Histogram* token_latency = nullptr;
  // Called with each request that ends, and how (OK for a summary), before its client can see it.
  std::function<void(const EngineRequest& request, const absl::Status& outcome)> on_finished;
};

class OutputProcessor {
 public:
  // `stop_ids`: the model's end-of-sequence tokens. The metrics must outlive the processor.
  OutputProcessor(std::vector<int32_t> stop_ids, int64_t max_context_tokens, OutputMetrics metrics)
      : stop_ids_(std::move(stop_ids)), max_context_tokens_(max_context_tokens), metrics_(metrics) {}

  // Takes the request's next token: streams what it completes, or, when it ends the generation,
  // sends the last of the text and records why (then Complete). Returns whether it ended.
  bool Process(EngineRequest& request, int32_t token);
  // Sends the summary of a generation that Process ended, with what its attention read.
  void Complete(EngineRequest& request, std::optional<GenerationTelemetry> telemetry);
  // Ends the generation with `error`, unless it has ended already.
  void Fail(EngineRequest& request, const absl::Status& error);

 private:
  void SendText(EngineRequest& request, std::vector<int32_t> ids, std::string text);
  bool End(EngineRequest& request, FinishReason reason, std::vector<int32_t> last_ids);

  const std::vector<int32_t> stop_ids_;
  const int64_t max_context_tokens_;
  const OutputMetrics metrics_;
};

}  // namespace lychee
