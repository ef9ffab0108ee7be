"""kl_fuzz_target: one fuzz target, built two ways (tests/fuzz/README.md).

  <name>_replay  cc_test in the normal suite (gcc, no libFuzzer): replays every
                 file under corpus/<name>/ (seeds and crash regressions).
  <name>         cc_binary, tagged manual. Under --config=fuzz (clang,
                 -fsanitize=fuzzer,address,undefined; tools/fuzz.sh) it is the
                 libFuzzer binary; otherwise it links the replay main, so it can
                 re-run single inputs with gcc builds (e.g. under --config=asan).
"""

def kl_fuzz_target(name, srcs, deps = [], replay_size = "small"):
    corpus = "corpus/" + name
    native.cc_library(
        name = name + "_lib",
        testonly = True,
        srcs = srcs,
        deps = deps + [":fuzz_interface"],
        alwayslink = True,
    )
    native.cc_test(
        name = name + "_replay",
        size = replay_size,
        deps = [
            ":" + name + "_lib",
            ":replay_main",
        ],
        data = native.glob([corpus + "/**"]),
        args = [native.package_name() + "/" + corpus],
    )
    native.cc_binary(
        name = name,
        testonly = True,
        tags = ["manual"],
        deps = [":" + name + "_lib"] + select({
            ":fuzz_build": [],
            "//conditions:default": [":replay_main"],
        }),
        linkopts = select({
            ":fuzz_build": ["-fsanitize=fuzzer"],
            "//conditions:default": [],
        }),
    )
