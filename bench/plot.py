#!/usr/bin/env python3
"""Plot decode time per token and KV-cache bytes against G from bench_decode JSON (--benchmark_out).

Usage: plot.py DECODE_JSON... [-o decode_vs_G.png] [--seq S] [--machine TEXT]

Two panels: (left) time per generated token against G, one line per (kv type, threads), with the roofline floor
T_floor = max(kv_bytes / stream GB/s, 4*S*D*H / sgemm GFLOP/s) of the same run dashed; (right) the K+V bytes a
decode step reads against G. S defaults to the largest cache length in the file. The log axes are labelled with
plain numbers (1, 2, 5, 10, ...), and the title names the machine (--machine, else machine.txt next to the JSON,
written by compare_g.sh), the date and the load average of the run. Needs matplotlib (pip install matplotlib, or
apt-get install python3-matplotlib); parsing is report.py's.
"""

import argparse
import sys

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing report.py
from report import Index, decode_floor, load_averages, load_runs, machine_name  # noqa: E402


def plain_log_axis(axis, ticker):
    """Ticks at 1, 2, 5 x 10^k written as plain numbers (0.5, 2, 20, 500), not as 10^k powers."""
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_minor_locator(ticker.NullLocator())
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("-o", "--output", default="decode_vs_G.png")
    ap.add_argument("--seq", type=int, default=None, help="cache length S to plot (default: the largest)")
    ap.add_argument("--machine", default=None, help="machine name for the title (default: machine.txt)")
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker as ticker
    except ImportError:
        print("plot.py needs matplotlib: pip install matplotlib (or apt-get install python3-matplotlib)")
        return 2

    runs, contexts = load_runs(args.json)
    ix = Index(runs)
    decode = ix.all("decode")
    if not decode:
        print("plot.py: no decode/... benchmarks in " + " ".join(args.json))
        return 2
    S = args.seq or max(r.get("S") for r in decode)
    decode = [r for r in decode if r.get("S") == S]
    H, D = decode[0].get("H"), decode[0].get("D")

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    kv_order = {"f32": 0, "bf16": 1, "f16": 2, "i8": 3}
    series = sorted({(r.get("kv"), r.get("threads")) for r in decode}, key=lambda k: (kv_order.get(k[0], 9), k[1]))
    for i, (kv, t) in enumerate(series):
        pts = sorted((r for r in decode if r.get("kv") == kv and r.get("threads") == t), key=lambda r: r.get("G"))
        gs = [r.get("G") for r in pts]
        color = colors[i % len(colors)]
        ax_t.plot(gs, [r.seconds * 1e3 for r in pts], "o-", color=color, label=f"{kv}, {t} thread{'s' * (t > 1)}")
        floors = [(r.get("G"), decode_floor(ix, r)[0]) for r in pts]
        floors = [(g, f) for g, f in floors if f]
        if floors:
            ax_t.plot([g for g, _ in floors], [f * 1e3 for _, f in floors], "--", color=color, alpha=0.6)
    for kv in sorted({r.get("kv") for r in decode}, key=lambda k: kv_order.get(k, 9)):
        pts = {r.get("G"): r.counters.get("kv_bytes", 0) for r in decode if r.get("kv") == kv}
        gs = sorted(pts)
        ax_b.plot(gs, [pts[g] / 2**20 for g in gs], "s-", label=f"kv:{kv}")

    for ax in (ax_t, ax_b):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        gs = sorted({r.get("G") for r in decode})
        ax.set_xticks(gs)
        ax.set_xticklabels([str(g) for g in gs])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        plain_log_axis(ax.yaxis, ticker)
        ax.set_xlabel(f"G (KV heads; H = {H}: G = {H} is MHA, G = 1 is MQA)")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.plot([], [], "--", color="gray", label="T_floor (dashed, same colour)")
    ax_t.legend(fontsize=8)
    ax_b.legend(fontsize=8)
    ax_t.set_ylabel("time per token (ms, log scale)")
    ax_t.set_title(f"Decode, B=1, H={H}, D={D}, cache S={S}")
    ax_b.set_ylabel("K+V bytes read per token (MiB, one layer, log scale)")
    ax_b.set_title(f"KV-cache bytes, S={S}")
    context = next(iter(contexts.values()), {})
    loads = load_averages(contexts)
    threads = ", ".join(str(t) for t in sorted({r.get("threads") for r in decode}))
    machine = args.machine or machine_name(args.json) or f"{context.get('num_cpus', '?')} CPUs"
    fig.suptitle(f"{machine}; threads {threads}; {context.get('date', '?')}; load average "
                 f"{', '.join(f'{x:.2f}' for x in loads) if loads else '?'} at the start", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
