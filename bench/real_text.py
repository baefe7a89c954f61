#!/usr/bin/env python3
"""bench/real_text.py -- calibration and held-out evaluation ids from real English text already on the machine,
read at run time (nothing of it is committed): Python's documentation topics (pydoc_data.topics), the licence texts
under /usr/share/common-licenses/ and the English manual pages under /usr/share/man/man[1-9]/ (gzip roff).

    python3 bench/real_text.py [MODEL_DIR] [--out DIR] [--calibration-tokens N] [--eval-tokens N] [--ngram N]
                               [--tolerance F] [--self-check]

MODEL_DIR holds the tokenizer.json to use (default /tmp/rm/smol-tf5, SmolLM2-135M's). Writes into --out
(default /tmp/gqa-real-text):
  calibration.ids     pydoc topics of the calibration share, in sorted name order, cut to --calibration-tokens
  eval-pydoc.ids      the other pydoc topics (the held-out share), cut to --eval-tokens
  eval-licenses.ids   the licence files (symlinks to another licence skipped), sorted, cut to --eval-tokens
  eval-man.ids        manual pages in a fixed hash order, cut to --eval-tokens
  split.tsv           which document went where: set, source, name, characters, tokens used
  summary.json        the counts and tokens per set and the overlap check's figures
Ids files are whitespace-separated, 20 to a line (bench/text_ids.py's format), no special tokens; each document is
tokenized on its own (its text plus a blank line) and the documents' ids concatenated.

THE SPLIT (deterministic: sorted names and one hash rule). Pydoc repeats sections under several topics, so topics
that share a --ngram-token sequence are grouped first (transitively); a group is held out when the first 8 hex
digits of sha256("gqa-real-text:" + its smallest topic name), as an integer, are 0 modulo 4; the rest form the
calibration pool, of which the first topics in sorted order give --calibration-tokens (the pool's unused topics are
used nowhere). Licences and manual pages are evaluation only. Manual pages are ordered by sha256 of their path under
/usr/share/man (a fixed pseudo-random order, so the sample is not all one section); a page that is only a ".so"
redirect is skipped. Whatever manual pages are installed is used; the counts are printed.

THE OVERLAP CHECK. No evaluation set may share a --ngram-token sequence (default 32) with the calibration ids beyond
--tolerance (default 0.001) of its positions; the source names of calibration and evaluation are disjoint by
construction and checked. The figures are printed and written to summary.json; the script exits 1 on a failure.

--self-check: the split twice (the same bytes), the roff stripper on a fixed sample, the disjointness, and that the
overlap check catches a calibration slice planted in an evaluation set.
"""
import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import sys

DEFAULT_MODEL = "/tmp/rm/smol-tf5"
LICENSES = "/usr/share/common-licenses"
MAN = "/usr/share/man"


def held_out(name):
    return int(hashlib.sha256(("gqa-real-text:" + name).encode()).hexdigest()[:8], 16) % 4 == 0


# ---- roff to text ----------------------------------------------------------------------------------------------
# Requests whose arguments are text (headings, font macros, list tags); every other request line is dropped.
TEXT_MACROS = {"SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "TP", "IP", "HP", "TQ",
               "UR", "MT", "OP", "Nm", "Nd", "Sh", "Ss", "Fl", "Ar", "Op", "Pa", "Xr", "Dq", "Sq", "Qq", "Em", "Li",
               "Cm", "Ic", "Va", "Fn", "Ev", "Dv", "Er", "It", "Pp"}
NAMED_CHARS = {"em": "--", "en": "-", "hy": "-", "mi": "-", "bu": "*", "co": "(c)", "rg": "(R)", "lq": '"',
               "rq": '"', "oq": "'", "cq": "'", "aq": "'", "dq": '"', "tm": "(TM)", "dg": "+", "de": " degrees",
               "mu": "x", "<=": "<=", ">=": ">=", "->": "->", "<-": "<-", "aa": "'", "ga": "`", "ti": "~", "ha": "^",
               "rs": "\\", "ba": "|", "br": "|", "sq": "*", "pl": "+", "eq": "="}


def roff_escapes(line):
    line = line.replace("\\e", "\0")                               # a literal backslash, put back last
    line = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", line)               # font changes
    line = re.sub(r"\\s[+-]?(\[[^\]]*\]|\(..|\d+)", "", line)        # size changes
    line = re.sub(r"\\\*(\[[^\]]*\]|\(..|.)", "", line)              # string interpolation (undefined here)
    line = re.sub(r"\\\((..)", lambda m: NAMED_CHARS.get(m.group(1), ""), line)
    line = re.sub(r"\\\[([^\]]*)\]", lambda m: NAMED_CHARS.get(m.group(1), ""), line)
    line = re.sub(r"\\[hvwlLoDbXNRZk]'[^']*'", "", line)              # motions, drawings, widths
    line = re.sub(r"\\[nmgV](\[[^\]]*\]|\(..|.)", "", line)           # registers, colours
    line = line.replace("\\-", "-").replace("\\ ", " ").replace("\\~", " ")
    line = re.sub(r"\\[&|^%:c)/,!]", "", line)
    line = re.sub(r"\\\"", "", line)
    line = re.sub(r"\\(.)", r"\1", line)                              # any other escape: its character
    return re.sub(r"[ \t]+", " ", line.replace("\0", "\\"))


def roff_to_text(source):
    out = []
    for raw in source.splitlines():
        if raw.startswith(('.\\"', "'\\\"", '.\\#')) or raw.startswith('\\"'):
            continue
        line = re.sub(r'\\".*$', "", raw)                                # trailing comment
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts or parts[0] not in TEXT_MACROS or len(parts) < 2:
                if parts and parts[0] in ("PP", "LP", "P", "sp", "br", "Pp"):
                    out.append("")
                continue
            args = re.findall(r'"[^"]*"|\S+', parts[1])
            line = " ".join(a.strip('"') for a in args)
            if parts[0] in ("B", "I", "SM", "SB"):
                pass
            elif parts[0] in ("BI", "BR", "IB", "IR", "RB", "RI"):
                line = "".join(a.strip('"') for a in args)                # alternating fonts join without spaces
        out.append(roff_escapes(line).rstrip())
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


# ---- sources ---------------------------------------------------------------------------------------------------
def pydoc_topics():
    from pydoc_data.topics import topics
    return sorted(topics.items())


def licence_files():
    docs = []
    for name in sorted(os.listdir(LICENSES)):
        path = os.path.join(LICENSES, name)
        if os.path.islink(path) or not os.path.isfile(path):   # GPL -> GPL-3: the target is read under its own name
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.append((name, f.read()))
    return docs


def man_pages():
    paths = []
    for section in sorted(glob.glob(os.path.join(MAN, "man[1-9]"))):
        paths += [p for p in glob.glob(os.path.join(section, "*.gz")) if os.path.isfile(p)]
    rel = sorted((os.path.relpath(p, MAN) for p in paths), key=lambda r: (hashlib.sha256(r.encode()).hexdigest(), r))
    for r in rel:
        with gzip.open(os.path.join(MAN, r), "rt", encoding="utf-8", errors="replace") as f:
            source = f.read()
        if source.lstrip().startswith(".so "):
            continue
        yield r, roff_to_text(source)


# ---- building the sets -----------------------------------------------------------------------------------------
def take(docs, tokenizer, budget, source, set_name, listing):
    """Tokenizes documents in order until `budget` tokens; records each used document in `listing`."""
    ids = []
    for name, text in docs:
        if len(ids) >= budget:
            break
        doc = tokenizer.encode(text + "\n\n", add_special_tokens=False).ids
        used = doc[: budget - len(ids)]
        ids += used
        listing.append((set_name, source, name, len(text), len(used)))
    return ids


def topic_groups(topics, tokenizer, n):
    """Topic name -> the smallest name of its group: topics that share an n-token sequence (pydoc repeats sections
    under several topics: a quarter of the held-out positions did before grouping), joined transitively."""
    parent = {name: name for name, _ in topics}

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    seen = {}
    for name, text in topics:
        ids = tokenizer.encode(text + "\n\n", add_special_tokens=False).ids
        for i in range(len(ids) - n + 1):
            other = seen.setdefault(tuple(ids[i:i + n]), name)
            a, b = root(name), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {name: root(name) for name, _ in topics}


def build(tokenizer, calibration_tokens, eval_tokens, n=32):
    listing = []
    topics = pydoc_topics()
    group = topic_groups(topics, tokenizer, n)
    pool = [(name, t) for name, t in topics if not held_out(group[name])]
    heldout = [(name, t) for name, t in topics if held_out(group[name])]
    sets = {
        "calibration": take(pool, tokenizer, calibration_tokens, "pydoc", "calibration", listing),
        "eval-pydoc": take(heldout, tokenizer, eval_tokens, "pydoc", "eval-pydoc", listing),
        "eval-licenses": take(licence_files(), tokenizer, eval_tokens, "licenses", "eval-licenses", listing),
        "eval-man": take(man_pages(), tokenizer, eval_tokens, "man", "eval-man", listing),
    }
    return sets, listing


def ngrams(ids, n):
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


def overlap(calibration, ids, n, calib_grams=None):
    """Positions of `ids` whose n-gram occurs in the calibration ids, and the number of positions."""
    grams = calib_grams if calib_grams is not None else ngrams(calibration, n)
    total = max(len(ids) - n + 1, 0)
    shared = sum(1 for i in range(total) if tuple(ids[i:i + n]) in grams)
    return shared, total


def check(sets, listing, n, tolerance):
    """The overlap and disjointness figures; ok False if any exceeds its bound."""
    calib_names = {(s, name) for st, s, name, _, _ in listing if st == "calibration"}
    report, ok = {}, True
    grams = ngrams(sets["calibration"], n)
    for name, ids in sets.items():
        if name == "calibration":
            continue
        shared, total = overlap(sets["calibration"], ids, n, grams)
        eval_names = {(s, d) for st, s, d, _, _ in listing if st == name}
        fraction = shared / total if total else 0.0
        report[name] = {"ngram": n, "shared_positions": shared, "positions": total, "fraction": fraction,
                        "names_shared_with_calibration": sorted("/".join(x) for x in eval_names & calib_names)}
        ok &= fraction <= tolerance and not (eval_names & calib_names)
    return report, ok


def write_ids(path, ids):
    with open(path, "w") as f:
        for i in range(0, len(ids), 20):
            f.write(" ".join(map(str, ids[i:i + 20])) + "\n")


def write_outputs(out, sets, listing, summary):
    os.makedirs(out, exist_ok=True)
    for name, ids in sets.items():
        write_ids(os.path.join(out, name + ".ids"), ids)
    with open(os.path.join(out, "split.tsv"), "w") as f:
        f.write("set\tsource\tname\tcharacters\ttokens\n")
        for row in listing:
            f.write("\t".join(map(str, row)) + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")


def summarize(sets, listing, report, args):
    per_set = {}
    for name, ids in sets.items():
        docs = [r for r in listing if r[0] == name]
        per_set[name] = {"documents": len(docs), "tokens": len(ids), "characters": sum(r[3] for r in docs)}
    return {"tokenizer": args.tokenizer, "calibration_tokens": args.calibration_tokens,
            "eval_tokens": args.eval_tokens, "sets": per_set, "overlap": report, "tolerance": args.tolerance,
            "installed": {"pydoc_topics": len(pydoc_topics()), "licence_files": len(licence_files()),
                          "man_pages_gz": len(glob.glob(os.path.join(MAN, "man[1-9]", "*.gz")))}}


def self_check(tokenizer, args):
    failures = []
    sample = ('.\\" a comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\n'
              '.BR ls (1)\nuse \\(em or \\[em] and \\*(Rg \\e\\& here\n.TP\n.B \\-a\nall\n')
    expected = "NAME\nls - list directory contents\n\nls(1)\nuse -- or -- and \\ here\n-a\nall\n"
    if roff_to_text(sample) != expected:
        failures.append("roff_to_text gave %r, expected %r" % (roff_to_text(sample), expected))
    small = max(2000, args.calibration_tokens // 10)
    a, la = build(tokenizer, small, small, args.ngram)
    b, lb = build(tokenizer, small, small, args.ngram)
    if a != b or la != lb:
        failures.append("two builds differ: the split is not deterministic")
    report, ok = check(a, la, args.ngram, args.tolerance)
    if not ok:
        failures.append("overlap or shared names: %s" % json.dumps(report))
    planted = dict(a)
    planted["eval-pydoc"] = a["eval-pydoc"][:500] + a["calibration"][100:100 + 2 * args.ngram] + a["eval-pydoc"][500:]
    shared, _ = overlap(planted["calibration"], planted["eval-pydoc"], args.ngram)
    if shared < args.ngram + 1:
        failures.append("a planted %d-token calibration slice gave only %d shared positions" % (2 * args.ngram, shared))
    for name, ids in a.items():
        if not ids:
            failures.append(name + " is empty")
    for f in failures:
        print("real_text.py --self-check: FAILED: " + f, file=sys.stderr)
    print("real_text.py --self-check: %s (%d checks failed)" % ("ok" if not failures else "FAILED", len(failures)))
    return 0 if not failures else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--out", default="/tmp/gqa-real-text")
    p.add_argument("--calibration-tokens", type=int, default=65536)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--ngram", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=0.001)
    p.add_argument("--self-check", action="store_true")
    args = p.parse_args()
    args.tokenizer = os.path.join(args.model_dir, "tokenizer.json")
    if not os.path.isfile(args.tokenizer):
        sys.exit("real_text.py: %s not found (MODEL_DIR must hold tokenizer.json)" % args.tokenizer)
    if args.calibration_tokens < 1 or args.eval_tokens < 1 or args.ngram < 1:
        sys.exit("real_text.py: --calibration-tokens, --eval-tokens and --ngram must be >= 1")
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(args.tokenizer)
    if args.self_check:
        return self_check(tokenizer, args)
    sets, listing = build(tokenizer, args.calibration_tokens, args.eval_tokens, args.ngram)
    report, ok = check(sets, listing, args.ngram, args.tolerance)
    summary = summarize(sets, listing, report, args)
    write_outputs(args.out, sets, listing, summary)
    for name, s in summary["sets"].items():
        extra = ""
        if name in report:
            r = report[name]
            extra = ", %d of %d positions share a %d-gram with calibration (%.4f%%)" % (
                r["shared_positions"], r["positions"], r["ngram"], 100 * r["fraction"])
        print("%-14s %4d documents, %7d characters, %6d tokens%s" % (name, s["documents"], s["characters"],
                                                                     s["tokens"], extra))
    print("installed: %(pydoc_topics)d pydoc topics, %(licence_files)d licence files, %(man_pages_gz)d manual pages"
          % summary["installed"])
    print("written to " + args.out + (": overlap check ok" if ok else ": OVERLAP CHECK FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
