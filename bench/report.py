#!/usr/bin/env python3
"""Turn bench_decode / bench_prefill JSON (--benchmark_out) into the G-comparison table and the PASS/FAIL bars.

Usage: report.py [--strict] FILE_OR_DIR...     (a directory means every *.json in it)

Python 3 standard library only. Benchmark names are `/`-separated `key:value` fields (bench/README.md), e.g.
decode/H:32/G:8/D:128/S:16384/kv:f32/threads:2. With --benchmark_repetitions, the best (lowest) wall-clock time
of the repetitions is used for every benchmark, baselines included. Ratios are only formed between numbers from the
same JSON file, i.e. the same binary run (baselines are looked up in the file of the benchmark first).
--strict exits 1 when a bar fails.
"""

import json
import math
import os
import sys
from collections import defaultdict

# The bars of the issue (README "Benchmarks"); change them here only.
DECODE_S = 16384          # cache length of the decode bars
FLOOR_MAX = 1.25          # decode time <= 1.25 x T_floor
GQA8_OVER_MHA_MIN = 3.0   # decode G=8 vs G=32
BF16_OVER_F32_MIN = 1.7   # bf16 cache throughput vs fp32, at G = 32 and G = 8
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


class Bars:
    def __init__(self):
        self.lines = []
        self.failed = 0

    def check(self, label, value, ok, detail):
        if value is None:
            self.lines.append(f"  [n/a ] {label}: not measured in this run")
            return
        self.lines.append(f"  [{'PASS' if ok else 'FAIL'}] {label}: {detail}")
        self.failed += 0 if ok else 1


def decode_section(ix, bars, out):
    runs = ix.all("decode")
    if not runs:
        return
    kv_order = {"f32": 0, "bf16": 1, "f16": 2}
    keys = sorted({(r.get("S"), r.get("kv"), r.get("threads")) for r in runs},
                  key=lambda k: (k[0], kv_order.get(k[1], 9), k[2]))
    for S in sorted({k[0] for k in keys}):
        shape = next(r for r in runs if r.get("S") == S)
        out.append(f"\nDecode: B=1, Sq=1, H={shape.get('H')}, D={shape.get('D')}, cache S={S} "
                   "(time per generated token; T_floor = max(kv_bytes / stream, 4*S*D*H / sgemm))")
        rows = []
        for _, kv, t in (k for k in keys if k[0] == S):
            for r in sorted((r for r in runs if (r.get("S"), r.get("kv"), r.get("threads")) == (S, kv, t)),
                            key=lambda r: -r.get("G")):
                G = r.get("G")
                floor, bound, gbps, _ = decode_floor(ix, r)
                own_gbps = r.counters.get("GBps")
                mha = ix.find("decode", r.source, S=S, kv=kv, threads=t, G=r.get("H"))
                f32 = ix.find("decode", r.source, S=S, kv="f32", threads=t, G=G) if kv != "f32" else None
                t1 = ix.find("decode", r.source, S=S, kv=kv, threads=1, G=G) if t != 1 else None
                rows.append([
                    kv, t, G, fmt_time(r.seconds), f"{1 / r.seconds:.1f}", fmt_bytes(r.counters.get("kv_bytes")),
                    f"{own_gbps:.1f}" if own_gbps else "-", f"{gbps:.1f}" if gbps else "-",
                    fmt_pct(own_gbps / gbps) if own_gbps and gbps else "-",
                    f"{fmt_time(floor)} {bound}" if floor else "-",
                    fmt_x(r.seconds / floor) if floor else "-",
                    fmt_x(mha.seconds / r.seconds) if mha else "-",
                    fmt_x(f32.seconds / r.seconds) if f32 else "-",
                    fmt_x(t1.seconds / r.seconds) if t1 else "-",
                ])
        out.append(table(["kv", "thr", "G", "time/tok", "tok/s", "KV bytes", "GB/s", "stream GB/s", "%stream",
                          "T_floor", "t/floor", "vs G=H", "vs f32", "vs 1thr"], rows))

    # Bars, at the cache length (or, when it was not run, the longest one that was).
    S_bar = DECODE_S if any(r.get("S") == DECODE_S for r in runs) else max(r.get("S") for r in runs)
    f32 = [r for r in runs if r.get("S") == S_bar and r.get("kv") == "f32"]
    for t in sorted({r.get("threads") for r in f32}) or [1]:
        per_g = sorted((r for r in f32 if r.get("threads") == t), key=lambda r: -r.get("G"))
        ratios = []
        for r in per_g:
            floor = decode_floor(ix, r)[0]
            if floor:
                ratios.append((r.seconds / floor, r.get("G")))
        worst = max(ratios) if ratios else None
        bars.check(f"decode f32 S={S_bar} threads:{t}, every G: time <= {FLOOR_MAX} x T_floor",
                   worst, worst is not None and worst[0] <= FLOOR_MAX,
                   (f"worst {worst[0]:.2f}x at G={worst[1]}; " + ", ".join(f"G={g}: {x:.2f}" for x, g in ratios))
                   if worst else "")
    for t in sorted({r.get("threads") for r in f32}) or [1]:
        mha = ix.find("decode", None, S=S_bar, kv="f32", threads=t, G=32)
        g8 = ix.find("decode", mha.source if mha else None, S=S_bar, kv="f32", threads=t, G=8)
        x = mha.seconds / g8.seconds if mha and g8 else None
        bars.check(f"decode f32 S={S_bar} threads:{t}: GQA-8 over MHA >= {GQA8_OVER_MHA_MIN:g}x", x,
                   x is not None and x >= GQA8_OVER_MHA_MIN, fmt_x(x))
    for t in sorted({r.get("threads") for r in runs if r.get("kv") == "bf16" and r.get("S") == S_bar}) or [1]:
        for G in (32, 8):
            a = ix.find("decode", None, S=S_bar, kv="f32", threads=t, G=G)
            b = ix.find("decode", a.source if a else None, S=S_bar, kv="bf16", threads=t, G=G)
            x = a.seconds / b.seconds if a and b else None
            bars.check(f"decode S={S_bar} threads:{t} G={G}: bf16 >= {BF16_OVER_F32_MIN:g}x fp32 throughput", x,
                       x is not None and x >= BF16_OVER_F32_MIN, fmt_x(x))
    for kv in ("f32", "bf16"):
        pairs = []
        for r in runs:
            if r.get("S") == S_bar and r.get("kv") == kv and r.get("threads") == 2:
                r1 = ix.find("decode", r.source, S=S_bar, kv=kv, threads=1, G=r.get("G"))
                if r1:
                    pairs.append((r1.seconds / r.seconds, r.get("G")))
        worst = min(pairs) if pairs else None
        bars.check(f"decode {kv} S={S_bar}, every G: 2 threads >= {THREADS_SCALING_MIN}x 1 thread", worst,
                   worst is not None and worst[0] >= THREADS_SCALING_MIN,
                   (f"worst {worst[0]:.2f}x at G={worst[1]}; " +
                    ", ".join(f"G={g}: {x:.2f}" for x, g in sorted(pairs, key=lambda p: -p[1]))) if worst else "")


def reference_decode_section(ix, out):
    refs = sorted(ix.all("reference/decode"), key=lambda r: -r.get("G"))
    if not refs:
        return
    rows = []
    for ref in refs:
        ours = [ix.find("decode", None, S=ref.get("S"), kv=ref.get("kv"), threads=t, G=ref.get("G"),
                        H=ref.get("H"), D=ref.get("D")) for t in (1, 2)]
        rows.append([ref.get("G"), ref.get("S"), fmt_time(ref.seconds)] +
                    [fmt_time(o.seconds) if o else "-" for o in ours] +
                    [fmt_x(ref.seconds / o.seconds, 0) if o else "-" for o in ours] +
                    [fmt_bytes(ref.counters.get("kv_bytes"))])
    out.append("\nDecode vs the naive reference (gqa::reference_attention: double, repeat_kv, 1 thread), f32 cache")
    out.append(table(["G", "S", "reference", "ours 1thr", "ours 2thr", "speedup 1thr", "speedup 2thr", "KV bytes"],
                     rows))


def prefill_section(ix, bars, out):
    runs = [r for r in ix.all("prefill") if r.get("S") != 32768]
    if runs:
        rows = []
        for r in sorted(runs, key=lambda r: (r.get("H"), r.get("S"), -r.get("G"), r.get("kv"), -r.get("causal", 0),
                                             r.get("threads"))):
            t = r.get("threads")
            gfl = r.counters.get("GFLOPs")
            sg, _ = ix.sgemm_gflops(t, r.source)
            t1 = ix.find("prefill", r.source, H=r.get("H"), G=r.get("G"), S=r.get("S"), kv=r.get("kv"),
                         causal=r.get("causal"), threads=1) if t != 1 else None
            rows.append([r.get("H"), r.get("G"), r.get("S"), r.get("kv"), r.get("causal"), t, fmt_time(r.seconds),
                         fmt_time(r.seconds / r.get("S")), f"{gfl:.1f}" if gfl else "-",
                         f"{sg:.1f}" if sg else "-", fmt_pct(gfl / sg) if gfl and sg else "-",
                         fmt_x(t1.seconds / r.seconds) if t1 else "-", fmt_bytes(r.counters.get("kv_bytes"))])
        out.append("\nPrefill: Sq = Sk = S, B=1, D=128 (GFLOP/s of useful flops: 4*S*S*D*H, half that when causal; "
                   "sgemm = best measured shape at the same threads)")
        out.append(table(["H", "G", "S", "kv", "causal", "thr", "time", "time/tok", "GFLOP/s", "sgemm GFLOP/s", "%sgemm",
                          "vs 1thr", "KV bytes"], rows))

    refs = ix.all("reference/prefill")
    if refs:
        rows = []
        for ref in sorted(refs, key=lambda r: (r.get("H"), -r.get("G"), r.get("S"), -r.get("causal", 0))):
            ours = [ix.find("prefill", None, H=ref.get("H"), G=ref.get("G"), D=ref.get("D"), S=ref.get("S"),
                            kv=ref.get("kv"), causal=ref.get("causal"), threads=t) for t in (1, 2)]
            rows.append([ref.get("H"), ref.get("G"), ref.get("S"), ref.get("causal"), fmt_time(ref.seconds)] +
                        [fmt_time(o.seconds) if o else "-" for o in ours] +
                        [fmt_x(ref.seconds / o.seconds, 0) if o else "-" for o in ours] +
                        [f"{ref.counters.get('peak_rss_mb', 0):.0f} MiB"])
        out.append("\nPrefill vs the naive reference (double, repeat_kv, full S x S scores, 1 thread), same shape")
        out.append(table(["H", "G", "S", "causal", "reference", "ours 1thr", "ours 2thr", "speedup 1thr",
                          "speedup 2thr", "peak RSS"], rows))

    mem = [r for r in ix.all("prefill") if r.get("S") == 32768]
    if mem:
        rows = [[r.get("G"), r.get("S"), r.get("causal"), r.get("threads"), fmt_time(r.seconds),
                 f"{r.counters.get('GFLOPs', 0):.1f}", f"{r.counters.get('peak_rss_mb', 0):.0f} MiB",
                 f"{r.counters.get('qkvo_mb', 0):.0f} MiB", f"{r.counters.get('sxs_mb', 0):.0f} MiB"] for r in mem]
        out.append("\nPrefill memory run (peak RSS = getrusage ru_maxrss of the whole process)")
        out.append(table(["G", "S", "causal", "thr", "time", "GFLOP/s", "peak RSS", "Q+K+V+O", "one SxS f32"], rows))

    # Bars.
    for t in sorted({r.get("threads") for r in runs if r.get("S") == PREFILL_S}) or [2]:
        r = ix.find("prefill", None, H=32, G=8, S=PREFILL_S, kv="f32", causal=1, threads=t)
        sg = ix.sgemm_gflops(t, r.source)[0] if r else None
        x = r.counters.get("GFLOPs") / sg if r and sg else None
        bars.check(f"prefill causal S={PREFILL_S} H=32 G=8 threads:{t}: >= {PREFILL_SGEMM_MIN:.0%} of sgemm GFLOP/s",
                   x, x is not None and x >= PREFILL_SGEMM_MIN,
                   f"{fmt_pct(x)} ({r.counters.get('GFLOPs'):.1f} of {sg:.1f} GFLOP/s)" if x else "")
    ref = ix.find("reference/prefill", None, S=2048, causal=1)
    if ref is None:
        ref = ix.find("reference/prefill", None, S=2048)
    ours = ix.find("prefill", None, H=ref.get("H"), G=ref.get("G"), S=2048, kv=ref.get("kv"),
                   causal=ref.get("causal"), threads=1) if ref else None
    x = ref.seconds / ours.seconds if ref and ours else None
    bars.check(f"prefill S=2048 vs the naive reference (same reduced shape, 1 thread each) >= {REF_SPEEDUP_MIN:g}x", x,
               x is not None and x >= REF_SPEEDUP_MIN,
               f"{fmt_x(x, 0)} at H={ref.get('H')} G={ref.get('G')} causal:{ref.get('causal')}" if x else "")
    for r in mem:
        peak, tensors, sxs = (r.counters.get(k, 0) for k in ("peak_rss_mb", "qkvo_mb", "sxs_mb"))
        bars.check(f"prefill S={r.get('S')} threads:{r.get('threads')}: no S x S buffer (peak RSS < Q+K+V+O + one "
                   "S x S f32 matrix)", peak, peak < tensors + sxs,
                   f"peak {peak:.0f} MiB = tensors {tensors:.0f} MiB + {peak - tensors:.0f} MiB; one S x S matrix "
                   f"is {sxs:.0f} MiB")
    for G in sorted({r.get("G") for r in runs if r.get("S") == PREFILL_S and r.get("H") == 32}, reverse=True):
        r2 = ix.find("prefill", None, H=32, G=G, S=PREFILL_S, kv="f32", causal=1, threads=2)
        r1 = ix.find("prefill", r2.source if r2 else None, H=32, G=G, S=PREFILL_S, kv="f32", causal=1, threads=1)
        x = r1.seconds / r2.seconds if r1 and r2 else None
        bars.check(f"prefill causal S={PREFILL_S} G={G}: 2 threads >= {THREADS_SCALING_MIN}x 1 thread", x,
                   x is not None and x >= THREADS_SCALING_MIN, fmt_x(x))


def baseline_section(ix, out):
    streams = ix.all("baseline/stream_read")
    gemms = ix.all("baseline/sgemm")
    if streams:
        by_cache = defaultdict(dict)
        for r in streams:
            key = (r.get("S"), r.get("kv"), r.get("G"), int(r.counters.get("kv_bytes", 0)))
            by_cache[key][r.get("threads")] = max(by_cache[key].get(r.get("threads"), 0), r.counters.get("GBps", 0))
        kv_order = {"f32": 0, "bf16": 1, "f16": 2}
        keys = sorted(by_cache, key=lambda k: (k[0], kv_order.get(k[1], 9), -k[2]))
        rows = [[S, kv, G, fmt_bytes(b)] + [f"{by_cache[k][t]:.1f}" if t in by_cache[k] else "-" for t in (1, 2)]
                for k in keys for (S, kv, G, b) in [k]]
        out.append("\nBaseline: STREAM-style read of each decode's own KV cache, GB/s")
        out.append(table(["S", "kv", "G", "bytes", "1 thread", "2 threads"], rows))
    if gemms:
        rows = [[r.name.split("/threads")[0].replace("baseline/sgemm/", ""), r.get("threads"),
                 f"{r.counters.get('GFLOPs', 0):.1f}", os.path.basename(r.source)]
                for r in sorted(gemms, key=lambda r: (r.source, r.get("M"), r.get("threads")))]
        out.append("\nBaseline: Eigen SGEMM, GFLOP/s summed over threads (t independent products)")
        out.append(table(["shape", "thr", "GFLOP/s", "run"], rows))


def main(argv):
    strict = "--strict" in argv
    paths = [a for a in argv if a != "--strict"]
    if not paths:
        print(__doc__.strip())
        return 2
    runs, contexts = load_runs(paths)
    if not runs:
        print("no benchmark results in " + " ".join(paths))
        return 2
    ix = Index(runs)
    out, bars = [], Bars()
    reps = max(r.reps for r in runs)
    first = next(iter(contexts.values()))
    loads = [c.get("load_avg", [0])[0] for c in contexts.values() if c.get("load_avg")]
    out.append(f"gqa benchmarks: {first.get('date', '?')}, {first.get('num_cpus', '?')} CPUs at "
               f"{first.get('mhz_per_cpu', '?')} MHz, best of {reps} repetition(s) per benchmark")
    if loads and max(loads) > 0.5:
        out.append(f"NOTE: load average up to {max(loads):.2f} when a run started: the machine was busy, timings "
                   "(2-thread ones most) are noisy.")
    decode_section(ix, bars, out)
    reference_decode_section(ix, out)
    prefill_section(ix, bars, out)
    baseline_section(ix, out)
    out.append("\nBars (issue 4): ratios within one binary run")
    out += bars.lines
    print("\n".join(out))
    return 1 if strict and bars.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
