// Prefill and decode throughput of the whole model at given context lengths (dense attention).
// usage: model_bench [--model DIR] [--device cpu|cuda] [--contexts 2048,8192] [--decode-tokens 32]
//                    [--threads N]  (LibTorch intra-op threads; BLAS threads are its own)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/heap_tuning.h"
#include "common/model.h"
#include "kernels/dense_attention.h"

namespace {

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "model_bench: %s\n", message.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  lychee::KeepFreedMemoryInHeap();
  std::string model_dir = LYCHEE_DEFAULT_MODEL_DIR;
  std::string device = "cpu";
  std::vector<int64_t> contexts = {2048, 8192};
  int64_t decode_tokens = 32;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--model") {
      model_dir = value;
    } else if (flag == "--device") {
      device = value;
    } else if (flag == "--contexts") {
      contexts.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        int64_t context;
        if (!absl::SimpleAtoi(part, &context) || context <= 0) return Fail("bad --contexts " + value);
        contexts.push_back(context);
      }
    } else if (flag == "--threads") {
      int threads;
      if (!absl::SimpleAtoi(value, &threads) || threads <= 0) return Fail("bad --threads " + value);
      at::set_num_threads(threads);
    } else if (flag == "--decode-tokens") {
      if (!absl::SimpleAtoi(value, &decode_tokens) || decode_tokens <= 0) return Fail("bad --decode-tokens " + value);
    } else {
      return Fail("unknown flag " + flag);
    }
  }
  lychee::ModelOptions options;
  if (device == "cuda") options = {at::Device(at::kCUDA, 0), at::kBFloat16};
  auto model = lychee::Model::Load(model_dir, options);
  if (!model.ok()) return Fail(std::string(model.status().message()));
  auto attention = std::make_shared<lychee::DenseAttentionBackend>();
  std::mt19937 rng(1);
  std::uniform_int_distribution<int32_t> token(3, static_cast<int32_t>((*model)->config().vocab_size) - 1);

  std::printf("model %s, device %s, %d threads\n", model_dir.c_str(), device.c_str(), at::get_num_threads());
  std::printf("%8s  %14s  %14s  %12s\n", "context", "prefill tok/s", "decode tok/s", "ms/token");
  for (int64_t context : contexts) {
    std::vector<int32_t> prompt(context);
    for (int32_t& id : prompt) id = token(rng);
    auto sequence = (*model)->NewSequence(attention);
    auto start = std::chrono::steady_clock::now();
    auto logits = (*model)->Prefill(*sequence, prompt);
    if (!logits.ok()) return Fail(std::string(logits.status().message()));
    logits->max().item<float>();  // waits for the device
    const double prefill_seconds = Seconds(start);
    lychee::Sequence* const batch[] = {sequence.get()};
    start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < decode_tokens; ++i) {
      const int32_t next[] = {token(rng)};
      auto step = (*model)->Decode(batch, next);
      if (!step.ok()) return Fail(std::string(step.status().message()));
      step->max().item<float>();
    }
    const double decode_seconds = Seconds(start);
    std::printf("%8lld  %14.0f  %14.1f  %12.2f\n", static_cast<long long>(context), context / prefill_seconds,
                decode_tokens / decode_seconds, 1e3 * decode_seconds / decode_tokens);
  }
  return 0;
}
