// The CUDA attention backends inside the bundled model (bf16 on the GPU) against the LibTorch
// reference backends on the same device: the same logits within bf16 noise (0.156 dense and
// 0.125 hybrid seen on an H100), and a batch of sequences of different lengths equal to each
// decoded alone, and the same reads in each sequence's telemetry. Dense, hybrid, Quest, PrHS and
// Double-P. Then the decode step replayed from CUDA graphs over a shared pool of shuffled pages
// against the same step run eagerly.
#include "tests/torch_catch.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <random>

#include "common/model/model.h"
#include "kernels/cuda_attention.h"
#include "kernels/dense_attention.h"
#include "kernels/hybrid_attention.h"
#include "kernels/policies/policies.h"

namespace lychee {
namespace {

std::vector<int32_t> Prompt(size_t length, int salt) {
  std::vector<int32_t> ids(length);
  for (size_t i = 0; i < length; ++i) ids[i] = static_cast<int32_t>(100 + (i * 37 + salt * 11) % 4000);
  return ids;
}

// Decodes `steps` fixed tokens after each prompt, as one batch, so that both backends see the
// same inputs however their logits differ; returns each step's logits [B, V], and each sequence's
// telemetry in `telemetry` when given.
std::vector<at::Tensor> DecodeBatch(const Model& model, std::shared_ptr<const AttentionBackend> attention,
                                    const std::vector<std::vector<int32_t>>& prompts, int steps,
                                    std::vector<AttentionTelemetry>* telemetry = nullptr) {
  std::vector<std::unique_ptr<Sequence>> sequences;
  std::vector<Sequence*> batch;
  for (const auto& prompt : prompts) {
    sequences.push_back(model.NewSequence(attention));
    batch.push_back(sequences.back().get());
    REQUIRE(model.Prefill(*sequences.back(), prompt).ok());
  }
  std::vector<at::Tensor> logits;
  for (int step = 0; step < steps; ++step) {
    const std::vector<int32_t> next(prompts.size(), 200 + 13 * step);
    logits.push_back(model.Decode(batch, next).value().cpu());
  }
  for (const auto& sequence : sequences) {
    if (telemetry == nullptr) break;
    const SequenceAttentionState* state = sequence->attention_state();
    REQUIRE(state != nullptr);
    REQUIRE(state->telemetry() != nullptr);
    telemetry->push_back(*state->telemetry());
  }
  return logits;
}

// The bundled model's hybrid partition with KV head `sparse_head(layer)` sparse in every layer after 0.
std::shared_ptr<const HeadPartition> OneSparseHeadPerLayer(const ModelConfig& config,
                                                           const std::function<int64_t(int64_t)>& sparse_head,
                                                           int64_t budget) {
  HeadPartition partition = HeadPartition::AllRetrieval(config.num_layers, config.num_kv_heads, SelectionParams{});
  for (int64_t layer = 1; layer < config.num_layers; ++layer) partition.set_role(layer, sparse_head(layer), HeadRole::kSparse);
  partition.mutable_selection().token_budget = budget;
  return std::make_shared<const HeadPartition>(std::move(partition));
}

TEST_CASE("CUDA backends decode as the reference backends do", "[cuda]") {
  if (!at::hasCUDA()) {
    WARN("SKIPPED: no CUDA device: the CUDA attention backends run on the GPU host only");
    return;
  }
  auto model = Model::Load("models/tiny-llama-retrieval", ModelOptionsForDevice("cuda").value());
  REQUIRE(model.ok());
  const ModelConfig& config = (*model)->config();
  auto shared = OneSparseHeadPerLayer(config, [](int64_t layer) { return layer % 2; }, 512);
  auto cuda_hybrid = MakeCudaHybridAttention(shared, config);
  REQUIRE(cuda_hybrid.ok());
  auto reference_hybrid = HybridAttentionBackend::Create(shared, config);
  REQUIRE(reference_hybrid.ok());

  PolicySpec quest = PolicySpec::Defaults(PolicyKind::kQuest);
  quest.token_budget = 512;
  PolicySpec prhs = PolicySpec::Defaults(PolicyKind::kPrhs);
  prhs.token_budget = 512;
  PolicySpec double_p = PolicySpec::Defaults(PolicyKind::kDoubleP);

  const std::vector<std::vector<int32_t>> prompts = {Prompt(3000, 1), Prompt(1234, 2), Prompt(70, 3)};
  const struct {
    const char* name;
    std::shared_ptr<const AttentionBackend> cuda, reference;
  } pairs[] = {{"dense", MakeCudaDenseAttention(config), std::make_shared<DenseAttentionBackend>()},
               {"hybrid", *cuda_hybrid, *reference_hybrid},
               {"quest", MakeCudaQuestAttention(quest), MakeQuestBackend(quest)},
               {"prhs", MakeCudaPrhsAttention(prhs), MakePrhsBackend(prhs)},
               {"double-p", MakeCudaDoublePAttention(double_p), MakeDoublePBackend(double_p)}};
  for (const auto& pair : pairs) {
    std::vector<AttentionTelemetry> fast_reads, reference_reads;
    const auto fast = DecodeBatch(**model, pair.cuda, prompts, 6, &fast_reads);
    const auto reference = DecodeBatch(**model, pair.reference, prompts, 6, &reference_reads);
    // What each sequence read, counted as the reference counts it: exactly for dense and hybrid,
    // whose reads follow from the lengths; within 2% of the bytes for the policies whose selections
    // follow scores that bf16 noise can reorder.
    for (size_t i = 0; i < prompts.size(); ++i) {
      INFO(pair.name << ", sequence " << i);
      CHECK(fast_reads[i].decode_steps == reference_reads[i].decode_steps);
      const double bytes_ratio = static_cast<double>(fast_reads[i].kv_bytes_read) / reference_reads[i].kv_bytes_read;
      WARN(pair.name << ", sequence " << i << ": KV bytes read CUDA " << fast_reads[i].kv_bytes_read << ", reference "
                     << reference_reads[i].kv_bytes_read);
      if (std::string(pair.name) == "dense" || std::string(pair.name) == "hybrid") {
        CHECK(fast_reads[i].tokens_attended == reference_reads[i].tokens_attended);
        CHECK(fast_reads[i].kv_bytes_read == reference_reads[i].kv_bytes_read);
      } else {
        CHECK(fast_reads[i].num_layers == reference_reads[i].num_layers);
        CHECK(std::abs(bytes_ratio - 1) < 0.02);
      }
    }
    double worst = 0;
    for (size_t step = 0; step < fast.size(); ++step) {
      worst = std::max(worst, (fast[step] - reference[step]).abs().max().item<double>());
    }
    WARN(pair.name << ": max |logit difference| CUDA kernels vs LibTorch reference, bf16: " << worst);
    CHECK(worst < 0.25);
    // The batch equals each sequence decoded alone.
    for (size_t i = 0; i < prompts.size(); ++i) {
      const auto alone = DecodeBatch(**model, pair.cuda, {prompts[i]}, 6);
      for (size_t step = 0; step < alone.size(); ++step) {
        CHECK((alone[step][0] - fast[step][i]).abs().max().item<double>() < 0.05);
      }
    }
  }
}

// Greedy decoding of `prompts` as one batch in `pool` for `steps` steps; returns each step's tokens
// and logits, and each sequence's telemetry.
struct Greedy {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<at::Tensor> logits;
  std::vector<AttentionTelemetry> reads;
};
Greedy DecodeGreedy(const Model& model, std::shared_ptr<KvPool> pool, std::shared_ptr<const AttentionBackend> attention,
                    const std::vector<std::vector<int32_t>>& prompts, int steps, DecodeContext& context) {
  std::vector<std::unique_ptr<Sequence>> sequences;
  std::vector<Sequence*> batch;
  std::vector<int32_t> next;
  for (const auto& prompt : prompts) {
    sequences.push_back(model.NewSequence(pool, attention));
    batch.push_back(sequences.back().get());
    next.push_back(static_cast<int32_t>(model.Prefill(*sequences.back(), prompt).value().argmax().item<int64_t>()));
  }
  Greedy greedy;
  for (int step = 0; step < steps; ++step) {
    const at::Tensor logits = model.Decode(batch, next, &context).value().cpu();
    greedy.logits.push_back(logits.clone());
    for (size_t i = 0; i < next.size(); ++i) next[i] = static_cast<int32_t>(logits[i].argmax().item<int64_t>());
    greedy.tokens.push_back(next);
  }
  for (const auto& sequence : sequences) greedy.reads.push_back(*sequence->attention_state()->telemetry());
  return greedy;
}

TEST_CASE("the decode step replayed from a CUDA graph equals the eager step", "[cuda]") {
  if (!at::hasCUDA()) {
    WARN("SKIPPED: no CUDA device: CUDA graphs run on the GPU host only");
    return;
  }
  auto model = Model::Load("models/tiny-llama-retrieval", ModelOptionsForDevice("cuda").value());
  REQUIRE(model.ok());
  const ModelConfig& config = (*model)->config();
  auto hybrid = MakeCudaHybridAttention(OneSparseHeadPerLayer(config, [](int64_t) { return 1; }, 256), config);
  REQUIRE(hybrid.ok());
  // The pool's pages handed out in a shuffled order, so that no sequence's pages are consecutive.
  auto pool = (*model)->NewKvPool(200).value();
  {
    std::vector<int32_t> pages = pool->Allocate(200).value();
    std::mt19937 rng(7);
    std::shuffle(pages.begin(), pages.end(), rng);
    pool->Free(pages);
  }
  for (const auto& [name, attention] : std::vector<std::pair<std::string, std::shared_ptr<const AttentionBackend>>>{
           {"dense", MakeCudaDenseAttention(config)}, {"hybrid", *hybrid}}) {
    for (const std::vector<std::vector<int32_t>>& prompts :
         {std::vector<std::vector<int32_t>>{Prompt(1500, 4)},
          std::vector<std::vector<int32_t>>{Prompt(2000, 5), Prompt(700, 6), Prompt(90, 7)}}) {
      INFO(name << ", batch " << prompts.size());
      DecodeContext eager_context(DecodeOptions{/*cuda_graphs=*/false});
      DecodeContext graph_context;
      const Greedy eager = DecodeGreedy(**model, pool, attention, prompts, 40, eager_context);
      const Greedy graphed = DecodeGreedy(**model, pool, attention, prompts, 40, graph_context);
      const DecodeStats stats = graph_context.stats();
      INFO("capture error: " << stats.last_capture_error);
      CHECK(stats.capture_failures == 0);
      CHECK(stats.graph_captures == 1);
      CHECK(stats.graph_replays == 39);
      CHECK(eager_context.stats().graph_replays == 0);
      CHECK(graphed.tokens == eager.tokens);
      double worst = 0;
      for (size_t step = 0; step < eager.logits.size(); ++step) {
        worst = std::max(worst, (graphed.logits[step] - eager.logits[step]).abs().max().item<double>());
      }
      WARN(name << " batch " << prompts.size() << ": max |logit difference| graph vs eager: " << worst);
      CHECK(worst <= 1e-3);
    }
  }
}

TEST_CASE("graphs prepared ahead are replayed from the first step and decode as the eager step", "[cuda]") {
  if (!at::hasCUDA()) {
    WARN("SKIPPED: no CUDA device: CUDA graphs run on the GPU host only");
    return;
  }
  auto model = Model::Load("models/tiny-llama-retrieval", ModelOptionsForDevice("cuda").value());
  REQUIRE(model.ok());
  const ModelConfig& config = (*model)->config();
  std::shared_ptr<const AttentionBackend> hybrid =
      MakeCudaHybridAttention(OneSparseHeadPerLayer(config, [](int64_t) { return 0; }, 256), config).value();
  auto pool = (*model)->NewKvPool(120).value();
  DecodeOptions options;
  options.max_graph_batch = 3;  // buckets of 1, 2 and 4 rows
  DecodeContext prepared(options);
  REQUIRE((*model)->PrepareDecodeGraphs(hybrid, pool, prepared).ok());
  INFO("capture error: " << prepared.stats().last_capture_error);
  CHECK(prepared.stats().graph_captures == 3);
  CHECK(prepared.stats().eager_steps == 0);
  CHECK(prepared.stats().graph_replays == 0);
  CHECK(pool->free_pages() == 120);  // the throwaway sequences gave their pages back

  const std::vector<std::vector<int32_t>> prompts = {Prompt(900, 11), Prompt(300, 12), Prompt(64, 13)};
  DecodeContext eager_context(DecodeOptions{/*cuda_graphs=*/false});
  const Greedy eager = DecodeGreedy(**model, pool, hybrid, prompts, 12, eager_context);
  const Greedy graphed = DecodeGreedy(**model, pool, hybrid, prompts, 12, prepared);
  CHECK(prepared.stats().graph_captures == 3);
  CHECK(prepared.stats().graph_replays == 12);
  CHECK(prepared.stats().eager_steps == 0);
  CHECK(graphed.tokens == eager.tokens);
}

TEST_CASE("the sampled audit on the GPU measures the dropped mass the reference audit measures", "[cuda]") {
  if (!at::hasCUDA()) {
    WARN("SKIPPED: no CUDA device: the CUDA audit runs on the GPU host only");
    return;
  }
  auto model = Model::Load("models/tiny-llama-retrieval", ModelOptionsForDevice("cuda").value());
  REQUIRE(model.ok());
  const ModelConfig& config = (*model)->config();
  const int64_t heads_per_step = config.num_layers * config.num_attention_heads;
  auto partition = OneSparseHeadPerLayer(
      config, [](int64_t layer) { return layer % 2; }, 256);
  // 70 positions fit the budget: that sequence drops nothing.
  const std::vector<std::vector<int32_t>> prompts = {Prompt(3000, 21), Prompt(1234, 22), Prompt(70, 23)};

  SECTION("every step, against the reference") {
    std::vector<AttentionTelemetry> fast, reference;
    DecodeBatch(**model, MakeCudaHybridAttention(partition, config, /*audit_every=*/1).value(), prompts, 6, &fast);
    DecodeBatch(**model, HybridAttentionBackend::Create(partition, config, /*audit_every=*/1).value(), prompts, 6,
                &reference);
    for (size_t i = 0; i < prompts.size(); ++i) {
      INFO("sequence " << i);
      WARN("sequence " << i << ": dropped mass mean/max CUDA " << fast[i].mean_dropped_mass() << "/"
                       << fast[i].max_dropped_mass << ", reference " << reference[i].mean_dropped_mass() << "/"
                       << reference[i].max_dropped_mass);
      CHECK(fast[i].audited);
      CHECK(fast[i].audited_heads == 6 * heads_per_step);
      CHECK(fast[i].audited_heads == reference[i].audited_heads);
      CHECK(std::abs(fast[i].mean_dropped_mass() - reference[i].mean_dropped_mass()) <=
            0.002 + 0.05 * reference[i].mean_dropped_mass());
      CHECK(std::abs(fast[i].max_dropped_mass - reference[i].max_dropped_mass) <=
            0.01 + 0.05 * reference[i].max_dropped_mass);
    }
    CHECK(fast[0].mean_dropped_mass() > 0.001);  // the long sequence does drop mass
    CHECK(fast[2].max_dropped_mass < 1e-3);
  }

  SECTION("every fourth step, replayed from its own graph") {
    auto audited = MakeCudaHybridAttention(partition, config, /*audit_every=*/4).value();
    auto pool = (*model)->NewKvPool(200).value();
    DecodeContext eager_context(DecodeOptions{/*cuda_graphs=*/false});
    DecodeContext graph_context;
    const Greedy eager = DecodeGreedy(**model, pool, audited, prompts, 13, eager_context);
    const Greedy graphed = DecodeGreedy(**model, pool, audited, prompts, 13, graph_context);
    INFO("capture error: " << graph_context.stats().last_capture_error);
    // Steps 1, 5, 9 and 13 audited; steps 1 and 2 eager, the plain graph captured at step 3 and the
    // audited one at step 5.
    CHECK(graph_context.stats().graph_captures == 2);
    CHECK(graph_context.stats().eager_steps == 2);
    CHECK(graphed.tokens == eager.tokens);
    for (size_t i = 0; i < prompts.size(); ++i) {
      INFO("sequence " << i);
      CHECK(graphed.reads[i].audited_heads == 4 * heads_per_step);
      CHECK(eager.reads[i].audited_heads == 4 * heads_per_step);
      CHECK(std::abs(graphed.reads[i].sum_dropped_mass - eager.reads[i].sum_dropped_mass) <=
            1e-4 * (1 + eager.reads[i].sum_dropped_mass));
    }
    // The audit adds no reads to the sequence's account.
    DecodeContext plain_context(DecodeOptions{/*cuda_graphs=*/false});
    const Greedy plain =
        DecodeGreedy(**model, pool, MakeCudaHybridAttention(partition, config).value(), prompts, 13, plain_context);
    CHECK(plain.tokens == eager.tokens);
    for (size_t i = 0; i < prompts.size(); ++i) CHECK(plain.reads[i].kv_bytes_read == eager.reads[i].kv_bytes_read);
  }
}

TEST_CASE("the fused decode step gives the LibTorch step's logits", "[cuda]") {
  if (!at::hasCUDA()) {
    WARN("SKIPPED: no CUDA device: the fused decode kernels run on the GPU host only");
    return;
  }
  ModelOptions fused_options = ModelOptionsForDevice("cuda").value();
  ModelOptions plain_options = fused_options;
  plain_options.fused_decode = false;
  ModelOptions cublas_options = fused_options;
  cublas_options.small_batch_gemv = false;
  ModelOptions serial_options = fused_options;
  serial_options.overlap_kernel_launches = false;
  REQUIRE(fused_options.overlap_kernel_launches);
  auto fused = Model::Load("models/tiny-llama-retrieval", fused_options);
  auto plain = Model::Load("models/tiny-llama-retrieval", plain_options);
  auto cublas = Model::Load("models/tiny-llama-retrieval", cublas_options);
  auto serial = Model::Load("models/tiny-llama-retrieval", serial_options);
  REQUIRE(fused.ok());
  REQUIRE(plain.ok());
  REQUIRE(cublas.ok());
  REQUIRE(serial.ok());
  const ModelConfig& config = (*fused)->config();
  const std::vector<std::vector<int32_t>> prompts = {Prompt(1200, 8), Prompt(300, 9), Prompt(45, 10)};
  struct Run {
    const Model* model;
    std::vector<std::unique_ptr<Sequence>> sequences;
    DecodeContext context;
  };
  std::vector<std::unique_ptr<Run>> runs;
  std::vector<int32_t> next;
  for (const Model* model : {fused->get(), plain->get(), cublas->get(), serial->get()}) {
    runs.push_back(std::make_unique<Run>());
    runs.back()->model = model;
    auto pool = model->NewKvPool(64).value();
    const auto attention = MakeCudaDenseAttention(config);
    for (const auto& prompt : prompts) {
      runs.back()->sequences.push_back(model->NewSequence(pool, attention));
      const at::Tensor logits = model->Prefill(*runs.back()->sequences.back(), prompt).value();
      if (model == plain->get()) next.push_back(static_cast<int32_t>(logits.argmax().item<int64_t>()));
    }
  }
  // Every run is fed the LibTorch step's tokens, so that a near tie cannot make them diverge.
  double worst = 0, worst_cublas = 0, worst_serial = 0;
  int agree = 0, total = 0;
  for (int step = 0; step < 24; ++step) {
    std::vector<at::Tensor> logits;
    for (auto& run : runs) {
      std::vector<Sequence*> batch;
      for (auto& sequence : run->sequences) batch.push_back(sequence.get());
      logits.push_back(run->model->Decode(batch, next, &run->context).value().cpu());
    }
    worst = std::max(worst, (logits[0] - logits[1]).abs().max().item<double>());
    worst_cublas = std::max(worst_cublas, (logits[2] - logits[1]).abs().max().item<double>());
    // The same kernels in the same order: overlapping their launches must not change a bit (a
    // kernel that read its input before the previous one finished writing it would).
    worst_serial = std::max(worst_serial, (logits[0] - logits[3]).abs().max().item<double>());
    for (size_t i = 0; i < next.size(); ++i) {
      const int32_t reference = static_cast<int32_t>(logits[1][i].argmax().item<int64_t>());
      agree += static_cast<int32_t>(logits[0][i].argmax().item<int64_t>()) == reference;
      ++total;
      next[i] = reference;
    }
  }
  WARN("fused vs LibTorch decode, max |logit difference| " << worst << " (with cuBLAS projections " << worst_cublas
                                                          << "), argmax agreement " << agree << " of " << total);
  CHECK(worst < 0.25);
  CHECK(worst_cublas < 0.25);
  CHECK(worst_serial == 0);
  CHECK(agree >= total - 2);
  CHECK(runs[0]->context.stats().graph_replays > 0);
  CHECK(runs[3]->context.stats().graph_replays > 0);
}

}  // namespace
}  // namespace lychee
