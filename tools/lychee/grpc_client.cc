#include "tools/lychee/grpc_client.h"

#include "common/base/status_macros.h"

namespace lychee::cli {

std::set<std::string> WithConnectionFlags(std::set<std::string> flags) {
  flags.insert({"tls-ca", "tls-cert", "tls-key", "token-file"});
  return flags;
}

absl::StatusOr<Connection> ConnectionFromArgs(const Args& args) {
  TlsClientConfig tls;
  tls.ca_file = args.GetOr("tls-ca", "");
  tls.cert_file = args.GetOr("tls-cert", "");
  tls.key_file = args.GetOr("tls-key", "");
  Connection connection;
  LYCHEE_ASSIGN_OR_RETURN(connection.credentials, MakeChannelCredentials(tls));
  if (args.Has("token-file")) {
    LYCHEE_ASSIGN_OR_RETURN(connection.token, ReadTokenFile(*args.Get("token-file")));
  }
  return connection;
}

}  // namespace lychee::cli
