# Sourced (from the repo root) by the scripts that run a GPU bundle on the GPU
# machine (tools/gpu_run.sh, tools/nccl_runs.sh, tools/disagg_bench.sh): unpacks
# the bundle (tools/gpu_bundle.sh gzips what is large), makes its programs
# executable, points the loader at its libraries and the machine's CUDA (and at
# PyTorch's cuBLAS when the toolkit has none), and keeps NVLink multicast off.
# Sets BUNDLE (default .bundle) and B (its bin/).
BUNDLE="${BUNDLE_DIR:-.bundle}"
B="$BUNDLE/bin"
for z in "$BUNDLE"/lib/*.gz "$BUNDLE"/bin/*.gz; do [[ -e "$z" ]] && gunzip -f "$z"; done
chmod +x "$BUNDLE"/bin/* 2>/dev/null || true
export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
if ! ldconfig -p 2>/dev/null | grep -q libcublas.so.13 && [[ ! -e /usr/local/cuda/lib64/libcublas.so.13 ]]; then
  cublas_dir="$(python3 -c 'import nvidia.cublas, os; print(os.path.join(os.path.dirname(nvidia.cublas.__file__), "lib"))' 2>/dev/null || true)"
  [[ -n "$cublas_dir" ]] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$cublas_dir"
fi
# NVLink multicast stays off (KINDS.md: it can take a shared host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
