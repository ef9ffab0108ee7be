#!/usr/bin/env bash
# Builds Bazel targets (optimised, in their own output base so the workspace's
# bazel-* links are untouched) and copies the binaries plus the non-system shared
# libraries they need into one folder (default .bundle/, git-ignored), so a GPU
# machine without gRPC/protobuf/Abseil can run them:
#   tools/gpu_bundle.sh //kernels/cuda:kda_test //kernels/cuda:kda_bench
#   tools/gpu_bundle.sh --tests   # every test tagged gpu
#   tools/gpu_bundle.sh --all     # every test and binary tagged gpu (benchmarks,
#                                 # the CUDA workers) plus what the cluster tools need
#   # on the GPU machine: tools/gpu_run.sh   (or LD_LIBRARY_PATH=.bundle/lib .bundle/bin/X)
# Left out: libc/libm/libstdc++/libgcc_s/ld-linux/libpthread/libdl/librt, the CUDA
# driver, NCCL and cuBLAS (too large; the GPU machine has its own).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  --tests)
    mapfile -t targets < <(bazel query 'attr(tags, "\bgpu\b", tests(//...))' 2>/dev/null)
    set -- "${targets[@]}" ;;
  --all)
    mapfile -t targets < <(bazel query 'attr(tags, "\bgpu\b", kind("cc_(test|binary)", //...))' 2>/dev/null)
    # tools/disagg_bench.sh drives the cluster with these (CPU code, small).
    set -- "${targets[@]}" //tools/kl:kl //tools/make_checkpoint:make_checkpoint \
      //services/router:kl-router ;;
esac
[ $# -gt 0 ] || { echo "usage: $0 //target ... | --tests | --all" >&2; exit 2; }
BUNDLE="${BUNDLE_DIR:-.bundle}"
base="${BAZEL_OUTPUT_BASE:-$HOME/.cache/bazel_gpu_bundle}"
bazel --output_base="$base" build -c opt --symlink_prefix=/ "$@" >&2
bin="$(bazel --output_base="$base" info -c opt bazel-bin 2>/dev/null)"
mkdir -p "$BUNDLE/bin" "$BUNDLE/lib"
skip='^(libc|libm|libstdc\+\+|libgcc_s|ld-linux|libpthread|libdl|librt|libcuda|libnccl|libnvidia|libcublas|libcublasLt)[.-]'
for t in "$@"; do
  pkg="${t#//}"; name="${pkg##*:}"; pkg="${pkg%%:*}"
  f="$bin/$pkg/$name"
  [[ -f "$f" && -x "$f" ]] || { echo "not a binary: $t ($f)" >&2; exit 1; }
  cp -f "$f" "$BUNDLE/bin/"
  rm -f "$BUNDLE/bin/$name.gz"  # a stale packed copy would win when gpu_run.sh unpacks
  ldd "$f" | awk '/=> \//{print $3}' | while read -r lib; do
    b=$(basename "$lib")
    [[ "$b" =~ $skip ]] || { cp -fL "$lib" "$BUNDLE/lib/$b"; rm -f "$BUNDLE/lib/$b.gz"; }
  done
done
chmod -R u+w "$BUNDLE"
# What travels is capped (64 MiB with the checkout): strip the binaries and gzip
# every file over 1 MB (OpenBLAS is 36 MB); tools/gpu_run.sh unpacks them.
strip --strip-unneeded "$BUNDLE"/bin/* 2>/dev/null || true
find "$BUNDLE/lib" "$BUNDLE/bin" -type f ! -name '*.gz' -size +1M -exec gzip -9f {} \;
du -sh "$BUNDLE" >&2
ls "$BUNDLE/bin" >&2
