#include "trainer/hard_kuma.h"

namespace lychee::hard_kuma {

at::Tensor Sample(const at::Tensor& a, const at::Tensor& b, const at::Tensor& u) {
  at::Tensor s = at::pow(1.0 - at::pow(1.0 - u, 1.0 / b), 1.0 / a);
  return at::clamp(kStretchLow + (kStretchHigh - kStretchLow) * s, 0.0, 1.0);
}

at::Tensor Cdf(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b) {
  return 1.0 - at::pow(1.0 - at::pow(x, a), b);
}

at::Tensor ProbabilityZero(const at::Tensor& a, const at::Tensor& b) {
  return Cdf(at::full_like(a, -kStretchLow / (kStretchHigh - kStretchLow)), a, b);
}

at::Tensor ProbabilityOne(const at::Tensor& a, const at::Tensor& b) {
  return 1.0 - Cdf(at::full_like(a, (1.0 - kStretchLow) / (kStretchHigh - kStretchLow)), a, b);
}

at::Tensor Mean(const at::Tensor& a, const at::Tensor& b) {
  return at::exp(at::log(b) + at::lgamma(1.0 + 1.0 / a) + at::lgamma(b) - at::lgamma(1.0 + 1.0 / a + b));
}

}  // namespace lychee::hard_kuma
