// The HardKuma gate against its closed forms and against sampling.
#include "tests/torch_catch.h"

#include <cmath>

#include "trainer/hard_kuma.h"

namespace lychee::hard_kuma {
namespace {

at::Tensor Scalar(double value) { return at::full({1}, value, at::kDouble); }
double Value(const at::Tensor& t) { return t.item<double>(); }

TEST_CASE("samples lie in [0, 1] and follow the stretch of the Kumaraswamy draw") {
  at::Tensor u = at::linspace(0.001, 0.999, 999, at::kDouble);
  at::Tensor z = Sample(Scalar(1), Scalar(1), u);  // Kuma(1, 1) is uniform: s = u
  CHECK(at::allclose(z, at::clamp(-0.1 + 1.2 * u, 0, 1)));
  for (double a : {0.2, 1.0, 5.0}) {
    for (double b : {0.3, 1.0, 7.0}) {
      at::Tensor sample = Sample(Scalar(a), Scalar(b), u);
      CHECK(Value(sample.min()) >= 0.0);
      CHECK(Value(sample.max()) <= 1.0);
    }
  }
}

TEST_CASE("CDF, P(z = 0), P(z = 1) and the mean match their closed forms") {
  CHECK(Value(Cdf(Scalar(0.5), Scalar(2), Scalar(3))) == Approx(1 - std::pow(0.75, 3)));
  CHECK(Value(ProbabilityZero(Scalar(1), Scalar(1))) == Approx(1.0 / 12));
  CHECK(Value(ProbabilityOne(Scalar(1), Scalar(1))) == Approx(1.0 / 12));
  CHECK(Value(ProbabilityZero(Scalar(2), Scalar(3))) == Approx(1 - std::pow(1 - 1.0 / 144, 3)));
  CHECK(Value(ProbabilityOne(Scalar(2), Scalar(3))) == Approx(std::pow(1 - std::pow(11.0 / 12, 2), 3)));
  CHECK(Value(Mean(Scalar(1), Scalar(1))) == Approx(0.5));
  CHECK(Value(Mean(Scalar(1), Scalar(3))) == Approx(0.25));       // Beta(1, 3)
  CHECK(Value(Mean(Scalar(2), Scalar(1))) == Approx(2.0 / 3));    // CDF x^2
  CHECK(Value(Mean(Scalar(0.5), Scalar(2))) == Approx(2 * std::tgamma(3) * std::tgamma(2) / std::tgamma(5)));
}

TEST_CASE("sampled gates agree with P(z = 0), P(z = 1) and the mean") {
  at::manual_seed(11);
  at::Tensor u = at::rand({400000}, at::kDouble) * 0.998 + 0.001;
  for (auto [a, b] : {std::pair{0.5, 2.0}, std::pair{3.0, 0.7}, std::pair{1.0, 1.0}}) {
    at::Tensor z = Sample(Scalar(a), Scalar(b), u);
    INFO("a " << a << " b " << b);
    CHECK(Value((z == 0).to(at::kDouble).mean()) == Approx(Value(ProbabilityZero(Scalar(a), Scalar(b)))).margin(0.004));
    CHECK(Value((z == 1).to(at::kDouble).mean()) == Approx(Value(ProbabilityOne(Scalar(a), Scalar(b)))).margin(0.004));
    at::Tensor unstretched = at::pow(1.0 - at::pow(1.0 - u, 1.0 / b), 1.0 / a);
    CHECK(Value(unstretched.mean()) == Approx(Value(Mean(Scalar(a), Scalar(b)))).margin(0.004));
  }
}

TEST_CASE("a gate strictly inside (0, 1) passes gradients to a and b") {
  at::Tensor a = Scalar(1.5).set_requires_grad(true);
  at::Tensor b = Scalar(0.8).set_requires_grad(true);
  Sample(a, b, Scalar(0.5)).sum().backward();
  CHECK(std::abs(Value(a.grad())) > 1e-6);
  CHECK(std::abs(Value(b.grad())) > 1e-6);
}

}  // namespace
}  // namespace lychee::hard_kuma
