#include "engine/common/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>

namespace kl {
namespace {

std::atomic<int> g_min_level{static_cast<int>(LogLevel::kInfo)};
thread_local std::string tls_request_id;

const char* LevelName(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
  }
  return "?";
}

// Quotes a value if it contains spaces, quotes or '=' (logfmt).
std::string Quote(const std::string& v) {
  bool needs = v.empty();
  for (char c : v) needs |= (c == ' ' || c == '"' || c == '=' || c == '\n' || c == '\t');
  if (!needs) return v;
  std::string out = "\"";
  for (char c : v) {
    if (c == '"' || c == '\\') out += '\\';
    if (c == '\n') { out += "\\n"; continue; }
    out += c;
  }
  return out + "\"";
}

const char* Basename(const char* path) {
  const char* b = path;
  for (const char* p = path; *p; ++p) if (*p == '/') b = p + 1;
  return b;
}

}  // namespace

void SetMinLogLevel(LogLevel level) { g_min_level = static_cast<int>(level); }
LogLevel MinLogLevel() { return static_cast<LogLevel>(g_min_level.load()); }

ScopedRequestId::ScopedRequestId(std::string id) : previous_(std::move(tls_request_id)) {
  tls_request_id = std::move(id);
}
ScopedRequestId::~ScopedRequestId() { tls_request_id = std::move(previous_); }
const std::string& CurrentRequestId() { return tls_request_id; }

LogMessage::LogMessage(LogLevel level, const char* file, int line)
    : level_(level), file_(file), line_(line) {}

void LogMessage::AddField(const char* key, const std::string& value) {
  fields_ += ' ';
  fields_ += key;
  fields_ += '=';
  fields_ += Quote(value);
}

LogMessage::~LogMessage() {
  using namespace std::chrono;
  const auto now = system_clock::now();
  const std::time_t secs = system_clock::to_time_t(now);
  const int ms = static_cast<int>(duration_cast<milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm tm;
  gmtime_r(&secs, &tm);
  char ts[40];
  std::snprintf(ts, sizeof(ts), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms);
  std::string line = "ts=";
  line += ts;
  line += " level=";
  line += LevelName(level_);
  line += " src=";
  line += Basename(file_);
  line += ':' + std::to_string(line_);
  if (!tls_request_id.empty()) line += " req=" + Quote(tls_request_id);
  line += " msg=" + Quote(msg_.str());
  line += fields_;
  line += '\n';
  static std::mutex mu;
  std::lock_guard<std::mutex> l(mu);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace kl
