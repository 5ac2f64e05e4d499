// Sweep jobs in the client: the submit flags that make one, and the views of its table (text for
// `lychee watch` and `lychee jobs`, SVG for `lychee watch --plot`). Free of LibTorch.
//   --target-densities D1,D2,...   one job over these targets (1 to 16, each in (0, 1])
//   --sweep                        the same over kDefaultSweepTargets
//   --max-accuracy-drop D          the quality bound (default 0.05)
//   --validation-context TOKENS --validation-samples N --validation-seed S
//   --validation-corpus PATH | --validation-prompts PATH   (under the trainer's data root)
//   --validation-budget TOKENS     hybrid decoding's budget in the validation (default --budget)
//   --audit                        measure the attention mass each partition drops
#pragma once

#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "lychee/v1/trainer.pb.h"
#include "tools/lychee/args.h"

namespace lychee::cli {

// A macro, so that the usage text (a string literal) can spell it.
#define LYCHEE_DEFAULT_SWEEP_TARGETS "0.05,0.1,0.2,0.3"
inline constexpr char kDefaultSweepTargets[] = LYCHEE_DEFAULT_SWEEP_TARGETS;

const std::set<std::string>& SweepValuedFlags();
const std::set<std::string>& SweepSwitches();

// "0.05,0.1" as numbers; INVALID_ARGUMENT naming the item that is not one. An empty text is an
// empty list, which the trainer refuses.
absl::StatusOr<std::vector<double>> ParseTargetDensities(const std::string& text);

// Makes `request` a sweep when the flags ask for one (INVALID_ARGUMENT when they ask for a sweep
// and a single --target-density, or give sweep settings without a sweep); leaves it alone otherwise.
absl::Status AddSweepFromArgs(const Args& args, v1::SubmitCalibrationJobRequest& request);

bool IsSweep(const v1::Job& job);
// The job's table: dense, then a row per finished target, the published one marked, and its summary.
std::string RenderSweepTable(const v1::Job& job);
// Accuracy against KV bytes read per token, a panel per task: dense and the sweep's partitions.
std::string RenderSweepSvg(const v1::Job& job);

}  // namespace lychee::cli
