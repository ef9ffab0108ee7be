#!/usr/bin/env python3
"""Times fla's KDA kernels on the shapes of //kernels/cuda:kda_bench, side by side.

  python3 kernels/cuda/bench_fla.py [--quick] [--prefill]   (--prefill: chunk_kda only)

Needs torch + triton (on the GPU machine) and fla (`flash-linear-attention` /
`fla-core` wheels carried in .whl/, see tools/gpu_run.sh). Same conventions as
kda_bench: bf16 q/k/v/raw gate/raw beta, gate + L2 norm + beta sigmoid fused in the
kernel, fp32 state; decode states in place in a 1024-slot pool with rotating slots
(ssm_state_indices, as vLLM calls it); medians of triton.testing.do_bench.
"""
import sys

import torch
import triton

from fla.ops.kda import chunk_kda
from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd

H, K, V = 32, 128, 128
QUICK = "--quick" in sys.argv
PREFILL_ONLY = "--prefill" in sys.argv


def do_bench(fn, warmup_ms=50, rep_ms=300):
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def bench_decode(dev):
    P = 1024
    pool = (torch.rand(P, H, K, V, device=dev) - 0.5) * 0.6
    A_log = torch.log(torch.rand(H, device=dev) * 15 + 1)
    dt_bias = torch.rand(H * K, device=dev) * 2 - 1
    rows = []
    for N in (1, 4, 8, 16, 64, 256):
        q = torch.rand(1, N, H, K, device=dev, dtype=torch.bfloat16) * 2 - 1
        k = torch.rand_like(q) * 2 - 1
        v = torch.rand(1, N, H, V, device=dev, dtype=torch.bfloat16) * 2 - 1
        f = torch.rand_like(q) * 6 - 3
        b = torch.rand(1, N, H, device=dev, dtype=torch.bfloat16) * 6 - 3
        out = torch.empty_like(v)
        cu = torch.arange(N + 1, device=dev, dtype=torch.long)
        slot_sets = [torch.arange(i * N, i * N + N, device=dev, dtype=torch.int32) % P
                     for i in range(max(1, P // N))]
        it = [0]

        def step(slots=None):
            if slots is None:
                slots = slot_sets[it[0] % len(slot_sets)]
                it[0] += 1
            fused_recurrent_kda_fwd(
                q=q, k=k, v=v, g=f, beta=b, A_log=A_log, dt_bias=dt_bias, scale=K ** -0.5,
                initial_state=pool, inplace_final_state=True, cu_seqlens=cu,
                ssm_state_indices=slots, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                use_beta_sigmoid_in_kernel=True, out=out)

        ms = do_bench(step)
        gbs = 2 * N * H * K * V * 4 / (ms * 1e-3) / 1e9
        rows.append(f"fla fused_recurrent_kda N={N:<4d} (Python launch)  | {ms * 1e3:8.2f} us | {gbs:7.1f} GB/s state")
        print(rows[-1], flush=True)
        if N == 1:  # 256 launches on distinct slots captured in one CUDA graph
            G = 256
            for _ in range(3):
                step(slot_sets[0])
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(G):
                    step(slot_sets[i % len(slot_sets)])
            ms = do_bench(g.replay) / G
            gbs = 2 * H * K * V * 4 / (ms * 1e-3) / 1e9
            rows.append(f"fla fused_recurrent_kda N=1    (CUDA graph)     | {ms * 1e3:8.2f} us | {gbs:7.1f} GB/s state")
            print(rows[-1], flush=True)
    return rows


def bench_prefill(dev):
    rows = []
    A_log = torch.log(torch.rand(H, device=dev) * 15 + 1)
    dt_bias = torch.rand(H * K, device=dev) * 2 - 1
    for T in ((8192, 32768) if QUICK else (8192, 32768, 131072)):
        q = torch.rand(1, T, H, K, device=dev, dtype=torch.bfloat16) * 2 - 1
        k = torch.rand_like(q) * 2 - 1
        v = torch.rand(1, T, H, V, device=dev, dtype=torch.bfloat16) * 2 - 1
        f = torch.rand_like(q) * 6 - 3
        b = torch.rand(1, T, H, device=dev, dtype=torch.bfloat16) * 6 - 3
        h0 = (torch.rand(1, H, K, V, device=dev) - 0.5) * 0.6

        def run():
            chunk_kda(q, k, v, f, b, A_log=A_log, dt_bias=dt_bias, scale=K ** -0.5,
                      initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
                      use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)

        ms = do_bench(run, warmup_ms=100, rep_ms=500 if T < 131072 else 1000)
        rows.append(f"fla chunk_kda T={T:<6d} | {ms:8.3f} ms | {T / (ms * 1e-3) / 1e6:6.2f} Mtok/s")
        print(rows[-1], flush=True)
        del q, k, v, f, b
        torch.cuda.empty_cache()
    return rows


def main():
    dev = torch.device("cuda")
    import fla
    print(f"fla {getattr(fla, '__version__', '?')}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{torch.cuda.get_device_name()}", flush=True)
    with torch.inference_mode():
        rows = ([] if PREFILL_ONLY else bench_decode(dev)) + bench_prefill(dev)
    print("\n== fla summary")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
