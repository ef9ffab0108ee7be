// Structured logging: one line per event, logfmt style
//   ts=2026-11-23T03:45:00.123Z level=info src=loader.cc:42 req=abc msg="..." key=value
// The request id comes from a thread-local scope (ScopedRequestId) so every line
// about a request carries it. Thread-safe; writes to stderr.
#ifndef KL_ENGINE_COMMON_LOG_H_
#define KL_ENGINE_COMMON_LOG_H_

#include <sstream>
#include <string>

namespace kl {

enum class LogLevel : int { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

void SetMinLogLevel(LogLevel level);
LogLevel MinLogLevel();

// Sets the request id for log lines emitted by this thread until destroyed.
class ScopedRequestId {
 public:
  explicit ScopedRequestId(std::string id);
  ~ScopedRequestId();
  ScopedRequestId(const ScopedRequestId&) = delete;
  ScopedRequestId& operator=(const ScopedRequestId&) = delete;

 private:
  std::string previous_;
};
const std::string& CurrentRequestId();

// Collects `msg` text via operator<< and optional fields via Field(); emits on destruction.
class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();
  template <typename T>
  LogMessage& operator<<(const T& v) {
    msg_ << v;
    return *this;
  }
  template <typename T>
  LogMessage& Field(const char* key, const T& v) {
    std::ostringstream s;
    s << v;
    AddField(key, s.str());
    return *this;
  }

 private:
  void AddField(const char* key, const std::string& value);
  LogLevel level_;
  const char* file_;
  int line_;
  std::ostringstream msg_;
  std::string fields_;
};

}  // namespace kl

#define KL_LOG_LEVEL_DEBUG ::kl::LogLevel::kDebug
#define KL_LOG_LEVEL_INFO ::kl::LogLevel::kInfo
#define KL_LOG_LEVEL_WARNING ::kl::LogLevel::kWarning
#define KL_LOG_LEVEL_ERROR ::kl::LogLevel::kError

// KL_LOG(INFO) << "text"; KL_LOG(WARNING).Field("tensor", name) << "unknown tensor";
#define KL_LOG(severity)                                              \
  if (KL_LOG_LEVEL_##severity < ::kl::MinLogLevel()) {                \
  } else                                                              \
    ::kl::LogMessage(KL_LOG_LEVEL_##severity, __FILE__, __LINE__)

#endif  // KL_ENGINE_COMMON_LOG_H_
