#!/usr/bin/env python3
"""Turn bench_decode / bench_prefill JSON (--benchmark_out) into the G-comparison tables and the ratio checks.

Usage: report.py [--strict] [--smoke] FILE_OR_DIR...     (a directory means every *.json in it)

Python 3 standard library only. Benchmark names are `/`-separated `key:value` fields (bench/README.md), e.g.
decode/H:32/G:8/D:128/S:16384/kv:f32/threads:2. With --benchmark_repetitions, the best (lowest) wall-clock time
of the repetitions is used for every benchmark, baselines included. Ratios are only formed between numbers from the
same JSON file, i.e. the same binary run (baselines are looked up in the file of the benchmark first).
The output leads with the headline: decode at S = 16384 (or the longest cache run), f32, the most threads.
A machine.txt next to the JSON (written by compare_g.sh) names the machine. --strict exits 1 when a ratio check
fails; --smoke marks a compare_g.sh --smoke run, whose tiny shapes make the checks meaningless.
"""

import json
import math
import os
import sys
from collections import defaultdict

# The ratio checks (README "Performance" reports them); change them here only.
DECODE_S = 16384          # the headline decode cache length
FLOOR_MAX = 1.25          # decode time <= 1.25 x T_floor
GQA8_OVER_MHA_MIN = 3.0   # decode G=8 vs G=32
BF16_OVER_F32_MIN = 1.7   # bf16 cache throughput vs fp32, at G = 32 and G = 8
F16_OVER_BF16_MIN = 0.9   # f16 cache throughput vs bf16, every G and thread count
I8_OVER_BF16_MIN = 1.7    # int8 cache throughput vs bf16, at G = 32 and G = 8
PREFILL_S = 4096          # prefill causal S = 4096, G = 8: >= 60% of sgemm GFLOP/s
PREFILL_SGEMM_MIN = 0.60
REF_SPEEDUP_MIN = 20.0    # prefill vs the naive reference at S = 2048
THREADS_SCALING_MIN = 1.8  # 2 threads vs 1 thread

_UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


class Run:
    """One benchmark: its name fields and the best repetition (lowest real_time)."""

    def __init__(self, name, source):
        self.name = name
        self.source = source
        parts = name.split("/")
        self.kind = "/".join(p for p in parts if ":" not in p)   # decode, prefill, reference/decode, baseline/sgemm
        self.f = {}
        for p in parts:
            if ":" in p:
                k, v = p.split(":", 1)
                self.f[k] = int(v) if v.lstrip("-").isdigit() else v
        self.seconds = math.inf   # wall-clock seconds per iteration, best repetition
        self.counters = {}
        self.reps = 0

    def get(self, key, default=None):
        return self.f.get(key, default)


def load_runs(paths):
    """Runs from Google Benchmark JSON files (or directories of them); returns (runs, contexts)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".json"))
        else:
            files.append(p)
    runs, contexts = {}, {}
    for path in files:
        with open(path) as fh:
            data = json.load(fh)
        contexts[path] = data.get("context", {})
        for b in data.get("benchmarks", []):
            if b.get("run_type", "iteration") != "iteration" or b.get("error_occurred"):
                continue
            name = b.get("run_name", b["name"])
            run = runs.setdefault((path, name), Run(name, path))
            run.reps += 1
            t = b["real_time"] * _UNIT[b.get("time_unit", "ns")]
            if t < run.seconds:
                run.seconds = t
                run.counters = {k: v for k, v in b.items() if isinstance(v, (int, float))}
    return list(runs.values()), contexts


class Index:
    """Look-ups of runs by kind and fields, preferring the same source file (the same binary run)."""

    def __init__(self, runs):
        self.runs = runs

    def find(self, kind, source=None, **fields):
        hits = [r for r in self.runs if r.kind == kind and all(r.get(k) == v for k, v in fields.items())]
        same = [r for r in hits if r.source == source]
        pool = same or hits
        return min(pool, key=lambda r: r.seconds) if pool else None

    def all(self, kind):
        return [r for r in self.runs if r.kind == kind]

    def stream_gbps(self, decode_run):
        """The stream read of the decode run's own cache (same shape, kv type and threads, same file first)."""
        r = decode_run
        s = self.find("baseline/stream_read", r.source, B=r.get("B"), H=r.get("H"), G=r.get("G"), D=r.get("D"),
                      S=r.get("S"), kv=r.get("kv"), threads=r.get("threads"))
        return (s.counters.get("GBps"), s) if s else (None, None)

    def sgemm_gflops(self, threads, source):
        """The machine's compute rate at `threads`: the best sgemm shape measured (the strictest floor)."""
        cands = [r for r in self.all("baseline/sgemm") if r.get("threads") == threads]
        same = [r for r in cands if r.source == source] or cands
        if not same:
            return None, None
        best = max(same, key=lambda r: r.counters.get("GFLOPs", 0))
        return best.counters.get("GFLOPs"), best


def fmt_time(s):
    if s is None or s == math.inf:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}" if s / scale < 100 else f"{s / scale:.0f} {unit}"
    return f"{s * 1e9:.0f} ns"


def fmt_bytes(b):
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.4g} {unit}"
    return f"{b:.0f} B"


def fmt_x(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}x"


def fmt_pct(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def table(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def decode_floor(ix, r):
    """(T_floor seconds, 'mem' or 'flop', stream GBps, sgemm GFLOPs) for a decode run, same file and threads."""
    t = r.get("threads")
    kv_bytes = r.counters.get("kv_bytes")
    gbps, _ = ix.stream_gbps(r) if kv_bytes else (None, None)
    gflops, _ = ix.sgemm_gflops(t, r.source)
    flops = 4.0 * r.get("S") * r.get("D") * r.get("H") * r.get("B", 1)
    t_mem = kv_bytes / (gbps * 1e9) if gbps else None
    t_flop = flops / (gflops * 1e9) if gflops else None
    if t_mem is None and t_flop is None:
        return None, "-", gbps, gflops
    if t_flop is None or (t_mem is not None and t_mem >= t_flop):
        return t_mem, "mem", gbps, gflops
    return t_flop, "flop", gbps, gflops


class Checks:
    def __init__(self):
        self.lines = []
        self.failed = 0
        self.total = 0

    def check(self, label, value, ok, detail):
        if value is None:
            self.lines.append(f"  n/a   {label}: not measured in this run")
            return
        self.total += 1
        self.failed += 0 if ok else 1
        self.lines.append(f"  {'ok  ' if ok else 'FAIL'}  {label}: {detail}")


KV_ORDER = {"f32": 0, "bf16": 1, "f16": 2, "i8": 3}


def headline_s(runs):
    return DECODE_S if any(r.get("S") == DECODE_S for r in runs) else max(r.get("S") for r in runs)


def headline_section(ix, out):
    """The README's table: one line per G at the headline shape, f32 cache, the most threads measured."""
    runs = ix.all("decode")
    S = headline_s(runs)
    f32 = [r for r in runs if r.get("S") == S and r.get("kv") == "f32"] or [r for r in runs if r.get("S") == S]
    t = max(r.get("threads") for r in f32)
    kv = f32[0].get("kv")
    rows = []
    for r in sorted((r for r in f32 if r.get("threads") == t), key=lambda r: -r.get("G")):
        G, H = r.get("G"), r.get("H")
        floor, bound, _, _ = decode_floor(ix, r)
        mha = ix.find("decode", r.source, S=S, kv=kv, threads=t, G=H)
        kind = " (MHA)" if G == H else " (MQA)" if G == 1 else ""
        own = r.counters.get("GBps")
        rows.append([f"{G}{kind}", fmt_bytes(r.counters.get("kv_bytes")), fmt_time(r.seconds),
                     fmt_x(mha.seconds / r.seconds) if mha else "-", f"{own:.1f}" if own else "-",
                     f"{r.seconds / floor:.2f}" if floor else "-",
                     {"mem": "memory", "flop": "flops"}.get(bound, "-")])
    shape = f32[0]
    out.append(f"Decode, one token: B = 1, H = {shape.get('H')}, D = {shape.get('D')}, cache S = {S}, {kv} cache, "
               f"{t} thread{'s' * (t > 1)}")
    out.append(table(["G", "KV bytes", "time/token", "vs MHA", "GB/s", "t/T_floor", "floor bound by"], rows))
    out.append("T_floor = max(KV bytes / stream read of the same cache, 4*S*D*H / sgemm rate), same run and threads.")


def decode_grid_section(ix, out):
    """Every (kv, threads) time at the headline S in one table, with the bf16 and 2-thread speedups."""
    runs = ix.all("decode")
    S = headline_s(runs)
    at_s = [r for r in runs if r.get("S") == S]
    cols = sorted({(r.get("kv"), r.get("threads")) for r in at_s}, key=lambda k: (KV_ORDER.get(k[0], 9), k[1]))
    if len(cols) < 2:
        return
    tmax = max(t for _, t in cols)
    rows = []
    for G in sorted({r.get("G") for r in at_s}, reverse=True):
        cell = {(kv, t): ix.find("decode", None, S=S, kv=kv, threads=t, G=G) for kv, t in cols}
        row = [G] + [fmt_time(cell[c].seconds) if cell[c] else "-" for c in cols]
        a, b = cell.get(("f32", tmax)), cell.get(("bf16", tmax))
        row.append(fmt_x(a.seconds / b.seconds) if a and b else "-")
        for kv in ("f32", "bf16"):
            one, many = cell.get((kv, 1)), cell.get((kv, tmax))
            row.append(fmt_x(one.seconds / many.seconds) if one and many and tmax > 1 else "-")
        rows.append(row)
    out.append(f"\nDecode at S = {S}, time per token, every cache type and thread count")
    out.append(table(["G"] + [f"{kv} {t}thr" for kv, t in cols] +
                     [f"bf16/f32 {tmax}thr", f"f32 {tmax}/1thr", f"bf16 {tmax}/1thr"], rows))


def cache_types_section(ix, checks, out):
    """Bytes and time per token of every cache type at the headline S (one row per G and thread count), the f16 and
    int8 throughput against bf16, and their checks."""
    runs = ix.all("decode")
    S = headline_s(runs)
    at_s = [r for r in runs if r.get("S") == S]
    kvs = sorted({r.get("kv") for r in at_s}, key=lambda k: KV_ORDER.get(k, 9))
    if len(kvs) < 2:
        return
    rows, f16_ratios, i8_ratios = [], [], []
    for G in sorted({r.get("G") for r in at_s}, reverse=True):
        for t in sorted({r.get("threads") for r in at_s}):
            cell = {kv: ix.find("decode", None, S=S, kv=kv, threads=t, G=G) for kv in kvs}
            bf = cell.get("bf16")
            row = [G, t]
            for kv in kvs:
                r = cell[kv]
                kv_bytes = r.counters.get("kv_bytes") if r else None
                per_token = kv_bytes / (S * r.get("B", 1)) if kv_bytes else None
                row += [fmt_bytes(per_token), fmt_time(r.seconds) if r else "-"]
            for kv, ratios in (("f16", f16_ratios), ("i8", i8_ratios)):
                r = cell.get(kv)
                # Same binary run only: ratios of different runs would mix machine states.
                same = bf and r and ix.find("decode", bf.source, S=S, kv=kv, threads=t, G=G)
                x = bf.seconds / same.seconds if same else None
                row.append(fmt_x(x))
                if x is not None:
                    ratios.append((x, G, t))
            rows.append(row)
    out.append(f"\nCache types at S = {S}: KV bytes one token adds (all G heads, K and V; int8 counts its scales) and "
               f"time per token")
    header = ["G", "thr"]
    for kv in kvs:
        header += [f"{kv} B/token", f"{kv} time"]
    out.append(table(header + ["f16 vs bf16", "i8 vs bf16"], rows))
    out.append("(vs bf16: throughput ratio, bf16 time / that time; > 1 is faster than bf16)")
    worst = min(f16_ratios) if f16_ratios else None
    checks.check(f"decode S={S}, every G and thread count: f16 >= {F16_OVER_BF16_MIN:g}x bf16 throughput", worst,
                 worst is not None and worst[0] >= F16_OVER_BF16_MIN,
                 f"worst {worst[0]:.2f}x at G={worst[1]}, {worst[2]}thr" if worst else "")
    for G in (32, 8):
        sel = [x for x in i8_ratios if x[1] == G]
        worst = min(sel) if sel else None
        checks.check(f"decode S={S} G={G}, every thread count: i8 >= {I8_OVER_BF16_MIN:g}x bf16 throughput", worst,
                     worst is not None and worst[0] >= I8_OVER_BF16_MIN,
                     f"worst {worst[0]:.2f}x at {worst[2]}thr" if worst else "")


def decode_checks(ix, checks):
    runs = ix.all("decode")
    S = headline_s(runs)
    f32 = [r for r in runs if r.get("S") == S and r.get("kv") == "f32"]
    for t in sorted({r.get("threads") for r in f32}):
        ratios = []
        for r in sorted((r for r in f32 if r.get("threads") == t), key=lambda r: -r.get("G")):
            floor = decode_floor(ix, r)[0]
            if floor:
                ratios.append((r.seconds / floor, r.get("G")))
        worst = max(ratios) if ratios else None
        checks.check(f"decode f32 S={S} {t}thr, every G: time <= {FLOOR_MAX} x T_floor", worst,
                     worst is not None and worst[0] <= FLOOR_MAX,
                     f"worst {worst[0]:.2f} at G={worst[1]}" if worst else "")
        mha = ix.find("decode", None, S=S, kv="f32", threads=t, G=32)
        g8 = ix.find("decode", mha.source if mha else None, S=S, kv="f32", threads=t, G=8)
        x = mha.seconds / g8.seconds if mha and g8 else None
        checks.check(f"decode f32 S={S} {t}thr: G=8 over MHA >= {GQA8_OVER_MHA_MIN:g}x", x,
                     x is not None and x >= GQA8_OVER_MHA_MIN, fmt_x(x))
    for t in sorted({r.get("threads") for r in runs if r.get("kv") == "bf16" and r.get("S") == S}):
        for G in (32, 8):
            a = ix.find("decode", None, S=S, kv="f32", threads=t, G=G)
            b = ix.find("decode", a.source if a else None, S=S, kv="bf16", threads=t, G=G)
            x = a.seconds / b.seconds if a and b else None
            checks.check(f"decode S={S} {t}thr G={G}: bf16 >= {BF16_OVER_F32_MIN:g}x f32 throughput", x,
                         x is not None and x >= BF16_OVER_F32_MIN, fmt_x(x))
    for kv in ("f32", "bf16"):
        pairs = []
        for r in runs:
            if r.get("S") == S and r.get("kv") == kv and r.get("threads") == 2:
                r1 = ix.find("decode", r.source, S=S, kv=kv, threads=1, G=r.get("G"))
                if r1:
                    pairs.append((r1.seconds / r.seconds, r.get("G")))
        worst = min(pairs) if pairs else None
        checks.check(f"decode {kv} S={S}, every G: 2 threads >= {THREADS_SCALING_MIN}x 1 thread", worst,
                     worst is not None and worst[0] >= THREADS_SCALING_MIN,
                     f"worst {worst[0]:.2f}x at G={worst[1]}" if worst else "")


def prefill_section(ix, checks, out):
    runs = [r for r in ix.all("prefill") if r.get("S") != 32768]
    if runs:
        rows = []
        for r in sorted(runs, key=lambda r: (-r.get("H"), -r.get("S"), -r.get("G"), r.get("kv"),
                                             -r.get("causal", 0), r.get("threads"))):
            gfl = r.counters.get("GFLOPs")
            sg, _ = ix.sgemm_gflops(r.get("threads"), r.source)
            rows.append([r.get("H"), r.get("G"), r.get("S"), r.get("kv"), "yes" if r.get("causal") else "no",
                         r.get("threads"), fmt_time(r.seconds), f"{gfl:.1f}" if gfl else "-",
                         fmt_pct(gfl / sg) if gfl and sg else "-"])
        out.append("\nPrefill, Sq = Sk = S, B = 1, D = 128 (useful flops: 4*S*S*D*H, half when causal)")
        out.append(table(["H", "G", "S", "kv", "causal", "thr", "time", "GFLOP/s", "of sgemm"], rows))
    mem = [r for r in ix.all("prefill") if r.get("S") == 32768]
    for r in mem:
        out.append(f"Prefill memory run, S = {r.get('S')}, G = {r.get('G')}, {r.get('threads')} threads: "
                   f"{fmt_time(r.seconds)}, peak RSS {r.counters.get('peak_rss_mb', 0):.0f} MiB for "
                   f"{r.counters.get('qkvo_mb', 0):.0f} MiB of Q, K, V, O (one S x S f32 matrix: "
                   f"{r.counters.get('sxs_mb', 0):.0f} MiB)")

    for t in sorted({r.get("threads") for r in runs if r.get("S") == PREFILL_S}):
        r = ix.find("prefill", None, H=32, G=8, S=PREFILL_S, kv="f32", causal=1, threads=t)
        sg = ix.sgemm_gflops(t, r.source)[0] if r else None
        x = r.counters.get("GFLOPs") / sg if r and sg else None
        checks.check(f"prefill causal S={PREFILL_S} H=32 G=8 {t}thr: >= {PREFILL_SGEMM_MIN:.0%} of sgemm GFLOP/s",
                     x, x is not None and x >= PREFILL_SGEMM_MIN, fmt_pct(x) if x else "")
    for G in sorted({r.get("G") for r in runs if r.get("S") == PREFILL_S and r.get("H") == 32}, reverse=True):
        r2 = ix.find("prefill", None, H=32, G=G, S=PREFILL_S, kv="f32", causal=1, threads=2)
        r1 = ix.find("prefill", r2.source if r2 else None, H=32, G=G, S=PREFILL_S, kv="f32", causal=1, threads=1)
        x = r1.seconds / r2.seconds if r1 and r2 else None
        checks.check(f"prefill causal S={PREFILL_S} G={G}: 2 threads >= {THREADS_SCALING_MIN}x 1 thread", x,
                     x is not None and x >= THREADS_SCALING_MIN, fmt_x(x))
    for r in mem:
        peak, tensors, sxs = (r.counters.get(k, 0) for k in ("peak_rss_mb", "qkvo_mb", "sxs_mb"))
        checks.check(f"prefill S={r.get('S')}: no S x S buffer (peak RSS < Q+K+V+O + one S x S matrix)", peak,
                     peak < tensors + sxs, f"{peak - tensors:.0f} MiB above the tensors")


def reference_section(ix, checks, out):
    """Our kernel against the naive double reference at the same (reduced) shapes, 1 thread each."""
    rows = []
    for kind in ("decode", "prefill"):
        for ref in sorted(ix.all("reference/" + kind), key=lambda r: (-r.get("H"), -r.get("G"), r.get("S"))):
            fields = {k: ref.get(k) for k in ("H", "G", "D", "S", "kv", "causal") if ref.get(k) is not None}
            ours = ix.find(kind, None, threads=1, **fields)
            if ours:
                rows.append([kind, ref.get("H"), ref.get("G"), ref.get("S"), fmt_time(ref.seconds),
                             fmt_time(ours.seconds), fmt_x(ref.seconds / ours.seconds, 0)])
    if rows:
        out.append("\nAgainst the naive reference (double, repeat_kv, full score matrix), 1 thread each")
        out.append(table(["", "H", "G", "S", "reference", "gqa", "speedup"], rows))
    ref = ix.find("reference/prefill", None, S=2048, causal=1) or ix.find("reference/prefill", None, S=2048)
    ours = ix.find("prefill", None, H=ref.get("H"), G=ref.get("G"), S=2048, kv=ref.get("kv"),
                   causal=ref.get("causal"), threads=1) if ref else None
    x = ref.seconds / ours.seconds if ref and ours else None
    checks.check(f"prefill S=2048 vs the naive reference, 1 thread each: >= {REF_SPEEDUP_MIN:g}x", x,
                 x is not None and x >= REF_SPEEDUP_MIN, fmt_x(x, 0))


def baseline_section(ix, out):
    """One line per baseline: the range of stream-read bandwidths, and the sgemm rates."""
    streams = ix.all("baseline/stream_read")
    for t in sorted({r.get("threads") for r in streams}):
        gbps = [r.counters.get("GBps", 0) for r in streams if r.get("threads") == t]
        out.append(f"Stream read of the decode caches, {t} thread{'s' * (t > 1)}: "
                   f"{min(gbps):.1f} to {max(gbps):.1f} GB/s over {len(gbps)} caches")
    gemms = ix.all("baseline/sgemm")
    for t in sorted({r.get("threads") for r in gemms}):
        best = {}
        for r in gemms:
            if r.get("threads") == t:
                shape = f"{r.get('M')}x{r.get('N')}x{r.get('K')}"
                best[shape] = max(best.get(shape, 0), r.counters.get("GFLOPs", 0))
        out.append(f"Eigen sgemm, {t} thread{'s' * (t > 1)} (GFLOP/s summed over threads): " +
                   ", ".join(f"{s} {g:.1f}" for s, g in sorted(best.items())))


def load_averages(contexts):
    return [c["load_avg"][0] for c in contexts.values() if c.get("load_avg")]


def machine_name(paths):
    for p in paths:
        d = p if os.path.isdir(p) else os.path.dirname(p) or "."
        try:
            with open(os.path.join(d, "machine.txt")) as fh:
                return fh.read().strip()
        except OSError:
            pass
    return None


def main(argv):
    strict = "--strict" in argv
    smoke = "--smoke" in argv
    paths = [a for a in argv if a not in ("--strict", "--smoke")]
    if not paths:
        print(__doc__.strip())
        return 2
    runs, contexts = load_runs(paths)
    if not any(r.kind == "decode" for r in runs):
        print("report.py: no decode/... benchmark results in " + " ".join(paths))
        return 2
    ix = Index(runs)
    first = next(iter(contexts.values()))
    loads = load_averages(contexts)
    load = ", ".join(f"{x:.2f}" for x in loads) if loads else "?"
    machine = machine_name(paths) or f"{first.get('num_cpus', '?')} CPUs at {first.get('mhz_per_cpu', '?')} MHz"
    out = [f"gqa G comparison: {machine}; {first.get('date', '?')}; load average {load} when the runs started; "
           f"best of {max(r.reps for r in runs)} repetition(s)"]
    if smoke:
        out.append("SMOKE RUN (compare_g.sh --smoke): tiny shapes, one repetition. It checks that the chain works; "
                   "the numbers mean nothing.")
    out.append("")
    checks = Checks()
    headline_section(ix, out)
    decode_grid_section(ix, out)
    decode_checks(ix, checks)
    cache_types_section(ix, checks, out)
    prefill_section(ix, checks, out)
    reference_section(ix, checks, out)
    out.append("")
    baseline_section(ix, out)
    out.append("\nRatio checks, each within one binary run" + (" (informational in a smoke run)" if smoke else ""))
    out += checks.lines
    if checks.failed and not smoke:
        out.append("")
        out.append(f"!! WARNING: {checks.failed} of {checks.total} ratio checks FAILED. Load average when the runs "
                   f"started: {load} (on {first.get('num_cpus', '?')} CPUs).")
        out.append("!! Other work on the machine slows the 2-thread runs most; rerun on a quiet machine before "
                   "reading anything into a failure.")
    elif checks.failed:
        out.append(f"{checks.failed} of {checks.total} checks failed, as tiny shapes on a smoke run may.")
    elif checks.total:
        out.append(f"All {checks.total} ratio checks passed.")
    print("\n".join(out))
    return 1 if strict and checks.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
