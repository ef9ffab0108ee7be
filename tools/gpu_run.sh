#!/usr/bin/env bash
# Runs the GPU suite ON the GPU machine, from the repo root:
#   tools/gpu_run.sh [--quick] [--only "name name ..."]
# --only: just these bundled programs (e.g. "kda_test kda_bench"; bench_fla.py
# runs only when named there too, as "fla").
# - LD_LIBRARY_PATH=.bundle/lib (+ the toolkit's / PyTorch's cuBLAS, which is too
#   large to bundle);
# - every test binary in .bundle/bin (*_test: the bundle holds the gpu-tagged tests),
#   then every benchmark (*_bench);
# - kernels/cuda/bench_fla.py when fla wheels were carried in .whl/;
# - one log per program plus summary.txt under $OUT (default ./gpu_logs).
# Exit status: non-zero if any test failed.
#
# Build and bundle on the build machine (own output base, no convenience symlinks):
#   tools/gpu_run.sh --bundle //kernels/cuda:kda_test //kernels/cuda:kda_bench
# which copies the binaries and their non-system shared libraries (same exclusions
# as tools/gpu_bundle.sh) into .bundle/.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--bundle" ]]; then
  shift
  exec bash tools/gpu_bundle.sh "$@"
fi

QUICK=()
ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=(--quick) ;;
    --only) ONLY=" $2 "; shift ;;
    *) echo "gpu_run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
wanted() { [[ -z "$ONLY" || "$ONLY" == *" $1 "* ]]; }
LOG="${OUT:-gpu_logs}"
mkdir -p "$LOG"
source tools/bundle_env.sh
# Multi-process GPU tests write their workers' logs here.
export TEST_UNDECLARED_OUTPUTS_DIR="$(cd "$LOG" && pwd)/outputs" TEST_TMPDIR="${TEST_TMPDIR:-$(mktemp -d)}"
mkdir -p "$TEST_UNDECLARED_OUTPUTS_DIR"
summary="$LOG/summary.txt"
: > "$summary"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem \
  --format=csv > "$LOG/gpu.txt" 2>&1 || true
cat "$LOG/gpu.txt" | tee -a "$summary"

rc=0
for t in "$BUNDLE"/bin/*_test; do
  [[ -x "$t" ]] || continue
  n=$(basename "$t")
  wanted "$n" || continue
  start=$SECONDS
  if timeout "${KL_GPU_TIMEOUT:-300}" "$t" > "$LOG/$n.log" 2>&1; then status=PASS; else status=FAIL; rc=1; fi
  echo "$status $n ($((SECONDS - start)) s)" | tee -a "$summary"
  grep -E "^\s+(decode|chunk|prefill|fast)|FAILED|Failure|error" "$LOG/$n.log" | head -60 | tee -a "$summary"
done
for b in "$BUNDLE"/bin/*_bench; do
  [[ -x "$b" ]] || continue
  n=$(basename "$b")
  wanted "$n" || continue
  start=$SECONDS
  timeout "${KL_GPU_TIMEOUT:-300}" "$b" "${QUICK[@]}" > "$LOG/$n.log" 2>&1 ||
    { echo "FAIL $n" | tee -a "$summary"; rc=1; }
  echo "== $n ($((SECONDS - start)) s)" | tee -a "$summary"
  sed -n '/== summary/,$p' "$LOG/$n.log" | tee -a "$summary"
done
if wanted fla && [[ -f kernels/cuda/bench_fla.py ]] && compgen -G ".whl/*.whl" > /dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/fla_site .whl/*.whl > "$LOG/pip.log" 2>&1; then
    start=$SECONDS
    PYTHONPATH=/tmp/fla_site PYTHONUNBUFFERED=1 python3 kernels/cuda/bench_fla.py "${QUICK[@]}" \
      > "$LOG/bench_fla.log" 2>&1 || echo "FAIL bench_fla.py" | tee -a "$summary"
    echo "== bench_fla.py ($((SECONDS - start)) s)" | tee -a "$summary"
    sed -n '/== fla summary/,$p' "$LOG/bench_fla.log" | tee -a "$summary"
  else
    echo "FAIL pip install of .whl (see pip.log)" | tee -a "$summary"
  fi
fi
exit $rc
