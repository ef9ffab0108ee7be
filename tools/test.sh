#!/usr/bin/env bash
# The README's test command: installs what is missing, then runs, with Bazel (offline):
#   1. the whole CPU test suite (gcc);
#   2. the same suite under ASan + UBSan (--config=asan, own output base so the
#      normal cache stays warm);                         KL_CI_ASAN=0 skips it
#   3. a short libFuzzer run of every fuzz target (tools/fuzz.sh, clang,
#      KL_FUZZ_SECONDS per target, default 20);            KL_CI_FUZZ=0 skips it
# and prints one line for all of them: "N passed, N failed, N skipped".
# Arguments go to the phase-1 `bazel test` command.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/install_deps.sh || { echo "dependency install failed"; echo "0 passed, 1 failed"; exit 1; }
TMP="$(mktemp -d)"
HASH="$(pwd -P | md5sum | cut -c1-12)"
ASAN_BASE="${KL_ASAN_OUTPUT_BASE:-$HOME/.cache/bazel_asan/$HASH}"
trap 'bazel shutdown >/dev/null 2>&1; bazel --output_base="$ASAN_BASE" shutdown >/dev/null 2>&1; rm -rf "$TMP"' EXIT
phase_start() { PHASE_T0=$(date +%s); echo "=== test.sh: $1" >&2; }
phase_end() { echo "=== test.sh: $1 took $(( $(date +%s) - PHASE_T0 )) s (exit $2)" >&2; }
summary_args=()
rc=0

phase_start "CPU suite"
bazel test //... --keep_going --build_event_json_file="$TMP/bep.json" --color=no --curses=no "$@" </dev/null
r=$?; phase_end "CPU suite" "$r"
summary_args+=("$TMP/bep.json" --bazel-exit-code "$r")
[ "$r" -ne 0 ] && rc=$r
bazel shutdown >/dev/null 2>&1  # free its memory for the next phases

if [ "${KL_CI_ASAN:-1}" != 0 ]; then
  phase_start "ASan+UBSan suite"
  # The normal build's convenience symlinks (bazel-<workspace> leads into its
  # execroot) would be walked by `//...` in the ASan output base; the next
  # normal build recreates them.
  for l in bazel-bin bazel-out bazel-testlogs "bazel-$(basename "$(pwd -P)")"; do
    [ -L "$l" ] && rm -f "$l"
  done
  bazel --output_base="$ASAN_BASE" test --config=asan //... --keep_going \
    --test_env=LSAN_OPTIONS="suppressions=$PWD/tools/sanitizers/lsan.supp:print_suppressions=0" \
    --build_event_json_file="$TMP/bep_asan.json" --color=no --curses=no </dev/null
  r=$?; phase_end "ASan+UBSan suite" "$r"
  summary_args+=("$TMP/bep_asan.json" --bazel-exit-code "$r")
  [ "$r" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$r
  bazel --output_base="$ASAN_BASE" shutdown >/dev/null 2>&1
fi

if [ "${KL_CI_FUZZ:-1}" != 0 ]; then
  phase_start "fuzz run"
  bash tools/fuzz.sh --seconds "${KL_FUZZ_SECONDS:-20}" --junit "$TMP/fuzz.xml" </dev/null >&2
  r=$?; phase_end "fuzz run" "$r"
  summary_args+=(--junit "$TMP/fuzz.xml")
  [ "$r" -ne 0 ] && [ "$rc" -eq 0 ] && rc=3
fi

summary=$(python3 tools/ci/bazel_test_summary.py "${summary_args[@]}") || summary="0 passed, 1 failed"
# Bazel exit codes: 0 ok, 1 build failed, 3 tests failed, 4 no test targets.
if [ "$rc" -eq 4 ]; then rc=1; fi
echo "$summary"
exit "$rc"
