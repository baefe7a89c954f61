#!/usr/bin/env python3
"""bench/eval_text.py -- builds the evaluation text of bench/real_model.sh from this project's own writing.

    python3 bench/eval_text.py [--root DIR] [-o FILE]

The text is the prose of README.md (fenced code blocks dropped, everything else as written) followed by the top
comment of every public header include/gqa/*.hpp (the `//` block above the first line of code, comment markers
removed). Nothing in it is copied from elsewhere: it is all gqa's documentation.

The committed bench/eval/gqa_docs.txt is this script's output at the time the set was fixed; the perplexity
figures are measured on that file (tokenized into bench/eval/gqa_docs.ids), not on a fresh run of this script,
so that they stay comparable while the README changes. Run it again only to build a new set on purpose.

Held out: calibration or uptraining text for conversion experiments must not come from README.md or the public
headers' top comments (use, for example, comments from include/gqa/detail/ or the tests), so that this set stays
unseen by whatever is fitted.
"""
import argparse
import glob
import os
import re
import sys


def readme_prose(path):
    out, in_code = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            if not in_code:
                out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "".join(out)).strip() + "\n"


def header_comment(path):
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("//"):
                break
            lines.append(re.sub(r"^// ?", "", line))
    return "".join(lines).strip() + "\n"


def build(root):
    parts = [readme_prose(os.path.join(root, "README.md"))]
    for header in sorted(glob.glob(os.path.join(root, "include", "gqa", "*.hpp"))):
        comment = header_comment(header)
        if comment.strip():
            parts.append(comment)
    return "\n".join(parts)


def main():
    here = os.path.dirname(os.path.realpath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.path.dirname(here), help="the repository (default: this script's)")
    ap.add_argument("-o", "--output", default="-", help="output file (default: standard output)")
    args = ap.parse_args()
    text = build(args.root)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"eval_text.py: {len(text)} characters -> {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
