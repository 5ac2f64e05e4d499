// What the attention backends share: the per-sequence state that carries the telemetry
// (common/model/attention.h), the accounting of each decode step's reads, the audit of the dropped
// attention mass against dense scores, and exact attention over a set of cache positions.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "common/model/attention.h"

namespace lychee {

// The state of every backend that accounts for its reads; backends with more to carry derive
// from it.
class AccountedState : public SequenceAttentionState {
 public:
  // audit_every: 0, no audit; N, the sequence's decode steps 1, N + 1, 2N + 1, ... are audited.
  explicit AccountedState(int64_t audit_every) : audit_every_(audit_every) {}
  const AttentionTelemetry* telemetry() const override { return &telemetry_; }
  AttentionTelemetry& account() { return telemetry_; }
  // Whether the decode step that CountDecodeStep counted last is audited.
  bool audit() const {
    return audit_every_ > 0 && telemetry_.decode_steps > 0 && (telemetry_.decode_steps - 1) % audit_every_ == 0;
  }

 private:
  int64_t audit_every_;
  AttentionTelemetry telemetry_;
};

// Bytes of one cached position: its key and its value.
int64_t KvBytesPerPosition(const at::Tensor& keys);

// For a decode call of `layer` (one query per head): a new step begins at layer 0. Null states
// (a backend called without one) account nothing, here and below.
void CountDecodeStep(AccountedState* state, int layer);

// One KV head of one decode call read `positions` cached positions (keys and values of
// `bytes_per_position` each) and `summary_bytes` of summaries (page bounds, centroids).
void AccountHead(AccountedState* state, int layer, int64_t kv_head, int64_t num_kv_heads, int64_t positions,
                 int64_t bytes_per_position, int64_t summary_bytes = 0);

// In audit mode: for each query of the group, queries [G, 1, D] over keys [L, D], the dense
// softmax mass of the positions that `attended` (int64 positions) leaves out.
void AuditDroppedMass(AccountedState* state, const at::Tensor& queries, const at::Tensor& keys,
                      const at::Tensor& attended, double scale);
// The same for a head that attended everything: records zero per query without computing.
void AuditDense(AccountedState* state, int64_t num_queries);

// Exact attention of a group's queries [G, 1, D] over `positions` (int64, any order) of
// keys and values [L, D]; returns [G, 1, D].
at::Tensor AttendPositions(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                           const at::Tensor& positions, double scale);

// The units (blocks, pages or positions) 0..taken.size()-1 that a selection keeps: those already
// `taken` (the mandatory ones), then the others by `scores` (higher first, ties to the lower
// index) up to `budget` units in all, skipping units scored below 0 when `proposed_only`.
// Ascending.
std::vector<int64_t> SelectUnits(std::vector<bool> taken, const float* scores, int64_t budget,
                                 bool proposed_only = false);

// The positions [begin, end) of each unit (block, page) in `units`, for units of `unit_size`
// tokens in a cache of `length`; int64 on `device`.
at::Tensor UnitPositions(const std::vector<int64_t>& units, int64_t unit_size, int64_t length, at::Device device);

}  // namespace lychee
