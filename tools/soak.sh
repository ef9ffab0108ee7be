#!/usr/bin/env bash
# Soak run of the local cluster (router + 2 prefill + 2 decode workers, the
# embedded tiny model): a short Poisson rate sweep finds the highest rate the
# cluster sustains (zero errors, throughput >= 85% of the offered rate, p99 TTFT
# under SLO_TTFT), then HOLD_FRACTION (default 0.75) of it — headroom for the
# rate noise of minutes instead of seconds — is held for SOAK_SECONDS while every
# process's VmRSS is sampled from /proc. Prints peak RSS, RSS growth (mean of
# the first vs the last minute of the soak) and TTFT / ITL / E2E p50 / p99, and
# exits non-zero on any request error. Not part of CI (minutes long).
#   tools/soak.sh [OUT_DIR]        env: SOAK_SECONDS=240 RATES="2 4 6 8 12 16 24"
#                                       SWEEP_SECONDS=30 SLO_TTFT=2 HOLD_FRACTION=0.75
#                                       COMPILATION_MODE=opt
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/kl-soak}"
soak_seconds="${SOAK_SECONDS:-240}"
rates="${RATES:-2 4 6 8 12 16 24}"
sweep_seconds="${SWEEP_SECONDS:-30}"
slo_ttft="${SLO_TTFT:-2}"
hold_fraction="${HOLD_FRACTION:-0.75}"
mode="${COMPILATION_MODE:-opt}"
rm -rf "$out" && mkdir -p "$out/bin" "$out/logs"

bazel build -c "$mode" --noshow_progress //tools/kl:kl //services/router:kl-router \
  //services/prefill:kl-prefill //services/decode:kl-decode >&2
# A private copy: a later build must not replace the binaries under a running cluster.
bindir="$(bazel info -c "$mode" bazel-bin 2>/dev/null)"
cp "$bindir/tools/kl/kl" "$bindir/services/router/kl-router" "$bindir/services/prefill/kl-prefill" \
  "$bindir/services/decode/kl-decode" "$out/bin/"
kl="$out/bin/kl"

"$kl" local --prefill_workers 2 --decode_workers 2 --serve --quiet --max_tokens 4 \
  --log_dir "$out/logs" >/dev/null 2>"$out/local.log" &
klpid=$!
cleanup() { kill -TERM "$klpid" 2>/dev/null || true; wait "$klpid" 2>/dev/null || true; }
trap cleanup EXIT
addr=""
for _ in $(seq 1 600); do
  addr="$(sed -n 's/^\[serving on \([^;]*\);.*/\1/p' "$out/local.log")"
  [[ -n "$addr" ]] && break
  kill -0 "$klpid" 2>/dev/null || { cat "$out/local.log" >&2; exit 1; }
  sleep 0.1
done
[[ -n "$addr" ]] || { echo "soak: cluster did not come up" >&2; exit 1; }
pids="$(pgrep -P "$klpid" | tr '\n' ' ')"
echo "soak: cluster on $addr (pids $pids); logs in $out/logs" >&2

bench() {  # rate seconds json
  local n
  n="$(python3 -c "print(max(8, int($1 * $2)))")"
  "$kl" bench --router "$addr" --rate "$1" --concurrency 256 --num_requests "$n" --warmup 4 \
    --seed "$RANDOM" --prompt_len 16:256 --output_len 16:64 --slo_ttft "$slo_ttft" \
    --deadline_seconds 120 --json_out "$3" >/dev/null
}

# 1. Sweep: the last rate that met every condition.
best=""
for r in $rates; do
  bench "$r" "$sweep_seconds" "$out/sweep_$r.json"
  verdict="$(python3 - "$out/sweep_$r.json" "$r" "$slo_ttft" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1])); r = float(sys.argv[2]); slo = float(sys.argv[3])
errors = sum(j["errors"].values())  # by status code
ok = errors == 0 and j["request_throughput"] >= 0.85 * r and j["ttft_seconds"]["p99"] <= slo
print(("ok" if ok else "no"), "errors=%d thr=%.2f/s ttft_p99=%.3fs" % (
    errors, j["request_throughput"], j["ttft_seconds"]["p99"]))
EOF
)"
  echo "soak: sweep rate $r/s: $verdict" >&2
  [[ "$verdict" == ok* ]] || break
  best="$r"
done
[[ -n "$best" ]] || { echo "soak: not even the lowest rate is sustainable" >&2; exit 1; }
sweep_best="$best"
best="$(python3 -c "print(round($best * $hold_fraction, 2))")"
echo "soak: highest sustainable in the sweep $sweep_best/s; holding $best/s for $soak_seconds s" >&2

# 2. Soak with RSS sampling every 2 s.
(
  while :; do
    now=$(date +%s.%N)
    for p in $pids; do
      rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null) || continue
      name=$(tr '\0' ' ' <"/proc/$p/cmdline" | awk '{n=$1; sub(".*/", "", n); for (i=2;i<=NF;i++) if ($i ~ /^--listen=/) print n, $i}')
      echo "$now $p $rss $name"
    done
    sleep 2
  done
) >"$out/rss.txt" &
sampler=$!
bench "$best" "$soak_seconds" "$out/soak.json"
kill "$sampler"; wait "$sampler" 2>/dev/null || true

python3 - "$out/soak.json" "$out/rss.txt" "$best" <<'EOF'
import collections, json, sys
j = json.load(open(sys.argv[1])); rate = sys.argv[3]
rows = [l.split() for l in open(sys.argv[2]) if len(l.split()) >= 4]
by = collections.defaultdict(list)
t0 = min(float(r[0]) for r in rows)
for t, pid, rss, name, *rest in rows:
    by[(name, rest[0] if rest else pid)].append((float(t) - t0, int(rss)))
end = max(t for v in by.values() for t, _ in v)
print("soak: rate %s/s for %.0f s, %d requests, %d completed, errors %s" % (
    rate, j["duration_seconds"], j["requests"], j["completed"], j["errors"] or "none"))
print("throughput %.2f req/s, %.1f output tok/s" % (j["request_throughput"], j["output_token_throughput"]))
for k in ("ttft_seconds", "itl_seconds", "tpot_seconds", "e2e_seconds"):
    print("%-13s p50 %.4f s  p99 %.4f s" % (k, j[k]["p50"], j[k]["p99"]))
print("%-12s %-26s %10s %10s %10s %8s" % ("process", "listen", "peak MiB", "1st min", "last min", "growth"))
for (name, listen), v in sorted(by.items()):
    first = [r for t, r in v if t <= 60]; last = [r for t, r in v if t >= end - 60]
    f = sum(first) / len(first) / 1024; l = sum(last) / len(last) / 1024
    print("%-12s %-26s %10.1f %10.1f %10.1f %+7.1f%%" % (
        name, listen.replace("--listen=", ""), max(r for _, r in v) / 1024, f, l, 100 * (l - f) / f))
EOF
python3 -c "import json,sys; sys.exit(1 if sum(json.load(open('$out/soak.json'))['errors'].values()) else 0)"
