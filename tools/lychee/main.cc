// lychee: the command-line client.
#include <algorithm>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/base/heap_tuning.h"
#include "common/service/resource_paths.h"
#include "tools/lychee/eval_command.h"
#include "tools/lychee/health_command.h"
#include "tools/lychee/inference_commands.h"
#include "tools/lychee/local_commands.h"
#include "tools/lychee/sweep_view.h"
#include "tools/lychee/trainer_commands.h"

namespace {

constexpr char kUsage[] = R"(usage: lychee COMMAND [flags]

commands:
  tokenize [--tokenizer PATH] [--no-special-tokens]
      reads UTF-8 text on stdin, prints its token ids on one line
  generate [--model DIR] (--prompt TEXT | --prompt-file FILE) [--max-new-tokens N]
           [--temperature T] [--top-p P] [--seed S] [--device cpu|cuda] [--print-ids]
           [--policy NAME | --attention dense|hybrid] [--partition FILE] [--budget TOKENS]
           [the policy parameters of eval but --audit] [--tensor-parallel N]
      streams the generated text (temperature 0, the default, is greedy); --print-ids adds
      the generated ids on the last line; FILE is a lychee.v1.HeadPartition in JSON;
      --tensor-parallel N runs N ranks (processes, each its shard of the weights) over Gloo
      (cpu) or NCCL (cuda, a GPU each), with any policy
  eval [--model DIR] [--tasks passkey,multikey,multivalue,vartrack] [--context T1,T2,...]
       [--samples N] [--seed S] [--corpus FILE] [--device cpu|cuda] [--print-failures]
       [--policy dense,lychee,double-p,prhs,streaming,tidal,quest | --attention dense|hybrid]
       [--partition FILE | --random-partition DENSITY [--partition-seed S]] [--budget TOKENS]
       [--block-size N] [--sink N] [--recent N] [--p1 P] [--p2 P] [--clusters N]
       [--kmeans-iterations N] [--tail-tokens N] [--prhs-selectors temporal,recency,cross-layer]
       [--prhs-enlargement BLOCKS] [--prhs-window N] [--tidal-layers L1,L2] [--page-size N]
       [--quest-dense-layers N] [--audit [--audit-every N]] [--json FILE] [--plot FILE.svg]
      retrieval accuracy (greedy exact match of the answer) on held-out text, per policy, task
      and context, with the tokens attended per head and the KV bytes read per token

commands that talk to a lychee-trainer (all take [--trainer HOST:PORT], default 127.0.0.1:50061):
  submit --target-density D --steps N [--model NAME] [--corpus PATH] [--min-context TOKENS]
         [--max-context TOKENS] [--passkeys N] [--learning-rate LR] [--sparse-keep-ratio R]
         [--sparse-sink TOKENS] [--sparse-recent TOKENS] [--block-size TOKENS] [--budget TOKENS]
         [--sink TOKENS] [--recent TOKENS] [--seed S] [--samples-per-step N]
      queues a calibration job and prints its name; NAME is a model directory on the trainer,
      PATH a corpus under its data root (default: the built-in calibration corpus)
  submit (--target-densities D1,D2,... | --sweep) --steps N [the flags above but --target-density]
         [--max-accuracy-drop D] [--validation-context TOKENS] [--validation-samples N]
         [--validation-seed S] [--validation-corpus PATH | --validation-prompts PATH]
         [--validation-budget TOKENS] [--audit]
      one sweep job: a partition per target (1 to 16, each in (0, 1]; --sweep: )" LYCHEE_DEFAULT_SWEEP_TARGETS R"(),
      each validated against dense on pass-key and multi-key prompts of held-out text (default
      2048 tokens, 20 per task, budget --budget) or on a JSON-lines prompts file; publishes the
      sparsest partition whose accuracy stays within D (default 0.05) of dense on every task
  watch JOB [--plot FILE.svg]
      a progress bar on stderr until the job ends; prints how it ended, and a sweep's table;
      --plot writes the sweep's accuracy against KV bytes read per token as SVG
  jobs               lists the jobs, with each sweep's table
  cancel JOB         cancels a queued or running job
  partitions [--model NAME | --fingerprint FP | --server HOST:PORT]
      lists the published head partitions of a model (with --server: those an inference
      server holds, and which is active)
  partition VERSION|latest [--model NAME | --fingerprint FP | --server HOST:PORT] [--json] [--svg FILE]
      shows one: a layer-by-KV-head map of retrieval (R) and sparse (S) heads, or its JSON;
      --svg also writes it to FILE as an SVG heatmap of the gates
  publish FILE [--model NAME]
      stores a hand-written or shipped partition (JSON) as the model's next version

commands that talk to a lychee-inference (all take [--server HOST:PORT], default 127.0.0.1:50062):
  generate --server HOST:PORT (--prompt TEXT | --prompt-file FILE) [--max-new-tokens N]
           [--temperature T] [--top-p P] [--seed S] [--stop TEXT] [--attention dense|hybrid |
           --policy dense|lychee|double-p|prhs|streaming|tidal|quest [--audit [--audit-every N]]]
           [--budget TOKENS] [--partition-version V] [--max-dropped-mass M] [--timeout SECONDS]
           [--print-ids]
      streams the generation; a summary (tokens, latency, partition version, the policy's
      telemetry) goes to stderr. --max-dropped-mass audits each decode step and switches to
      dense attention once one drops more than M of a head's attention mass; hybrid (lychee)
      takes the partition's own selection, --budget over it
  server-info        model, active partition, trainer connection, rejected partitions, load
  activate VERSION   serves VERSION to new sequences
  rollback           back to the partition active before the current one
  canary VERSION --fraction F [--max-dropped-mass M] [--max-error-rate E]
      serves VERSION to a fraction F (in (0, 1]) of new sequences, the active version to the
      others, and promotes or rolls it back by itself after the server's --canary-sequences
      (status in server-info)
  canary --promote | --abort
      decides the running canary now
  hold on|off        while on, partitions from the trainer are stored but not activated

  health [--target HOST:PORT] [--service NAME] [--timeout SECONDS]
      asks a lychee-trainer or lychee-inference (default 127.0.0.1:50061) through
      grpc.health.v1.Health/Check whether it serves; prints the status, exits 0 only if SERVING

every command that talks to a server also takes [--tls-ca FILE] [--tls-cert FILE --tls-key FILE]
[--token-file FILE]: TLS verified with the CA certificates of FILE (a client certificate for mutual
TLS), and the admin or client token of FILE sent as 'authorization: Bearer TOKEN'
The default model is the bundled one: )";

// The usage, ending with where the bundled model is, or why none was found.
std::string Usage() {
  const absl::StatusOr<std::string> model = lychee::ResourcePath(lychee::kBundledModelPath);
  return absl::StrCat(kUsage, model.ok() ? *model : model.status().message(), "\n");
}

}  // namespace

int main(int argc, char** argv) {
  lychee::KeepFreedMemoryInHeap();
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "help") {
    std::cout << Usage();
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  absl::Status status;
  if (command == "tokenize") {
    status = lychee::cli::RunTokenize(args);
  } else if (command == "generate") {
    const bool remote = std::any_of(args.begin(), args.end(), [](const std::string& arg) {
      return arg == "--server" || arg.rfind("--server=", 0) == 0;
    });
    status = remote ? lychee::cli::RunRemoteGenerate(args) : lychee::cli::RunGenerate(args);
  } else if (command == "server-info") {
    status = lychee::cli::RunServerInfo(args);
  } else if (command == "activate") {
    status = lychee::cli::RunActivate(args);
  } else if (command == "canary") {
    status = lychee::cli::RunCanary(args);
  } else if (command == "rollback") {
    status = lychee::cli::RunRollback(args);
  } else if (command == "hold") {
    status = lychee::cli::RunHold(args);
  } else if (command == "publish") {
    status = lychee::cli::RunPublish(args);
  } else if (command == "eval") {
    status = lychee::cli::RunEval(args);
  } else if (command == "submit") {
    status = lychee::cli::RunSubmit(args);
  } else if (command == "watch") {
    status = lychee::cli::RunWatch(args);
  } else if (command == "jobs") {
    status = lychee::cli::RunJobs(args);
  } else if (command == "cancel") {
    status = lychee::cli::RunCancel(args);
  } else if (command == "partitions") {
    status = lychee::cli::RunPartitions(args);
  } else if (command == "partition") {
    status = lychee::cli::RunPartition(args);
  } else if (command == "health") {
    status = lychee::cli::RunHealth(args);
  } else {
    std::cerr << "lychee: unknown command '" << command << "'\n" << Usage();
    return 2;
  }
  if (!status.ok()) {
    std::cerr << "lychee " << command << ": " << status.message() << "\n";
    return 1;
  }
  return 0;
}
