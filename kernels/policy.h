// Token-selection policies for decode attention, as a request names them: which policy, and its
// parameters with the authors' defaults. Free of LibTorch, so that the gRPC layers can parse and
// validate a request's choice; kernels/policy_backend.h turns a spec into an attention backend.
//
// Every policy prefills densely and keeps every head's whole KV cache; they differ in what a
// decode step reads:
//   dense      the whole cache.
//   lychee     hybrid heads (kernels/hybrid_attention.h): retrieval heads of a head partition
//              attend densely and select blocks; sparse heads reuse the latest selection at their
//              KV-head index.
//   double-p   Double-P: per KV head, k-means clusters of the keys; clusters ranked by a
//              size-weighted centroid softmax; those within top-p2 attended exactly, the rest up
//              to top-p1 approximated by centroid and mean value, in one softmax.
//   prhs       PrHS: pre-hoc selection (previous step's set enlarged, a recency window, the
//              previous layer's set) made before any score of the step is computed.
//   streaming  DuoAttention-style: the partition's retrieval heads dense, its sparse heads
//              attend the sink and the most recent tokens only.
//   tidal      TidalDecode-style: a few selection layers attend densely and pick top-k tokens
//              per KV head; the layers after each reuse that set.
//   quest      Quest: pages with per-dimension key bounds; pages ranked by an upper bound of
//              q.k; the first layers dense.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/base/head_partition.h"
#include "common/base/model_config.h"

namespace lychee {

// The audit period of a request that names none, unless the server sets another.
constexpr int64_t kDefaultAuditEvery = 16;

enum class PolicyKind { kDense, kLychee, kDoubleP, kPrhs, kStreaming, kTidal, kQuest };

// "dense", "lychee" (or "hybrid"), "double-p", "prhs", "streaming", "tidal", "quest";
// INVALID_ARGUMENT naming the policies otherwise.
absl::StatusOr<PolicyKind> ParsePolicyKind(std::string_view name);
std::string PolicyName(PolicyKind kind);
// Every kind, in the order above.
const std::vector<PolicyKind>& AllPolicyKinds();

// The PrHS selectors, combinable.
struct PrhsSelectors {
  bool temporal = true;     // the previous step's set at this (layer, KV head), enlarged
  bool recency = true;      // the last `prhs_window` tokens
  bool cross_layer = true;  // the previous layer's set at this KV head, in this step
};
// "temporal,recency,cross-layer" (any non-empty subset); INVALID_ARGUMENT naming the bad one.
absl::StatusOr<PrhsSelectors> ParsePrhsSelectors(std::string_view list);
std::string PrhsSelectorsName(const PrhsSelectors& selectors);

// The attention a request asks for, as every edge (gRPC, the HTTP API, the CLI) gives it: the
// policy and its parameters. The engine takes a request without one to mean its default.
struct PolicySpec {
  PolicyKind kind = PolicyKind::kDense;

  // Lychee and streaming: serve with this stored head partition instead of the active one.
  std::optional<uint64_t> partition_version;
  // Lychee: the selection parameters left to the head partition it is served with (its own
  // SelectionParams), filled in by WithPartitionSelection once that partition is known.
  struct PartitionSelected {
    bool token_budget = false;
    bool block_size = false;
    bool sink_tokens = false;
    bool recent_tokens = false;
  };
  PartitionSelected from_partition;

  // Fixed-budget policies (lychee, prhs, streaming, tidal, quest): the most cache positions a
  // selecting head attends to per step, the sink and recent positions included.
  int64_t token_budget = 4096;
  // Selection granularity of lychee and prhs (a power of two).
  int64_t block_size = 64;
  // Always attended at the start and at the end of the cache (lychee, prhs, streaming, tidal,
  // double-p).
  int64_t sink_tokens = 64;
  int64_t recent_tokens = 64;

  // Double-P.
  double p1 = 0.95;  // stage 1: the clusters kept hold this share of the estimated mass
  double p2 = 0.7;   // stage 2: those holding this share are attended exactly, the rest approximated
  int64_t clusters = 128;          // per KV head, over the prefilled keys
  int64_t kmeans_iterations = 10;
  // Decoded tokens stay exact until this many have left the recent window; then they are
  // clustered too, into clusters of the prefill's mean size.
  int64_t tail_tokens = 1024;

  // PrHS (block granularity: block_size).
  PrhsSelectors prhs_selectors;
  // Blocks added on each side of every block the temporal and cross-layer selectors carry over.
  int64_t prhs_enlargement = 1;
  // Tokens of the recency window.
  int64_t prhs_window = 256;

  // TidalDecode: layers that attend densely and select; layers before the first are dense,
  // layers after one reuse its selection. Empty: the authors' layers 2 and 13 of 32, scaled to
  // the model (see TidalSelectionLayers).
  std::vector<int64_t> tidal_selection_layers;

  // Quest.
  int64_t page_size = 16;
  int64_t quest_dense_layers = 2;

  // Compute dense scores too and record the dropped attention mass, on every audit_every-th decode
  // step of each sequence (its first, N + 1-th, ...). 0: the server's default period, where a
  // server fills it in (kDefaultAuditEvery elsewhere).
  bool audit = false;
  int64_t audit_every = 1;
  // The period the backends audit at: 0 without audit.
  int64_t AuditPeriod() const;

  // The authors' defaults for `kind`: DuoAttention's streaming heads keep 64 sink and 256 recent
  // tokens (a budget of 320); Double-P keeps 4 sink and 64 recent tokens exact; TidalDecode and
  // Quest have no sink or recent window (Quest always keeps the current page).
  static PolicySpec Defaults(PolicyKind kind);
  // Lychee with every selection parameter the partition's: hybrid decoding as the partition was
  // calibrated for.
  static PolicySpec LycheeAsPartition();
  // This spec with the parameters left to the partition taken from `selection`.
  PolicySpec WithPartitionSelection(const SelectionParams& selection) const;

  // INVALID_ARGUMENT naming the parameter that is out of range for `kind` on a model of
  // `config`'s shape (parameters the kind does not use are not checked).
  absl::Status Validate(const ModelConfig& config) const;

  // "quest budget=1024 page=16 dense_layers=2 sink=0 recent=0": the kind and the parameters it uses
  // (every one, as the engine shares a backend between requests whose descriptions are equal).
  std::string Describe() const;
};

// The selection layers TidalDecode uses on a model of `num_layers` layers: the spec's, or by
// default layer 2 and layer round(13 / 32 * num_layers) (its choice for 32-layer Llama),
// deduplicated and inside the model.
std::vector<int64_t> TidalSelectionLayers(const PolicySpec& spec, int64_t num_layers);

// Whether the policy's backend records something during prefill (PrHS takes its first temporal
// set from the last prompt position's dense attention), so that its sequences cannot start from a
// copy of another backend's prefilled cache.
bool PolicyObservesPrefill(PolicyKind kind);

// Block and page sizes must be powers of two.
bool IsPowerOfTwo(int64_t value);

// Whether the policy needs a head partition (lychee, streaming).
bool PolicyNeedsPartition(PolicyKind kind);

}  // namespace lychee
