#!/usr/bin/env bash
# Installs every Debian package the project builds, tests and runs with, if missing.
# Idempotent and quiet when everything is already there. Needs root (or sudo).
set -euo pipefail
PKGS=(
  bazel-bootstrap                       # Bazel 4.2.3, offline (see docs/build.md)
  libgrpc++-dev protobuf-compiler-grpc  # gRPC 1.51 + grpc_cpp_plugin
  libprotobuf-dev protobuf-compiler     # protobuf 3.21
  libabsl-dev                           # Abseil 20220623
  prometheus-cpp-dev libcivetweb-dev    # metrics exposer
  libgtest-dev                          # GoogleTest 1.12
  libopenblas-pthread-dev               # CPU GEMM
  libpcre2-dev                          # tokenizer pre-split (lookahead)
  nlohmann-json3-dev                    # config.json / safetensors headers
  openssl                               # throwaway test certificates (tools/certs)
  prometheus                            # server + promtool: tests/observability, rule and metrics checks
  clang libclang-rt-14-dev              # libFuzzer targets (tools/fuzz.sh); ASan/UBSan/TSan runtimes of gcc:
  libasan8 libubsan1 libtsan2           #   --config=asan / --config=tsan
  python3 python3-pip python3-grpcio python3-protobuf  # Python client test, tiktoken parity
)
missing=()
for p in "${PKGS[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)" = "ii " ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install_deps: installing ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# tiktoken (PyPI) is the oracle of the tokenizer parity test; the test skips,
# saying why, when it cannot be installed.
if ! /usr/bin/python3 -c "import tiktoken" 2>/dev/null; then
  /usr/bin/python3 -m pip install -q --break-system-packages tiktoken >/dev/null 2>&1 ||
    echo "install_deps: note: could not pip install tiktoken; the tokenizer parity test will skip" >&2
fi
if [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "install_deps: note: no CUDA toolkit at /usr/local/cuda; CUDA targets will not build" >&2
fi
