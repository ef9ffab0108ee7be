#!/usr/bin/env python3
"""Reference encodings from Python's tiktoken, for tiktoken_parity_test.

Usage: tiktoken_reference.py TOKENIZER_DIR INPUTS_JSON OUTPUT_JSON

Builds the encoder the way tokenization_kimi.py's TikTokenTokenizer does
(same pat_str, ranks from tiktoken.model, specials from tokenizer_config.json
over range(R, R + 256 + 2) with "<|reserved_token_{id}|>" fallbacks) and
encodes each input string with its long-input splitting, once with special
tokens allowed and once with them treated as text. Exits 3 if tiktoken cannot
be imported, so the C++ test can skip with a reason.
"""
import base64
import json
import sys

try:
    import tiktoken
except ImportError as e:  # pragma: no cover
    print(f"cannot import tiktoken: {e}", file=sys.stderr)
    sys.exit(3)

# TikTokenTokenizer.pat_str, as published in tokenization_kimi.py.
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
NUM_RESERVED_SPECIAL_TOKENS = 256
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def load_ranks(path):
    ranks = {}
    with open(path, "rb") as f:
        for line in f.read().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def split_runs(s, limit):
    """Cuts s so no piece has more than `limit` consecutive space/non-space chars."""
    run, run_is_space, start = 0, s[0].isspace() if s else False, 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run, run_is_space = 1, is_space
        else:
            run += 1
            if run > limit:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


def kimi_encode(enc, text, allow_special):
    ids = []
    for i in range(0, len(text), MAX_ENCODE_CHARS):
        for sub in split_runs(text[i : i + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
            if allow_special:
                ids.extend(enc.encode(sub, allowed_special="all"))
            else:
                ids.extend(enc.encode(sub, disallowed_special=()))
    return ids


def main():
    folder, inputs_path, output_path = sys.argv[1:4]
    ranks = load_ranks(f"{folder}/tiktoken.model")
    with open(f"{folder}/tokenizer_config.json", encoding="utf-8") as f:
        decoder = json.load(f)["added_tokens_decoder"]
    names = {int(k): v["content"] for k, v in decoder.items()}
    n = len(ranks)
    specials = {
        names.get(i, f"<|reserved_token_{i}|>"): i
        for i in range(n, n + NUM_RESERVED_SPECIAL_TOKENS + 2)
    }
    enc = tiktoken.Encoding(
        name="kimi_parity", pat_str=PAT_STR, mergeable_ranks=ranks,
        special_tokens=specials)
    with open(inputs_path, encoding="utf-8") as f:
        texts = json.load(f)
    results = [
        {"special": kimi_encode(enc, t, True), "ordinary": kimi_encode(enc, t, False)}
        for t in texts
    ]
    with open(output_path, "w", encoding="utf-8") as f:
        json.dump({"pat_str": PAT_STR, "tiktoken_version": tiktoken.__version__,
                   "results": results}, f)


if __name__ == "__main__":
    main()
