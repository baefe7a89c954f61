#!/usr/bin/env python3
"""bench/hf_save.py -- re-save a Hugging Face model directory with the installed transformers' save_pretrained.

    python3 bench/hf_save.py SRC_DIR OUT_DIR [--dtype float32|bfloat16|float16] [--force]

Loads SRC_DIR with AutoModelForCausalLM (in --dtype, default float32: bfloat16 and float16 round each weight to
nearest even, as torch's cast does) and AutoTokenizer and writes both to OUT_DIR with
save_pretrained, exactly as a user of the installed transformers would: its config.json is in that version's form
(transformers 5 writes "rope_parameters" and no top-level "rope_theta"), its safetensors in its own tensor order
and naming. bench/real_model.sh measures the model tools on this output, so that they are checked against what
today's tools write and not only against bench/gguf_to_hf.py's older config form.

The output is built in a temporary sibling directory and renamed into place when complete; without --force an
existing OUT_DIR is refused. Prints the transformers version and the config's rotary fields. Needs torch and
transformers (PyPI); HF_HUB_OFFLINE=1 is set, nothing is downloaded.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="the weights' dtype in OUT_DIR (default float32)")
    ap.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    args = ap.parse_args()
    out = os.path.abspath(args.out_dir)
    if os.path.exists(out) and not args.force:
        sys.exit(f"hf_save.py: {out} exists (use --force to replace it)")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(args.src_dir, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.src_dir)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".hf_save-", dir=parent)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    rotary = {k: config[k] for k in ("rope_theta", "rope_scaling", "rope_parameters") if k in config}
    print(f"saved {out} ({args.dtype}) with transformers {transformers.__version__}; rotary fields: "
          f"{json.dumps(rotary)}")


if __name__ == "__main__":
    main()
