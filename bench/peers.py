#!/usr/bin/env python3
"""Peer comparison: gqa against PyTorch SDPA, ONNX Runtime's GroupQueryAttention and ggml on the same shapes.

Optional tooling (never a test, never in CI). Needs python3 with numpy and torch; onnxruntime and onnx are used
when importable (`pip install onnxruntime onnx` in the venv), else those columns are skipped. gqa's times come
from the bench_decode / bench_prefill binaries of a Release build (-DGQA_BUILD_BENCHMARKS=ON), run by this script
in the same session as the peers, interleaved: every round runs each case with gqa, then torch, then ORT, so load
from other processes falls on all three alike. Per case it prints the medians over rounds and peer time / gqa time
(> 1: gqa is faster), and for prefill gqa's useful GFLOP/s against the same-run SGEMM baseline of bench_prefill.

ggml (optional, --ggml DIR): ggml_flash_attn_ext through bench/ggml_peer.cpp, which this script compiles against a
ggml source tree DIR built with CMake into DIR/build (e.g. `cmake -S DIR -B DIR/build -DCMAKE_BUILD_TYPE=Release
-DGGML_NATIVE=ON && cmake --build DIR/build -j`); ggml's own threads (its OpenMP build), K/V head-major like gqa's
KVCache, each run checked against a double-precision reference by ggml_peer itself.

Cases (H = 32 query heads, D = 128, f32 unless --decode-kv adds others, one sequence):
  prefill  causal, S = 2048 and 4096, G = 8:
           torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
           ORT GroupQueryAttention (com.microsoft) on a one-node model, S new tokens, no past
           gqa: prefill/H:32/G:8/D:128/S:<s>/kv:f32/threads:<t>/causal:1
  decode   one query token against Sk = 16384 cached tokens, G = 32, 8, 1:
           torch SDPA(q [1, H, 1, D], K/V [1, G, Sk, D], enable_gqa=True)
           ORT GroupQueryAttention with past and present K/V bound to one shared buffer of Sk tokens (IOBinding;
           the new token is written in place, as ORT's decoders run it)
           gqa: decode/H:32/G:<g>/D:128/S:16384/kv:f32/threads:<t> (a KVCache<float> of Sk tokens)
           --decode-kv f16 i8: the same with 16-bit and 8-bit caches, against ggml only (f16, q8_0); torch and
           ORT take f32 K/V here
Threads: torch.set_num_threads(t), ORT intra_op_num_threads = t, gqa num_threads = t; t = 1 and 2 by default.

  bench/peers.py                         # builds nothing; needs build/bench/bench_{decode,prefill}
  bench/peers.py --build DIR --rounds 5 --threads 1 --only decode
  bench/peers.py --ggml ~/ggml --decode-kv f32 f16 i8
Before timing, a small causal prefill and a decode are checked: torch and ORT against a float64 numpy reference,
so a misconfigured peer (wrong mask, wrong head mapping) stops the script instead of giving a flattering ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the script is optional tooling
    sys.exit("peers.py needs torch (pip install torch)")

try:
    from onnx import TensorProto, helper
    import onnxruntime as ort
except ImportError:
    ort = None

H, D = 32, 128
DECODE_SK = 16384


# ------------------------------------------------------------------------------------------------ the cases

GGML_KV = {"f32": "f32", "f16": "f16", "i8": "q8_0"}  # gqa's cache type -> ggml's K/V type


class Case:
    def __init__(self, kind, S, G, threads, kv="f32"):
        self.kind, self.S, self.G, self.threads, self.kv = kind, S, G, threads, kv

    @property
    def label(self):
        if self.kind == "prefill":
            return f"prefill causal S={self.S} G={self.G} thr={self.threads}"
        return f"decode Sk={self.S} G={self.G} kv={self.kv} thr={self.threads}"

    @property
    def gqa_name(self):
        if self.kind == "prefill":
            return f"prefill/H:{H}/G:{self.G}/D:{D}/S:{self.S}/kv:f32/threads:{self.threads}/causal:1"
        return f"decode/H:{H}/G:{self.G}/D:{D}/S:{self.S}/kv:{self.kv}/threads:{self.threads}"

    @property
    def flops(self):  # useful flops, as bench_prefill / bench_decode count them
        return 2.0 * self.S * self.S * D * H if self.kind == "prefill" else 4.0 * self.S * D * H


def median_time(fn, reps, min_seconds=0.3):
    """Median seconds per call of fn over `reps` timed calls (after one warm-up), repeating short calls."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    inner = max(1, int(min_seconds / max(once, 1e-6) / reps))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------- torch

def torch_runner(case, rng):
    torch.set_num_threads(case.threads)
    if case.kind == "prefill":
        q = torch.from_numpy(rng.standard_normal((1, H, case.S, D), dtype=np.float32))
        k = torch.from_numpy(rng.standard_normal((1, case.G, case.S, D), dtype=np.float32))
        v = torch.from_numpy(rng.standard_normal((1, case.G, case.S, D), dtype=np.float32))
        causal = True
    else:
        q = torch.from_numpy(rng.standard_normal((1, H, 1, D), dtype=np.float32))
        k = torch.from_numpy(rng.standard_normal((1, case.G, case.S, D), dtype=np.float32))
        v = torch.from_numpy(rng.standard_normal((1, case.G, case.S, D), dtype=np.float32))
        causal = False

    def run():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    return run


# --------------------------------------------------------------------------------------------- ONNX Runtime

def gqa_model(G, with_past):
    """A one-node ONNX model: com.microsoft GroupQueryAttention, float32, H heads, G KV heads, D = 128."""
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs = [helper.make_tensor_value_info("query", f32, [1, "S", H * D]),
              helper.make_tensor_value_info("key", f32, [1, "S", G * D]),
              helper.make_tensor_value_info("value", f32, [1, "S", G * D])]
    names = ["query", "key", "value"]
    if with_past:
        inputs += [helper.make_tensor_value_info("past_key", f32, [1, G, "P", D]),
                   helper.make_tensor_value_info("past_value", f32, [1, G, "P", D])]
        names += ["past_key", "past_value"]
    else:
        names += ["", ""]
    inputs += [helper.make_tensor_value_info("seqlens_k", i32, [1]),
               helper.make_tensor_value_info("total_sequence_length", i32, [])]
    names += ["seqlens_k", "total_sequence_length"]
    outputs = [helper.make_tensor_value_info("output", f32, [1, "S", H * D]),
               helper.make_tensor_value_info("present_key", f32, [1, G, "T", D]),
               helper.make_tensor_value_info("present_value", f32, [1, G, "T", D])]
    node = helper.make_node("GroupQueryAttention", names, ["output", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=H, kv_num_heads=G)
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def ort_session(G, with_past, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(gqa_model(G, with_past), so, providers=["CPUExecutionProvider"])


def ort_runner(case, rng, data=None):
    """Returns (run, output getter). Prefill: S new tokens, no past. Decode: past/present share one buffer of Sk
    tokens (IOBinding), seqlens_k = Sk - 1, the new token at position Sk - 1."""
    G, S = case.G, case.S
    if case.kind == "prefill":
        sess = ort_session(G, False, case.threads)
        q, k, v = data if data else (rng.standard_normal((1, S, H * D), dtype=np.float32),
                                     rng.standard_normal((1, S, G * D), dtype=np.float32),
                                     rng.standard_normal((1, S, G * D), dtype=np.float32))
        feeds = {"query": q, "key": k, "value": v, "seqlens_k": np.array([S - 1], np.int32),
                 "total_sequence_length": np.array(S, np.int32)}
        out = {}

        def run():
            out["o"] = sess.run(["output"], feeds)[0]

        return run, lambda: out["o"]
    sess = ort_session(G, True, case.threads)
    if data:
        q, k_new, v_new, past_k, past_v = data
    else:
        q = rng.standard_normal((1, 1, H * D), dtype=np.float32)
        k_new = rng.standard_normal((1, 1, G * D), dtype=np.float32)
        v_new = rng.standard_normal((1, 1, G * D), dtype=np.float32)
        past_k = rng.standard_normal((1, G, S, D), dtype=np.float32)
        past_v = rng.standard_normal((1, G, S, D), dtype=np.float32)
    pk = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(past_k))
    pv = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(past_v))
    out = ort.OrtValue.ortvalue_from_shape_and_type([1, 1, H * D], np.float32)
    binding = sess.io_binding()
    binding.bind_cpu_input("query", q)
    binding.bind_cpu_input("key", k_new)
    binding.bind_cpu_input("value", v_new)
    binding.bind_ortvalue_input("past_key", pk)
    binding.bind_ortvalue_input("past_value", pv)
    binding.bind_cpu_input("seqlens_k", np.array([S - 1], np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(S, np.int32))
    binding.bind_ortvalue_output("output", out)
    binding.bind_ortvalue_output("present_key", pk)  # the same buffer: ORT appends in place, copies nothing
    binding.bind_ortvalue_output("present_value", pv)

    def run():
        sess.run_with_iobinding(binding)

    return run, lambda: out.numpy()


# ------------------------------------------------------------------------------------------ correctness check

def reference(q, k, v, causal):
    """float64 attention: q [H, Sq, D], k/v [G, Sk, D]; query head h uses KV head h // (H / G)."""
    Hq, Sq, _ = q.shape
    G, Sk, _ = k.shape
    out = np.empty((Hq, Sq, D))
    for h in range(Hq):
        s = q[h].astype(np.float64) @ k[h // (Hq // G)].astype(np.float64).T / np.sqrt(D)
        if causal:
            s = np.where(np.arange(Sk)[None, :] <= np.arange(Sq)[:, None] + (Sk - Sq), s, -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[h] = (p / p.sum(axis=1, keepdims=True)) @ v[h // (Hq // G)].astype(np.float64)
    return out


def check_peers(rng):
    """Torch and ORT against the float64 reference: causal prefill S = 64 and decode Sk = 96, G = 8."""
    tol = 1e-4
    G, S = 8, 64
    q = rng.standard_normal((1, S, H * D), dtype=np.float32)
    k = rng.standard_normal((1, S, G * D), dtype=np.float32)
    v = rng.standard_normal((1, S, G * D), dtype=np.float32)
    qh, kh, vh = (x.reshape(S, -1, D).transpose(1, 0, 2) for x in (q, k, v))
    ref = reference(qh, kh, vh, True)
    with torch.inference_mode():
        t = F.scaled_dot_product_attention(torch.from_numpy(qh[None].copy()), torch.from_numpy(kh[None].copy()),
                                           torch.from_numpy(vh[None].copy()), is_causal=True, enable_gqa=True)
    errs = {"torch prefill": np.abs(t[0].numpy() - ref).max()}
    if ort:
        run, get = ort_runner(Case("prefill", S, G, 1), rng, (q, k, v))
        run()
        errs["ORT prefill"] = np.abs(get().reshape(S, H, D).transpose(1, 0, 2) - ref).max()
        Sk = 96
        qd = rng.standard_normal((1, 1, H * D), dtype=np.float32)
        kn = rng.standard_normal((1, 1, G * D), dtype=np.float32)
        vn = rng.standard_normal((1, 1, G * D), dtype=np.float32)
        pk = rng.standard_normal((1, G, Sk, D), dtype=np.float32)
        pv = rng.standard_normal((1, G, Sk, D), dtype=np.float32)
        kall, vall = pk[0].copy(), pv[0].copy()
        kall[:, Sk - 1], vall[:, Sk - 1] = kn.reshape(G, D), vn.reshape(G, D)
        ref_d = reference(qd.reshape(1, H, D).transpose(1, 0, 2), kall, vall, False)
        run, get = ort_runner(Case("decode", Sk, G, 1), rng, (qd, kn, vn, pk, pv))
        run()
        errs["ORT decode (shared past/present)"] = np.abs(get().reshape(1, H, D).transpose(1, 0, 2) - ref_d).max()
    for name, err in errs.items():
        print(f"check: {name}: max |error| {err:.2e} against float64 (tolerance {tol})")
        if not err <= tol:
            sys.exit(f"peers.py: {name} disagrees with the reference; not timing a misconfigured peer")


# ----------------------------------------------------------------------------------------------------- gqa

def run_gqa(args, case, reps):
    """Median real time (s) of the case from bench_decode / bench_prefill, and for prefill the best same-run SGEMM
    GFLOP/s at the case's thread count."""
    binary = os.path.join(args.build, "bench", "bench_prefill" if case.kind == "prefill" else "bench_decode")
    pattern = "^" + case.gqa_name + "$"
    if case.kind == "prefill":
        pattern = f"^({case.gqa_name}|baseline/sgemm/M:[0-9]+/N:[0-9]+/K:[0-9]+/threads:{case.threads})$"
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        done = subprocess.run([binary, f"--benchmark_filter={pattern}", f"--benchmark_repetitions={reps}",
                               f"--benchmark_min_time={args.min_time}", f"--benchmark_out={out}",
                               "--benchmark_out_format=json"], capture_output=True, text=True,
                              env=dict(os.environ, OMP_WAIT_POLICY="passive"))
        if done.returncode != 0:
            sys.exit(f"peers.py: {binary} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        with open(out) as f:
            runs = json.load(f)["benchmarks"]
    finally:
        os.unlink(out)

    def med(name, key):
        vals = [r[key] for r in runs if r.get("run_name", r["name"]) == name and r.get("run_type") == "iteration"]
        if not vals:
            sys.exit(f"peers.py: {binary} reported no {name}")
        return statistics.median(vals)

    t = med(case.gqa_name, "real_time") * {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[runs[0]["time_unit"]]
    sgemm = None
    if case.kind == "prefill":
        names = {r.get("run_name", r["name"]) for r in runs if r["name"].startswith("baseline/sgemm/")}
        sgemm = max(med(n, "GFLOPs") for n in names) if names else None
    return t, sgemm


def build_ggml_peer(ggml_dir):
    """Compiles bench/ggml_peer.cpp against the ggml tree at ggml_dir (built into ggml_dir/build); its path."""
    lib = os.path.join(ggml_dir, "build", "src")
    if not os.path.isfile(os.path.join(ggml_dir, "include", "ggml.h")) or not os.path.isdir(lib):
        sys.exit(f"peers.py: --ggml {ggml_dir}: need {ggml_dir}/include/ggml.h and a CMake build in {ggml_dir}/build")
    exe = os.path.join(tempfile.mkdtemp(prefix="gqa-peers-"), "ggml_peer")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ggml_peer.cpp")
    cmd = ["g++", "-O2", "-std=c++17", "-I" + os.path.join(ggml_dir, "include"), src, "-L" + lib, "-lggml",
           "-lggml-base", "-lggml-cpu", "-Wl,-rpath," + lib, "-o", exe]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"peers.py: compiling {src} failed:\n{done.stderr[-2000:]}")
    return exe


def run_ggml(exe, case, reps):
    """Median time (s) of ggml_flash_attn_ext on the case (ggml_peer checks its result, exit 1 if wrong)."""
    cmd = [exe, case.kind, str(H), str(case.G), str(D), str(case.S), GGML_KV[case.kv], str(case.threads), str(reps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_WAIT_POLICY="passive"))
    if done.returncode != 0:
        sys.exit(f"peers.py: {' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr[-2000:]}")
    fields = dict(f.split("=", 1) for f in done.stdout.split() if "=" in f)
    return float(fields["median_ms"]) * 1e-3


# ---------------------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default="build", help="gqa build dir with bench/bench_decode, bench/bench_prefill")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over them)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per tool per round (their median)")
    ap.add_argument("--min-time", default="0.1", help="gqa's --benchmark_min_time per repetition")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--only", choices=["prefill", "decode"], help="run only these cases")
    ap.add_argument("--prefill-seq", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--decode-groups", type=int, nargs="+", default=[32, 8, 1])
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime even if installed")
    ap.add_argument("--ggml", metavar="DIR", help="ggml source tree built into DIR/build: adds ggml_flash_attn_ext")
    ap.add_argument("--decode-kv", nargs="+", default=["f32"], choices=sorted(GGML_KV),
                    help="decode cache types (f16 and i8: gqa against ggml only)")
    args = ap.parse_args()
    global ort
    if args.no_ort:
        ort = None

    cases = []
    for t in args.threads:
        if args.only != "decode":
            cases += [Case("prefill", s, 8, t) for s in args.prefill_seq]
        if args.only != "prefill":
            cases += [Case("decode", DECODE_SK, g, t, kv) for kv in args.decode_kv for g in args.decode_groups]
    rng = np.random.default_rng(7)
    print(f"torch {torch.__version__}" + (f", onnxruntime {ort.__version__}" if ort else ", no onnxruntime"))
    print(f"cpu: {cpu_model()}; load average at start: {os.getloadavg()[0]:.2f}")
    check_peers(rng)
    ggml_exe = build_ggml_peer(args.ggml) if args.ggml else None

    times = {c.label: {"gqa": [], "torch": [], "ort": [], "ggml": [], "sgemm": []} for c in cases}
    for r in range(args.rounds):
        for c in cases:
            tg, sgemm = run_gqa(args, c, args.reps)
            times[c.label]["gqa"].append(tg)
            if sgemm:
                times[c.label]["sgemm"].append(sgemm)
            if c.kv == "f32":
                times[c.label]["torch"].append(median_time(torch_runner(c, rng), args.reps))
                if ort:
                    run, _ = ort_runner(c, rng)
                    times[c.label]["ort"].append(median_time(run, args.reps))
            if ggml_exe:
                times[c.label]["ggml"].append(run_ggml(ggml_exe, c, args.reps))
        print(f"round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}", flush=True)

    print(f"\nmedians of {args.rounds} interleaved rounds; ratio = peer time / gqa time (> 1: gqa faster); "
          f"load average at end {os.getloadavg()[0]:.2f}")
    print(f"{'case':40s} {'gqa ms':>9s} {'torch ms':>9s} {'torch/gqa':>9s} {'ORT ms':>9s} {'ORT/gqa':>8s} "
          f"{'ggml ms':>9s} {'ggml/gqa':>8s}  gqa GFLOP/s (vs sgemm)")
    for c in cases:
        t = times[c.label]
        g = statistics.median(t["gqa"])
        line = f"{c.label:40s} {g * 1e3:9.2f} "
        for peer, width in (("torch", 9), ("ort", 8), ("ggml", 8)):
            p = statistics.median(t[peer]) if t[peer] else None
            line += f"{p * 1e3:9.2f} {p / g:{width - 1}.2f}x " if p else f"{'-':>9s} {'-':>{width}s} "
        rate = c.flops / g / 1e9
        if t["sgemm"]:
            sg = statistics.median(t["sgemm"])
            line += f" {rate:7.1f} ({rate / sg:.0%} of sgemm {sg:.1f})"
        else:
            line += f" {rate:7.1f}"
        print(line)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
