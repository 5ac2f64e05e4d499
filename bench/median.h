// The median the benchmarks report: robust to the odd slow repeat (a page fault, a clock change).
#pragma once

#include <algorithm>
#include <vector>

namespace lychee::bench {

inline double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

}  // namespace lychee::bench
