#include "kernels/policies/accounting.h"

#include <algorithm>

#include "kernels/dense_attention.h"

namespace lychee {

int64_t KvBytesPerPosition(const at::Tensor& keys) {
  return 2 * keys.size(-1) * static_cast<int64_t>(keys.element_size());
}

void CountDecodeStep(AccountedState* state, int layer) {
  if (state != nullptr && layer == 0) ++state->account().decode_steps;
}

void AccountHead(AccountedState* state, int layer, int64_t kv_head, int64_t num_kv_heads, int64_t positions,
                 int64_t bytes_per_position, int64_t summary_bytes) {
  if (state == nullptr) return;
  AttentionTelemetry& account = state->account();
  account.AddTokens(layer, kv_head, num_kv_heads, positions);
  account.kv_bytes_read += positions * bytes_per_position + summary_bytes;
}

void AuditDroppedMass(AccountedState* state, const at::Tensor& queries, const at::Tensor& keys,
                      const at::Tensor& attended, double scale) {
  if (state == nullptr || !state->audit()) return;
  const int64_t length = keys.size(0);
  at::Tensor weights = at::softmax(at::mm(queries.squeeze(1).to(at::kDouble), keys.to(at::kDouble).t()) * scale, -1);
  at::Tensor left_out = at::ones({length}, weights.options().dtype(at::kBool));
  left_out.index_fill_(0, attended.to(weights.device()), false);
  // The mass of what was left out, summed directly (not 1 minus the kept mass), so that a head
  // that kept everything reports exactly zero.
  at::Tensor dropped = (weights * left_out.to(at::kDouble)).sum(-1).cpu();
  for (int64_t g = 0; g < dropped.size(0); ++g) state->account().AddDroppedMass(dropped[g].item<double>());
}

void AuditDense(AccountedState* state, int64_t num_queries) {
  if (state == nullptr || !state->audit()) return;
  for (int64_t g = 0; g < num_queries; ++g) state->account().AddDroppedMass(0.0);
}

at::Tensor AttendPositions(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                           const at::Tensor& positions, double scale) {
  return DenseAttention(queries, keys.index_select(0, positions).unsqueeze(0),
                        values.index_select(0, positions).unsqueeze(0), scale);
}

std::vector<int64_t> SelectUnits(std::vector<bool> taken, const float* scores, int64_t budget, bool proposed_only) {
  const int64_t count = static_cast<int64_t>(taken.size());
  std::vector<int64_t> candidates;
  int64_t kept = 0;
  for (int64_t unit = 0; unit < count; ++unit) {
    if (taken[unit]) {
      ++kept;
    } else if (!proposed_only || scores[unit] >= 0) {
      candidates.push_back(unit);
    }
  }
  const int64_t wanted = std::clamp<int64_t>(budget - kept, 0, static_cast<int64_t>(candidates.size()));
  std::partial_sort(candidates.begin(), candidates.begin() + wanted, candidates.end(), [&](int64_t a, int64_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  });
  for (int64_t i = 0; i < wanted; ++i) taken[candidates[i]] = true;
  std::vector<int64_t> selected;
  for (int64_t unit = 0; unit < count; ++unit) {
    if (taken[unit]) selected.push_back(unit);
  }
  return selected;
}

at::Tensor UnitPositions(const std::vector<int64_t>& units, int64_t unit_size, int64_t length, at::Device device) {
  std::vector<int64_t> positions;
  positions.reserve(units.size() * unit_size);
  for (int64_t unit : units) {
    for (int64_t p = unit * unit_size; p < std::min(length, (unit + 1) * unit_size); ++p) positions.push_back(p);
  }
  return at::tensor(positions, at::kLong).to(device);
}

}  // namespace lychee
