// StopMatcher: applies stop strings to a stream of text deltas. It releases
// only text that can no longer be part of a stop string, and on a match cuts the
// text just before it (OpenAI / vLLM semantics: the stop string is not emitted).
#ifndef KL_ENGINE_SAMPLING_STOP_MATCHER_H_
#define KL_ENGINE_SAMPLING_STOP_MATCHER_H_

#include <string>
#include <vector>

namespace kl {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}

  // Feeds a delta; returns the text safe to emit now. Sets *stopped when a stop
  // string completed (then nothing more should be fed).
  std::string Push(const std::string& delta, bool* stopped);
  // End of stream: releases whatever was held back.
  std::string Flush();

 private:
  std::vector<std::string> stops_;
  std::string pending_;
};

}  // namespace kl

#endif  // KL_ENGINE_SAMPLING_STOP_MATCHER_H_
