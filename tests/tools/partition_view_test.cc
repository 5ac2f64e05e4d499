// The partition views of the lychee CLI on the bundled model's shipped partitions: the terminal
// map and the SVG heatmap (one cell per head, a mark per retrieval head, colours from the gates,
// well-formed XML whatever the partition's source says), and the atomic write of the picture.
#include <catch2/catch.hpp>
#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <utility>

#include "common/base/durable_file.h"
#include "common/base/head_partition.h"
#include "harness/temp_dir.h"
#include "tests/tools/xml_check.h"
#include "tools/lychee/partition_view.h"

namespace lychee::cli {
namespace {

constexpr char kLearned[] = "models/tiny-llama-retrieval/partitions/learned-target-0.25.json";
constexpr char kHandMade[] = "models/tiny-llama-retrieval/partitions/retrieval-head-0.json";

HeadPartition Load(const std::string& path) {
  absl::StatusOr<HeadPartition> partition = LoadHeadPartitionJson(path);
  REQUIRE(partition.ok());
  return *partition;
}

int RetrievalHeads(const HeadPartition& partition) {
  int count = 0;
  for (int64_t layer = 0; layer < partition.num_layers(); ++layer) {
    for (int64_t head = 0; head < partition.num_kv_heads(); ++head) {
      count += partition.role(layer, head) == HeadRole::kRetrieval;
    }
  }
  return count;
}

int Occurrences(const std::string& text, const std::string& needle) {
  int count = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++count;
  return count;
}

struct SvgCell {
  std::string role;
  std::string fill;
};

// (layer, KV head) -> the role and fill of its <rect class="cell">.
std::map<std::pair<int64_t, int64_t>, SvgCell> Cells(const std::string& svg) {
  static const std::regex kCell(
      R"re(class="cell" data-layer="(\d+)" data-kv-head="(\d+)" data-role="(retrieval|sparse)" fill="(#[0-9a-f]{6})")re");
  std::map<std::pair<int64_t, int64_t>, SvgCell> cells;
  for (auto match = std::sregex_iterator(svg.begin(), svg.end(), kCell); match != std::sregex_iterator(); ++match) {
    cells[{std::stoll((*match)[1]), std::stoll((*match)[2])}] = {(*match)[3], (*match)[4]};
  }
  return cells;
}

// The grid rows of the terminal map: the lines after "layer \ KV head" up to the blank line.
std::vector<std::string> GridRows(const std::string& map) {
  std::istringstream lines(map.substr(map.find("layer \\ KV head")));
  std::vector<std::string> rows;
  std::string line;
  std::getline(lines, line);
  while (std::getline(lines, line) && !line.empty()) rows.push_back(line);
  return rows;
}

TEST_CASE("the terminal map has a header line and one R or S per head, with gate means where learned") {
  const HeadPartition learned = Load(kLearned);
  const std::string map = RenderPartitionMap(learned);
  INFO(map);
  const std::string header = map.substr(0, map.find('\n'));
  CHECK(header ==
        "partition version 1, density 0.100, block 64, budget 1024, sink 64, recent 64 tokens; "
        "source: shipped: calibration job jobs/1 of scripts/partition-eval.sh on the H100");
  const std::vector<std::string> rows = GridRows(map);
  REQUIRE(rows.size() == 6);
  CHECK(rows[0] == "              0      R      R");  // layer 0 has no gates: it is always dense
  CHECK(rows[3] == "              3  R1.00  S0.00");
  CHECK(rows[5] == "              5  S0.01  S0.00");
  int retrieval = 0;
  int sparse = 0;
  for (const std::string& row : rows) {
    retrieval += Occurrences(row, "R");
    sparse += Occurrences(row, "S");
  }
  CHECK(retrieval == RetrievalHeads(learned));
  CHECK(retrieval + sparse == 12);
  CHECK_THAT(map, Catch::EndsWith("retrieval density outside layer 0: 0.100\n"));

  const std::string hand_made = RenderPartitionMap(Load(kHandMade));
  INFO(hand_made);
  CHECK_THAT(hand_made, Catch::StartsWith("unpublished partition, density 0.500, block 64, budget 1024, sink 64, "
                                          "recent 64 tokens; source: hand-made: KV head 0 of every layer is a "
                                          "retrieval head, KV head 1 sparse (layer 0 dense)\n"));
  const std::vector<std::string> hand_made_rows = GridRows(hand_made);
  REQUIRE(hand_made_rows.size() == 6);
  for (size_t layer = 1; layer < 6; ++layer) CHECK(hand_made_rows[layer] == std::to_string(layer).insert(0, 14, ' ') + "      R      S");
}

TEST_CASE("the SVG has one cell per head and a mark per retrieval head, and is well-formed") {
  for (const char* path : {kLearned, kHandMade}) {
    const HeadPartition partition = Load(path);
    const std::string svg = RenderPartitionSvg(partition);
    INFO(path);
    CHECK(lychee::testing::XmlProblem(svg) == "");
    CHECK_THAT(svg, Catch::StartsWith("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\""));
    CHECK(Occurrences(svg, "class=\"cell\"") == 12);
    CHECK(Occurrences(svg, "class=\"retrieval-mark\"") == RetrievalHeads(partition));
    const auto cells = Cells(svg);
    REQUIRE(cells.size() == 12);
    for (const auto& [head, cell] : cells) {
      const bool retrieval = partition.role(head.first, head.second) == HeadRole::kRetrieval;
      CHECK(cell.role == (retrieval ? "retrieval" : "sparse"));
    }
    // Axis labels and the legend.
    CHECK_THAT(svg, Catch::Contains(">KV head</text>") && Catch::Contains(">layer</text>") &&
                        Catch::Contains("id=\"gate-scale\"") && Catch::Contains(">retrieval head (dense)</text>"));
  }
}

TEST_CASE("SVG cells are coloured by the gate's mean where learned, else by role") {
  const auto hand_made = Cells(RenderPartitionSvg(Load(kHandMade)));
  const auto learned = Cells(RenderPartitionSvg(Load(kLearned)));
  REQUIRE(hand_made.size() == 12);
  REQUIRE(learned.size() == 12);
  // Without gates: one colour per role.
  std::map<std::string, std::set<std::string>> fills_by_role;
  for (const auto& [head, cell] : hand_made) fills_by_role[cell.role].insert(cell.fill);
  REQUIRE(fills_by_role["retrieval"].size() == 1);
  REQUIRE(fills_by_role["sparse"].size() == 1);
  const std::string retrieval_end = *fills_by_role["retrieval"].begin();
  const std::string sparse_end = *fills_by_role["sparse"].begin();
  CHECK(retrieval_end != sparse_end);
  // Learned: layer 0 has no gates and takes the retrieval end of the scale; the gate of layer 3
  // head 0 (mean 0.9959) is near that end, that of layer 2 head 0 (mean 0.0036) near the other,
  // and neither is exactly an end.
  CHECK(learned.at({0, 0}).fill == retrieval_end);
  CHECK(learned.at({3, 0}).fill != sparse_end);
  CHECK(learned.at({2, 0}).fill != retrieval_end);
  CHECK(learned.at({3, 0}).fill != learned.at({2, 0}).fill);
  // Summed over red, green and blue.
  const auto distance = [](const std::string& a, const std::string& b) {
    int sum = 0;
    for (int c = 0; c < 3; ++c) sum += std::abs(std::stoi(a.substr(1 + 2 * c, 2), nullptr, 16) - std::stoi(b.substr(1 + 2 * c, 2), nullptr, 16));
    return sum;
  };
  CHECK(distance(learned.at({3, 0}).fill, retrieval_end) <= 12);
  CHECK(distance(learned.at({2, 0}).fill, sparse_end) <= 12);
}

TEST_CASE("the SVG title names version, source and density, and escapes what the source holds") {
  const std::string learned = RenderPartitionSvg(Load(kLearned));
  CHECK_THAT(learned, Catch::Contains("<title>partition version 1, density 0.100: shipped: calibration job jobs/1 of "
                                       "scripts/partition-eval.sh on the H100</title>"));

  HeadPartition partition = Load(kHandMade);
  partition.version = 7;
  partition.source = std::string("a <b> & \"c\" 'd' \x01\xff end");
  const std::string svg = RenderPartitionSvg(partition);
  CHECK(lychee::testing::XmlProblem(svg) == "");
  CHECK_THAT(svg, Catch::Contains("partition version 7, density 0.500: a &lt;b&gt; &amp; &quot;c&quot; &apos;d&apos; "
                                  "\xef\xbf\xbd\xef\xbf\xbd end"));
  CHECK_THAT(svg, !Catch::Contains("<b>"));
}

TEST_CASE("the XML check itself rejects what is not well-formed") {
  using lychee::testing::XmlProblem;
  CHECK(XmlProblem("<svg><g></g></svg>") == "");
  CHECK(XmlProblem("<svg><g></svg>") != "");
  CHECK(XmlProblem("<svg><g/></svg><svg/>") != "");
  CHECK(XmlProblem("<svg>a & b</svg>") != "");
  CHECK(XmlProblem("<svg a=\"1\" a=\"2\"/>") != "");
  CHECK(XmlProblem("<svg a=\"<\"/>") != "");
  CHECK(XmlProblem("<svg a=1/>") != "");
  CHECK(XmlProblem("<svg><text>x</text>") != "");
}

TEST_CASE("a large model's SVG keeps one cell per head and stays well-formed") {
  constexpr int64_t kLayers = 80;
  constexpr int64_t kKvHeads = 8;
  HeadPartition partition = HeadPartition::AllRetrieval(kLayers, kKvHeads, SelectionParams{});
  for (int64_t layer = 1; layer < kLayers; ++layer) partition.set_role(layer, layer % kKvHeads, HeadRole::kSparse);
  partition.gates.push_back({5, 3, 0.5, 0.5, 0.42});
  const std::string svg = RenderPartitionSvg(partition);
  CHECK(lychee::testing::XmlProblem(svg) == "");
  CHECK(Occurrences(svg, "class=\"cell\"") == kLayers * kKvHeads);
  CHECK(Occurrences(svg, "class=\"retrieval-mark\"") == RetrievalHeads(partition));
  CHECK(Cells(svg).size() == static_cast<size_t>(kLayers * kKvHeads));
}

TEST_CASE("ReplaceFile, which writes the pictures, replaces the file whole and leaves no temporary behind") {
  lychee::testing::TempDir dir;
  const std::string path = (dir.path / "map.svg").string();
  REQUIRE(ReplaceFile(path, "first").ok());
  REQUIRE(ReplaceFile(path, "second, longer").ok());
  std::ifstream in(path, std::ios::binary);
  CHECK(std::string(std::istreambuf_iterator<char>(in), {}) == "second, longer");
  int entries = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(dir.path)) ++entries;
  CHECK(entries == 1);
  struct stat info {};
  REQUIRE(stat(path.c_str(), &info) == 0);
  CHECK((info.st_mode & 0777) == 0644);

  const absl::Status missing = ReplaceFile((dir.path / "no/such/dir/map.svg").string(), "x");
  CHECK(missing.code() == absl::StatusCode::kNotFound);
  CHECK_THAT(std::string(missing.message()), Catch::Contains("no/such/dir/map.svg"));
}

}  // namespace
}  // namespace lychee::cli
