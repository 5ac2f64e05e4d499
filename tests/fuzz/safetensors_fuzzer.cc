// SafetensorsFile::Open on arbitrary files: the 8-byte header length, the JSON header and its
// validation (dtypes, shapes against byte ranges, ranges inside the data and not overlapping).
// The input is the whole file, served from a memfd so that the real open and mmap path runs.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "common/base/safetensors.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int fd = memfd_create("safetensors_fuzzer", MFD_CLOEXEC);
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  LYCHEE_FUZZ_CHECK(fd >= 0);
  LYCHEE_FUZZ_CHECK(ftruncate(fd, 0) == 0);
  LYCHEE_FUZZ_CHECK(pwrite(fd, data, size, 0) == static_cast<ssize_t>(size));

  auto file = lychee::SafetensorsFile::Open(path);
  if (!file.ok()) return 0;
  // Every tensor it hands out lies in the data section, after the header, and is as large as its
  // shape says.
  const std::string_view header = (*file)->header();
  const auto* file_begin = reinterpret_cast<const std::byte*>(header.data()) - 8;
  const std::byte* data_begin = file_begin + 8 + header.size();
  const std::byte* file_end = file_begin + size;
  for (const auto& [name, view] : (*file)->tensors()) {
    LYCHEE_FUZZ_CHECK(view.name == name);
    LYCHEE_FUZZ_CHECK(view.data >= data_begin && view.data <= file_end);
    LYCHEE_FUZZ_CHECK(view.num_bytes <= static_cast<size_t>(file_end - view.data));
    LYCHEE_FUZZ_CHECK(static_cast<uint64_t>(view.NumElements()) * lychee::DTypeSize(view.dtype) == view.num_bytes);
  }
  return 0;
}
