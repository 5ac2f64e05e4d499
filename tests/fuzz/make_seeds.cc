// Writes the seed corpora of the fuzz targets, corpus/<target>/, from the repository's own files,
// kept small (a few KB each) so that the fuzzers start from real structure:
//   safetensors        the bundled and the hf_parity checkpoints with every tensor cut to at most
//                      2 elements a dimension (real names, dtypes, metadata and leading bytes)
//   model_config       their config.json files
//   tokenizer_json     every tokenizer of tests/data/tokenizers/tokenizers.json, patches applied,
//                      cut to its first 300 ids and the merges among them
//   tokenizer_encode   the texts of tests/data/tokenizers/texts.json and a few invalid UTF-8 ones
//   partition_json     models/tiny-llama-retrieval/partitions/*.json
//   partition_proto    the same as lychee.v1.HeadPartition bytes
//   partition_registry the files PartitionStore::Publish stores for them
// Run from the source root: build-fuzz/tests/fuzz/make_fuzz_seeds tests/fuzz/corpus
// The crash-* files beside the seeds are inputs that once broke a target, kept as regressions.
#include <stdlib.h>
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/base/head_partition.h"
#include "common/base/model_fingerprint.h"
#include "common/base/partition_store.h"
#include "common/base/safetensors.h"
#include "common/base/tokenizer.h"
#include "lychee/v1/head_partition.pb.h"
#include "nlohmann/json.hpp"

namespace lychee {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr char kBundledModel[] = "models/tiny-llama-retrieval";
const char* const kParityModels[] = {"llama3-scaled-bf16", "mistral-window", "qwen2-tied", "qwen3-head-dim"};
constexpr int32_t kTokenizerIds = 300;
constexpr size_t kLongTextSeedBytes = 1500;

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "make_fuzz_seeds: %s\n", message.c_str());
  std::exit(1);
}

std::string ReadFile(const std::string& path) {
  if (path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0) {
    gzFile file = gzopen(path.c_str(), "rb");
    if (file == nullptr) Die("cannot open " + path);
    std::string contents;
    char buffer[1 << 16];
    int read;
    while ((read = gzread(file, buffer, sizeof(buffer))) > 0) contents.append(buffer, read);
    gzclose(file);
    if (read < 0) Die("cannot decompress " + path);
    return contents;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) Die("cannot open " + path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteSeed(const fs::path& dir, const std::string& name, const std::string& bytes) {
  fs::create_directories(dir);
  std::ofstream(dir / name, std::ios::binary) << bytes;
  std::printf("%8zu  %s\n", bytes.size(), (dir / name).c_str());
}

// The checkpoint at `path` with each tensor cut to its first elements (at most 2 a dimension).
std::string ShrunkSafetensors(const std::string& path) {
  const std::string file = ReadFile(path);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | static_cast<uint8_t>(file[i]);
  const json header = json::parse(file.substr(8, header_size));
  const std::string_view data = std::string_view(file).substr(8 + header_size);

  std::vector<std::pair<uint64_t, std::string>> by_offset;
  for (const auto& [name, entry] : header.items()) {
    if (name != "__metadata__") by_offset.emplace_back(entry["data_offsets"][0].get<uint64_t>(), name);
  }
  std::sort(by_offset.begin(), by_offset.end());
  json shrunk = json::object();
  if (header.contains("__metadata__")) shrunk["__metadata__"] = header["__metadata__"];
  std::string shrunk_data;
  for (const auto& [begin, name] : by_offset) {
    json entry = header[name];
    uint64_t elements = 1;
    for (json& dim : entry["shape"]) {
      dim = std::min<uint64_t>(dim.get<uint64_t>(), 2);
      elements *= dim.get<uint64_t>();
    }
    const uint64_t bytes = elements * (entry["dtype"] == "F32" ? 4 : 2);
    entry["data_offsets"] = {shrunk_data.size(), shrunk_data.size() + bytes};
    shrunk_data.append(data.substr(begin, bytes));
    shrunk[name] = entry;
  }
  std::string shrunk_header = shrunk.dump();
  // The format pads the header with spaces so that the data starts 8-byte aligned.
  shrunk_header.resize((shrunk_header.size() + 7) / 8 * 8, ' ');
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((shrunk_header.size() >> (8 * i)) & 0xff));
  return out + shrunk_header + shrunk_data;
}

void WriteSafetensorsAndConfigs(const fs::path& corpus) {
  std::vector<std::pair<std::string, std::string>> models = {{"tiny-llama-retrieval", kBundledModel}};
  for (const char* parity : kParityModels) models.emplace_back(parity, std::string("tests/data/hf_parity/") + parity);
  for (const auto& [name, dir] : models) {
    const std::string checkpoint = ShrunkSafetensors(dir + "/model.safetensors");
    WriteSeed(corpus / "safetensors", name + ".safetensors", checkpoint);
    WriteSeed(corpus / "model_config", name + ".json", ReadFile(dir + "/config.json"));
  }
}

// Rewrites the ids of TemplateProcessing special tokens (inside Sequence processors too).
void RenumberTemplateIds(json& processor, const std::map<int64_t, int64_t>& new_ids) {
  if (processor.is_object() && processor.contains("processors")) {
    for (json& inner : processor["processors"]) RenumberTemplateIds(inner, new_ids);
  }
  if (!processor.is_object() || !processor.contains("special_tokens")) return;
  for (auto& [name, entry] : processor["special_tokens"].items()) {
    for (json& id : entry["ids"]) {
      const auto found = new_ids.find(id.get<int64_t>());
      if (found != new_ids.end()) id = found->second;
    }
  }
}

// The ids of added tokens the post-processor's templates use, which must be kept.
void CollectTemplateIds(const json& processor, std::set<int64_t>* ids) {
  if (!processor.is_object()) return;
  if (processor.contains("processors")) {
    for (const json& inner : processor["processors"]) CollectTemplateIds(inner, ids);
  }
  if (!processor.contains("special_tokens")) return;
  for (const auto& [name, entry] : processor["special_tokens"].items()) {
    for (const json& id : entry["ids"]) ids->insert(id.get<int64_t>());
  }
}

// The tokenizer cut to its first kTokenizerIds ids, the merges among them, and the first few added
// tokens (renumbered as Hugging Face tokenizers numbers them, after the vocabulary).
json ShrunkTokenizer(json tokenizer) {
  json& model = tokenizer["model"];
  json vocab = json::object();
  for (const auto& [token, id] : model["vocab"].items()) {
    if (id.get<int64_t>() < kTokenizerIds) vocab[token] = id;
  }
  json merges = json::array();
  for (const json& merge : model["merges"]) {
    std::string left, right;
    if (merge.is_string()) {
      const std::string text = merge.get<std::string>();
      left = text.substr(0, text.find(' '));
      right = text.substr(text.find(' ') + 1);
    } else {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    }
    if (vocab.contains(left) && vocab.contains(right) && vocab.contains(left + right)) merges.push_back(merge);
  }
  model["vocab"] = vocab;
  model["merges"] = merges;

  std::set<int64_t> template_ids;
  if (tokenizer.contains("post_processor")) CollectTemplateIds(tokenizer["post_processor"], &template_ids);
  json added_tokens = json::array();
  std::map<int64_t, int64_t> new_ids;
  const int64_t model_size = static_cast<int64_t>(vocab.size());
  int64_t max_added = -1;
  int kept_beyond_vocabulary = 0;
  for (json token : tokenizer["added_tokens"]) {
    const int64_t old_id = token["id"].get<int64_t>();
    const std::string content = token["content"].get<std::string>();
    int64_t new_id;
    if (vocab.contains(content)) {
      new_id = vocab[content].get<int64_t>();
    } else if (kept_beyond_vocabulary < 6 || template_ids.count(old_id) > 0) {
      new_id = max_added < 0 ? model_size : (max_added >= model_size ? max_added + 1 : model_size);
      ++kept_beyond_vocabulary;
    } else {
      continue;
    }
    max_added = std::max(max_added, new_id);
    new_ids[old_id] = new_id;
    token["id"] = new_id;
    added_tokens.push_back(token);
  }
  tokenizer["added_tokens"] = added_tokens;
  if (tokenizer.contains("post_processor")) RenumberTemplateIds(tokenizer["post_processor"], new_ids);
  return tokenizer;
}

void WriteTokenizers(const fs::path& corpus) {
  const json list = json::parse(ReadFile("tests/data/tokenizers/tokenizers.json"));
  for (const json& entry : list["tokenizers"]) {
    json tokenizer = json::parse(ReadFile(entry["file"].get<std::string>()));
    if (entry.contains("patch")) tokenizer.merge_patch(entry["patch"]);
    const std::string text = ShrunkTokenizer(std::move(tokenizer)).dump();
    const std::string name = entry["name"].get<std::string>();
    const auto loaded = Tokenizer::FromJson(text, name);
    if (!loaded.ok()) Die("the cut tokenizer " + name + " does not load: " + loaded.status().ToString());
    WriteSeed(corpus / "tokenizer_json", name + ".json", text);
  }

  const json texts = json::parse(ReadFile("tests/data/tokenizers/texts.json"));
  int index = 0;
  char name[32];
  for (const json& text : texts["texts"]) {
    std::snprintf(name, sizeof(name), "text-%02d.txt", index++);
    WriteSeed(corpus / "tokenizer_encode", name, text.get<std::string>());
  }
  for (const json& text : texts["long_texts"]) {
    std::string excerpt = text.get<std::string>().substr(0, kLongTextSeedBytes);
    // Not cut inside a UTF-8 sequence: the seed stays valid text.
    while (!excerpt.empty() && (static_cast<unsigned char>(excerpt.back()) & 0xC0) == 0x80) excerpt.pop_back();
    if (!excerpt.empty() && static_cast<unsigned char>(excerpt.back()) >= 0xC0) excerpt.pop_back();
    std::snprintf(name, sizeof(name), "text-%02d.txt", index++);
    WriteSeed(corpus / "tokenizer_encode", name, excerpt);
  }
  WriteSeed(corpus / "tokenizer_encode", "invalid-utf8.txt", "ok \xff then \xe6\x97 cut \xed\xa0\x80 surrogate");
}

void WritePartitions(const fs::path& corpus) {
  const std::string fingerprint = ModelFingerprint(kBundledModel).value();
  char registry_template[] = "/tmp/make_fuzz_seeds_XXXXXX";
  if (mkdtemp(registry_template) == nullptr) Die("mkdtemp failed");
  const fs::path registry(registry_template);
  auto store = PartitionStore::Open(registry.string());
  if (!store.ok()) Die(store.status().ToString());

  for (const fs::directory_entry& file : fs::directory_iterator(fs::path(kBundledModel) / "partitions")) {
    const std::string name = file.path().stem().string();
    const std::string text = ReadFile(file.path().string());
    WriteSeed(corpus / "partition_json", name + ".json", text);
    HeadPartition partition = HeadPartitionFromJson(text, file.path().string()).value();
    WriteSeed(corpus / "partition_proto", name + ".binpb", HeadPartitionToProto(partition).SerializeAsString());
    partition.model_fingerprint = fingerprint;  // the hand-made one has none, and Publish needs it
    const uint64_t version = (*store)->Publish(partition).value();
    char stored_name[32];
    std::snprintf(stored_name, sizeof(stored_name), "%012llu.partition", static_cast<unsigned long long>(version));
    WriteSeed(corpus / "partition_registry", name + ".partition",
              ReadFile((registry / "partitions" / fingerprint / stored_name).string()));
  }
  fs::remove_all(registry);
}

}  // namespace
}  // namespace lychee

int main(int argc, char** argv) {
  if (argc != 2) lychee::Die("usage: make_fuzz_seeds CORPUS_DIR (run from the source root)");
  const std::filesystem::path corpus(argv[1]);
  lychee::WriteSafetensorsAndConfigs(corpus);
  lychee::WriteTokenizers(corpus);
  lychee::WritePartitions(corpus);
  return 0;
}
