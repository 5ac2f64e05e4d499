// What both services' main() share: the heap setting, logging, the flags (common/service/command_line.h),
// and the exit code and message of a failed start.
#pragma once

#include <iostream>
#include <string>
#include <string_view>

#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "common/base/heap_tuning.h"
#include "common/service/command_line.h"
#include "common/service/server_logging.h"

namespace lychee {

// Parses the flags that `flags_file` (the main file's __FILE__) defines, then runs `serve`; on an
// error logs "PROGRAM: message", prints the flag list where the arguments were invalid, and returns 1.
inline int ServiceMain(int argc, char** argv, std::string_view program, const char* usage, absl::string_view flags_file,
                       absl::Status (*serve)()) {
  KeepFreedMemoryInHeap();
  InitServerLogging(argv[0]);
  absl::SetProgramUsageMessage(usage);
  absl::Status status = ParseFlags(argc, argv, flags_file);
  if (status.ok()) status = serve();
  if (!status.ok()) {
    LogServerError(std::string(program) + ": " + std::string(status.message()));
    // The flag list is the command line's help, for the person who typed it, as --help prints it.
    if (status.code() == absl::StatusCode::kInvalidArgument) std::cerr << FlagsHelp(flags_file);
    return 1;
  }
  return 0;
}

}  // namespace lychee
