// What both services' main() share: the heap setting, logging, --help, and the exit code and
// message of a failed start.
#pragma once

#include <iostream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "common/heap_tuning.h"
#include "common/server_logging.h"

namespace lychee {

// Runs `serve` with the command-line arguments; on an error logs "PROGRAM: message", prints the
// usage where the arguments were invalid, and returns 1.
inline int ServiceMain(int argc, char** argv, std::string_view program, std::string_view usage,
                       absl::Status (*serve)(const std::vector<std::string>& args)) {
  KeepFreedMemoryInHeap();
  InitServerLogging(argv[0]);
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && (args[0] == "--help" || args[0] == "help")) {
    std::cout << usage;
    return 0;
  }
  const absl::Status status = serve(args);
  if (!status.ok()) {
    LogServerError(std::string(program) + ": " + std::string(status.message()));
    // The usage is the command line's help, for the person who typed it, as --help prints it.
    if (status.code() == absl::StatusCode::kInvalidArgument) std::cerr << usage;
    return 1;
  }
  return 0;
}

}  // namespace lychee
