#!/usr/bin/env bash
# The README's test command: installs what is missing, then builds and runs the
# whole CPU test suite with Bazel (offline) and prints "N passed, N failed, N skipped".
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/install_deps.sh || { echo "dependency install failed"; echo "0 passed, 1 failed"; exit 1; }
BEP="$(mktemp)"
trap 'bazel shutdown >/dev/null 2>&1; rm -f "$BEP"' EXIT
bazel test //... --keep_going --build_event_json_file="$BEP" --color=no --curses=no "$@" </dev/null
rc=$?
summary=$(python3 tools/ci/bazel_test_summary.py "$BEP" --bazel-exit-code "$rc") || summary="0 passed, 1 failed"
# Bazel exit codes: 0 ok, 1 build failed, 3 tests failed, 4 no test targets.
if [ "$rc" -eq 4 ]; then rc=1; fi
echo "$summary"
exit "$rc"
