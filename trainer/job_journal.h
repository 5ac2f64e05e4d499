// The trainer's memory of its jobs across restarts: one durable, checksummed file per job
// (<dir>/<n>.job, a lychee.v1.Job), rewritten at every state change. Free of LibTorch.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "lychee/v1/trainer.pb.h"

namespace lychee {

// "jobs/<n>" for n >= 1.
std::string JobName(uint64_t number);
// The n of "jobs/<n>"; INVALID_ARGUMENT naming the field "name" otherwise.
absl::StatusOr<uint64_t> ParseJobName(const std::string& name);

class JobJournal {
 public:
  struct Contents {
    std::vector<v1::Job> jobs;  // readable journals, by job number
    // Job numbers whose journal is damaged, with what is wrong.
    std::vector<std::pair<uint64_t, std::string>> damaged;
    // Entries of the directory that are no journal at all.
    std::vector<std::string> stray_entries;
    // The highest job number seen, readable or not: numbers are never handed out twice.
    uint64_t last_number = 0;
  };

  // Creates the directory when absent.
  static absl::StatusOr<JobJournal> Open(const std::string& dir);

  Contents Load() const;
  absl::Status Write(const v1::Job& job) const;

 private:
  explicit JobJournal(std::string dir) : dir_(std::move(dir)) {}
  std::string dir_;
};

}  // namespace lychee
