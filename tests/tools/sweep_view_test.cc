// The client's side of sweeps: the submit flags that make one, and its table and plot.
#include <catch2/catch.hpp>

#include "tests/tools/xml_check.h"
#include "tools/lychee/sweep_view.h"

namespace lychee::cli {
namespace {

absl::StatusOr<v1::SubmitCalibrationJobRequest> Submit(const std::vector<std::string>& argv) {
  std::set<std::string> valued = SweepValuedFlags();
  valued.insert({"target-density", "steps"});
  absl::StatusOr<Args> args = Args::Parse(argv, valued, SweepSwitches());
  if (!args.ok()) return args.status();
  v1::SubmitCalibrationJobRequest request;
  if (absl::Status added = AddSweepFromArgs(*args, request); !added.ok()) return added;
  return request;
}

TEST_CASE("--target-densities and --sweep make a sweep request; the sweep flags fill its config") {
  const auto listed = Submit({"--target-densities", "0.05,0.1,0.2,0.3", "--max-accuracy-drop", "0.1",
                              "--validation-context", "1024", "--validation-samples", "8", "--validation-seed", "4",
                              "--validation-budget", "256", "--validation-corpus", "held.txt", "--audit"})
                          .value();
  CHECK(std::vector<double>(listed.target_densities().begin(), listed.target_densities().end()) ==
        std::vector<double>{0.05, 0.1, 0.2, 0.3});
  REQUIRE(listed.has_sweep());
  CHECK(listed.sweep().max_accuracy_drop() == 0.1);
  CHECK(listed.sweep().validation_context_tokens() == 1024);
  CHECK(listed.sweep().validation_samples() == 8);
  CHECK(listed.sweep().validation_seed() == 4);
  CHECK(listed.sweep().validation_token_budget() == 256);
  CHECK(listed.sweep().validation_corpus() == "held.txt");
  CHECK_FALSE(listed.sweep().has_validation_prompts());
  CHECK(listed.sweep().audit());

  // --sweep: the default list, and nothing else set, so the trainer's defaults apply.
  const auto shorthand = Submit({"--sweep"}).value();
  CHECK(shorthand.target_densities_size() == 4);
  CHECK(shorthand.target_densities(0) == 0.05);
  CHECK(shorthand.has_sweep());
  CHECK_FALSE(shorthand.sweep().has_max_accuracy_drop());

  // No sweep flag: the request stays a single job.
  const auto single = Submit({"--target-density", "0.2"}).value();
  CHECK_FALSE(single.has_sweep());
  CHECK(single.target_densities_size() == 0);

  // An empty list goes to the trainer as a sweep without targets, which it refuses by name.
  const auto empty = Submit({"--target-densities", ""}).value();
  CHECK(empty.has_sweep());
  CHECK(empty.target_densities_size() == 0);
}

TEST_CASE("contradictory or malformed sweep flags are INVALID_ARGUMENT naming the flag") {
  const struct {
    std::vector<std::string> argv;
    std::string message;
  } cases[] = {
      {{"--target-densities", "0.1,x"}, "--target-densities: 'x' is not a number"},
      {{"--target-densities", "0.1,,0.2"}, "--target-densities: '' is not a number"},
      {{"--target-densities", "0.1", "--sweep"}, "not both"},
      {{"--target-densities", "0.1", "--target-density", "0.2"}, "--target-density trains one partition"},
      {{"--max-accuracy-drop", "0.1"}, "--max-accuracy-drop goes with --target-densities or --sweep"},
      {{"--audit"}, "--audit goes with"},
      {{"--sweep", "--validation-samples", "many"}, "validation-samples"},
  };
  for (const auto& c : cases) {
    INFO(c.message);
    const absl::Status status = Submit(c.argv).status();
    CHECK(status.code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(status.message()), Catch::Contains(c.message));
  }
}

v1::Job FinishedSweep() {
  v1::Job job;
  job.set_name("jobs/7");
  for (double target : {0.1, 0.3}) job.mutable_request()->add_target_densities(target);
  job.mutable_request()->mutable_sweep()->set_max_accuracy_drop(0.05);
  v1::SweepResult* sweep = job.mutable_sweep();
  sweep->set_validation_context_tokens(2048);
  sweep->set_validation_token_budget(512);
  const auto summary = [](double passkey, double multikey, double bytes) {
    v1::ValidationSummary s;
    for (const auto& [task, accuracy] : {std::pair<const char*, double>{"passkey", passkey}, {"multikey", multikey}}) {
      v1::TaskAccuracy* t = s.add_tasks();
      t->set_task(task);
      t->set_samples(20);
      t->set_accuracy(accuracy);
    }
    s.set_kv_bytes_per_token(bytes);
    s.set_kv_bytes_measured(true);
    return s;
  };
  *sweep->mutable_dense() = summary(1.0, 0.95, 12.6e6);
  v1::SweepRow* low = sweep->add_rows();
  low->set_target_density(0.1);
  low->set_deployed_density(0.1);
  *low->mutable_validation() = summary(0.6, 0.3, 3.1e6);
  low->set_verdict("passkey: accuracy 0.600 against dense 1.000, more than 0.050 below");
  v1::SweepRow* high = sweep->add_rows();
  high->set_target_density(0.3);
  high->set_deployed_density(0.3);
  *high->mutable_validation() = summary(1.0, 0.95, 5.2e6);
  high->set_within_bound(true);
  high->set_verdict("within the bound");
  high->set_partition_version(4);
  sweep->set_chosen(1);
  sweep->set_summary("published the partition of target 0.3 (deployed density 0.3) as version 4");
  return job;
}

TEST_CASE("the sweep table has dense, a row per target with its accuracies, and marks the published one") {
  const std::string table = RenderSweepTable(FinishedSweep());
  CHECK_THAT(table, Catch::Contains("sweep over 2 target(s): validation 2048-token prompts, budget 512 tokens; "
                                    "bound: accuracy >= dense - 0.050 on every task"));
  CHECK_THAT(table, Catch::Contains("passkey") && Catch::Contains("multikey"));
  CHECK_THAT(table, Catch::Contains("  dense ") && Catch::Contains("12.60 MB"));
  CHECK_THAT(table, Catch::Contains("  0.1 ") && Catch::Contains("0.600") && Catch::Contains("more than 0.050 below"));
  CHECK_THAT(table, Catch::Contains("* 0.3 ") && Catch::Contains("published as version 4"));
  CHECK_THAT(table, Catch::Contains("published the partition of target 0.3"));
  CHECK(table.find("computed from the roles") == std::string::npos);
}

TEST_CASE("the sweep plot has a panel per task, dense and every target, and is well-formed") {
  const std::string svg = RenderSweepSvg(FinishedSweep());
  CHECK(testing::XmlProblem(svg).empty());
  CHECK_THAT(svg, Catch::Contains(">passkey<") && Catch::Contains(">multikey<"));
  CHECK_THAT(svg, Catch::Contains(">0.3 (published)<") && Catch::Contains(">0.1<") && Catch::Contains(">dense<"));
  // Two panels of dense and two targets: six points.
  size_t circles = 0;
  for (size_t at = svg.find("<circle"); at != std::string::npos; at = svg.find("<circle", at + 1)) ++circles;
  CHECK(circles == 6);
}

}  // namespace
}  // namespace lychee::cli
