// The fixed training text of the synthetic tokenizer: a few KB of English
// prose, C++ and Python, JSON, numbers and Chinese, written for this project.
// Changing it changes every synthetic vocabulary (and the checkpoints built on
// them), so treat it as frozen data.
#include "engine/tokenizer/synthetic.h"

namespace kl {
namespace {

constexpr char kCorpus[] = R"CORPUS(The quick brown fox jumps over the lazy dog. The dog did not mind; it was asleep in the sun.
A serving system receives a request, tokenizes the prompt, and schedules it on a worker. The worker runs the model one step at a time and streams the text back to the client.
When the cache is full, the scheduler waits. When a request finishes, its memory is returned to the pool and the next request can start.
We measured the time to first token and the time between tokens. The numbers were better than we expected, but the tail latency was still too high.
It's a long way from a prototype to a product. You'll need tests, metrics, and a clear story for every error the user might see. They've said that before, and we're listening.
I'm sure the team will ship it on time. Don't forget the documentation! Isn't that what reviewers always ask for?
In 2024 the model had 48 billion parameters, of which about 3 billion were active for each token. Its context window was 1,048,576 tokens long.
Linear attention keeps a fixed-size state per head instead of a growing cache of keys and values. The state is updated with a delta rule and a learned decay.
Mixture-of-experts layers route each token to 8 of 256 experts, plus one shared expert that every token uses.
THE END OF THE FIRST PART. Chapter Two: Numbers, Names and Places.
London, Paris, Berlin, Tokyo, Beijing, Shanghai, New York, San Francisco, and Sydney are large cities.
Prices went from $12.50 to $13.75, an increase of 10%. The meeting is at 10:30 on 2025-03-14.
Please email support@example.com or call +1 (555) 010-0199 if you have questions.

// C++: a small ring buffer.
#include <vector>
#include <cstdint>

template <typename T>
class RingBuffer {
 public:
  explicit RingBuffer(size_t capacity) : data_(capacity), head_(0), size_(0) {}
  bool Push(const T& value) {
    if (size_ == data_.size()) return false;
    data_[(head_ + size_) % data_.size()] = value;
    ++size_;
    return true;
  }
  bool Pop(T* out) {
    if (size_ == 0) return false;
    *out = data_[head_];
    head_ = (head_ + 1) % data_.size();
    --size_;
    return true;
  }
 private:
  std::vector<T> data_;
  size_t head_;
  size_t size_;
};

int main(int argc, char** argv) {
  RingBuffer<int32_t> buffer(16);
  for (int i = 0; i < 10; ++i) buffer.Push(i * i);
  int32_t value = 0;
  while (buffer.Pop(&value)) printf("%d\n", value);
  return 0;
}

# Python: count words in a file.
import collections
import sys

def count_words(path):
    counts = collections.Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            for word in line.split():
                counts[word.lower()] += 1
    return counts

if __name__ == "__main__":
    for word, n in count_words(sys.argv[1]).most_common(10):
        print(f"{word}\t{n}")

{"model": "kimi-linear", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 256, "temperature": 0.7, "stream": true}
{"id": "req-0001", "choices": [{"index": 0, "delta": {"content": "Hi there"}, "finish_reason": null}]}

人工智能正在改变我们的生活和工作方式。大型语言模型可以回答问题、写代码、翻译文章。
今天天气很好，我们去公园散步吧。公园里有很多人，有的在跑步，有的在下棋，还有的在唱歌。
这个系统的设计目标是低延迟和高吞吐量。每个请求都会被分配到一个工作节点上。
中文分词是自然语言处理的基础任务之一。模型的上下文长度可以达到一百万个词元。
北京、上海、广州和深圳是中国的大城市。学习是一件快乐的事情，我们每天都在进步。

Résumé: naïve café owners in Zürich serve crème brûlée; señor García prefers jalapeños.
Ελληνικά, русский язык, 日本語のテキスト、한국어 문장도 조금 섞어 둡니다。
Emoji appear in chat too 🙂🚀✨ and so do symbols like ©, ®, ™, €, £, ¥, →, ≤, ≥, ±, ×, ÷.
)CORPUS";

}  // namespace

absl::string_view SyntheticCorpus() {
  return absl::string_view(kCorpus, sizeof(kCorpus) - 1);
}

}  // namespace kl
