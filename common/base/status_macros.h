// Early-return helpers for absl::Status and absl::StatusOr (Abseil 20220623 has none public).
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define LYCHEE_CONCAT_INNER(a, b) a##b
#define LYCHEE_CONCAT(a, b) LYCHEE_CONCAT_INNER(a, b)

#define LYCHEE_RETURN_IF_ERROR(expr)            \
  do {                                          \
    ::absl::Status lychee_status_ = (expr);     \
    if (!lychee_status_.ok()) return lychee_status_; \
  } while (0)

#define LYCHEE_ASSIGN_OR_RETURN_IMPL(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return statusor.status();            \
  lhs = std::move(statusor).value()

// LYCHEE_ASSIGN_OR_RETURN(auto x, Foo()); returns Foo()'s status if it is an error.
#define LYCHEE_ASSIGN_OR_RETURN(lhs, rexpr) \
  LYCHEE_ASSIGN_OR_RETURN_IMPL(LYCHEE_CONCAT(lychee_statusor_, __LINE__), lhs, rexpr)
