// What both services' main() share: the heap setting, the flags (common/command_line.h), and the
// exit code and message of a failed start.
#pragma once

#include <iostream>
#include <string_view>

#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "common/command_line.h"
#include "common/heap_tuning.h"

namespace lychee {

// Parses the flags that `flags_file` (the main file's __FILE__) defines, then runs `serve`; on an
// error prints "PROGRAM: message", and the flag list where the arguments were invalid, and returns 1.
inline int ServiceMain(int argc, char** argv, std::string_view program, const char* usage, absl::string_view flags_file,
                       absl::Status (*serve)()) {
  KeepFreedMemoryInHeap();
  absl::SetProgramUsageMessage(usage);
  absl::Status status = ParseFlags(argc, argv, flags_file);
  if (status.ok()) status = serve();
  if (!status.ok()) {
    std::cerr << program << ": " << status.message() << "\n"
              << (status.code() == absl::StatusCode::kInvalidArgument ? FlagsHelp(flags_file) : "");
    return 1;
  }
  return 0;
}

}  // namespace lychee
