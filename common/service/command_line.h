// Abseil flags for the servers and the benchmarks under the names their users type: flag names are
// dashed (--kv-cache-mib; Abseil names cannot hold '-', so the flag is defined as kv_cache_mib and
// both spellings work) and a boolean may take its value as the next argument
// (--shadow-validation false), as these binaries have always accepted.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lychee {

// `args` (without the program name) as absl::ParseCommandLine takes them: the dashes of each flag's
// name become underscores (values are left alone), and a boolean flag followed by an argument that
// is not a flag takes it as its value. A boolean's value must be true or false. Arguments after a
// bare "--" are left as they are.
absl::StatusOr<std::vector<std::string>> ToAbslFlagArguments(const std::vector<std::string>& args);

// The program's usage message, then every flag that `defining_file` (the __FILE__ of the
// ABSL_FLAG definitions) defines, by its dashed name, with its default and help text.
std::string FlagsHelp(absl::string_view defining_file);

// The value of `flag` when it lies in [low, high]; otherwise an InvalidArgumentError naming the flag.
absl::StatusOr<int64_t> FlagInRange(const absl::Flag<int64_t>& flag, int64_t low, int64_t high);

// Parses the command line into the flags (after absl::SetProgramUsageMessage). --help (or a first argument
// `help`) prints FlagsHelp(defining_file) and exits 0; an unknown flag or a value its flag cannot
// hold makes absl::ParseCommandLine print which and exit 1. A boolean that is not true or false
// and positional arguments are an InvalidArgumentError naming them.
absl::Status ParseFlags(int argc, char** argv, absl::string_view defining_file);

}  // namespace lychee
