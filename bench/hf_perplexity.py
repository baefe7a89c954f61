#!/usr/bin/env python3
"""bench/hf_perplexity.py -- the independent reference for example_decoder's perplexity mode: Hugging Face
transformers (PyTorch) on the same model directory and the same ids.

    python3 bench/hf_perplexity.py MODEL_DIR --ids FILE [--context N] [--dtype float32|float64] [--threads N]

The definition is example_decoder's (examples/model/llama.hpp, llama::perplexity): the ids are cut into
consecutive non-overlapping windows of --context tokens (the last one may be shorter; a last window of one token
is dropped), each window is run from an empty cache starting at position 0, and every token of a window except
its first is scored by the model's prediction from the tokens before it in the same window. Perplexity is
exp(sum of negative log-likelihoods / number of scored tokens). The last line printed is the decoder's:
"perplexity <value> over <n> tokens".

--context defaults to the decoder's default, min(2048, max_position_embeddings). --dtype float64 runs the whole
model in double, a reference with no float rounding of its own to speak of. Log-probabilities are taken in double
from the logits either way. Needs torch and transformers (PyPI); HF_HUB_OFFLINE=1 is set, nothing is downloaded.
"""
import argparse
import json
import math
import os
import sys
import time
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import text_ids  # noqa: E402 (bench/, first on sys.path when this script runs)


def read_ids(path, vocab):
    with open(path) as f:
        ids = text_ids.parse_ids(f.read(), vocab, path, prog="hf_perplexity.py")
    if len(ids) < 2:
        sys.exit(f"hf_perplexity.py: {path}: perplexity needs at least 2 ids, got {len(ids)}")
    return ids


def perplexity(model, ids, context, torch):
    """Sum of negative log-likelihoods (nats) and number of scored tokens, window by window."""
    nll, scored = 0.0, 0
    for w in range(0, len(ids) - 1, context):
        window = ids[w:w + context]
        x = torch.tensor([window])
        with torch.no_grad():
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].double()
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(window[1:]).unsqueeze(1)
        nll -= logp.gather(1, target).sum().item()
        scored += len(window) - 1
    return nll, scored


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--ids", required=True, help="whitespace-separated token ids")
    ap.add_argument("--context", type=int, help="window length (default min(2048, max_position_embeddings))")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(os.path.join(args.model_dir, "config.json")) as f:
        config = json.load(f)
    max_positions = config.get("max_position_embeddings", 2048)
    context = args.context if args.context is not None else min(2048, max_positions)
    if not 2 <= context <= max_positions:
        sys.exit(f"hf_perplexity.py: --context {context} is not in [2, max_position_embeddings = {max_positions}]")
    ids = read_ids(args.ids, config["vocab_size"])
    dtype = getattr(torch, args.dtype)
    # Eager attention: the plain softmax(QK^T)V, the most literal reading of the model.
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="eager")
    model.eval()
    t0 = time.time()
    nll, scored = perplexity(model, ids, context, torch)
    s = time.time() - t0
    print(f"{len(ids)} ids in windows of {context}: mean negative log-likelihood {nll / scored:.6f} nats, "
          f"{s:.1f} s ({len(ids) / s:.1f} tokens/s), transformers {args.dtype}, {torch.get_num_threads()} threads")
    print(f"perplexity {math.exp(nll / scored):.4f} over {scored} tokens")


if __name__ == "__main__":
    main()
