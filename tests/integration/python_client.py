#!/usr/bin/env python3
"""Streams one generation from kl-router using only proto/generation.proto.

Generates the Python stubs with the system protoc + grpc_python_plugin into a
temporary folder, so the public API is proven usable from outside C++.
Usage: python_client.py --router HOST:PORT --proto_dir DIR [--prompt TEXT]
Prints one JSON line: {"tokens": [...], "text": "...", "finish": "...", "indices": [...]}.
"""
import argparse
import importlib
import json
import subprocess
import sys
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", required=True)
    ap.add_argument("--proto_dir", required=True)
    ap.add_argument("--prompt", default="Hello from Python")
    ap.add_argument("--max_tokens", type=int, default=12)
    ap.add_argument("--ignore_eos", action="store_true")
    args = ap.parse_args()

    out = tempfile.mkdtemp()
    subprocess.run(
        ["/usr/bin/protoc", "-I", args.proto_dir, "--python_out", out, "--grpc_out", out,
         "--plugin=protoc-gen-grpc=/usr/bin/grpc_python_plugin", "generation.proto"],
        check=True)
    sys.path.insert(0, out)
    import grpc  # noqa: E402  (python3-grpcio from Debian)
    pb = importlib.import_module("generation_pb2")
    pb_grpc = importlib.import_module("generation_pb2_grpc")

    with grpc.insecure_channel(args.router) as ch:
        stub = pb_grpc.GenerationStub(ch)
        req = pb.GenerateRequest(text=args.prompt, request_id="python-client")
        req.sampling.temperature = 0.0
        req.sampling.max_tokens = args.max_tokens
        req.sampling.ignore_eos = args.ignore_eos
        tokens, indices, text, finish = [], [], "", ""
        for chunk in stub.Generate(req, timeout=120):
            tokens.extend(chunk.token_ids)
            indices.extend(range(chunk.index, chunk.index + len(chunk.token_ids)))
            text += chunk.text
            if chunk.finish_reason:
                finish = pb.FinishReason.Name(chunk.finish_reason)
        info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    print(json.dumps({"tokens": tokens, "indices": indices, "text": text, "finish": finish,
                      "vocab_size": info.vocab_size}))


if __name__ == "__main__":
    main()
