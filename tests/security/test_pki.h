// A throwaway public key infrastructure made with the openssl command at test time: a CA, a
// server certificate for 127.0.0.1 and localhost, a client certificate, and a client
// certificate from a second CA that the servers do not trust.
#pragma once

#include <catch2/catch.hpp>

#include <fstream>
#include <string>

#include "harness/temp_dir.h"
#include "tests/run_command.h"

namespace lychee::testing {

class TestPki {
 public:
  TestPki() {
    const CommandResult openssl = RunCommand("openssl version");
    INFO("the tests need the openssl command (Debian package openssl): " << openssl.output);
    REQUIRE(openssl.exit_code == 0);
    MakeCa("ca");
    MakeCa("other-ca");
    MakeLeaf("server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n", 2);
    MakeLeaf("client", "ca", "extendedKeyUsage=clientAuth\n", 3);
    MakeLeaf("other-client", "other-ca", "extendedKeyUsage=clientAuth\n", 4);
  }

  // NAME.pem (certificate) and NAME.key (private key) for ca, other-ca, server, client,
  // other-client.
  std::string Cert(const std::string& name) const { return (dir_.path / (name + ".pem")).string(); }
  std::string Key(const std::string& name) const { return (dir_.path / (name + ".key")).string(); }
  std::string Path(const std::string& file) const { return (dir_.path / file).string(); }

 private:
  void Run(const std::string& command) {
    const CommandResult result = RunCommand("cd '" + dir_.str() + "' && " + command);
    INFO(command << "\n" << result.output);
    REQUIRE(result.exit_code == 0);
  }

  void MakeCa(const std::string& name) {
    Run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=lychee-test-" +
        name + " -keyout " + name + ".key -out " + name + ".pem");
  }

  void MakeLeaf(const std::string& name, const std::string& ca, const std::string& extensions, int serial) {
    std::ofstream(dir_.path / (name + ".ext")) << "basicConstraints=CA:FALSE\n" << extensions;
    Run("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=" + name + " -keyout " + name +
        ".key -out " + name + ".csr");
    Run("openssl x509 -req -days 2 -in " + name + ".csr -CA " + ca + ".pem -CAkey " + ca + ".key -set_serial " +
        std::to_string(serial) + " -extfile " + name + ".ext -out " + name + ".pem");
  }

  TempDir dir_;
};

}  // namespace lychee::testing
