#!/usr/bin/env python3
"""The paged-cache tables from a bench_paged JSON run (Google Benchmark --benchmark_format=json).

    bench_paged --benchmark_repetitions=3 --benchmark_enable_random_interleaving=true \
        --benchmark_format=json > paged.json
    bench/paged_report.py paged.json

Decode: paged throughput over the contiguous cache's (time contiguous / time paged, > 1: paged faster, from the
paired-decode benchmarks, which alternate the two step by step; the paged cache's blocks in random order, the worst
case) per cache type, G, threads and block size, and the same for a fresh pool (the allocator's order); then the
stream read of the same bytes in decode's order (the
random blocks' read rate over the contiguous read's, and each decode's floor on its own layout over its time).
Serving: tokens/s of the paged and the contiguous batch, their ratio alternated step by step (serving-paired), blocks
per run of consecutive blocks (the allocator's layout), bytes reserved over bytes in use, the contiguous worst case
over the paged reservation, and the stream floor (the sequences' K/V bytes at the same run's stream-read rate of
the pool, read alternately with the steps: serving-floor) over the batched decode's time (1.0 = at the floor), and the
compute floor (the step's flops at the same
run's SGEMM rate, baseline/sgemm) over it. With repetitions, medians of the repetitions. Prints
the bars' checks last."""
import json
import re
import statistics
import sys


def fields(name):
    kind = name.split("/")[0] if not name.startswith("baseline/") else "/".join(name.split("/")[:3])
    return kind, dict(re.findall(r"([A-Za-z_]+):([^/]+)", name))


def load(path):
    runs = {}
    with open(path) as f:
        data = json.load(f)
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" or b.get("error_occurred"):
            continue
        runs.setdefault(b["run_name"] if "run_name" in b else b["name"], []).append(b)
    out = {}
    for name, reps in runs.items():
        med = {"real_time": statistics.median(r["real_time"] for r in reps)}
        for key in ("paged_throughput", "contiguous_ms", "paged_ms", "GBps", "GFLOPs", "tokens_per_s", "kv_bytes",
                    "bytes_in_use", "bytes_reserved", "reserved_over_in_use", "worst_case_over_reserved",
                    "blocks_per_run", "floor_over_time"):
            if key in reps[0]:
                med[key] = statistics.median(r[key] for r in reps)
        out[name] = med
    return out, data.get("context", {})


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    runs, context = load(sys.argv[1])
    print(f"CPU: {context.get('host_name', '?')}, {context.get('num_cpus', '?')} CPUs at "
          f"{context.get('mhz_per_cpu', '?')} MHz; repetitions: medians\n")
    decode, fresh = {}, {}
    for name, r in runs.items():
        kind, f = fields(name)
        if kind == "paired-decode":
            table = fresh if f.get("pool") == "fresh" else decode
            cell = table.setdefault((f["kv"], int(f["G"]), int(f["threads"])), {})
            cell[int(f["block"])] = r["paged_throughput"]
            cell.setdefault(0, []).append(r["contiguous_ms"])
    blocks = sorted({b for v in decode.values() for b in v if b > 0})
    def decode_table(title, table):
        print(title + "\n")
        print("| kv | G | threads | contiguous ms | " + " | ".join(f"block {b}" for b in blocks) + " |")
        print("|---|---:|---:|---:|" + "---:|" * len(blocks))
        worst = None
        for (kv, g, t), times in sorted(table.items(), key=lambda x: (x[0][0], -x[0][1], x[0][2])):
            cells = []
            for b in blocks:
                ratio = times.get(b, float("nan"))
                cells.append(f"{ratio:.3f}")
                if b >= 32 and b in times and (worst is None or ratio < worst[0]):
                    worst = (ratio, kv, g, t, b)
            print(f"| {kv} | {g} | {t} | {statistics.median(times[0]):.3f} | " + " | ".join(cells) + " |")
        return worst

    worst = decode_table("Decode, H = 32, D = 128, S = 16384: paged throughput / contiguous, alternated step by step "
                         "(paired-decode); the blocks in random order (pool:random, the worst case)", decode)
    worst_fresh = None
    if fresh:
        print()
        worst_fresh = decode_table("The same, appended to a fresh pool (pool:fresh: the allocator's order)", fresh)

    floors = {}  # (kv, G, threads) -> {block: stream-read time of the bytes decode reads, in its order}
    for name, r in runs.items():
        kind, f = fields(name)
        if name.startswith("baseline/stream_read/decode/"):
            floors.setdefault((f["kv"], int(f["G"]), int(f["threads"])), {})[int(f["block"])] = r["real_time"] / 1e6
    paged_ms = {}
    for name, r in runs.items():
        kind, f = fields(name)
        if kind == "paired-decode" and f.get("pool") != "fresh":
            paged_ms.setdefault((f["kv"], int(f["G"]), int(f["threads"])), {})[int(f["block"])] = r["paged_ms"]
    if floors:
        print("\nThe same bytes read by the stream baseline in decode's order (blocks in table order, random in the "
              "pool):\nread rate over the contiguous read's, and each decode's floor / time (1.0 = at the rate its "
              "layout reads)\n")
        print("| kv | G | threads | contiguous floor / time | " +
              " | ".join(f"block {b}: read rate, floor / time" for b in blocks) + " |")
        print("|---|---:|---:|---:|" + "---:|" * len(blocks))
        for key in sorted(floors, key=lambda k: (k[0], -k[1], k[2])):
            fl, times = floors[key], decode.get(key, {})
            contiguous_ms = statistics.median(times[0]) if times.get(0) else float("nan")
            cells = []
            for b in blocks:
                if b in fl and 0 in fl and b in paged_ms.get(key, {}):
                    cells.append(f"{fl[0] / fl[b]:.3f}, {fl[b] / paged_ms[key][b]:.3f}")
                else:
                    cells.append("")
            print(f"| {key[0]} | {key[1]} | {key[2]} | {fl.get(0, float('nan')) / contiguous_ms:.3f} | "
                  + " | ".join(cells) + " |")

    print("\nServing: 64 sequences, lengths uniform in [100, 8000], H = 32, G = 8, D = 128, block 32\n")
    print("| kv | threads | paged tokens/s | contiguous tokens/s | paged / contiguous (alternated) | blocks per run | "
          "reserved / in use | contiguous worst case / reserved | stream floor / time | compute floor / time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    serving_checks = []
    for name, r in sorted(runs.items()):
        kind, f = fields(name)
        if kind != "serving":
            continue
        contiguous = runs.get(name.replace("serving/", "serving-contiguous/", 1), {})
        paired = runs.get(name.replace("serving/", "serving-paired/", 1), {})
        stream = runs.get("baseline/stream_read/" + name, {})
        floor_run = runs.get(name.replace("serving/", "serving-floor/", 1), {})
        if "floor_over_time" in floor_run:  # alternated with the step: the same load
            floor_ratio = floor_run["floor_over_time"]
        else:
            floor = r["kv_bytes"] / (stream["GBps"] * 1e9) if stream else float("nan")
            floor_ratio = floor / (r["real_time"] / 1e9)
        sgemm = max((x.get("GFLOPs", 0) for n, x in runs.items()
                     if n.startswith("baseline/sgemm/") and n.endswith(f"/threads:{f['threads']}")), default=0)
        compute_ratio = r["GFLOPs"] / sgemm if sgemm else float("nan")
        serving_checks.append((f["kv"], int(f["threads"]), r["reserved_over_in_use"], floor_ratio,
                               paired.get("paged_throughput", float("nan"))))
        print(f"| {f['kv']} | {f['threads']} | {r['tokens_per_s']:.0f} | {contiguous.get('tokens_per_s', float('nan')):.0f}"
              f" | {paired.get('paged_throughput', float('nan')):.3f} | {r.get('blocks_per_run', float('nan')):.1f}"
              f" | {r['reserved_over_in_use']:.4f} | {r['worst_case_over_reserved']:.2f} | {floor_ratio:.3f}"
              f" | {compute_ratio:.3f} |")

    print("\nBars")
    if worst_fresh:
        print(f"  paged decode (fresh pool) >= 0.95x contiguous at block >= 32: worst {worst_fresh[0]:.3f} (kv "
              f"{worst_fresh[1]}, G = {worst_fresh[2]}, {worst_fresh[3]} threads, block {worst_fresh[4]}) "
              f"{'met' if worst_fresh[0] >= 0.95 else 'NOT MET'}")
    if worst:
        print(f"  paged decode (random block order) >= 0.95x contiguous at block >= 32: worst {worst[0]:.3f} (kv {worst[1]}, G = {worst[2]},"
              f" {worst[3]} threads, block {worst[4]}) {'met' if worst[0] >= 0.95 else 'NOT MET'}")
    for kv, t, reserved, floor, paired in serving_checks:
        print(f"  serving {kv}, {t} threads: paged / contiguous {paired:.3f} {'met' if paired >= 0.95 else 'NOT MET'}"
              " (the decode bar, on the allocator's layout)")
        print(f"  serving {kv}, {t} threads: reserved / in use {reserved:.4f} {'met' if reserved <= 1.1 else 'NOT MET'};"
              f" floor / time {floor:.3f} {'met' if floor >= 0.9 else 'NOT MET'}")


if __name__ == "__main__":
    main()
