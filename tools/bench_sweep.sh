#!/usr/bin/env bash
# Rate sweep of the local cluster with `kl bench`, one JSON report per rate, and
# a plot (docs/bench_cluster.png) when matplotlib is importable.
#   tools/bench_sweep.sh [OUT_DIR] [RATES...]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/kl-bench}"; shift || true
rates=("${@:-2 4 8 16 32 64}")
mkdir -p "$out"
bazel build -c opt --noshow_progress //tools/kl:kl //services/router:kl-router //services/prefill:kl-prefill //services/decode:kl-decode >&2
for r in ${rates[@]}; do
  bazel-bin/tools/kl/kl bench --local --rate "$r" --concurrency 256 --num_requests 48 --warmup 4 \
    --seed 1 --prompt_len 16:256 --output_len 16:64 --slo_ttft 0.25 --slo_tpot 0.01 \
    --json_out "$out/rate_$r.json" >/dev/null
done
python3 tools/bench_plot.py docs/bench_cluster.png "$out"/rate_*.json || echo "no plot (matplotlib missing)" >&2
ls "$out"
