// GPU timing shared by the CUDA benchmarks: CUDA events around each repeat, the repeats queued
// behind a spin kernel so that the host's launch overhead does not reach the GPU's timeline, and
// the median; and the device-to-device copy bandwidth every figure is compared with.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/base/status_macros.h"
#include "common/service/command_line.h"

// Exits with the location and the error when a CUDA call fails (benchmarks have nothing to recover).
#define LYCHEE_BENCH_CUDA_OK(expr)                                                                  \
  do {                                                                                              \
    const cudaError_t err_ = (expr);                                                                \
    if (err_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                 \
    }                                                                                               \
  } while (0)

namespace lychee::bench {

struct Repeats {
  int reps = 50;
  int warmup = 8;
};

// The repeats a benchmark's --reps and --warmup flags ask for: at least one timed repeat.
inline absl::StatusOr<Repeats> RepeatsFromFlags(const absl::Flag<int64_t>& reps, const absl::Flag<int64_t>& warmup) {
  Repeats repeats;
  LYCHEE_ASSIGN_OR_RETURN(const int64_t timed, FlagInRange(reps, 1, 100000));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t untimed, FlagInRange(warmup, 0, 100000));
  repeats.reps = static_cast<int>(timed);
  repeats.warmup = static_cast<int>(untimed);
  return repeats;
}

// A CUDA benchmark's command line: its flags (ParseFlags; `defining_file` is the __FILE__ of their
// definitions) and the repeats its --reps and --warmup ask for. Otherwise prints what was wrong after
// the program's name and exits 1.
inline Repeats ParseBenchFlags(int argc, char** argv, absl::string_view defining_file, const absl::Flag<int64_t>& reps,
                               const absl::Flag<int64_t>& warmup) {
  const absl::Status parsed = ParseFlags(argc, argv, defining_file);
  const absl::StatusOr<Repeats> repeats = parsed.ok() ? RepeatsFromFlags(reps, warmup) : parsed;
  if (!repeats.ok()) {
    const char* slash = std::strrchr(argv[0], '/');
    std::fprintf(stderr, "%s: %s\n", slash == nullptr ? argv[0] : slash + 1,
                 std::string(repeats.status().message()).c_str());
    std::exit(1);
  }
  return *repeats;
}

inline cudaStream_t CurrentStream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Median milliseconds of fn(i) over `repeats.reps` timed calls after `repeats.warmup` untimed ones;
// i counts all calls, so that fn can rotate among buffers.
inline double TimeMs(const std::function<void(int)>& fn, const Repeats& repeats) {
  for (int i = 0; i < repeats.warmup; ++i) fn(i);
  LYCHEE_BENCH_CUDA_OK(cudaGetLastError());
  LYCHEE_BENCH_CUDA_OK(cudaStreamSynchronize(CurrentStream()));
  std::vector<cudaEvent_t> start(repeats.reps), stop(repeats.reps);
  for (int i = 0; i < repeats.reps; ++i) {
    LYCHEE_BENCH_CUDA_OK(cudaEventCreate(&start[i]));
    LYCHEE_BENCH_CUDA_OK(cudaEventCreate(&stop[i]));
  }
  at::cuda::sleep(40 * 1000 * 1000);  // ~20 ms of spinning: the host queues the repeats meanwhile
  for (int i = 0; i < repeats.reps; ++i) {
    LYCHEE_BENCH_CUDA_OK(cudaEventRecord(start[i], CurrentStream()));
    fn(repeats.warmup + i);
    LYCHEE_BENCH_CUDA_OK(cudaEventRecord(stop[i], CurrentStream()));
  }
  LYCHEE_BENCH_CUDA_OK(cudaGetLastError());
  LYCHEE_BENCH_CUDA_OK(cudaStreamSynchronize(CurrentStream()));
  std::vector<double> ms(repeats.reps);
  for (int i = 0; i < repeats.reps; ++i) {
    float t = 0;
    LYCHEE_BENCH_CUDA_OK(cudaEventElapsedTime(&t, start[i], stop[i]));
    ms[i] = t;
    cudaEventDestroy(start[i]);
    cudaEventDestroy(stop[i]);
  }
  std::sort(ms.begin(), ms.end());
  return ms[repeats.reps / 2];
}

// Device-to-device copy of 1 GiB, read + write bytes over the median time of 20 copies, GB/s.
inline double CopyBandwidthGBs() {
  const int64_t bytes = int64_t{1} << 30;
  at::Tensor a = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
  at::Tensor b = at::empty_like(a);
  a.fill_(1);
  b.fill_(2);
  const double ms = TimeMs(
      [&](int i) {
        LYCHEE_BENCH_CUDA_OK(cudaMemcpyAsync(i % 2 ? a.data_ptr() : b.data_ptr(), i % 2 ? b.data_ptr() : a.data_ptr(),
                                             bytes, cudaMemcpyDeviceToDevice, CurrentStream()));
      },
      Repeats{20, 8});
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

}  // namespace lychee::bench
