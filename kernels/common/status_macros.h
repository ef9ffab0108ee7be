// RETURN_IF_ERROR / ASSIGN_OR_RETURN for absl::Status and absl::StatusOr.
// Debian's Abseil (20220623) predates the official macros; these are the
// project's only copy. Usable from every layer (kernels, engine, services).
#ifndef KL_KERNELS_COMMON_STATUS_MACROS_H_
#define KL_KERNELS_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KL_CONCAT_INNER_(a, b) a##b
#define KL_CONCAT_(a, b) KL_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status); returns it from the caller if not ok.
#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    ::absl::Status kl_status_ = (expr);                \
    if (!kl_status_.ok()) return kl_status_;           \
  } while (0)

// ASSIGN_OR_RETURN(lhs, expr): evaluates `expr` (an absl::StatusOr<T>); on error
// returns its status, else moves the value into `lhs` (which may declare a variable).
#define ASSIGN_OR_RETURN(lhs, expr) \
  KL_ASSIGN_OR_RETURN_IMPL_(KL_CONCAT_(kl_statusor_, __LINE__), lhs, expr)
#define KL_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()

#endif  // KL_KERNELS_COMMON_STATUS_MACROS_H_
