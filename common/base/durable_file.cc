#include "common/base/durable_file.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "absl/strings/str_cat.h"

namespace lychee {
namespace {

// Layout: magic, payload length (8 bytes little-endian), SHA-256 of the payload, payload.
constexpr char kMagic[8] = {'L', 'Y', 'C', 'H', 'D', 'U', 'R', '1'};
constexpr size_t kDigestSize = 32;
constexpr size_t kHeaderSize = sizeof(kMagic) + 8 + kDigestSize;
constexpr char kTemporaryMarker[] = ".tmp-";

std::string Sha256(std::string_view bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest, &size, EVP_sha256(), nullptr);
  return std::string(reinterpret_cast<const char*>(digest), size);
}

// The code follows errno (ENOSPC: RESOURCE_EXHAUSTED, EACCES: PERMISSION_DENIED, ...); the
// message gets strerror appended.
absl::Status ErrnoError(int error, const std::string& what) { return absl::ErrnoToStatus(error, what); }

absl::Status WriteAll(int fd, std::string_view bytes, const std::string& path) {
  while (!bytes.empty()) {
    const ssize_t written = ::write(fd, bytes.data(), bytes.size());
    if (written < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, absl::StrCat("writing ", path));
    }
    bytes.remove_prefix(static_cast<size_t>(written));
  }
  return absl::OkStatus();
}

absl::Status FsyncDirectory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, absl::StrCat("opening directory ", dir));
  const int result = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (result != 0) return ErrnoError(error, absl::StrCat("fsync of directory ", dir));
  return absl::OkStatus();
}

}  // namespace

std::string EncodeDurableRecord(std::string_view payload) {
  std::string file(kMagic, sizeof(kMagic));
  uint64_t length = payload.size();
  for (int i = 0; i < 8; ++i) file.push_back(static_cast<char>((length >> (8 * i)) & 0xff));
  file += Sha256(payload);
  file.append(payload.data(), payload.size());
  return file;
}

absl::Status ReplaceFile(const std::string& path, std::string_view bytes) {
  std::string temporary = absl::StrCat(path, kTemporaryMarker, "XXXXXX");
  const int fd = ::mkostemp(temporary.data(), O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, absl::StrCat("creating a temporary file for ", path));
  absl::Status status = WriteAll(fd, bytes, temporary);
  // mkostemp makes the file 0600; what is written here is for anyone who may read the directory.
  if (status.ok() && ::fchmod(fd, 0644) != 0) status = ErrnoError(errno, absl::StrCat("chmod of ", temporary));
  if (status.ok() && ::fsync(fd) != 0) status = ErrnoError(errno, absl::StrCat("fsync of ", temporary));
  if (::close(fd) != 0 && status.ok()) status = ErrnoError(errno, absl::StrCat("closing ", temporary));
  if (status.ok() && ::rename(temporary.c_str(), path.c_str()) != 0) {
    status = ErrnoError(errno, absl::StrCat("renaming ", temporary, " to ", path));
  }
  if (!status.ok()) ::unlink(temporary.c_str());
  return status;
}

absl::Status WriteDurableFile(const std::string& path, std::string_view payload) {
  const std::filesystem::path target(path);
  const std::string dir = target.has_parent_path() ? target.parent_path().string() : std::string(".");
  if (absl::Status status = ReplaceFile(path, EncodeDurableRecord(payload)); !status.ok()) return status;
  return FsyncDirectory(dir);
}

absl::StatusOr<std::string> ReadDurableFile(const std::string& path) {
  absl::StatusOr<std::string> record = ReadDurableRecord(path);
  if (!record.ok()) return record.status();
  return DecodeDurableRecord(*record, path);
}

absl::StatusOr<std::string> ReadDurableRecord(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::error_code error;
    if (!std::filesystem::exists(path, error) && !error) return absl::NotFoundError(absl::StrCat("no file ", path));
    return absl::UnavailableError(absl::StrCat("cannot open ", path));
  }
  std::string record((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::UnavailableError(absl::StrCat("reading ", path, " failed"));
  return record;
}

absl::StatusOr<std::string> DecodeDurableRecord(std::string_view record, const std::string& path) {
  if (record.size() < kHeaderSize || std::memcmp(record.data(), kMagic, sizeof(kMagic)) != 0) {
    return absl::DataLossError(absl::StrCat(path, ": not a lychee record (", record.size(), " bytes, no valid header)"));
  }
  uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= static_cast<uint64_t>(static_cast<unsigned char>(record[8 + i])) << (8 * i);
  if (length != record.size() - kHeaderSize) {
    return absl::DataLossError(absl::StrCat(path, ": torn record, the header announces ", length,
                                            " payload bytes but the file holds ", record.size() - kHeaderSize));
  }
  const std::string_view payload = record.substr(kHeaderSize);
  if (Sha256(payload) != record.substr(sizeof(kMagic) + 8, kDigestSize)) {
    return absl::DataLossError(absl::StrCat(path, ": checksum mismatch, the record is corrupt"));
  }
  return std::string(payload);
}

absl::Status CreateDurableDirectory(const std::string& dir) {
  std::error_code error;
  const std::filesystem::path path = std::filesystem::absolute(dir, error).lexically_normal();
  if (error) return absl::InvalidArgumentError(absl::StrCat("bad directory path ", dir, ": ", error.message()));
  if (std::filesystem::is_directory(path, error)) return absl::OkStatus();
  if (path.has_parent_path() && path.parent_path() != path) {
    const absl::Status parent = CreateDurableDirectory(path.parent_path().string());
    if (!parent.ok()) return parent;
  }
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
    return ErrnoError(errno, absl::StrCat("creating directory ", path.string()));
  }
  return FsyncDirectory(path.parent_path().string());
}

bool IsDurableTemporaryName(std::string_view file_name) {
  return file_name.find(kTemporaryMarker) != std::string_view::npos;
}

}  // namespace lychee
