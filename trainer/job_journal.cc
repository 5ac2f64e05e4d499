#include "trainer/job_journal.h"

#include <algorithm>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/base/durable_file.h"
#include "common/base/status_macros.h"

namespace lychee {
namespace fs = std::filesystem;
namespace {

const std::string kJobPrefix = "jobs/";
const std::string kSuffix = ".job";

bool ParseNumber(const std::string& digits, uint64_t* number) {
  return !digits.empty() && digits.find_first_not_of("0123456789") == std::string::npos &&
         absl::SimpleAtoi(digits, number) && *number > 0;
}

// Zero-padded so that a directory listing sorts by job number.
std::string FileName(uint64_t number) {
  std::string digits = std::to_string(number);
  if (digits.size() < 12) digits.insert(0, 12 - digits.size(), '0');
  return digits + kSuffix;
}

}  // namespace

std::string JobName(uint64_t number) { return absl::StrCat(kJobPrefix, number); }

absl::StatusOr<uint64_t> ParseJobName(const std::string& name) {
  uint64_t number = 0;
  if (name.compare(0, kJobPrefix.size(), kJobPrefix) != 0 ||
      !ParseNumber(name.substr(kJobPrefix.size()), &number)) {
    return absl::InvalidArgumentError(absl::StrCat("name: '", name, "' is not a job name (jobs/<n>, n >= 1)"));
  }
  return number;
}

absl::StatusOr<JobJournal> JobJournal::Open(const std::string& dir) {
  LYCHEE_RETURN_IF_ERROR(CreateDurableDirectory(dir));
  return JobJournal(dir);
}

JobJournal::Contents JobJournal::Load() const {
  Contents contents;
  std::error_code error;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir_, error)) {
    const std::string file_name = entry.path().filename().string();
    if (IsDurableTemporaryName(file_name)) continue;  // a write a crash cut short; the old journal stands
    uint64_t number = 0;
    const bool has_suffix = file_name.size() > kSuffix.size() &&
                            file_name.compare(file_name.size() - kSuffix.size(), kSuffix.size(), kSuffix) == 0;
    if (!has_suffix || !ParseNumber(file_name.substr(0, file_name.size() - kSuffix.size()), &number)) {
      contents.stray_entries.push_back(entry.path().string());
      continue;
    }
    contents.last_number = std::max(contents.last_number, number);
    absl::StatusOr<std::string> payload = ReadDurableFile(entry.path().string());
    v1::Job job;
    if (!payload.ok()) {
      contents.damaged.emplace_back(number, std::string(payload.status().message()));
    } else if (!job.ParseFromString(*payload)) {
      contents.damaged.emplace_back(number, absl::StrCat(entry.path().string(), ": not a lychee.v1.Job"));
    } else if (job.name() != JobName(number)) {
      contents.damaged.emplace_back(number,
                                    absl::StrCat(entry.path().string(), ": holds job '", job.name(), "', not ", JobName(number)));
    } else {
      contents.jobs.push_back(std::move(job));
    }
  }
  if (error) contents.stray_entries.push_back(absl::StrCat(dir_, ": cannot list: ", error.message()));
  const auto number_of = [](const v1::Job& job) { return ParseJobName(job.name()).value_or(0); };
  std::sort(contents.jobs.begin(), contents.jobs.end(),
            [&](const v1::Job& a, const v1::Job& b) { return number_of(a) < number_of(b); });
  std::sort(contents.damaged.begin(), contents.damaged.end());
  return contents;
}

absl::Status JobJournal::Write(const v1::Job& job) const {
  LYCHEE_ASSIGN_OR_RETURN(const uint64_t number, ParseJobName(job.name()));
  return WriteDurableFile((fs::path(dir_) / FileName(number)).string(), job.SerializeAsString());
}

}  // namespace lychee
