// Loopback helpers for tests of servers: free ports, and HTTP/1.0 requests on 127.0.0.1 for the
// metrics endpoint and the HTTP API, one request per connection, which the server closes after its
// response, so that the body is whatever follows the headers (no chunked encoding to undo).
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <string>
#include <vector>

namespace lychee::testing {

// A socket connected to 127.0.0.1:`port`, or -1. Reads give up after a minute, so that a server
// that never answers fails a test rather than hanging it.
inline int ConnectLoopback(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  const timeval read_timeout{60, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &read_timeout, sizeof read_timeout);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Loopback ports that nothing listens on: bound together, so that they differ, then let go.
inline std::vector<int> FreePorts(int count) {
  std::vector<int> sockets;
  std::vector<int> ports;
  for (int i = 0; i < count; ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd >= 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = 0;
    inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
    REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
    socklen_t length = sizeof address;
    REQUIRE(getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0);
    sockets.push_back(fd);
    ports.push_back(ntohs(address.sin_port));
  }
  for (int fd : sockets) close(fd);
  return ports;
}

// Writes all of `data`; false when the peer closed (no SIGPIPE).
inline bool SendAll(int fd, const std::string& data) {
  for (size_t sent = 0; sent < data.size();) {
    const ssize_t n = send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  return true;
}

inline std::string ReadToEnd(int fd) {
  std::string received;
  char buffer[4096];
  for (ssize_t n; (n = read(fd, buffer, sizeof buffer)) > 0;) received.append(buffer, static_cast<size_t>(n));
  return received;
}

// The request's text: `headers` are whole lines ("Authorization: Bearer ..."); a body gets its
// Content-Length.
inline std::string HttpRequestText(const std::string& method, const std::string& path, const std::string& body = "",
                                   const std::vector<std::string>& headers = {}) {
  std::string request = method + " " + path + " HTTP/1.0\r\n";
  for (const std::string& header : headers) request += header + "\r\n";
  if (!body.empty()) {
    request += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  }
  return request + "\r\n" + body;
}

// The whole response, headers included; empty when nothing listens on `port`.
inline std::string HttpGet(int port, const std::string& path) {
  const int fd = ConnectLoopback(port);
  if (fd < 0) return "";
  const std::string response = SendAll(fd, HttpRequestText("GET", path)) ? ReadToEnd(fd) : "";
  close(fd);
  return response;
}

struct HttpResponse {
  int status = 0;  // 0: no response
  std::string headers;
  std::string body;
};

inline HttpResponse ParseHttpResponse(const std::string& text) {
  HttpResponse response;
  const size_t end_of_headers = text.find("\r\n\r\n");
  if (text.rfind("HTTP/", 0) != 0 || end_of_headers == std::string::npos) return response;
  response.status = std::stoi(text.substr(text.find(' ') + 1, 3));
  response.headers = text.substr(0, end_of_headers);
  response.body = text.substr(end_of_headers + 4);
  return response;
}

inline HttpResponse HttpRequest(int port, const std::string& method, const std::string& path,
                                const std::string& body = "", const std::vector<std::string>& headers = {}) {
  const int fd = ConnectLoopback(port);
  if (fd < 0) return {};
  const std::string response = SendAll(fd, HttpRequestText(method, path, body, headers)) ? ReadToEnd(fd) : "";
  close(fd);
  return ParseHttpResponse(response);
}

// A request whose response is read as it arrives, and that can be abandoned midway. Fails the
// test when nothing listens on `port`.
class OpenRequest {
 public:
  OpenRequest(int port, const std::string& path, const std::string& body) : fd_(ConnectLoopback(port)) {
    REQUIRE(fd_ >= 0);
    REQUIRE(SendAll(fd_, HttpRequestText("POST", path, body)));
  }
  ~OpenRequest() { Close(); }
  OpenRequest(const OpenRequest&) = delete;
  OpenRequest& operator=(const OpenRequest&) = delete;

  // Reads until what arrived holds `needle`; false at the end of the response.
  bool ReadUntil(const std::string& needle) {
    char buffer[4096];
    while (received_.find(needle) == std::string::npos) {
      const ssize_t n = read(fd_, buffer, sizeof buffer);
      if (n <= 0) return false;
      received_.append(buffer, static_cast<size_t>(n));
    }
    return true;
  }

  // What arrived so far, headers included.
  const std::string& received() const { return received_; }

  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
  std::string received_;
};

}  // namespace lychee::testing
