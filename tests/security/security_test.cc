// common/service/security.h on its own: which addresses count as the loopback, token files, the
// checks of a call's authorization metadata, the start-up refusals, and TLS files that are
// missing, half given or do not belong together.
#include <catch2/catch.hpp>

#include <fstream>
#include <string>
#include <vector>

#include "common/service/security.h"
#include "harness/temp_dir.h"
#include "tests/security/test_pki.h"

namespace lychee {
namespace {

using testing::TempDir;
using testing::TestPki;

constexpr char kAdminToken[] = "admin-0123456789abcdef";
constexpr char kClientToken[] = "client-0123456789abcdef";

std::string WriteFile(const TempDir& dir, const std::string& name, const std::string& content) {
  const std::string path = (dir.path / name).string();
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

struct Tokens {
  TempDir dir;
  std::string admin = WriteFile(dir, "admin.token", std::string(kAdminToken) + "\n");
  std::string client = WriteFile(dir, "client.token", kClientToken);
};

TEST_CASE("only the loopback counts as the loopback") {
  for (const std::string address : {"127.0.0.1:50061", "127.1.2.3:1", "localhost:50062", "LOCALHOST:1", "[::1]:50061",
                                    "[::ffff:127.0.0.1]:5"}) {
    INFO(address);
    CHECK(IsLoopbackAddress(address));
  }
  for (const std::string address : {"0.0.0.0:50061", "[::]:50061", ":50061", "10.0.0.5:50061", "trainer:50061",
                                    "128.0.0.1:1", "unix:/tmp/lychee.sock"}) {
    INFO(address);
    CHECK_FALSE(IsLoopbackAddress(address));
  }
}

TEST_CASE("a token file gives its token, trimmed; a bad one is an error that names the file, not the content") {
  Tokens tokens;
  CHECK(ReadTokenFile(tokens.admin).value() == kAdminToken);
  CHECK(ReadTokenFile(tokens.client).value() == kClientToken);

  const std::string short_token = WriteFile(tokens.dir, "short.token", "s3cret-short\n");
  const absl::Status too_short = ReadTokenFile(short_token).status();
  CHECK(too_short.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(too_short.message()), Catch::Contains(short_token));
  CHECK_THAT(std::string(too_short.message()), !Catch::Contains("s3cret"));

  const std::string spaced = WriteFile(tokens.dir, "spaced.token", "two words-0123456789");
  CHECK(ReadTokenFile(spaced).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(ReadTokenFile(spaced).status().message()), !Catch::Contains("words"));

  const absl::Status missing = ReadTokenFile((tokens.dir.path / "absent.token").string()).status();
  CHECK(missing.code() == absl::StatusCode::kNotFound);
  CHECK_THAT(std::string(missing.message()), Catch::Contains("absent.token"));
}

TEST_CASE("admin RPCs need the admin token; client RPCs take either token; the client token is no admin") {
  Tokens tokens;
  const AccessControl access =
      AccessControl::Create({tokens.admin, tokens.client, false}, "127.0.0.1:0").value();
  const std::string admin = std::string("Bearer ") + kAdminToken;
  const std::string client = std::string("Bearer ") + kClientToken;

  CHECK(access.CheckAdmin(admin).ok());
  CHECK(access.CheckAdmin(std::string("bearer ") + kAdminToken).ok());
  CHECK(access.CheckAdmin(client).error_code() == grpc::StatusCode::PERMISSION_DENIED);
  CHECK(access.CheckAdmin(std::nullopt).error_code() == grpc::StatusCode::UNAUTHENTICATED);
  for (const std::string& wrong :
       std::vector<std::string>{"Bearer wrong-0123456789abcdef", std::string("Basic ") + kAdminToken, kAdminToken,
                                std::string("Bearer ") + kAdminToken + "x", "Bearer "}) {
    INFO(wrong);
    const grpc::Status status = access.CheckAdmin(wrong);
    CHECK(status.error_code() == grpc::StatusCode::UNAUTHENTICATED);
    CHECK_THAT(status.error_message(), !Catch::Contains("0123456789abcdef"));
  }

  CHECK(access.CheckClient(client).ok());
  CHECK(access.CheckClient(admin).ok());
  CHECK(access.CheckClient(std::nullopt).error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(access.CheckClient("Bearer wrong-0123456789abcdef").error_code() == grpc::StatusCode::UNAUTHENTICATED);
}

TEST_CASE("without tokens everything is open, which only the loopback (or --insecure-admin) accepts") {
  Tokens tokens;
  const AccessControl open = AccessControl::Create({}, "127.0.0.1:50061").value();
  CHECK(open.CheckAdmin(std::nullopt).ok());
  CHECK(open.CheckClient(std::nullopt).ok());

  const absl::Status exposed = AccessControl::Create({}, "0.0.0.0:50061").status();
  CHECK(exposed.code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(exposed.message()), Catch::Contains("0.0.0.0:50061") && Catch::Contains("--admin-token-file"));
  CHECK(AccessControl::Create({"", "", true}, "0.0.0.0:50061").ok());
  // With an admin token, admin RPCs are closed and any address will do; client RPCs stay open.
  const AccessControl admin_only = AccessControl::Create({tokens.admin, "", false}, "0.0.0.0:50061").value();
  CHECK(admin_only.CheckAdmin(std::nullopt).error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(admin_only.CheckClient(std::nullopt).ok());
}

TEST_CASE("a client token needs an admin token of its own") {
  Tokens tokens;
  CHECK(AccessControl::Create({"", tokens.client, false}, "127.0.0.1:0").status().code() ==
        absl::StatusCode::kInvalidArgument);
  const std::string same = WriteFile(tokens.dir, "same.token", kAdminToken);
  const absl::Status shared = AccessControl::Create({tokens.admin, same, false}, "127.0.0.1:0").status();
  CHECK(shared.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(shared.message()), !Catch::Contains(kAdminToken));
}

TEST_CASE("TLS files are read and checked up front, errors name the file") {
  TestPki pki;
  CHECK(MakeServerCredentials({}).ok());
  CHECK(MakeServerCredentials({pki.Cert("server"), pki.Key("server"), ""}).ok());
  CHECK(MakeServerCredentials({pki.Cert("server"), pki.Key("server"), pki.Cert("ca")}).ok());
  CHECK(MakeChannelCredentials({}).ok());
  CHECK(MakeChannelCredentials({pki.Cert("ca"), "", ""}).ok());
  CHECK(MakeChannelCredentials({pki.Cert("ca"), pki.Cert("client"), pki.Key("client")}).ok());

  const absl::Status mismatched = MakeServerCredentials({pki.Cert("server"), pki.Key("client"), ""}).status();
  CHECK(mismatched.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(mismatched.message()),
             Catch::Contains(pki.Key("client")) && Catch::Contains(pki.Cert("server")));

  const absl::Status half = MakeServerCredentials({pki.Cert("server"), "", ""}).status();
  CHECK(half.code() == absl::StatusCode::kInvalidArgument);
  CHECK(MakeServerCredentials({"", "", pki.Cert("ca")}).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(MakeChannelCredentials({pki.Cert("ca"), pki.Cert("client"), ""}).status().code() ==
        absl::StatusCode::kInvalidArgument);

  const absl::Status missing = MakeChannelCredentials({pki.Path("absent.pem"), "", ""}).status();
  CHECK(missing.code() == absl::StatusCode::kNotFound);
  CHECK_THAT(std::string(missing.message()), Catch::Contains("absent.pem"));

  // A key where a certificate belongs, a certificate where a key belongs.
  CHECK_THAT(std::string(MakeChannelCredentials({pki.Key("ca"), "", ""}).status().message()),
             Catch::Contains(pki.Key("ca")));
  CHECK(MakeServerCredentials({pki.Cert("server"), pki.Cert("server"), ""}).status().code() ==
        absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lychee
