#include "common/service/security.h"

#include <arpa/inet.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <fstream>
#include <iterator>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"

namespace lychee {
namespace {

constexpr size_t kMinTokenLength = 16;
constexpr char kAuthorizationKey[] = "authorization";
constexpr char kBearerPrefix[] = "Bearer ";
constexpr size_t kBearerPrefixLength = sizeof(kBearerPrefix) - 1;

absl::StatusOr<std::string> ReadWholeFile(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(what, " ", path, ": cannot be read"));
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat(what, " ", path, ": read failed"));
  return content;
}

struct BioDeleter {
  void operator()(BIO* bio) const { BIO_free(bio); }
};
struct X509Deleter {
  void operator()(X509* cert) const { X509_free(cert); }
};
struct KeyDeleter {
  void operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }
};
using Bio = std::unique_ptr<BIO, BioDeleter>;
using Certificate = std::unique_ptr<X509, X509Deleter>;
using PrivateKey = std::unique_ptr<EVP_PKEY, KeyDeleter>;

Bio MemoryBio(const std::string& pem) { return Bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()))); }

// Refuses to prompt for the passphrase of an encrypted key: a server has no terminal to ask on.
int NoPassphrase(char*, int, int, void*) { return 0; }

// The first certificate of a PEM file; INVALID_ARGUMENT naming the file when there is none.
absl::StatusOr<Certificate> ParseCertificate(const std::string& pem, const std::string& what, const std::string& path) {
  Bio bio = MemoryBio(pem);
  Certificate cert(PEM_read_bio_X509(bio.get(), nullptr, NoPassphrase, nullptr));
  ERR_clear_error();
  if (cert == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, ": no PEM certificate in it"));
  }
  return cert;
}

absl::StatusOr<PrivateKey> ParsePrivateKey(const std::string& pem, const std::string& path) {
  Bio bio = MemoryBio(pem);
  PrivateKey key(PEM_read_bio_PrivateKey(bio.get(), nullptr, NoPassphrase, nullptr));
  ERR_clear_error();
  if (key == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("TLS key ", path, ": no unencrypted PEM private key in it"));
  }
  return key;
}

struct KeyCertPair {
  std::string key_pem;
  std::string cert_pem;
};

// Reads a certificate chain and its key, and checks that they belong together. `role` says
// which flags they came from, for errors about one given without the other.
absl::StatusOr<KeyCertPair> ReadKeyCertPair(const std::string& cert_file, const std::string& key_file,
                                            const std::string& role) {
  if (cert_file.empty() != key_file.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(role, ": a certificate needs its key and a key its certificate; ",
                                                   "got ", cert_file.empty() ? "a key only" : "a certificate only"));
  }
  KeyCertPair pair;
  LYCHEE_ASSIGN_OR_RETURN(pair.cert_pem, ReadWholeFile(cert_file, "TLS certificate"));
  LYCHEE_ASSIGN_OR_RETURN(pair.key_pem, ReadWholeFile(key_file, "TLS key"));
  LYCHEE_ASSIGN_OR_RETURN(const Certificate cert, ParseCertificate(pair.cert_pem, "TLS certificate", cert_file));
  LYCHEE_ASSIGN_OR_RETURN(const PrivateKey key, ParsePrivateKey(pair.key_pem, key_file));
  const bool matches = X509_check_private_key(cert.get(), key.get()) == 1;
  ERR_clear_error();
  if (!matches) {
    return absl::InvalidArgumentError(
        absl::StrCat("TLS key ", key_file, " is not the private key of the certificate ", cert_file));
  }
  return pair;
}

absl::StatusOr<std::string> ReadCaFile(const std::string& path) {
  LYCHEE_ASSIGN_OR_RETURN(std::string pem, ReadWholeFile(path, "TLS CA file"));
  LYCHEE_RETURN_IF_ERROR(ParseCertificate(pem, "TLS CA file", path).status());
  return pem;
}

std::array<unsigned char, 32> Sha256(std::string_view bytes) {
  std::array<unsigned char, 32> digest{};
  unsigned int size = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest.data(), &size, EVP_sha256(), nullptr);
  return digest;
}

bool SameDigest(const std::array<unsigned char, 32>& a, const std::array<unsigned char, 32>& b) {
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

// The host part of HOST:PORT or [HOST]:PORT.
std::string HostOf(const std::string& address) {
  if (!address.empty() && address.front() == '[') {
    const size_t close = address.find(']');
    return close == std::string::npos ? address : address.substr(1, close - 1);
  }
  const size_t colon = address.rfind(':');
  return colon == std::string::npos ? address : address.substr(0, colon);
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsServerConfig& config) {
  if (!config.enabled()) return grpc::InsecureServerCredentials();
  if (config.cert_file.empty()) {
    return absl::InvalidArgumentError("TLS: a server needs a certificate and its key (--tls-cert, --tls-key)");
  }
  LYCHEE_ASSIGN_OR_RETURN(KeyCertPair pair, ReadKeyCertPair(config.cert_file, config.key_file, "TLS"));
  grpc::SslServerCredentialsOptions options(config.client_ca_file.empty()
                                                ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                                : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  if (!config.client_ca_file.empty()) {
    LYCHEE_ASSIGN_OR_RETURN(options.pem_root_certs, ReadCaFile(config.client_ca_file));
  }
  options.pem_key_cert_pairs.push_back({std::move(pair.key_pem), std::move(pair.cert_pem)});
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsClientConfig& config) {
  if (!config.enabled()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  if (!config.ca_file.empty()) {
    LYCHEE_ASSIGN_OR_RETURN(options.pem_root_certs, ReadCaFile(config.ca_file));
  }
  if (!config.cert_file.empty() || !config.key_file.empty()) {
    LYCHEE_ASSIGN_OR_RETURN(KeyCertPair pair,
                            ReadKeyCertPair(config.cert_file, config.key_file, "TLS client certificate"));
    options.pem_private_key = std::move(pair.key_pem);
    options.pem_cert_chain = std::move(pair.cert_pem);
  }
  return grpc::SslCredentials(options);
}

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  LYCHEE_ASSIGN_OR_RETURN(const std::string content, ReadWholeFile(path, "token file"));
  const std::string token(absl::StripAsciiWhitespace(content));
  if (token.size() < kMinTokenLength) {
    return absl::InvalidArgumentError(absl::StrCat("token file ", path, ": the token must have at least ",
                                                   kMinTokenLength, " characters (e.g. openssl rand -hex 32)"));
  }
  for (const char c : token) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(
          absl::StrCat("token file ", path, ": the token must be printable ASCII without spaces"));
    }
  }
  return token;
}

void AttachBearerToken(grpc::ClientContext& context, const std::string& token) {
  if (!token.empty()) context.AddMetadata(kAuthorizationKey, absl::StrCat(kBearerPrefix, token));
}

bool IsLoopbackAddress(const std::string& listen_address) {
  const std::string host = HostOf(listen_address);
  if (absl::AsciiStrToLower(host) == "localhost") return true;
  in_addr v4{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) {
    return IN6_IS_ADDR_LOOPBACK(&v6) || (IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127);
  }
  return false;
}

absl::StatusOr<AccessControl> AccessControl::Create(const AccessOptions& options,
                                                    const std::string& listen_address) {
  AccessControl access;
  std::string admin_token;
  if (!options.admin_token_file.empty()) {
    LYCHEE_ASSIGN_OR_RETURN(admin_token, ReadTokenFile(options.admin_token_file));
    access.admin_digest_ = Sha256(admin_token);
  }
  if (!options.client_token_file.empty()) {
    if (!access.admin_digest_) {
      return absl::InvalidArgumentError(
          "--client-token-file needs --admin-token-file too; without it the admin RPCs would be open to callers the "
          "other RPCs refuse");
    }
    LYCHEE_ASSIGN_OR_RETURN(const std::string client_token, ReadTokenFile(options.client_token_file));
    if (client_token == admin_token) {
      return absl::InvalidArgumentError(absl::StrCat("the client token file ", options.client_token_file,
                                                     " holds the admin token; give the clients a token of their own"));
    }
    access.client_digest_ = Sha256(client_token);
  }
  if (!access.admin_digest_ && !options.insecure_admin && !IsLoopbackAddress(listen_address)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--listen ", listen_address,
        " is beyond the loopback and there is no --admin-token-file: anyone who reaches the server could call its "
        "admin RPCs. Give --admin-token-file FILE, or --insecure-admin to allow that knowingly (e.g. behind a port "
        "published on the host's loopback)"));
  }
  return access;
}

AccessControl::Caller AccessControl::Identify(std::optional<std::string_view> authorization) const {
  if (!authorization) return Caller::kAnonymous;
  const std::string_view value = *authorization;
  if (value.size() < kBearerPrefixLength ||
      !absl::EqualsIgnoreCase(std::string(value.substr(0, kBearerPrefixLength)), kBearerPrefix)) {
    return Caller::kUnknown;
  }
  const std::string token(absl::StripAsciiWhitespace(std::string(value.substr(kBearerPrefixLength))));
  const Digest presented = Sha256(token);
  // Both comparisons always run, so that the time taken says nothing about which token matched.
  const bool is_admin = admin_digest_ && SameDigest(presented, *admin_digest_);
  const bool is_client = client_digest_ && SameDigest(presented, *client_digest_);
  if (is_admin) return Caller::kAdmin;
  if (is_client) return Caller::kClient;
  return Caller::kUnknown;
}

grpc::Status AccessControl::CheckAdmin(std::optional<std::string_view> authorization) const {
  if (!admin_digest_) return grpc::Status::OK;
  switch (Identify(authorization)) {
    case Caller::kAdmin:
      return grpc::Status::OK;
    case Caller::kClient:
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                          "this is an admin RPC; the client token does not grant it (send the admin token)");
    case Caller::kAnonymous:
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "this is an admin RPC: send the admin token as 'authorization: Bearer TOKEN'");
    case Caller::kUnknown:
      break;
  }
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "the token sent is not valid for this server");
}

grpc::Status AccessControl::CheckClient(std::optional<std::string_view> authorization) const {
  if (!client_digest_) return grpc::Status::OK;
  switch (Identify(authorization)) {
    case Caller::kAdmin:
    case Caller::kClient:
      return grpc::Status::OK;
    case Caller::kAnonymous:
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "this server needs a client token: send it as 'authorization: Bearer TOKEN'");
    case Caller::kUnknown:
      break;
  }
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "the token sent is not valid for this server");
}

namespace {

std::optional<std::string_view> AuthorizationOf(const grpc::ServerContext& context) {
  const auto& metadata = context.client_metadata();
  const auto found = metadata.find(kAuthorizationKey);
  if (found == metadata.end()) return std::nullopt;
  return std::string_view(found->second.data(), found->second.size());
}

}  // namespace

grpc::Status AccessControl::AuthorizeAdmin(const grpc::ServerContext& context) const {
  return CheckAdmin(AuthorizationOf(context));
}

grpc::Status AccessControl::AuthorizeClient(const grpc::ServerContext& context) const {
  return CheckClient(AuthorizationOf(context));
}

}  // namespace lychee
