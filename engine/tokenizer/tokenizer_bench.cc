// Encode/decode throughput of the Kimi tokenizer on a few MB of text.
//   bazel run -c opt //engine/tokenizer:tokenizer_bench [-- TOKENIZER_DIR]
// Without a folder it writes and uses a synthetic 163,840-token vocabulary
// (Kimi's size and special layout). Prints MB/s per input kind; single thread.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "engine/tokenizer/pretokenizer.h"
#include "engine/tokenizer/streaming_detokenizer.h"
#include "engine/tokenizer/synthetic.h"
#include "engine/tokenizer/tokenizer.h"

namespace kl {
namespace {

constexpr size_t kTextBytes = 4 << 20;

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

// The corpus' pre-token pieces in seeded random order: realistic token mix
// without repeating whole paragraphs.
std::string ShuffledCorpus(size_t bytes) {
  auto pre = PreTokenizer::Create();
  std::vector<std::string> pieces;
  (*pre)->Split(SyntheticCorpus(), [&](absl::string_view p) {
    pieces.emplace_back(p);
  });
  std::mt19937_64 rng(1);
  std::string out;
  while (out.size() < bytes) out += pieces[rng() % pieces.size()];
  return out;
}

void Bench(const Tokenizer& tok, const char* name, const std::string& text) {
  // Warm up, then time enough repetitions for about a second.
  std::vector<int32_t> ids = tok.Encode(text, true);
  int reps = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  while (elapsed < 1.0) {
    ids = tok.Encode(text, true);
    ++reps;
    elapsed = Seconds(start);
  }
  const double mb = text.size() * reps / 1e6;
  const auto decode_start = std::chrono::steady_clock::now();
  StreamingDetokenizer stream(&tok);
  size_t streamed = 0;
  for (int32_t id : ids) streamed += stream.Push(id).size();
  streamed += stream.Flush().size();
  const double stream_s = Seconds(decode_start);
  std::printf("%-22s %7.2f MB  encode %7.1f MB/s  %5.2f bytes/token  "
              "stream-detok %7.1f MB/s\n",
              name, text.size() / 1e6, mb / elapsed,
              static_cast<double>(text.size()) / ids.size(),
              streamed / 1e6 / stream_s);
}

int Main(int argc, char** argv) {
  std::string dir;
  if (argc > 1) {
    dir = argv[1];
  } else {
    const char* tmp = std::getenv("TMPDIR");
    dir = std::string(tmp ? tmp : "/tmp") + "/kl_tokenizer_bench";
    const auto start = std::chrono::steady_clock::now();
    if (absl::Status s = WriteSyntheticTokenizer(dir, 163840, 0); !s.ok()) {
      std::fprintf(stderr, "%s\n", s.ToString().c_str());
      return 1;
    }
    std::printf("synthetic 163840-token vocabulary written in %.2f s\n",
                Seconds(start));
  }
  const auto load_start = std::chrono::steady_clock::now();
  auto tok = Tokenizer::Load(dir);
  if (!tok.ok()) {
    std::fprintf(stderr, "%s\n", tok.status().ToString().c_str());
    return 1;
  }
  std::printf("loaded %s (%d ids) in %.2f s\n", dir.c_str(),
              (*tok)->vocab_size(), Seconds(load_start));

  std::string corpus;
  while (corpus.size() < kTextBytes) corpus += std::string(SyntheticCorpus());
  Bench(**tok, "corpus (mixed)", corpus);
  Bench(**tok, "shuffled pieces", ShuffledCorpus(kTextBytes));
  std::string english;
  const absl::string_view prose = SyntheticCorpus().substr(0, 1500);
  while (english.size() < kTextBytes) english += std::string(prose);
  Bench(**tok, "english prose", english);
  Bench(**tok, "no spaces (1 MB 'a')", std::string(1 << 20, 'a'));
  Bench(**tok, "spaces (1 MB)", std::string(1 << 20, ' '));
  std::string bytes(1 << 20, '\0');
  std::mt19937_64 rng(2);
  for (char& c : bytes) c = static_cast<char>(rng());
  Bench(**tok, "random bytes (1 MB)", bytes);
  return 0;
}

}  // namespace
}  // namespace kl

int main(int argc, char** argv) { return kl::Main(argc, argv); }
