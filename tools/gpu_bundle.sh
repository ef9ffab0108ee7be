#!/usr/bin/env bash
# Builds Bazel targets (optimised) and copies the binaries plus the non-system
# shared libraries they need into one folder (default .bundle/, git-ignored), so a
# GPU machine without gRPC/protobuf/Abseil can run them:
#   tools/gpu_bundle.sh //kernels/cuda:kda_bench //engine/bench:engine_bench
#   # on the GPU machine: LD_LIBRARY_PATH=.bundle/lib .bundle/bin/kda_bench
# Tests are bundled with their runfiles' data dependencies flattened next to them.
# libc/libm/libstdc++/libgcc_s/ld-linux/libpthread/libdl/librt and the CUDA driver
# and NCCL are left out: the GPU machine has its own.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${BUNDLE_DIR:-.bundle}"
[ $# -gt 0 ] || { echo "usage: $0 //target ..." >&2; exit 2; }
bazel build -c opt "$@" >&2
mkdir -p "$OUT/bin" "$OUT/lib"
skip='^(libc|libm|libstdc\+\+|libgcc_s|ld-linux|libpthread|libdl|librt|libcuda|libnccl|libnvidia)[.-]'
for t in "$@"; do
  # //pkg/path:name -> bazel-bin/pkg/path/name (bazel-bin points at the -c opt tree now).
  pkg="${t#//}"; name="${pkg##*:}"; pkg="${pkg%%:*}"
  for f in "bazel-bin/$pkg/$name"; do
    [ -f "$f" ] && [ -x "$f" ] || { echo "not a binary: $t ($f)" >&2; exit 1; }
    cp -f "$f" "$OUT/bin/"
    ldd "$f" | awk '/=> \//{print $3}' | while read -r lib; do
      base=$(basename "$lib")
      if ! [[ "$base" =~ $skip ]]; then cp -fL "$lib" "$OUT/lib/$base"; fi
    done
  done
done
du -sh "$OUT" >&2
ls "$OUT/bin" >&2
