// Throughput of the CPU KDA kernels at the production head size (K = V = 128):
//  - prefill: KdaChunkPrefill over one sequence of --tokens tokens, --heads heads
//    (and, for comparison, KdaRecurrent over the same tokens);
//  - decode: one recurrent step for --seqs sequences through KdaVarlen.
// Prints ms, tokens/s, GFLOP/s (chunk FLOPs counted with the cost line of
// kimi_linear.md §4.1) and state GB/s (fp32 state read + written once).
//
//   bazel run //kernels/cpu:kda_bench -- --heads=32 --tokens=4096 --seqs=16
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/common/parallel.h"
#include "kernels/cpu/kda.h"

namespace {

struct Options {
  int64_t heads = 32;
  int64_t tokens = 4096;
  int64_t seqs = 16;
  int64_t chunk = 64;
  int64_t dim = 128;  // K = V
  int reps = 3;
  int decode_reps = 50;
  int threads = 0;  // 0 = hardware concurrency
  bool recurrent_prefill = true;
};

bool ParseFlag(const char* arg, const char* name, int64_t* out) {
  const size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  *out = std::atoll(arg + n + 1);
  return true;
}

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    int64_t v = 0;
    if (ParseFlag(argv[i], "--heads", &o.heads) || ParseFlag(argv[i], "--tokens", &o.tokens) ||
        ParseFlag(argv[i], "--seqs", &o.seqs) || ParseFlag(argv[i], "--chunk", &o.chunk) ||
        ParseFlag(argv[i], "--dim", &o.dim)) {
      continue;
    } else if (ParseFlag(argv[i], "--reps", &v)) {
      o.reps = static_cast<int>(v);
    } else if (ParseFlag(argv[i], "--decode_reps", &v)) {
      o.decode_reps = static_cast<int>(v);
    } else if (ParseFlag(argv[i], "--threads", &v)) {
      o.threads = static_cast<int>(v);
    } else if (ParseFlag(argv[i], "--recurrent_prefill", &v)) {
      o.recurrent_prefill = v != 0;
    } else {
      std::fprintf(stderr,
                   "usage: kda_bench [--heads=32] [--tokens=4096] [--seqs=16] [--chunk=64] "
                   "[--dim=128] [--reps=3] [--decode_reps=50] [--threads=0] "
                   "[--recurrent_prefill=1]\n");
      std::exit(2);
    }
  }
  return o;
}

// Cheap deterministic inputs (xorshift); values in [-1, 1).
void Fill(std::vector<float>* x, uint64_t seed) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& v : *x) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    v = static_cast<float>((s >> 40) * (1.0 / (1 << 23)) - 1.0);
  }
}

// Prepared inputs for `rows` tokens x H heads: normalised q (scaled) and k,
// realistic gate (A_log = log 1..16, dt_bias ~ +-0.5), beta = sigmoid.
struct Inputs {
  std::vector<float> q, k, v, g, beta;
};
Inputs MakeInputs(int64_t rows, int64_t H, int64_t D) {
  Inputs in;
  in.q.resize(rows * H * D);
  in.k.resize(rows * H * D);
  in.v.resize(rows * H * D);
  in.g.resize(rows * H * D);
  in.beta.resize(rows * H);
  Fill(&in.q, 1);
  Fill(&in.k, 2);
  Fill(&in.v, 3);
  std::vector<float> f(rows * H * D), a_log(H), dt(H * D);
  Fill(&f, 4);
  Fill(&dt, 5);
  for (float& x : dt) x *= 0.5f;
  for (int64_t h = 0; h < H; ++h) a_log[h] = std::log(1.0f + 15.0f * h / std::max<int64_t>(1, H - 1));
  kl::cpu::KdaGate(f.data(), a_log.data(), dt.data(), rows, H, D, in.g.data());
  Fill(&in.beta, 6);
  kl::cpu::Sigmoid(in.beta.data(), rows * H, in.beta.data());
  kl::cpu::L2NormScaleRows(in.q.data(), rows * H, D, 1.0f / std::sqrt(static_cast<float>(D)));
  kl::cpu::L2NormScaleRows(in.k.data(), rows * H, D, 1.0f);
  return in;
}

// Chunk-algorithm FLOPs (2 per multiply-add) of kimi_linear.md §4.1's cost line
// for one head: per chunk of n tokens, L and A_qk 2n^2K, solve n^3/6, W/U
// n^2(K+V), Vt and state update 2nKV, output nKV + n^2V multiply-adds.
double ChunkFlopsPerHead(int64_t T, int64_t C, int64_t K, int64_t V) {
  double macs = 0;
  for (int64_t t0 = 0; t0 < T; t0 += C) {
    const double n = static_cast<double>(std::min(C, T - t0));
    macs += 2 * n * n * K + n * n * n / 6 + n * n * (K + V) + 2 * n * K * V + n * K * V + n * n * V;
  }
  return 2 * macs;
}

template <class F>
std::vector<double> TimeMs(int reps, F&& f) {
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = Parse(argc, argv);
  kl::SetNumThreads(opt.threads);
  const int64_t H = opt.heads, D = opt.dim, T = opt.tokens, N = opt.seqs;
  const double state_bytes = static_cast<double>(D) * D * sizeof(float);  // one head
  std::printf("kda_bench: threads=%d H=%lld K=V=%lld chunk=%lld\n", kl::NumThreads(),
              static_cast<long long>(H), static_cast<long long>(D),
              static_cast<long long>(opt.chunk));

  {  // Prefill.
    const Inputs in = MakeInputs(T, H, D);
    std::vector<float> state(H * D * D, 0.0f), o(T * H * D);
    auto run_chunk = [&] {
      std::fill(state.begin(), state.end(), 0.0f);
      kl::cpu::KdaChunkPrefill(in.q.data(), in.k.data(), in.v.data(), in.g.data(), in.beta.data(),
                               T, H, D, D, opt.chunk, state.data(), o.data());
    };
    run_chunk();  // warm-up (page faults, scratch allocation)
    const std::vector<double> ms = TimeMs(opt.reps, run_chunk);
    const double best = ms.front(), median = ms[ms.size() / 2];
    const double flops = ChunkFlopsPerHead(T, opt.chunk, D, D) * H;
    std::printf(
        "chunk prefill    T=%lld: best %.2f ms, median %.2f ms | %.0f tokens/s | %.1f GFLOP/s "
        "(spec cost line) | state %.2f GB/s\n",
        static_cast<long long>(T), best, median, T / (best * 1e-3), flops / (best * 1e-3) * 1e-9,
        2 * state_bytes * H / (best * 1e-3) * 1e-9);
    if (opt.recurrent_prefill) {
      auto run_rec = [&] {
        std::fill(state.begin(), state.end(), 0.0f);
        kl::cpu::KdaRecurrent(in.q.data(), in.k.data(), in.v.data(), in.g.data(), in.beta.data(), T,
                              H, D, D, state.data(), o.data());
      };
      const std::vector<double> rms = TimeMs(std::max(1, opt.reps / 2), run_rec);
      std::printf("recurrent prefill T=%lld: best %.2f ms | %.0f tokens/s | %.1f GFLOP/s (7KV/token)\n",
                  static_cast<long long>(T), rms.front(), T / (rms.front() * 1e-3),
                  7.0 * D * D * H * T / (rms.front() * 1e-3) * 1e-9);
    }
  }

  {  // Decode: one token for each of N sequences, through the varlen entry point.
    const Inputs in = MakeInputs(N, H, D);
    std::vector<float> states(N * H * D * D), o(N * H * D);
    Fill(&states, 7);
    for (float& x : states) x *= 0.1f;
    std::vector<float*> ptrs(N);
    for (int64_t n = 0; n < N; ++n) ptrs[n] = states.data() + n * H * D * D;
    std::vector<int64_t> cu(N + 1);
    for (int64_t n = 0; n <= N; ++n) cu[n] = n;
    auto step = [&] {
      kl::cpu::KdaVarlen(in.q.data(), in.k.data(), in.v.data(), in.g.data(), in.beta.data(),
                         cu.data(), N, H, D, D, opt.chunk, /*recurrent_max_tokens=*/64, ptrs.data(),
                         o.data());
    };
    step();
    const std::vector<double> ms = TimeMs(opt.decode_reps, step);
    const double best = ms.front(), median = ms[ms.size() / 2];
    std::printf(
        "recurrent decode N=%lld x 1 token: best %.3f ms, median %.3f ms | %.0f tokens/s | "
        "state %.2f GB/s (%.1f MiB read+written)\n",
        static_cast<long long>(N), best, median, N / (median * 1e-3),
        2 * state_bytes * H * N / (median * 1e-3) * 1e-9, 2 * state_bytes * H * N / (1 << 20));
  }
  return 0;
}
