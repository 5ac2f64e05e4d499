// Transport security and caller authorization, shared by lychee-trainer, lychee-inference and
// the lychee CLI: TLS credentials from PEM files (server certificates, optional mutual TLS),
// bearer tokens read from files, and the check of a call's token against the admin and client
// tokens. Free of LibTorch.
//
// A caller presents a token as the metadata `authorization: Bearer TOKEN`. Tokens live only in
// files (never on a command line, where `ps` shows them); the servers keep their SHA-256 digests
// and compare those in constant time; no token is ever written to a log or an error message.
#pragma once

#include <grpcpp/client_context.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_context.h>
#include <grpcpp/support/status.h>

#include <array>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace lychee {

struct TlsServerConfig {
  // PEM certificate chain and its private key; both empty: plaintext.
  std::string cert_file;
  std::string key_file;
  // PEM certificates of the CA that signs client certificates; set: mutual TLS, every client
  // must present a certificate it signed.
  std::string client_ca_file;

  bool enabled() const { return !cert_file.empty() || !key_file.empty() || !client_ca_file.empty(); }
};

// TLS credentials for `config` (insecure ones when it is empty). The files are read and checked
// here (a certificate, a private key that matches it, CA certificates), so that a bad file is an
// INVALID_ARGUMENT or NOT_FOUND naming it rather than a server that fails to start.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsServerConfig& config);

struct TlsClientConfig {
  // PEM certificates that verify the server; empty: gRPC's default roots.
  std::string ca_file;
  // A client certificate and its key, for servers that require mutual TLS.
  std::string cert_file;
  std::string key_file;

  // TLS is used as soon as any file is named.
  bool enabled() const { return !ca_file.empty() || !cert_file.empty() || !key_file.empty(); }
};

// TLS channel credentials for `config` (insecure ones when it is empty); files are checked as by
// MakeServerCredentials.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsClientConfig& config);

// The token held in `path`, surrounding whitespace (a trailing newline) removed. It must be at
// least 16 printable ASCII characters without spaces (what `openssl rand -hex 32` writes).
// Errors name the file and never quote its content.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// Sends `token` as `authorization: Bearer TOKEN` with the call; nothing when it is empty.
void AttachBearerToken(grpc::ClientContext& context, const std::string& token);

// Whether a server address (HOST:PORT, [IPV6]:PORT) can only be reached from this machine:
// 127.0.0.0/8, ::1 or localhost.
bool IsLoopbackAddress(const std::string& listen_address);

struct AccessOptions {
  // The admin token: required by the admin RPCs. Empty: they are open, which only a server on
  // the loopback (or one started with insecure_admin) accepts.
  std::string admin_token_file;
  // The inference clients' token: required by the other RPCs of the service when set (the admin
  // token is accepted there too); it never passes an admin check. Needs an admin token.
  std::string client_token_file;
  // Lets a server beyond the loopback run without an admin token: whoever reaches it is admin.
  bool insecure_admin = false;
};

// Who may call what: built once at start, consulted at the top of every RPC that needs it.
class AccessControl {
 public:
  // Fails when a token file is unusable, the two tokens are the same, a client token comes
  // without an admin token, or the server listens beyond the loopback with open admin RPCs and
  // without options.insecure_admin.
  static absl::StatusOr<AccessControl> Create(const AccessOptions& options, const std::string& listen_address);

  // OK for the admin token (or anyone when there is none); UNAUTHENTICATED without a token or
  // with an unknown one; PERMISSION_DENIED for the client token.
  grpc::Status AuthorizeAdmin(const grpc::ServerContext& context) const;
  // OK for the client or the admin token (or anyone when there is no client token);
  // UNAUTHENTICATED otherwise.
  grpc::Status AuthorizeClient(const grpc::ServerContext& context) const;

  // The same checks on the value of the authorization metadata (nullopt: none was sent).
  grpc::Status CheckAdmin(std::optional<std::string_view> authorization) const;
  grpc::Status CheckClient(std::optional<std::string_view> authorization) const;

 private:
  using Digest = std::array<unsigned char, 32>;
  enum class Caller { kAnonymous, kUnknown, kClient, kAdmin };

  Caller Identify(std::optional<std::string_view> authorization) const;

  std::optional<Digest> admin_digest_;
  std::optional<Digest> client_digest_;
};

}  // namespace lychee
