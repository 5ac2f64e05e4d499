#include "common/service/command_line.h"

#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <map>
#include <optional>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace lychee {
namespace {

std::string Dashed(absl::string_view name) { return absl::StrReplaceAll(name, {{"_", "-"}}); }

// `text` broken into lines of at most `width` characters, each after `indent`.
std::string Wrapped(absl::string_view text, absl::string_view indent, size_t width) {
  std::string out;
  std::string line;
  for (absl::string_view word : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    if (!line.empty() && line.size() + 1 + word.size() > width) {
      absl::StrAppend(&out, indent, line, "\n");
      line.clear();
    }
    absl::StrAppend(&line, line.empty() ? "" : " ", word);
  }
  if (!line.empty()) absl::StrAppend(&out, indent, line, "\n");
  return out;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ToAbslFlagArguments(const std::vector<std::string>& args) {
  std::vector<std::string> converted;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--") {
      converted.insert(converted.end(), args.begin() + static_cast<std::ptrdiff_t>(i), args.end());
      break;
    }
    if (arg.rfind("--", 0) != 0) {
      converted.push_back(arg);
      continue;
    }
    const size_t equals = arg.find('=');
    const std::string dashed_name = arg.substr(2, equals == std::string::npos ? std::string::npos : equals - 2);
    const std::string name = absl::StrReplaceAll(dashed_name, {{"-", "_"}});
    std::optional<std::string> value;
    if (equals != std::string::npos) value = arg.substr(equals + 1);
    const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag != nullptr && flag->IsOfType<bool>()) {
      if (!value && i + 1 < args.size() && args[i + 1].rfind("-", 0) != 0) value = args[++i];
      if (value && *value != "true" && *value != "false") {
        return absl::InvalidArgumentError(
            absl::StrCat("--", dashed_name, " must be true or false, got '", *value, "'"));
      }
    }
    converted.push_back(value ? absl::StrCat("--", name, "=", *value) : absl::StrCat("--", name));
  }
  return converted;
}

std::string FlagsHelp(absl::string_view defining_file) {
  std::map<std::string, const absl::CommandLineFlag*> flags;  // by dashed name, for a sorted list
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    // Filename() is normalized (leading slashes dropped), hence the comparison of endings.
    if (absl::EndsWith(defining_file, flag->Filename())) flags[Dashed(name)] = flag;
  }
  std::string help = absl::StrCat(absl::StripTrailingAsciiWhitespace(absl::ProgramUsageMessage()), "\n\n");
  for (const auto& [name, flag] : flags) {
    const std::string default_value = flag->DefaultValue();
    absl::StrAppend(&help, "  --", name, default_value.empty() ? "" : absl::StrCat(" (default ", default_value, ")"),
                    "\n", Wrapped(flag->Help(), "      ", 94));
  }
  return help;
}

absl::StatusOr<int64_t> FlagInRange(const absl::Flag<int64_t>& flag, int64_t low, int64_t high) {
  const int64_t value = absl::GetFlag(flag);
  if (value < low || value > high) {
    return absl::InvalidArgumentError(absl::StrCat("--", Dashed(absl::GetFlagReflectionHandle(flag).Name()),
                                                   " must be in [", low, ", ", high, "], got ", value));
  }
  return value;
}

absl::Status ParseFlags(int argc, char** argv, absl::string_view defining_file) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (std::find(args.begin(), args.end(), "--help") != args.end() || (!args.empty() && args[0] == "help")) {
    std::cout << FlagsHelp(defining_file);
    std::exit(0);
  }
  absl::StatusOr<std::vector<std::string>> converted = ToAbslFlagArguments(args);
  if (!converted.ok()) return converted.status();
  std::vector<char*> converted_argv = {argv[0]};
  for (std::string& arg : *converted) converted_argv.push_back(arg.data());
  const std::vector<char*> positional =
      absl::ParseCommandLine(static_cast<int>(converted_argv.size()), converted_argv.data());
  if (positional.size() > 1) {
    return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", positional[1], "'"));
  }
  return absl::OkStatus();
}

}  // namespace lychee
