// lychee: the command-line client.
#include <iostream>
#include <string>
#include <vector>

#include "tools/lychee/eval_command.h"
#include "tools/lychee/local_commands.h"

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
       [--corpus FILE] [--device cpu|cuda]
       [--attention dense|hybrid (--partition FILE | --random-partition DENSITY) [--budget TOKENS]]
      retrieval accuracy (greedy exact match of the answer) on held-out text
The default model is the bundled one: )" LYCHEE_DEFAULT_MODEL_DIR "\n";

}  // namespace

int main(int argc, char** argv) {
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
