#!/usr/bin/env python3
"""bench/real_model_report.py -- the table (and the plot) of bench/real_model.sh from the files of one run.

    python3 bench/real_model_report.py RESULTS_DIR [--png FILE] [--strict]

RESULTS_DIR holds what real_model.sh wrote:
  perplexity.tsv  one line per model: label, G, how it was made, who measured it (example_decoder or
                  transformers), perplexity, scored tokens, window length (tab-separated, no header)
  decode.txt      the last line of every `example_decoder MODEL bench` run: `bench key=value ...` plus G=
  machine.txt     free text naming the machine (lscpu's model name), printed under the table
Prints the perplexity part and the decode part of the table with the issue's bars (PASS/FAIL) and, with --png,
draws decode time per token against G next to the memory roofline (needs matplotlib). --strict: exit 1 when a
bar fails. Standard library only, except matplotlib for the plot.
"""
import argparse
import os
import sys

PPL_DECODER_VS_HF = 0.005   # the bar: decoder within 0.5% of the transformers reference
PPL_EXPANDED_VS_NATIVE = 0.001  # G = 9 (exact expansion) within 0.1% of native
DECODE_RATIO_BAR = 1.5      # context 2048, f32, 2 threads: time per token <= 1.5x the memory roofline
BAR_CONTEXT, BAR_THREADS = 2048, 2


def read_perplexity(path):
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                label, g, how, who, value, tokens, context = line.rstrip("\n").split("\t")
                rows.append(dict(label=label, G=int(g), how=how, who=who, ppl=float(value), tokens=int(tokens),
                                 context=int(context)))
    return rows


def read_decode(path):
    rows = []
    with open(path) as f:
        for line in f:
            words = line.split()
            if not words or words[0] != "bench":
                continue
            kv = dict(w.split("=", 1) for w in words[1:])
            rows.append(dict(G=int(kv["G"]), context=int(kv["context"]), threads=int(kv["threads"]), kv=kv["kv"],
                             tokens=int(kv["tokens"]), ms=float(kv["ms_per_token"]),
                             weight_bytes=float(kv["weight_bytes"]), kv_bytes=float(kv["kv_bytes"]),
                             bytes=float(kv["bytes_per_token"]), stream=float(kv["stream_GBps"]),
                             roofline=float(kv["roofline_ms"]), ratio=float(kv["ratio"])))
    return rows


def verdict(ok):
    return "PASS" if ok else "FAIL"


def perplexity_table(rows):
    failed = []
    native = next((r for r in rows if r["label"] == "native" and r["who"] == "example_decoder"), None)
    hf = next((r for r in rows if r["label"] == "native" and r["who"] == "transformers"), None)
    contexts = ", ".join(str(c) for c in sorted({r["context"] for r in rows}))
    print(f"Perplexity: bench/eval/gqa_docs.ids in windows of {contexts} tokens, each from an empty cache, the first "
          "token of each not scored")
    print(f"| {'model':<22} | {'G':>2} | {'measured by':<16} | {'perplexity':>12} | {'tokens':>6} | {'vs native':>11} |")
    print(f"|{'-' * 24}|{'-' * 4}|{'-' * 18}|{'-' * 14}|{'-' * 8}|{'-' * 13}|")
    for r in rows:
        ratio = r["ppl"] / native["ppl"] if native else None
        rel = "" if ratio is None else f"{ratio:.5f}x" if ratio < 100 else f"{ratio:.0f}x"
        name = r["how"]
        value = f"{r['ppl']:.4f}" if r["ppl"] < 1e5 else f"{r['ppl']:.0f}"
        print(f"| {name:<22} | {r['G']:>2} | {r['who']:<16} | {value:>12} | {r['tokens']:>6} | {rel:>11} |")
    print()
    if native and hf:
        d = abs(native["ppl"] / hf["ppl"] - 1)
        ok = d <= PPL_DECODER_VS_HF and native["tokens"] == hf["tokens"]
        print(f"{verdict(ok)}  example_decoder vs transformers, native model: {d * 100:.4f}% "
              f"(bar {PPL_DECODER_VS_HF * 100:g}%; scored tokens {native['tokens']} vs {hf['tokens']})")
        failed += [] if ok else ["decoder vs HF"]
    expanded = next((r for r in rows if r["label"] == "expanded"), None)
    if native and expanded:
        d = abs(expanded["ppl"] / native["ppl"] - 1)
        ok = d <= PPL_EXPANDED_VS_NATIVE
        print(f"{verdict(ok)}  expanded G = {expanded['G']} vs native G = {native['G']}: {d * 100:.4f}% "
              f"(bar {PPL_EXPANDED_VS_NATIVE * 100:g}%)")
        failed += [] if ok else ["expanded vs native"]
    return failed


def decode_table(rows):
    failed = []
    print("Decode, one token, f32 weights" + (" and KV cache" if all(r["kv"] == "f32" for r in rows) else "")
          + "; roofline = (weight bytes + KV-cache bytes read) / stream read bandwidth of as many bytes, "
          "same process")
    print(f"| {'context':>7} | {'G':>2} | {'thr':>3} | {'ms/token':>8} | {'weights MB':>10} | {'KV MB':>8} | "
          f"{'stream GB/s':>11} | {'roofline ms':>11} | {'ratio':>5} | {'vs G=9':>6} |")
    print(f"|{'-' * 9}|{'-' * 4}|{'-' * 5}|{'-' * 10}|{'-' * 12}|{'-' * 10}|{'-' * 13}|{'-' * 13}|{'-' * 7}|"
          f"{'-' * 8}|")
    ref = {(r["context"], r["threads"], r["kv"]): r["ms"] for r in rows if r["G"] == max(x["G"] for x in rows)}
    for r in sorted(rows, key=lambda r: (r["kv"], r["context"], r["threads"], -r["G"])):
        speed = ref.get((r["context"], r["threads"], r["kv"]))
        vs = f"{speed / r['ms']:.2f}x" if speed else ""
        print(f"| {r['context']:>7} | {r['G']:>2} | {r['threads']:>3} | {r['ms']:>8.2f} | "
              f"{r['weight_bytes'] / 1e6:>10.1f} | {r['kv_bytes'] / 1e6:>8.1f} | {r['stream']:>11.2f} | "
              f"{r['roofline']:>11.2f} | {r['ratio']:>5.2f} | {vs:>6} |")
    print()
    for r in rows:
        if r["context"] == BAR_CONTEXT and r["threads"] == BAR_THREADS and r["kv"] == "f32":
            ok = r["ratio"] <= DECODE_RATIO_BAR
            print(f"{verdict(ok)}  decode at context {BAR_CONTEXT}, f32, {BAR_THREADS} threads, G = {r['G']}: "
                  f"{r['ratio']:.2f}x the roofline (bar {DECODE_RATIO_BAR:g}x)")
            failed += [] if ok else [f"decode G = {r['G']}"]
    return failed


def plot(rows, path, machine):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    threads = sorted({r["threads"] for r in rows})
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(5.2 * len(threads), 4.2), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, t in zip(axes[0], threads):
        for i, c in enumerate(contexts):
            sel = sorted((r for r in rows if r["threads"] == t and r["context"] == c and r["kv"] == "f32"),
                         key=lambda r: r["G"])
            if not sel:
                continue
            g = [r["G"] for r in sel]
            ax.plot(g, [r["ms"] for r in sel], "o-", color=colors[i % len(colors)], label=f"context {c}")
            ax.plot(g, [r["roofline"] for r in sel], "--", color=colors[i % len(colors)], alpha=0.7,
                    label=f"roofline, {c}")
        ax.set_xscale("log", base=3)
        ax.set_xticks(sorted({r["G"] for r in rows}))
        ax.set_xticklabels([str(x) for x in sorted({r["G"] for r in rows})])
        ax.set_xlabel("G (KV heads; H = 9)")
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("decode time per token (ms)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M (f32) on gqa: decode time per token against G" + (f"\n{machine}" if machine else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results")
    ap.add_argument("--png")
    ap.add_argument("--strict", action="store_true")
    args = ap.parse_args()
    failed = []
    machine = ""
    if os.path.exists(os.path.join(args.results, "machine.txt")):
        with open(os.path.join(args.results, "machine.txt")) as f:
            machine = f.read().strip()
    ppl_path = os.path.join(args.results, "perplexity.tsv")
    if os.path.exists(ppl_path):
        failed += perplexity_table(read_perplexity(ppl_path))
        print()
    decode_path = os.path.join(args.results, "decode.txt")
    rows = read_decode(decode_path) if os.path.exists(decode_path) else []
    if rows:
        failed += decode_table(rows)
    if machine:
        print(f"\nmachine: {machine}")
    if rows and args.png:
        try:
            plot(rows, args.png, machine)
        except ImportError:
            print("no plot: matplotlib is not installed")
    if failed:
        print(f"\n{len(failed)} bar(s) failed: {', '.join(failed)}")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
