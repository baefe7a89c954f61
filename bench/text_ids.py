#!/usr/bin/env python3
"""bench/text_ids.py -- text to an ids file and back, with a model's tokenizer.json (the `tokenizers` package).

    python3 bench/text_ids.py encode MODEL_DIR TEXT_FILE IDS_FILE [--max-tokens N] [--bos]
    python3 bench/text_ids.py decode MODEL_DIR IDS_FILE [TEXT_FILE]

An ids file is whitespace-separated integers (what example_decoder's --ids and --prompt-ids read), written here
20 to a line. `-` as TEXT_FILE or IDS_FILE means standard input or output. encode adds no special tokens unless
--bos (the model's bos_token_id from config.json first); --max-tokens keeps the first N ids. decode prints special
tokens as they are.
"""
import argparse
import json
import os
import sys


def load_tokenizer(model_dir):
    from tokenizers import Tokenizer
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        sys.exit(f"text_ids.py: {path} not found")
    return Tokenizer.from_file(path)


def read_text(path):
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path, text):
    if path == "-":
        sys.stdout.write(text)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def format_ids(ids, per_line=20):
    return "".join(" ".join(map(str, ids[i:i + per_line])) + "\n" for i in range(0, len(ids), per_line))


def parse_ids(text, vocab_size, where, prog="text_ids.py"):
    """The ids of an ids file's text, each checked against the vocabulary (exits with a message otherwise)."""
    ids = []
    for n, word in enumerate(text.split()):
        try:
            i = int(word)
        except ValueError:
            sys.exit(f"{prog}: {where}: word {n} is {word!r}, not an integer")
        if not 0 <= i < vocab_size:
            sys.exit(f"{prog}: {where}: id {i} (word {n}) is outside the vocabulary [0, {vocab_size})")
        ids.append(i)
    return ids


def encode(args):
    tok = load_tokenizer(args.model_dir)
    ids = tok.encode(read_text(args.text_file), add_special_tokens=False).ids
    if args.bos:
        with open(os.path.join(args.model_dir, "config.json")) as f:
            bos = json.load(f).get("bos_token_id")
        if bos is None:
            sys.exit("text_ids.py: --bos, but config.json has no bos_token_id")
        ids = [bos] + ids
    if args.max_tokens is not None:
        ids = ids[:args.max_tokens]
    write_text(args.ids_file, format_ids(ids))
    print(f"text_ids.py: {len(ids)} ids -> {args.ids_file}", file=sys.stderr)


def decode(args):
    tok = load_tokenizer(args.model_dir)
    ids = parse_ids(read_text(args.ids_file), tok.get_vocab_size(with_added_tokens=True), args.ids_file)
    write_text(args.text_file, tok.decode(ids, skip_special_tokens=False))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("encode", help="text -> ids")
    e.add_argument("model_dir")
    e.add_argument("text_file")
    e.add_argument("ids_file")
    e.add_argument("--max-tokens", type=int)
    e.add_argument("--bos", action="store_true", help="start with the model's bos_token_id")
    d = sub.add_parser("decode", help="ids -> text")
    d.add_argument("model_dir")
    d.add_argument("ids_file")
    d.add_argument("text_file", nargs="?", default="-")
    args = ap.parse_args()
    encode(args) if args.command == "encode" else decode(args)


if __name__ == "__main__":
    main()
