// The HardKuma gate (Bastings et al. 2019) as LycheeDecode uses it: a Kumaraswamy(a, b) sample
// stretched to (-0.1, 1.1) and clipped to [0, 1], so that a gate is exactly 0 or 1 with
// non-zero probability while staying differentiable in a and b.
#pragma once

#include <ATen/ATen.h>

namespace lychee::hard_kuma {

constexpr double kStretchLow = -0.1;
constexpr double kStretchHigh = 1.1;
constexpr double kMinParameter = 1e-6;
constexpr double kMaxParameter = 100.0;

// s = (1 - (1 - u)^(1/b))^(1/a), stretched and clipped; u in (0, 1), broadcast with a and b.
at::Tensor Sample(const at::Tensor& a, const at::Tensor& b, const at::Tensor& u);
// Kumaraswamy CDF, 1 - (1 - x^a)^b, for x in [0, 1].
at::Tensor Cdf(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b);
// P(z = 0) = F(-l / (r - l)) and P(z = 1) = 1 - F((1 - l) / (r - l)).
at::Tensor ProbabilityZero(const at::Tensor& a, const at::Tensor& b);
at::Tensor ProbabilityOne(const at::Tensor& a, const at::Tensor& b);
// Mean of the unstretched Kumaraswamy(a, b): b Γ(1 + 1/a) Γ(b) / Γ(1 + 1/a + b).
at::Tensor Mean(const at::Tensor& a, const at::Tensor& b);

}  // namespace lychee::hard_kuma
