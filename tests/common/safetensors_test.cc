#include "common/base/safetensors.h"

#include <stdlib.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lychee {
namespace {

namespace fs = std::filesystem;

const std::string kModelDir = std::string(LYCHEE_SOURCE_DIR) + "/models/tiny-llama-retrieval";

// A fresh directory under the system temp dir, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "lychee-safetensors-XXXXXX").string();
    REQUIRE(mkdtemp(pattern.data()) != nullptr);
    path_ = pattern;
  }
  ~TempDir() { fs::remove_all(path_); }
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

std::string LittleEndian64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((value >> (8 * i)) & 0xff);
  return bytes;
}

// A safetensors file with the header text exactly as given, lies included.
void WriteRawSafetensors(const std::string& path, const std::string& header, const std::string& data) {
  WriteBytes(path, LittleEndian64(header.size()) + header + data);
}

template <typename Word>
std::string BytesOf(const std::vector<Word>& words) {
  std::string bytes(words.size() * sizeof(Word), '\0');
  std::memcpy(bytes.data(), words.data(), bytes.size());
  return bytes;
}

template <typename Word>
std::vector<Word> WordsOf(const TensorView& view) {
  REQUIRE(view.num_bytes % sizeof(Word) == 0);
  std::vector<Word> words(view.num_bytes / sizeof(Word));
  std::memcpy(words.data(), view.data, view.num_bytes);
  return words;
}

struct TestTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

// A well-formed file: tensors laid out back to back, the header padded with spaces to a multiple
// of 8 bytes as the reference writer does, so the data stays aligned.
void WriteSafetensors(const std::string& path, const std::vector<TestTensor>& tensors) {
  std::vector<std::string> entries = {R"("__metadata__": {"format": "pt"})"};
  std::string data;
  for (const TestTensor& tensor : tensors) {
    entries.push_back(absl::StrCat("\"", tensor.name, "\": {\"dtype\": \"", tensor.dtype, "\", \"shape\": [",
                                   absl::StrJoin(tensor.shape, ", "), "], \"data_offsets\": [", data.size(), ", ",
                                   data.size() + tensor.bytes.size(), "]}"));
    data += tensor.bytes;
  }
  std::string header = absl::StrCat("{", absl::StrJoin(entries, ", "), "}");
  header.resize((header.size() + 7) / 8 * 8, ' ');
  WriteRawSafetensors(path, header, data);
}

template <typename T>
std::string ErrorMessage(const absl::StatusOr<T>& result) {
  REQUIRE_FALSE(result.ok());
  return std::string(result.status().message());
}

// bf16, fp16 and fp32 bit patterns chosen to catch any conversion on the way: signed zero,
// subnormals, infinities, NaN payloads.
const std::vector<uint16_t> kBF16Bits = {0x3f80, 0xc000, 0x8000, 0x0001, 0x7f80, 0x7fc1};
const std::vector<uint16_t> kF16Bits = {0x3c00, 0x8001, 0x7bff, 0xfc00, 0x7e01, 0x0000};
const std::vector<uint32_t> kF32Bits = {0x3fc00000, 0x80000000, 0x00800000, 0x7fc00001, 0xff800000, 0x00000001};

std::vector<TestTensor> AllDTypeTensors() {
  return {{"weights.bf16", "BF16", {2, 3}, BytesOf(kBF16Bits)},
          {"weights.f16", "F16", {3, 2}, BytesOf(kF16Bits)},
          {"weights.f32", "F32", {6}, BytesOf(kF32Bits)},
          {"scalar", "F32", {}, BytesOf(std::vector<uint32_t>{0x40490fdb})},
          {"empty", "BF16", {0, 4}, ""}};
}

TEST_CASE("reads bf16, fp16 and fp32 tensors back bit-exactly", "[safetensors]") {
  TempDir dir;
  const std::string path = dir.File("model.safetensors");
  WriteSafetensors(path, AllDTypeTensors());

  auto file = SafetensorsFile::Open(path);
  REQUIRE(file.ok());
  const auto& tensors = (*file)->tensors();
  REQUIRE(tensors.size() == 5);

  const TensorView& bf16 = tensors.at("weights.bf16");
  CHECK(bf16.name == "weights.bf16");
  CHECK(bf16.dtype == DType::kBF16);
  CHECK(bf16.shape == std::vector<int64_t>{2, 3});
  CHECK(bf16.NumElements() == 6);
  CHECK(bf16.num_bytes == 12);
  CHECK(WordsOf<uint16_t>(bf16) == kBF16Bits);

  const TensorView& f16 = tensors.at("weights.f16");
  CHECK(f16.dtype == DType::kF16);
  CHECK(f16.shape == std::vector<int64_t>{3, 2});
  CHECK(WordsOf<uint16_t>(f16) == kF16Bits);

  const TensorView& f32 = tensors.at("weights.f32");
  CHECK(f32.dtype == DType::kF32);
  CHECK(f32.num_bytes == 24);
  CHECK(WordsOf<uint32_t>(f32) == kF32Bits);

  const TensorView& scalar = tensors.at("scalar");
  CHECK(scalar.shape.empty());
  CHECK(scalar.NumElements() == 1);
  CHECK(WordsOf<uint32_t>(scalar) == std::vector<uint32_t>{0x40490fdb});

  CHECK(tensors.at("empty").NumElements() == 0);
  CHECK(tensors.at("empty").num_bytes == 0);

  CHECK((*file)->path() == path);
  CHECK((*file)->header().front() == '{');
  CHECK((*file)->header().find("__metadata__") != std::string_view::npos);
}

TEST_CASE("dtype names and sizes follow safetensors", "[safetensors]") {
  CHECK(DTypeName(DType::kBF16) == "BF16");
  CHECK(DTypeName(DType::kF16) == "F16");
  CHECK(DTypeName(DType::kF32) == "F32");
  CHECK(DTypeSize(DType::kBF16) == 2);
  CHECK(DTypeSize(DType::kF16) == 2);
  CHECK(DTypeSize(DType::kF32) == 4);
}

TEST_CASE("a single-file checkpoint looks tensors up by name", "[safetensors]") {
  TempDir dir;
  WriteSafetensors(dir.File("model.safetensors"), AllDTypeTensors());

  auto checkpoint = Checkpoint::Open(dir.path());
  REQUIRE(checkpoint.ok());
  CHECK((*checkpoint)->Names() == std::vector<std::string>{"empty", "scalar", "weights.bf16", "weights.f16", "weights.f32"});
  CHECK((*checkpoint)->Has("weights.f16"));
  CHECK_FALSE((*checkpoint)->Has("__metadata__"));

  auto f32 = (*checkpoint)->Get("weights.f32");
  REQUIRE(f32.ok());
  CHECK(WordsOf<uint32_t>(*f32) == kF32Bits);

  auto missing = (*checkpoint)->Get("lm_head.weight");
  CHECK(missing.status().code() == absl::StatusCode::kNotFound);
  CHECK_THAT(ErrorMessage(missing), Catch::Contains("lm_head.weight") && Catch::Contains(dir.path()));

  const std::string digest_input = (*checkpoint)->HeadersDigestInput();
  CHECK(digest_input.rfind("model.safetensors\n", 0) == 0);
}

TEST_CASE("a directory without a checkpoint is NOT_FOUND naming it", "[safetensors]") {
  TempDir dir;
  auto checkpoint = Checkpoint::Open(dir.path());
  CHECK(checkpoint.status().code() == absl::StatusCode::kNotFound);
  CHECK_THAT(ErrorMessage(checkpoint), Catch::Contains(dir.path()));
}

// Two shards with an index, written in the order shard 2, shard 1 to show the sorting.
void WriteTwoShardCheckpoint(const TempDir& dir) {
  WriteSafetensors(dir.File("model-00002-of-00002.safetensors"),
                   {{"model.norm.weight", "F32", {2}, BytesOf(std::vector<uint32_t>{0x3f800000, 0xbf800000})},
                    {"lm_head.weight", "F16", {1, 2}, BytesOf(std::vector<uint16_t>{0x3c00, 0x4000})}});
  WriteSafetensors(dir.File("model-00001-of-00002.safetensors"),
                   {{"model.embed_tokens.weight", "BF16", {2, 2}, BytesOf(kBF16Bits).substr(0, 8)}});
  WriteBytes(dir.File("model.safetensors.index.json"), R"({
    "metadata": {"total_size": 20},
    "weight_map": {
      "lm_head.weight": "model-00002-of-00002.safetensors",
      "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
      "model.norm.weight": "model-00002-of-00002.safetensors"
    }
  })");
}

TEST_CASE("a sharded checkpoint reads every tensor from its shard", "[safetensors]") {
  TempDir dir;
  WriteTwoShardCheckpoint(dir);

  auto checkpoint = Checkpoint::Open(dir.path());
  REQUIRE(checkpoint.ok());
  CHECK((*checkpoint)->Names() ==
        std::vector<std::string>{"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"});

  auto embed = (*checkpoint)->Get("model.embed_tokens.weight");
  REQUIRE(embed.ok());
  CHECK(embed->dtype == DType::kBF16);
  CHECK(WordsOf<uint16_t>(*embed) == std::vector<uint16_t>(kBF16Bits.begin(), kBF16Bits.begin() + 4));
  auto norm = (*checkpoint)->Get("model.norm.weight");
  REQUIRE(norm.ok());
  CHECK(WordsOf<uint32_t>(*norm) == std::vector<uint32_t>{0x3f800000, 0xbf800000});
  auto head = (*checkpoint)->Get("lm_head.weight");
  REQUIRE(head.ok());
  CHECK(WordsOf<uint16_t>(*head) == std::vector<uint16_t>{0x3c00, 0x4000});

  // Both headers, verbatim, in file-name order, each after its file name.
  auto first = SafetensorsFile::Open(dir.File("model-00001-of-00002.safetensors"));
  auto second = SafetensorsFile::Open(dir.File("model-00002-of-00002.safetensors"));
  REQUIRE(first.ok());
  REQUIRE(second.ok());
  const std::string digest_input = (*checkpoint)->HeadersDigestInput();
  const size_t first_name = digest_input.find("model-00001-of-00002.safetensors");
  const size_t first_header = digest_input.find(std::string((*first)->header()));
  const size_t second_name = digest_input.find("model-00002-of-00002.safetensors");
  const size_t second_header = digest_input.find(std::string((*second)->header()));
  REQUIRE(second_header != std::string::npos);
  CHECK(first_name < first_header);
  CHECK(first_header < second_name);
  CHECK(second_name < second_header);
  CHECK(digest_input.find(dir.path()) == std::string::npos);
}

struct CorruptCase {
  std::string description;
  std::string file_bytes;
  std::vector<std::string> expected_in_message;
};

std::string RawFile(const std::string& header, const std::string& data) {
  return LittleEndian64(header.size()) + header + data;
}

TEST_CASE("corrupt files are errors naming the file and the problem", "[safetensors]") {
  const std::string eight_bytes(8, '\x11');
  const std::vector<CorruptCase> cases = {
      {"file shorter than 8 bytes", "abc", {"3 bytes", "too short"}},
      {"empty file", "", {"0 bytes", "too short"}},
      {"header length beyond the file", LittleEndian64(1000) + "{}", {"header length 1000", "past the end"}},
      {"header length beyond the cap", LittleEndian64(uint64_t{1} << 40) + "{}", {"exceeds the cap"}},
      {"header not JSON", RawFile("{\"a\": [1, 2", ""), {"header is not valid JSON"}},
      {"header not an object", RawFile("[1, 2, 3]", ""), {"not a JSON object"}},
      {"number too large for a double",
       RawFile(R"({"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}})", eight_bytes),
       {"header is not valid JSON", "1e400"}},
      // Error messages quote the shape, and printing it recurses once per level.
      {"nested deeper than any header",
       RawFile(R"({"w": {"dtype": "F32", "shape": )" + std::string(1000000, '[') + std::string(1000000, ']') +
                   R"(, "data_offsets": [0, 4]}})",
               eight_bytes),
       {"header is not valid JSON", "nested more than 64 levels deep"}},
      {"unknown dtype",
       RawFile(R"({"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}})", eight_bytes),
       {"\"w\"", "F64"}},
      {"integer dtype", RawFile(R"({"w": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}})", eight_bytes),
       {"\"w\"", "I32"}},
      {"missing dtype", RawFile(R"({"w": {"shape": [2], "data_offsets": [0, 8]}})", eight_bytes), {"\"w\"", "dtype"}},
      {"entry not an object", RawFile(R"({"w": [0, 8]})", eight_bytes), {"\"w\"", "not an object"}},
      {"shape and byte count disagree",
       RawFile(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", eight_bytes),
       {"\"w\"", "needs 12 bytes", "span 8"}},
      {"offsets past the end of the data",
       RawFile(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", eight_bytes),
       {"\"w\"", "past the end of the data section"}},
      {"overlapping ranges",
       RawFile(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "b": {"dtype": "F16", "shape": [2], "data_offsets": [4, 8]}})",
               eight_bytes),
       {"\"b\"", "overlap", "\"a\""}},
      {"begin after end", RawFile(R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", eight_bytes),
       {"\"w\"", "begin 8 is past end 4"}},
      {"negative shape", RawFile(R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", eight_bytes),
       {"\"w\"", "non-negative integer"}},
      {"fractional shape", RawFile(R"({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}})", eight_bytes),
       {"\"w\"", "non-negative integer"}},
      {"shape whose element count overflows",
       RawFile(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}})", eight_bytes),
       {"\"w\"", "64 bits"}},
      {"shape whose element count overflows int64 before a zero dimension",
       RawFile(R"({"w": {"dtype": "F32", "shape": [3037000500, 3037000500, 0], "data_offsets": [0, 0]}})", ""),
       {"\"w\"", "64 bits"}},
      {"shape whose byte count overflows",
       RawFile(R"({"w": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 8]}})", eight_bytes),
       {"\"w\"", "64 bits"}},
      {"negative offsets", RawFile(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}})", eight_bytes),
       {"\"w\"", "data_offsets"}},
      {"one offset only", RawFile(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8]}})", eight_bytes),
       {"\"w\"", "data_offsets"}},
      {"metadata not a string map", RawFile(R"({"__metadata__": {"format": 1}})", ""), {"__metadata__", "format"}},
      {"a tensor named twice",
       RawFile(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                   "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
               eight_bytes),
       {"\"w\"", "twice"}},
  };
  TempDir dir;
  for (const CorruptCase& corrupt : cases) {
    INFO(corrupt.description);
    const std::string path = dir.File("corrupt.safetensors");
    WriteBytes(path, corrupt.file_bytes);
    auto file = SafetensorsFile::Open(path);
    const std::string message = ErrorMessage(file);
    INFO(message);
    CHECK(file.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(message, Catch::Contains(path));
    for (const std::string& expected : corrupt.expected_in_message) CHECK_THAT(message, Catch::Contains(expected));
  }
}

TEST_CASE("a truncated file names the tensor whose bytes are missing", "[safetensors]") {
  TempDir dir;
  const std::string path = dir.File("model.safetensors");
  WriteSafetensors(path, AllDTypeTensors());
  fs::resize_file(path, fs::file_size(path) - 3);
  const std::string message = ErrorMessage(SafetensorsFile::Open(path));
  CHECK_THAT(message, Catch::Contains(path) && Catch::Contains("truncated"));
}

TEST_CASE("a sharded checkpoint whose index lies is an error", "[safetensors]") {
  TempDir dir;
  WriteTwoShardCheckpoint(dir);
  const std::string index_path = dir.File("model.safetensors.index.json");
  const auto open_with_index = [&](const std::string& index_text) {
    WriteBytes(index_path, index_text);
    return Checkpoint::Open(dir.path());
  };

  SECTION("index naming a missing shard") {
    auto checkpoint = open_with_index(R"({"weight_map": {"model.norm.weight": "model-00003-of-00003.safetensors"}})");
    CHECK(checkpoint.status().code() == absl::StatusCode::kNotFound);
    CHECK_THAT(ErrorMessage(checkpoint), Catch::Contains("model-00003-of-00003.safetensors"));
  }
  SECTION("index naming a tensor absent from its shard") {
    auto checkpoint = open_with_index(R"({"weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors"}})");
    CHECK_THAT(ErrorMessage(checkpoint), Catch::Contains("model.norm.weight") &&
                                             Catch::Contains("model-00001-of-00002.safetensors") &&
                                             Catch::Contains("does not contain"));
  }
  SECTION("shard path escaping the directory") {
    auto checkpoint = open_with_index(R"({"weight_map": {"model.norm.weight": "../model-00002-of-00002.safetensors"}})");
    CHECK_THAT(ErrorMessage(checkpoint), Catch::Contains("../model-00002-of-00002.safetensors") &&
                                             Catch::Contains("outside") && Catch::Contains("model.norm.weight"));
  }
  SECTION("shard path escaping through a subdirectory") {
    auto checkpoint = open_with_index(R"({"weight_map": {"model.norm.weight": "sub/../../x.safetensors"}})");
    CHECK_THAT(ErrorMessage(checkpoint), Catch::Contains("outside"));
  }
  SECTION("absolute shard path") {
    auto checkpoint = open_with_index(R"({"weight_map": {"model.norm.weight": "/etc/passwd"}})");
    CHECK_THAT(ErrorMessage(checkpoint), Catch::Contains("outside"));
  }
  SECTION("a tensor in two shards") {
    WriteSafetensors(dir.File("model-00001-of-00002.safetensors"),
                     {{"model.embed_tokens.weight", "BF16", {2, 2}, BytesOf(kBF16Bits).substr(0, 8)},
                      {"model.norm.weight", "F32", {2}, BytesOf(kF32Bits).substr(0, 8)}});
    auto checkpoint = Checkpoint::Open(dir.path());
    CHECK_THAT(ErrorMessage(checkpoint), Catch::Contains("model.norm.weight") && Catch::Contains("both") &&
                                             Catch::Contains("model-00001-of-00002.safetensors") &&
                                             Catch::Contains("model-00002-of-00002.safetensors"));
  }
  SECTION("index not JSON") {
    auto checkpoint = open_with_index("{\"weight_map\": ");
    CHECK_THAT(ErrorMessage(checkpoint), Catch::Contains(index_path) && Catch::Contains("not valid JSON"));
  }
  SECTION("index without a weight_map") {
    auto checkpoint = open_with_index(R"({"metadata": {}})");
    CHECK_THAT(ErrorMessage(checkpoint), Catch::Contains(index_path) && Catch::Contains("weight_map"));
  }
  SECTION("weight_map entry that is not a file name") {
    auto checkpoint = open_with_index(R"({"weight_map": {"model.norm.weight": 2}})");
    CHECK_THAT(ErrorMessage(checkpoint), Catch::Contains("model.norm.weight"));
  }
  SECTION("a corrupt shard") {
    WriteBytes(dir.File("model-00002-of-00002.safetensors"), "abc");
    CHECK_THAT(ErrorMessage(Checkpoint::Open(dir.path())), Catch::Contains("model-00002-of-00002.safetensors"));
  }
}

TEST_CASE("the bundled tiny model opens", "[safetensors]") {
  auto checkpoint = Checkpoint::Open(kModelDir);
  REQUIRE(checkpoint.ok());

  auto embed = (*checkpoint)->Get("model.embed_tokens.weight");
  REQUIRE(embed.ok());
  CHECK(embed->dtype == DType::kBF16);
  CHECK(embed->shape == std::vector<int64_t>{8192, 384});
  auto k_proj = (*checkpoint)->Get("model.layers.5.self_attn.k_proj.weight");
  REQUIRE(k_proj.ok());
  CHECK(k_proj->shape == std::vector<int64_t>{128, 384});
  CHECK_FALSE((*checkpoint)->Has("lm_head.weight"));  // tied to the embeddings

  std::set<std::string> layers;
  int64_t parameters = 0;
  for (const std::string& name : (*checkpoint)->Names()) {
    auto view = (*checkpoint)->Get(name);
    REQUIRE(view.ok());
    CHECK(view->dtype == DType::kBF16);
    parameters += view->NumElements();
    const std::string prefix = "model.layers.";
    if (name.rfind(prefix, 0) == 0) layers.insert(name.substr(prefix.size(), name.find('.', prefix.size()) - prefix.size()));
  }
  CHECK(layers == std::set<std::string>{"0", "1", "2", "3", "4", "5"});
  CHECK((*checkpoint)->Names().size() == 2 + 6 * 9);
  CHECK(parameters == 12'587'904);

  // The mapped bytes are the file's bytes, read here independently of the reader.
  auto norm = (*checkpoint)->Get("model.norm.weight");
  REQUIRE(norm.ok());
  std::ifstream in(kModelDir + "/model.safetensors", std::ios::binary);
  std::string length_bytes(8, '\0');
  in.read(length_bytes.data(), 8);
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | static_cast<uint8_t>(length_bytes[i]);
  std::string expected(norm->num_bytes, '\0');
  constexpr uint64_t kNormOffset = 25175040;  // its data_offsets begin, as the header gives it
  in.seekg(static_cast<std::streamoff>(8 + header_length + kNormOffset));
  in.read(expected.data(), static_cast<std::streamsize>(expected.size()));
  REQUIRE(in.good());
  CHECK(std::memcmp(norm->data, expected.data(), expected.size()) == 0);

  CHECK((*checkpoint)->HeadersDigestInput().rfind("model.safetensors\n", 0) == 0);
}

}  // namespace
}  // namespace lychee
