// Command-line flags of the form --name VALUE, --name=VALUE and bare --switch.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lychee::cli {

class Args {
 public:
  // `switches` take no value; every other flag must be in `valued`. Unknown flags and
  // positional arguments are errors.
  static absl::StatusOr<Args> Parse(const std::vector<std::string>& argv, const std::set<std::string>& valued,
                                    const std::set<std::string>& switches);

  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  std::optional<std::string> Get(const std::string& name) const;
  std::string GetOr(const std::string& name, const std::string& fallback) const;
  // The value of `name`, or the bundled `resource` (common/service/resource_paths.h) when it is absent.
  absl::StatusOr<std::string> GetOrResource(const std::string& name, absl::string_view resource) const;
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t fallback) const;
  absl::StatusOr<double> GetDouble(const std::string& name, double fallback) const;

 private:
  std::map<std::string, std::string> values_;
};

}  // namespace lychee::cli
