#include "inference/output_processor.h"

#include <algorithm>
#include <string>

namespace lychee {
namespace {

double Seconds(EngineClock::duration duration) { return std::chrono::duration<double>(duration).count(); }

// The length of the longest suffix of `text` that is a proper prefix of one of `stops`: text
// that might become a stop sequence is held back until it is decided.
size_t PossibleStopPrefix(const std::string& text, const std::vector<std::string>& stops) {
  size_t longest = 0;
  for (const std::string& stop : stops) {
    for (size_t length = std::min(text.size(), stop.size() - 1); length > longest; --length) {
      if (text.compare(text.size() - length, length, stop, 0, length) == 0) {
        longest = length;
        break;
      }
    }
  }
  return longest;
}

}  // namespace

bool OutputProcessor::Process(EngineRequest& request, int32_t token) {
  const EngineClock::time_point now = EngineClock::now();
  GenerationSummary& summary = request.summary;
  if (summary.completion_tokens == 0) {
    summary.time_to_first_token_seconds = Seconds(now - request.arrived);
    metrics_.time_to_first_token->Observe(summary.time_to_first_token_seconds);
  } else {
    // A preemption's pause falls between two tokens, and counts as their latency.
    const double latency = Seconds(now - request.last_token_time);
    request.latency_sum += latency;
    summary.max_token_latency_seconds = std::max(summary.max_token_latency_seconds, latency);
    metrics_.token_latency->Observe(latency);
  }
  request.last_token_time = now;
  ++summary.completion_tokens;
  metrics_.generated_tokens->Increment();
  request.output_ids.push_back(token);
  const GenerationRequest& generation = request.request;

  if (std::find(stop_ids_.begin(), stop_ids_.end(), token) != stop_ids_.end()) {
    return End(request, FinishReason::kStopToken, {});
  }
  // An id the tokenizer does not know (its only error) adds no text: models pad their embedding rows
  // past the tokenizer's vocabulary (Qwen2.5: 152064 rows for 151665 tokens), and Hugging Face's
  // decode skips such ids too. The id itself is streamed.
  if (absl::StatusOr<std::string> piece = request.decoder.Push(token); piece.ok()) request.held_text += *piece;
  size_t stop_at = std::string::npos;
  for (const std::string& stop : generation.stop_sequences) stop_at = std::min(stop_at, request.held_text.find(stop));
  if (stop_at != std::string::npos) {
    request.held_text.resize(stop_at);
    return End(request, FinishReason::kStopSequence, {token});
  }
  if (summary.completion_tokens >= generation.max_new_tokens) return End(request, FinishReason::kMaxTokens, {token});
  // The next decode step would write past the context limit.
  if (request.prompt_size() + summary.completion_tokens > max_context_tokens_) {
    return End(request, FinishReason::kContextLimit, {token});
  }
  const size_t keep = PossibleStopPrefix(request.held_text, generation.stop_sequences);
  std::string text = request.held_text.substr(0, request.held_text.size() - keep);
  request.held_text.erase(0, text.size());
  SendText(request, {token}, std::move(text));
  return false;
}

bool OutputProcessor::End(EngineRequest& request, FinishReason reason, std::vector<int32_t> last_ids) {
  if (reason != FinishReason::kStopSequence) request.held_text += request.decoder.Flush();
  if (!last_ids.empty() || !request.held_text.empty()) {
    SendText(request, std::move(last_ids), std::move(request.held_text));
    request.held_text.clear();
  }
  request.summary.finish_reason = reason;
  return true;
}

void OutputProcessor::Complete(EngineRequest& request, std::optional<GenerationTelemetry> telemetry) {
  GenerationSummary& summary = request.summary;
  if (summary.completion_tokens > 1) {
    summary.mean_token_latency_seconds = request.latency_sum / static_cast<double>(summary.completion_tokens - 1);
  }
  summary.total_seconds = Seconds(EngineClock::now() - request.arrived);
  summary.telemetry = std::move(telemetry);
  request.status = RequestStatus::kFinished;
  // Counted before the client can see the end, so that the metrics it reads then include it.
  metrics_.prompt_tokens->Increment(static_cast<double>(summary.prompt_tokens));
  metrics_.succeeded->Increment();
  if (metrics_.on_finished) metrics_.on_finished(request, absl::OkStatus());
  GenerationEvent done;
  done.kind = GenerationEvent::Kind::kDone;
  done.summary = summary;
  request.stream->Push(std::move(done));
}

void OutputProcessor::Fail(EngineRequest& request, const absl::Status& error) {
  if (request.status == RequestStatus::kFinished) return;
  request.status = RequestStatus::kFinished;
  (absl::IsCancelled(error) ? metrics_.cancelled : metrics_.failed)->Increment();
  if (metrics_.on_finished) metrics_.on_finished(request, error);
  GenerationEvent event;
  event.kind = GenerationEvent::Kind::kError;
  event.error = error;
  request.stream->Push(std::move(event));
}

void OutputProcessor::SendText(EngineRequest& request, std::vector<int32_t> ids, std::string text) {
  GenerationEvent chunk;
  chunk.kind = GenerationEvent::Kind::kChunk;
  chunk.token_ids = std::move(ids);
  chunk.text = std::move(text);
  request.stream->Push(std::move(chunk));
}

}  // namespace lychee
