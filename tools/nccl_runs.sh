#!/usr/bin/env bash
# The two-GPU measurements of the NCCL transport (docs/nccl_transfer.md,
# docs/benchmarks.md "NCCL state transfer"), from a bundle
# (tools/gpu_bundle.sh --all), on a machine with two GPUs of one host:
#   tools/nccl_runs.sh tests       # nccl_transfer_test (about 2 min)
#   tools/nccl_runs.sh bandwidth   # transfer_bench, serial and --pipeline, message
#                                  # bounds side by side (about 5 min)
#   tools/nccl_runs.sh load        # disaggregated vs colocated goodput
#                                  # (tools/disagg_bench.sh at one rate: up to
#                                  # 2 x RUN_TIMEOUT + making the checkpoint)
#   tools/nccl_runs.sh tests bandwidth   # several in one call
# Each part fits one device call (10 minutes). Results go under $OUT (default
# ./gpu_logs): one log per program, topo.txt, summary.txt.
# Environment: MESSAGE_MB (transfer_bench --message_mb, default 0,8,16,32,64),
# RATES (load, default 4; each rate adds up to 2 x RUN_TIMEOUT, so run others in
# further calls), NUM_REQUESTS (64), RUN_TIMEOUT (120 s per setup and rate),
# WORKER_FLAGS (load: see tools/disagg_bench.sh; `WORKER_FLAGS= ... load` runs
# the workers' default link set-up, in the background, as the control for a
# TTFT tail that link set-up could explain).
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/bundle_env.sh
LOG="${OUT:-gpu_logs}"
mkdir -p "$LOG"
export TEST_UNDECLARED_OUTPUTS_DIR="$(cd "$LOG" && pwd)/outputs" TEST_TMPDIR="${TEST_TMPDIR:-$(mktemp -d)}"
mkdir -p "$TEST_UNDECLARED_OUTPUTS_DIR"
[[ $# -gt 0 ]] || set -- tests
{
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  nvidia-smi topo -m
} > "$LOG/topo.txt" 2>&1
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
[[ "$gpus" -ge 2 ]] || echo "nccl_runs.sh: $gpus GPU(s) here: the two-GPU parts will skip or fail" >&2
rc=0
note() { echo "$*" | tee -a "$LOG/summary.txt"; }
for part in "$@"; do
  start=$SECONDS
  case "$part" in
    tests)
      "$B/nccl_transfer_test" > "$LOG/nccl_transfer_test.log" 2>&1
      r=$?
      # A test's own result line ends with its time (the closing lists do not).
      count() { grep -cE "^\[ *$1 *\] NcclTransfer\..* \([0-9]+ ms\)\$" "$LOG/nccl_transfer_test.log"; }
      note "nccl_transfer_test: exit $r ($((SECONDS - start)) s): $(count OK) ok, $(count FAILED) failed, $(count SKIPPED) skipped"
      [[ $r -eq 0 ]] || rc=1 ;;
    bandwidth)
      for mode in serial pipeline; do
        flags=(--message_mb="${MESSAGE_MB:-0,8,16,32,64}")
        [[ $mode == pipeline ]] && flags+=(--pipeline)
        s=$SECONDS
        "$B/transfer_bench" "${flags[@]}" > "$LOG/transfer_bench_$mode.log" 2>&1
        r=$?
        note "transfer_bench $mode: exit $r ($((SECONDS - s)) s)"
        [[ $r -eq 0 ]] || rc=1
      done ;;
    load)
      # shellcheck disable=SC2086
      OUT="$LOG" NUM_REQUESTS="${NUM_REQUESTS:-64}" RUN_TIMEOUT="${RUN_TIMEOUT:-120}" \
        bash tools/disagg_bench.sh ${RATES:-4} > "$LOG/disagg_bench.log" 2>&1
      r=$?
      note "disagg_bench: exit $r ($((SECONDS - start)) s)"
      # Each run's line and its workers' transfer / link set-up counters.
      for f in "$LOG"/disagg-rate*.txt "$LOG"/coloc-rate*.txt; do
        [[ -e "$f" ]] || continue
        note "$(basename "$f" .txt): $(grep -E '"(goodput|completed)"' "${f%.txt}.json" 2>/dev/null | tr -d ' \n')"
        grep -E '^\[(prefill|decode)-[0-9]+:' "$f" | tee -a "$LOG/summary.txt"
      done
      [[ $r -eq 0 ]] || rc=1 ;;
    *) echo "nccl_runs.sh: unknown part $part (tests, bandwidth, load)" >&2; exit 2 ;;
  esac
done
exit $rc
