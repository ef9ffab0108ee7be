#!/usr/bin/env bash
# Bazel wrapper: the test itself is Python 3 stdlib (+ python3-yaml, grpcio).
exec /usr/bin/python3 "${TEST_SRCDIR}/${TEST_WORKSPACE}/tests/deploy/deploy_test.py" "$@"
