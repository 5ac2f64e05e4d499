#include "common/base/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/base/json_parse.h"
#include "common/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace lychee {
namespace {

using nlohmann::json;

constexpr size_t kHeaderLengthBytes = 8;
// The reference implementation's cap: a real header is kilobytes to a few megabytes, so a larger
// length is a corrupt file, and refusing it keeps the JSON parser from chewing on gigabytes.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr char kMetadataKey[] = "__metadata__";
constexpr char kSingleFileName[] = "model.safetensors";
constexpr char kIndexFileName[] = "model.safetensors.index.json";

// Debian's Abseil has its own string_view, which absl::StrCat takes but std::string_view does
// not convert to.
absl::string_view Absl(std::string_view text) { return {text.data(), text.size()}; }

struct ByteRange {
  uint64_t begin;
  uint64_t end;
  std::string tensor;
};

// Safetensors stores the header length little-endian whatever the host is.
uint64_t ReadLittleEndian64(const std::byte* bytes) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | static_cast<uint8_t>(bytes[i]);
  return value;
}

std::optional<DType> ParseDType(const std::string& name) {
  if (name == "BF16") return DType::kBF16;
  if (name == "F16") return DType::kF16;
  if (name == "F32") return DType::kF32;
  return std::nullopt;
}

// A JSON integer as uint64_t; nullopt for negatives, fractions and non-numbers.
std::optional<uint64_t> NonNegativeInteger(const json& value) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer() && value.get<int64_t>() >= 0) return static_cast<uint64_t>(value.get<int64_t>());
  return std::nullopt;
}

class HeaderParser {
 public:
  HeaderParser(const std::string& path, uint64_t data_size) : path_(path), data_size_(data_size) {}

  absl::Status Error(absl::string_view tensor, absl::string_view problem) const {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor \"", tensor, "\": ", problem));
  }

  // Validates one header entry; the data pointer is left for the caller to fill in.
  absl::StatusOr<std::pair<TensorView, ByteRange>> ParseEntry(const std::string& name, const json& entry) const {
    if (!entry.is_object()) return Error(name, "header entry is not an object");

    const auto dtype_field = entry.find("dtype");
    if (dtype_field == entry.end() || !dtype_field->is_string()) return Error(name, "missing string field dtype");
    const std::string dtype_name = dtype_field->get<std::string>();
    const std::optional<DType> dtype = ParseDType(dtype_name);
    if (!dtype) {
      return Error(name, absl::StrCat("has dtype ", dtype_name, "; only BF16, F16 and F32 are supported"));
    }

    const auto shape_field = entry.find("shape");
    if (shape_field == entry.end() || !shape_field->is_array()) return Error(name, "missing array field shape");
    std::vector<int64_t> shape;
    uint64_t num_elements = 1;
    for (const json& dim : *shape_field) {
      const std::optional<uint64_t> size = NonNegativeInteger(dim);
      if (!size || *size > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Error(name, absl::StrCat("shape ", shape_field->dump(), " has a dimension that is not a non-negative integer"));
      }
      // Every partial product must fit in int64_t too: TensorView::NumElements() and LibTorch
      // multiply the dimensions in that type, and a zero dimension at the end hides the overflow.
      if (__builtin_mul_overflow(num_elements, *size, &num_elements) ||
          num_elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Error(name, absl::StrCat("shape ", shape_field->dump(), " has more elements than fit in 64 bits"));
      }
      shape.push_back(static_cast<int64_t>(*size));
    }
    uint64_t expected_bytes = 0;
    if (__builtin_mul_overflow(num_elements, static_cast<uint64_t>(DTypeSize(*dtype)), &expected_bytes)) {
      return Error(name, absl::StrCat("shape ", shape_field->dump(), " has more bytes than fit in 64 bits"));
    }

    const auto offsets_field = entry.find("data_offsets");
    if (offsets_field == entry.end() || !offsets_field->is_array() || offsets_field->size() != 2) {
      return Error(name, "missing field data_offsets [begin, end]");
    }
    const std::optional<uint64_t> begin = NonNegativeInteger((*offsets_field)[0]);
    const std::optional<uint64_t> end = NonNegativeInteger((*offsets_field)[1]);
    if (!begin || !end) {
      return Error(name, absl::StrCat("data_offsets ", offsets_field->dump(), " are not non-negative integers"));
    }
    if (*begin > *end) return Error(name, absl::StrCat("data_offsets begin ", *begin, " is past end ", *end));
    if (*end > data_size_) {
      return Error(name, absl::StrCat("data_offsets end ", *end, " is past the end of the data section (",
                                      data_size_, " bytes): the file is truncated or the header lies"));
    }
    if (*end - *begin != expected_bytes) {
      return Error(name, absl::StrCat("shape ", shape_field->dump(), " of ", dtype_name, " needs ", expected_bytes,
                                      " bytes but data_offsets ", offsets_field->dump(), " span ", *end - *begin));
    }

    TensorView view{name, *dtype, std::move(shape), nullptr, static_cast<size_t>(expected_bytes)};
    return std::make_pair(std::move(view), ByteRange{*begin, *end, name});
  }

  absl::Status CheckMetadata(const json& metadata) const {
    if (!metadata.is_object()) return absl::InvalidArgumentError(absl::StrCat(path_, ": __metadata__ is not an object"));
    for (const auto& [key, value] : metadata.items()) {
      if (!value.is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(path_, ": __metadata__ value of \"", key, "\" is not a string"));
      }
    }
    return absl::OkStatus();
  }

  // Empty ranges hold no bytes, so they cannot overlap anything.
  absl::Status CheckNoOverlap(std::vector<ByteRange> ranges) const {
    ranges.erase(std::remove_if(ranges.begin(), ranges.end(), [](const ByteRange& r) { return r.begin == r.end; }),
                 ranges.end());
    std::sort(ranges.begin(), ranges.end(), [](const ByteRange& a, const ByteRange& b) { return a.begin < b.begin; });
    for (size_t i = 1; i < ranges.size(); ++i) {
      if (ranges[i].begin < ranges[i - 1].end) {
        return Error(ranges[i].tensor, absl::StrCat("bytes [", ranges[i].begin, ", ", ranges[i].end,
                                                    ") overlap those of tensor \"", ranges[i - 1].tensor, "\" [",
                                                    ranges[i - 1].begin, ", ", ranges[i - 1].end, ")"));
      }
    }
    return absl::OkStatus();
  }

 private:
  const std::string& path_;
  uint64_t data_size_;
};

// Parses JSON, rejecting a name given twice at the top level: nlohmann would silently keep the
// last one, so a tensor's bytes would depend on which duplicate a reader happened to honour.
absl::StatusOr<json> ParseJsonObject(std::string_view text, const std::string& path, absl::string_view what) {
  std::set<std::string> top_level_keys;
  std::string duplicate_key;
  const json::parser_callback_t reject_duplicates = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 && !top_level_keys.insert(parsed.get<std::string>()).second &&
        duplicate_key.empty()) {
      duplicate_key = parsed.get<std::string>();
    }
    return true;
  };
  absl::StatusOr<json> parsed_or = ParseJson(text, reject_duplicates);
  if (!parsed_or.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", what, " is not valid JSON: ", parsed_or.status().message()));
  }
  json parsed = *std::move(parsed_or);
  if (!parsed.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", what, " is not a JSON object but ", parsed.type_name()));
  }
  if (!duplicate_key.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", what, " names \"", duplicate_key, "\" twice"));
  }
  return parsed;
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::ErrnoToStatus(errno != 0 ? errno : EIO, absl::StrCat(path, ": cannot open"));
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read failed"));
  return contents.str();
}

// Shard names come from a file in the checkpoint, so one must not reach outside the directory.
// The check is lexical on purpose: Hugging Face caches link shards to blobs elsewhere.
bool StaysInsideDirectory(const std::string& relative_path) {
  const std::filesystem::path path(relative_path);
  if (relative_path.empty() || path.is_absolute() || path.has_root_name()) return false;
  for (const std::filesystem::path& component : path) {
    if (component == "..") return false;
  }
  return true;
}

}  // namespace

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    case DType::kF32:
      return "F32";
  }
  return "?";
}

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
    case DType::kF16:
      return 2;
    case DType::kF32:
      return 4;
  }
  return 0;
}

int64_t TensorView::NumElements() const {
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  return count;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;

  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot open"));
  struct stat info;
  if (::fstat(fd, &info) != 0) {
    const int error = errno;
    ::close(fd);
    return absl::ErrnoToStatus(error, absl::StrCat(path, ": cannot stat"));
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t file_size = static_cast<uint64_t>(info.st_size);
  if (file_size < kHeaderLengthBytes) {
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": file is ", file_size, " bytes, too short for the 8-byte header length"));
  }
  void* mapping = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int mmap_error = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (mapping == MAP_FAILED) return absl::ErrnoToStatus(mmap_error, absl::StrCat(path, ": cannot mmap"));
  // From here the destructor unmaps whatever error is returned.
  file->mapping_ = mapping;
  file->mapping_size_ = file_size;

  const auto* bytes = static_cast<const std::byte*>(mapping);
  const uint64_t header_size = ReadLittleEndian64(bytes);
  if (header_size > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header length ", header_size, " exceeds the cap of ", kMaxHeaderBytes, " bytes"));
  }
  if (header_size > file_size - kHeaderLengthBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_size, " runs past the end of the ",
                                                   file_size, "-byte file"));
  }
  file->header_ = std::string_view(reinterpret_cast<const char*>(bytes + kHeaderLengthBytes), header_size);
  LYCHEE_ASSIGN_OR_RETURN(const json header, ParseJsonObject(file->header_, path, "header"));

  const std::byte* data_section = bytes + kHeaderLengthBytes + header_size;
  const HeaderParser parser(path, file_size - kHeaderLengthBytes - header_size);
  std::vector<ByteRange> ranges;
  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      LYCHEE_RETURN_IF_ERROR(parser.CheckMetadata(entry));
      continue;
    }
    LYCHEE_ASSIGN_OR_RETURN(auto view_and_range, parser.ParseEntry(name, entry));
    auto& [view, range] = view_and_range;
    view.data = data_section + range.begin;
    ranges.push_back(std::move(range));
    file->tensors_.emplace(name, std::move(view));
  }
  LYCHEE_RETURN_IF_ERROR(parser.CheckNoOverlap(std::move(ranges)));
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& model_dir) {
  namespace fs = std::filesystem;
  std::unique_ptr<Checkpoint> checkpoint(new Checkpoint());
  checkpoint->dir_ = model_dir;
  const fs::path dir(model_dir);
  const std::string index_path = (dir / kIndexFileName).string();

  // Shard name -> the tensors its index entry promises; std::map keeps the files sorted by name,
  // which is the order HeadersDigestInput needs.
  std::map<std::string, std::vector<std::string>> promised_by_shard;
  std::error_code error;
  if (fs::exists(index_path, error)) {
    LYCHEE_ASSIGN_OR_RETURN(const std::string index_text, ReadTextFile(index_path));
    LYCHEE_ASSIGN_OR_RETURN(const json index, ParseJsonObject(index_text, index_path, "index"));
    const auto weight_map = index.find("weight_map");
    if (weight_map == index.end() || !weight_map->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": missing object field weight_map"));
    }
    for (const auto& [tensor, shard] : weight_map->items()) {
      if (!shard.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": weight_map entry of tensor \"", tensor, "\" is not a file name"));
      }
      const std::string shard_name = shard.get<std::string>();
      if (!StaysInsideDirectory(shard_name)) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map puts tensor \"", tensor,
                                                       "\" in \"", shard_name, "\", outside ", model_dir));
      }
      promised_by_shard[shard_name].push_back(tensor);
    }
  } else if (fs::exists(dir / kSingleFileName, error)) {
    promised_by_shard[kSingleFileName];
  } else {
    return absl::NotFoundError(
        absl::StrCat(model_dir, ": neither ", kIndexFileName, " nor ", kSingleFileName, " is there"));
  }

  for (const auto& [shard_name, promised] : promised_by_shard) {
    LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open((dir / shard_name).string()));
    for (const std::string& tensor : promised) {
      if (file->tensors().count(tensor) == 0) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map puts tensor \"", tensor, "\" in ",
                                                       shard_name, ", which does not contain it"));
      }
    }
    for (const auto& [name, view] : file->tensors()) {
      if (!checkpoint->index_.emplace(name, &view).second) {
        const SafetensorsFile& other = **std::find_if(
            checkpoint->files_.begin(), checkpoint->files_.end(),
            // Clang before 16 cannot capture a structured binding, hence the init-capture.
            [&tensor = name](const auto& f) { return f->tensors().count(tensor) > 0; });
        return absl::InvalidArgumentError(absl::StrCat(model_dir, ": tensor \"", name, "\" is in both ", other.path(),
                                                       " and ", file->path()));
      }
    }
    checkpoint->files_.push_back(std::move(file));
    checkpoint->file_names_.push_back(shard_name);
  }
  return checkpoint;
}

absl::StatusOr<TensorView> Checkpoint::Get(std::string_view name) const {
  const auto found = index_.find(name);
  if (found == index_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor \"", Absl(name), "\" is not in the checkpoint at ", dir_));
  }
  return *found->second;
}

bool Checkpoint::Has(std::string_view name) const { return index_.find(name) != index_.end(); }

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  names.reserve(index_.size());
  for (const auto& [name, view] : index_) names.push_back(name);
  return names;
}

std::string Checkpoint::HeadersDigestInput() const {
  // Lengths make the concatenation unambiguous.
  std::string input;
  for (size_t i = 0; i < files_.size(); ++i) {
    const std::string_view header = files_[i]->header();
    absl::StrAppend(&input, file_names_[i], "\n", header.size(), "\n", Absl(header), "\n");
  }
  return input;
}

}  // namespace lychee
