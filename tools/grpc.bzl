"""cc_grpc_library: .proto -> C++ message + gRPC stubs with the *system* protoc and
grpc_cpp_plugin (Debian protobuf-compiler + protobuf-compiler-grpc); no
@com_google_protobuf / @com_github_grpc_grpc repositories needed (offline)."""

PROTOC = "/usr/bin/protoc"
GRPC_CPP_PLUGIN = "/usr/bin/grpc_cpp_plugin"

def cc_grpc_library(name, srcs, proto_deps = [], deps = [], grpc = True, visibility = None, **kwargs):
    """Generates <x>.pb.{h,cc} (+ <x>.grpc.pb.{h,cc} if grpc) for each src.

    Imports resolve from the workspace root, so a proto in //proto is imported
    as "proto/foo.proto" and its generated header is "proto/foo.pb.h".
    """
    hdrs = []
    ccs = []
    for src in srcs:
        base = src[:-len(".proto")]
        hdrs.append(base + ".pb.h")
        ccs.append(base + ".pb.cc")
        if grpc:
            hdrs.append(base + ".grpc.pb.h")
            ccs.append(base + ".grpc.pb.cc")
    plugin = " --plugin=protoc-gen-grpc=%s --grpc_out=$(GENDIR)" % GRPC_CPP_PLUGIN if grpc else ""
    native.genrule(
        name = name + "_codegen",
        srcs = srcs + proto_deps,
        outs = hdrs + ccs,
        cmd = "%s -I. --cpp_out=$(GENDIR)%s %s" % (
            PROTOC,
            plugin,
            " ".join(["$(location %s)" % s for s in srcs]),
        ),
        message = "protoc " + name,
    )
    native.cc_library(
        name = name,
        srcs = ccs,
        hdrs = hdrs,
        deps = deps + ["//third_party:grpc++" if grpc else "//third_party:protobuf"],
        visibility = visibility,
        **kwargs
    )
