// lychee: the command-line client.
#include <iostream>
#include <string>
#include <vector>

#include "common/heap_tuning.h"
#include "tools/lychee/eval_command.h"
#include "tools/lychee/local_commands.h"
#include "tools/lychee/trainer_commands.h"

namespace {

constexpr char kUsage[] = R"(usage: lychee COMMAND [flags]

commands:
  tokenize [--tokenizer PATH] [--no-special-tokens]
      reads UTF-8 text on stdin, prints its token ids on one line
  generate [--model DIR] (--prompt TEXT | --prompt-file FILE) [--max-new-tokens N]
           [--temperature T] [--top-p P] [--seed S] [--device cpu|cuda] [--print-ids]
           [--attention dense|hybrid --partition FILE [--budget TOKENS]]
      streams the generated text (temperature 0, the default, is greedy); --print-ids adds
      the generated ids on the last line; FILE is a lychee.v1.HeadPartition in JSON
  eval [--model DIR] [--tasks passkey,multikey] [--context TOKENS] [--samples N] [--seed S]
       [--corpus FILE] [--device cpu|cuda] [--print-failures]
       [--attention dense|hybrid (--partition FILE | --random-partition DENSITY [--partition-seed S])
        [--budget TOKENS]]
      retrieval accuracy (greedy exact match of the answer) on held-out text

commands that talk to a lychee-trainer (all take [--trainer HOST:PORT], default 127.0.0.1:50061):
  submit --target-density D --steps N [--model NAME] [--corpus PATH] [--min-context TOKENS]
         [--max-context TOKENS] [--passkeys N] [--learning-rate LR] [--sparse-keep-ratio R]
         [--sparse-sink TOKENS] [--sparse-recent TOKENS] [--block-size TOKENS] [--budget TOKENS]
         [--sink TOKENS] [--recent TOKENS] [--seed S]
      queues a calibration job and prints its name; NAME is a model directory on the trainer,
      PATH a corpus under its data root (default: the built-in calibration corpus)
  watch JOB          a progress bar on stderr until the job ends; prints how it ended
  jobs               lists the jobs
  cancel JOB         cancels a queued or running job
  partitions [--model NAME | --fingerprint FP]
      lists the published head partitions of a model
  partition VERSION|latest [--model NAME | --fingerprint FP] [--json]
      shows one: a layer-by-KV-head map of retrieval (R) and sparse (S) heads, or its JSON
The default model is the bundled one: )" LYCHEE_DEFAULT_MODEL_DIR "\n";

}  // namespace

int main(int argc, char** argv) {
  lychee::KeepFreedMemoryInHeap();
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "help") {
    std::cout << kUsage;
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  absl::Status status;
  if (command == "tokenize") {
    status = lychee::cli::RunTokenize(args);
  } else if (command == "generate") {
    status = lychee::cli::RunGenerate(args);
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
  } else {
    std::cerr << "lychee: unknown command '" << command << "'\n" << kUsage;
    return 2;
  }
  if (!status.ok()) {
    std::cerr << "lychee " << command << ": " << status.message() << "\n";
    return 1;
  }
  return 0;
}
