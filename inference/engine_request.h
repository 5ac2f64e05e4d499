// The engine's record of one generation, from Submit to its last event and across preemptions:
// what the scheduler, the model runner and the output processor each need to know of it. The
// scheduler owns it; the other parts are handed it. Free of LibTorch.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/base/tokenizer.h"
#include "inference/engine.h"
#include "inference/partition_manager.h"
#include "kernels/policy.h"

namespace lychee {

using EngineClock = std::chrono::steady_clock;

// The attention a request asked for, resolved against the server's default and checked when it
// is submitted; its partition is resolved when it is first admitted.
struct AttentionPlan {
  // Audited where the request bounds the dropped mass; the audit period filled in.
  PolicySpec policy;
  // Set for a pinned version; else the active partition at admission, for a policy that uses one.
  PartitionManager::Snapshot pinned;
  // Which side of a canary the active partition's routing put the sequence on, on its first
  // admission; its outcome then counts towards the canary's decision.
  PartitionRoute::Arm canary_arm = PartitionRoute::Arm::kNoCanary;
};

enum class RequestStatus {
  kWaiting,    // queued, never admitted
  kRunning,    // holds a sequence in the KV pool
  kPreempted,  // queued again: its sequence was dropped for an older one and is recomputed on admission
  kFinished,   // its last event is sent
};

struct EngineRequest {
  EngineRequest(uint64_t id_in, GenerationRequest request_in, const Tokenizer& tokenizer)
      : id(id_in),
        request(std::move(request_in)),
        stream(std::make_shared<GenerationStream>()),
        arrived(EngineClock::now()),
        decoder(tokenizer, /*skip_special_tokens=*/true) {
    summary.prompt_tokens = static_cast<int64_t>(request.prompt_ids.size());
  }

  int64_t prompt_size() const { return static_cast<int64_t>(request.prompt_ids.size()); }
  // The positions the sequence holds before it decodes: the prompt; or, recomputed after a
  // preemption, the prompt and every token generated but the last, which is the input of the next
  // decode step, as it was before the preemption.
  int64_t prefill_target() const {
    return prompt_size() + std::max<int64_t>(static_cast<int64_t>(output_ids.size()), 1) - 1;
  }
  bool prefilling() const { return computed_tokens < prefill_target(); }
  // The prompt followed by the generated tokens: what a prefill reads from.
  int32_t token_at(int64_t position) const {
    return position < prompt_size() ? request.prompt_ids[position] : output_ids[position - prompt_size()];
  }

  const uint64_t id;
  const GenerationRequest request;
  const std::shared_ptr<GenerationStream> stream;
  const EngineClock::time_point arrived;
  AttentionPlan plan;

  RequestStatus status = RequestStatus::kWaiting;
  // Every token sampled so far.
  std::vector<int32_t> output_ids;
  // Positions of the current sequence written so far; it holds the pages of exactly these
  // (KvCacheManager::PagesFor), 0 while it has no sequence.
  int64_t computed_tokens = 0;

  // The output processor's.
  IncrementalDecoder decoder;
  // Decoded text not sent yet because it may begin a stop sequence.
  std::string held_text;
  EngineClock::time_point last_token_time;
  double latency_sum = 0;
  GenerationSummary summary;
};

}  // namespace lychee
