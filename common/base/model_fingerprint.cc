#include "common/base/model_fingerprint.h"

#include <openssl/evp.h>

#include <cerrno>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/base/safetensors.h"
#include "common/base/status_macros.h"

namespace lychee {

std::string Sha256Hex(std::string_view bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest, &size, EVP_sha256(), nullptr);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned int i = 0; i < size; ++i) {
    hex.push_back(kHex[digest[i] >> 4]);
    hex.push_back(kHex[digest[i] & 0xf]);
  }
  return hex;
}

absl::StatusOr<std::string> ModelFingerprint(const std::string& model_dir) {
  const std::string config_path = model_dir + "/config.json";
  errno = 0;
  std::ifstream in(config_path, std::ios::binary);
  if (!in) return absl::ErrnoToStatus(errno != 0 ? errno : EIO, absl::StrCat(config_path, ": cannot open"));
  std::ostringstream config;
  config << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(config_path, ": read failed"));
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint, Checkpoint::Open(model_dir));
  return Sha256Hex(config.str() + checkpoint->HeadersDigestInput());
}

}  // namespace lychee
