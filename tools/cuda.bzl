"""cuda_library: compile .cu files with nvcc (outside Bazel's C++ toolchain) into
PIC objects and wrap them in a cc_library that links the static CUDA runtime."""

# SASS for Hopper (sm_90) + PTX for compute_90 so newer GPUs can JIT it.
DEFAULT_GENCODE = [
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]

def cuda_library(name, srcs, hdrs = [], extra_srcs = [], deps = [], copts = [], gencode = DEFAULT_GENCODE, visibility = None, **kwargs):
    """Args:
      srcs: .cu files; hdrs: headers they (and users) include (workspace-relative);
      extra_srcs: headers of other targets that the .cu files include;
      deps: cc deps of the wrapper library; copts: extra nvcc flags.
    """
    objs = []
    for src in srcs:
        obj = "_%s_objs/%s.pic.o" % (name, src[:-len(".cu")] if src.endswith(".cu") else src)
        objs.append(obj)
        native.genrule(
            name = "%s_nvcc_%s" % (name, src.replace("/", "_").replace(".", "_")),
            srcs = [src] + hdrs + extra_srcs,
            outs = [obj],
            # nvcc names its temporaries after its PID, which repeats across sandboxed
            # actions run in parallel (PID namespaces): each action gets its own TMPDIR.
            cmd = " ".join([
                "t=$$(mktemp -d) && TMPDIR=$$t",
                "\"$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc\"",
                "-c -std=c++17 -O3 -Xcompiler=-fPIC -I. -I$(GENDIR) --expt-relaxed-constexpr",
            ] + gencode + copts + ["-o $@ $(location %s) || r=$$?;" % src, "rm -rf $$t; exit $${r:-0}"]),
            message = "nvcc " + src,
        )
    native.cc_library(
        name = name,
        srcs = objs,
        hdrs = hdrs,
        deps = deps + ["@local_cuda//:cudart_static"],
        linkstatic = True,
        visibility = visibility,
        **kwargs
    )
