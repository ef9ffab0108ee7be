#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz with clang (--config=fuzz, own
# output base) and fuzzes each for SECONDS, starting from its seed corpus
# (tests/fuzz/README.md). A target passes if libFuzzer finds nothing: no crash,
# sanitizer report, fuzz-invariant abort, leak, timeout or OOM.
#
#   tools/fuzz.sh [--seconds N] [--junit FILE] [TARGET...]   (default: 25 s, all targets)
#
# Findings (crash-*, leak-*, timeout-*, oom-* inputs) and each target's log are
# kept in $KL_FUZZ_ARTIFACTS (default /tmp/kl_fuzz_artifacts/<checkout hash>). Turn a finding
# into a fix plus tests/fuzz/corpus/<target>/crash-<what> (README.md). With
# --junit, writes one <testcase> per target for tools/ci/bazel_test_summary.py.
# Ends with "N passed, N failed"; exit status 1 if any target failed.
set -uo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=25
JUNIT=""
TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_PER_TARGET="$2"; shift 2 ;;
    --junit) JUNIT="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(config_fuzzer safetensors_fuzzer tokenizer_fuzzer bundle_fuzzer request_fuzzer
           transfer_plan_fuzzer)
fi

# One output base per workspace, apart from the normal (gcc) one.
OUTPUT_BASE="${KL_FUZZ_OUTPUT_BASE:-$HOME/.cache/bazel_fuzz/$(pwd -P | md5sum | cut -c1-12)}"
# Findings and logs per workspace too: runs from two checkouts never clear each other's.
ARTIFACTS="${KL_FUZZ_ARTIFACTS:-/tmp/kl_fuzz_artifacts/$(pwd -P | md5sum | cut -c1-12)}"
mkdir -p "$ARTIFACTS"
BZL=(bazel --output_base="$OUTPUT_BASE")
trap '"${BZL[@]}" shutdown >/dev/null 2>&1' EXIT

labels=()
for t in "${TARGETS[@]}"; do labels+=("//tests/fuzz:$t"); done
passed=0
failed=0
cases=""
xml_escape() { sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e 's/"/\&quot;/g'; }

if ! "${BZL[@]}" build --config=fuzz --color=no --curses=no "${labels[@]}" </dev/null; then
  echo "fuzz: building the fuzz targets failed" >&2
  failed=${#TARGETS[@]}
  for t in "${TARGETS[@]}"; do
    cases+="<testcase classname=\"fuzz\" name=\"$t\"><failure message=\"build failed\"/></testcase>"
  done
else
  BIN="$("${BZL[@]}" info --config=fuzz bazel-bin 2>/dev/null)/tests/fuzz"
  for t in "${TARGETS[@]}"; do
    work="$(mktemp -d)"   # the grown corpus; the committed seeds stay read-only input
    log="$ARTIFACTS/$t.log"
    rm -f "$ARTIFACTS/$t-"*   # findings listed below are this run's only
    # -timeout: one input taking > 10 s is a hang; -rss_limit_mb: an input
    # making the parser allocate GiBs is a finding too.
    ASAN_OPTIONS="detect_leaks=1:halt_on_error=1" UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
      "$BIN/$t" -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$ARTIFACTS/$t-" "$work" "tests/fuzz/corpus/$t" \
      >"$log" 2>&1 </dev/null
    rc=$?
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    rm -rf "$work"
    if [ "$rc" -eq 0 ]; then
      passed=$((passed + 1))
      echo "fuzz: $t PASSED (${runs:-?} runs in ${SECONDS_PER_TARGET} s, ${cov:-cov: ?})"
      cases+="<testcase classname=\"fuzz\" name=\"$t\"/>"
    else
      failed=$((failed + 1))
      echo "fuzz: $t FAILED (exit $rc); log $log; inputs:" $(ls "$ARTIFACTS" | grep "^$t-" | sed "s|^|$ARTIFACTS/|")
      grep -m1 -E 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error|fuzz invariant failed' "$log" | sed 's/^/  /'
      msg=$(grep -m1 -E 'ERROR|runtime error|fuzz invariant failed' "$log" | head -c 300 | xml_escape)
      cases+="<testcase classname=\"fuzz\" name=\"$t\"><failure message=\"${msg:-exit $rc}\"/></testcase>"
    fi
  done
fi
if [ -n "$JUNIT" ]; then
  printf '<?xml version="1.0"?>\n<testsuites><testsuite name="fuzz">%s</testsuite></testsuites>\n' "$cases" >"$JUNIT"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
