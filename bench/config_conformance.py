#!/usr/bin/env python3
"""Expected logits of tests/test_config.cpp's conformance cases, computed by transformers on the very same files.

The checkpoints (config.json in each form the test covers, random weights, ids) are written by the test binary
itself (its hidden "[.conformance-writer]" case, GQA_CONFORMANCE_OUT=DIR), so C++ and Python read identical
bytes. For each case this script loads the directory with AutoModelForCausalLM (float32, eager attention) and
  * runs the 40 ids in one forward call ("prefill") and one token per call with a cache ("decode", as generate()),
  * compares llama::Model's logits (cpp.json, written by the same binary) with them over every position and the
    whole vocabulary, and prints the max abs difference per case, and that over the largest |logit| (rel),
  * writes, for a few positions, the first 32 logits and the log-sum-exp over the vocabulary into
    tests/data/config_conformance.json, which test_config checks without Python.

    python3 bench/config_conformance.py --test-config build/tests/test_config [--save-config] [--out FILE]

--save-config first regenerates tests/data/llama_config_transformers5.json: a LlamaConfig of the fixture's sizes
saved by the installed transformers' save_pretrained (the test's "config.json as transformers 5 saves it" case),
so run the writer after it (this script does both in that order).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
POSITIONS = [0, 7, 15, 16, 23, 31, 32, 39]  # both sides of yarn's (16) and longrope's (32) original lengths
COLUMNS = 32
TOLERANCE = 1e-4  # atol = rtol, as test_config


def save_config(path):
    """The fixture's sizes (tests/support/llama_fixture.hpp) in transformers 5's own config.json."""
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=299)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            text = f.read()
    with open(path, "w") as f:
        f.write(text)
    print("wrote", path)


def transformers_logits(directory, ids):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        prefill = model(x).logits[0]
        # A cache of every key (not DynamicCache(config=...), whose window-sized layers for a config with a
        # sliding_window break Llama, which applies no window): the same math for every case.
        cache = DynamicCache()
        steps = []
        for s in range(len(ids)):
            out = model(x[:, s:s + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[0, 0])
    return prefill.double(), torch.stack(steps).double()


def nine(v):
    """9 significant digits: every float32 logit exactly, far below the tolerance for the log-sum-exp."""
    return float(f"{float(v):.9g}")


def summary(logits):
    return {"logits": [[nine(v) for v in logits[p, :COLUMNS]] for p in POSITIONS],
            "logsumexp": [nine(torch.logsumexp(logits[p], 0)) for p in POSITIONS]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test-config", required=True, help="the built tests/test_config binary")
    ap.add_argument("--out", default=os.path.join(DATA, "config_conformance.json"))
    ap.add_argument("--save-config", action="store_true", help="regenerate llama_config_transformers5.json first")
    a = ap.parse_args()
    if a.save_config:
        save_config(os.path.join(DATA, "llama_config_transformers5.json"))
    transformers.logging.set_verbosity_error()
    cases, worst = {}, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([a.test_config, "[.conformance-writer]"], check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, GQA_CONFORMANCE_OUT=tmp))
        for n in sorted(os.listdir(tmp), key=int):
            d = os.path.join(tmp, n)
            name = open(os.path.join(d, "name.txt")).read().strip()
            ids = json.load(open(os.path.join(d, "ids.txt")))
            cpp = json.load(open(os.path.join(d, "cpp.json")))
            ref = dict(zip(("prefill", "decode"), transformers_logits(d, ids)))
            cases[name] = {mode: summary(ref[mode]) for mode in ref}
            line = []
            for mode in ref:
                diff = (torch.tensor(cpp[mode], dtype=torch.float64) - ref[mode]).abs()
                rel = diff.max() / ref[mode].abs().max()  # relative to the largest logit
                ratio = (diff / (TOLERANCE + TOLERANCE * ref[mode].abs())).max()
                worst = max(worst, float(ratio))
                line.append(f"{mode} max abs {float(diff.max()):.2e} max rel {float(rel):.2e}")
            print(f"{name:62s} " + "; ".join(line))
    out = {"generated_by": "bench/config_conformance.py with transformers " + transformers.__version__ +
                           ", torch " + torch.__version__ + " (float32, eager attention)",
           "ids": ids, "positions": POSITIONS, "cases": cases}
    with open(a.out, "w") as f:  # one line per case and mode
        f.write("{\n")
        for key in ("generated_by", "ids", "positions"):
            f.write(f" {json.dumps(key)}: {json.dumps(out[key])},\n")
        f.write(' "cases": {\n')
        for i, (name, modes) in enumerate(cases.items()):
            f.write(f"  {json.dumps(name)}: {{\n")
            f.write(",\n".join(f"   {json.dumps(m)}: {json.dumps(v)}" for m, v in modes.items()))
            f.write("\n  }" + ("," if i + 1 < len(cases) else "") + "\n")
        f.write(" }\n}\n")
    print("wrote", a.out, f"(worst llama::Model / transformers difference: {worst:.3f} of the tolerance)")
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
