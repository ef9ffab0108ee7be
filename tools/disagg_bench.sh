#!/usr/bin/env bash
# Disaggregated vs colocated goodput on a machine with two GPUs (issue: NCCL
# transport), from a bundle (tools/gpu_bundle.sh //tools/kl:kl
# //tools/make_checkpoint:make_checkpoint //services/router:kl-router
# //services/prefill:kl-prefill-cuda //services/decode:kl-decode-cuda):
#   tools/disagg_bench.sh [rate ...]
# Environment: NUM_REQUESTS (96), PROMPT_LEN (1024:8192), OUTPUT_LEN (64:256),
# RUN_TIMEOUT (300 s per setup and rate), OUT (where results and worker logs go),
# WORKER_FLAGS (both workers' extra flags, comma-separated; default
# --nccl_sync_open).
# Exit status: non-zero if any run failed or timed out.
# Model: the 48B shape's first 4 layers (3 KDA + 1 MLA: the real attention,
# state and expert sizes) with 64 routed experts instead of 256, random bf16
# weights written by make_checkpoint. Load: kl bench, Poisson arrivals.
#  - disaggregated: 1 prefill worker on GPU 0, 1 decode worker on GPU 1 (the
#    state goes over NCCL);
#  - colocated: 2 prefill + 2 decode workers, one of each on each GPU (a pair
#    on one GPU hands over by gRPC, a pair across GPUs by NCCL).
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/bundle_env.sh
LOG="${OUT:-gpu_logs}"
mkdir -p "$LOG"
M="${MODEL_DIR:-/tmp/kimi48b_4l_64e}"
[[ -f "$M/config.json" ]] || "$B/make_checkpoint" --preset=kimi48b --layers=4 --experts=64 \
  --max_total_gib=16 --out_dir="$M" > "$LOG/make_checkpoint.log" 2>&1 || { cat "$LOG/make_checkpoint.log"; exit 1; }
rates=("$@")
[[ ${#rates[@]} -gt 0 ]] || rates=(4 12)
common=(bench --local --model="$M" --worker_backend=cuda --decode_slots=32
        --num_requests="${NUM_REQUESTS:-96}" --warmup=8 --prompt_len="${PROMPT_LEN:-1024:8192}"
        --output_len="${OUTPUT_LEN:-64:256}" --slo_ttft=2 --slo_tpot=0.05 --concurrency=64)
# Unset: a prefill worker's first transfer to a peer waits for its link (as in
# the figures so far); WORKER_FLAGS= (empty) runs the workers' defaults, where
# transfers go over gRPC while links come up in the background.
wf="${WORKER_FLAGS---nccl_sync_open}"
[[ -n "$wf" ]] && common+=(--worker_flags="$wf")
rc=0
for r in "${rates[@]}"; do
  for setup in disagg coloc; do
    if [[ $setup == disagg ]]; then w=(--prefill_workers=1 --decode_workers=1); else w=(--prefill_workers=2 --decode_workers=2); fi
    start=$SECONDS
    timeout "${RUN_TIMEOUT:-300}" "$B/kl" "${common[@]}" "${w[@]}" --rate="$r" --json_out="$LOG/$setup-rate$r.json" \
      --log_dir="$LOG/logs-$setup-rate$r" \
      > "$LOG/$setup-rate$r.txt" 2>&1
    e=$?  # 124: the run hit RUN_TIMEOUT
    [[ $e -eq 0 ]] || rc=1
    echo "== $setup rate=$r ($((SECONDS - start)) s, exit $e)"
    cat "$LOG/$setup-rate$r.json" 2>/dev/null || tail -5 "$LOG/$setup-rate$r.txt"
    echo
  done
done
exit $rc
