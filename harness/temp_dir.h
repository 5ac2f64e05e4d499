// A fresh directory under the system's temporary directory, removed with all it holds when the
// test (or benchmark) is done.
#pragma once

#include <ftw.h>
#include <stdlib.h>

#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>

namespace lychee::testing {

// Removes `path` and everything under it. Not std::filesystem::remove_all: pip PyTorch's
// libtorch.so exports a copy of it that crashes, and binds ahead of libstdc++'s.
inline void RemoveTree(const std::filesystem::path& path) {
  nftw(
      path.c_str(), [](const char* entry, const struct stat*, int, struct FTW*) { return std::remove(entry); }, 16,
      FTW_DEPTH | FTW_PHYS);
}

struct TempDir {
  std::filesystem::path path;

  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "lychee_test_XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed for " + pattern);
    path = pattern;
  }
  ~TempDir() { RemoveTree(path); }
  std::string str() const { return path.string(); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

}  // namespace lychee::testing
