#include "common/service/server_logging.h"

#include <glog/logging.h>
#include <grpcpp/server_context.h>

#include <chrono>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lychee {
namespace {

using Clock = std::chrono::steady_clock;

double MillisecondsSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

class RequestLogInterceptor : public grpc::experimental::Interceptor {
 public:
  explicit RequestLogInterceptor(grpc::experimental::ServerRpcInfo* info) : info_(info), start_(Clock::now()) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    // The status is known when it is sent; a call the client cancelled ends without sending one.
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      LOG(INFO) << absl::StrFormat("grpc %s from %s -> %s%s in %.1f ms", info_->method(), Peer(),
                                   absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code())),
                                   status.ok() ? "" : absl::StrCat(" (", status.error_message(), ")"),
                                   MillisecondsSince(start_));
      logged_ = true;
    }
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::POST_RECV_CLOSE) && !logged_) {
      LOG(INFO) << absl::StrFormat("grpc %s from %s -> closed by the client in %.1f ms", info_->method(), Peer(),
                                   MillisecondsSince(start_));
      logged_ = true;
    }
    methods->Proceed();
  }

 private:
  // Known once the call is under way, not yet when the interceptor is made.
  std::string Peer() const { return info_->server_context()->peer(); }

  grpc::experimental::ServerRpcInfo* const info_;  // lives as long as the call
  const Clock::time_point start_;
  bool logged_ = false;
};

class RequestLogInterceptorFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    return new RequestLogInterceptor(info);
  }
};

}  // namespace

void InitServerLogging(const char* program) {
  FLAGS_logtostderr = true;
  google::InitGoogleLogging(program);
}

void LogServerError(std::string_view message) { LOG(ERROR) << message; }

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeRequestLogInterceptorFactory() {
  return std::make_unique<RequestLogInterceptorFactory>();
}

}  // namespace lychee
