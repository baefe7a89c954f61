#!/usr/bin/env python3
"""bench/uptrain_calibration.py -- model-generated token ids for gqa-uptrain: a calibration set and a separate
held-out evaluation set, both sampled from the native model itself.

    python3 bench/uptrain_calibration.py MODEL_DIR OUT_DIR [--tokens-per-prompt N] [--threads N]

Writes OUT_DIR/calibration.ids (prompts 0..23, seed 1) and OUT_DIR/heldout.ids (prompts 24..35, seed 2): for each
prompt (questions written for this project, wrapped in the model's chat template), the prompt ids followed by the
model's answer sampled with temperature 1.0 and top-k 50, all concatenated. The two sets share no prompt, and
neither uses bench/eval/gqa_docs.txt (the project's held-out text). Needs /work/venv (torch, transformers); runs
offline (HF_HUB_OFFLINE=1).
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Questions written for this project; no text copied from elsewhere.
PROMPTS = [
    "Explain how a bicycle stays upright while it is moving.",
    "Write a short story about a lighthouse keeper who finds a lost cat.",
    "What are the main differences between rivers and canals?",
    "Describe a good breakfast for someone who runs in the morning.",
    "How do bees decide where to build a new hive?",
    "Give three tips for learning to play the piano as an adult.",
    "Why does bread go stale, and how can it be kept fresh longer?",
    "Write a letter from a student to a teacher thanking them for a year of lessons.",
    "Explain what a compiler does, in simple words.",
    "What should a family pack for a week of camping in the mountains?",
    "Describe the water cycle to a ten year old.",
    "Write a poem about autumn leaves falling in a city park.",
    "How does a refrigerator keep food cold?",
    "What are some good ways to save money on groceries?",
    "Explain why the sky looks blue during the day and red at sunset.",
    "Write a short dialogue between a baker and a customer who wants a birthday cake.",
    "What is the difference between weather and climate?",
    "Describe how to plant and care for tomatoes in a small garden.",
    "Why do people enjoy music, and how does it affect the mood?",
    "Explain how a library organizes its books.",
    "Write a travel diary entry about a day spent in a quiet fishing village.",
    "What are the benefits of walking every day?",
    "How do airplanes stay in the air?",
    "Describe the life of a farmer during one busy harvest week.",
    # Held-out prompts (24..): never used for calibration.
    "Explain how a train signal system prevents collisions.",
    "Write a short story about two friends building a raft.",
    "What makes a good team captain in school sports?",
    "Describe how to make a simple vegetable soup.",
    "Why do some animals sleep through the winter?",
    "Give advice to someone starting their first job in an office.",
    "Explain how a microwave oven heats food.",
    "Write a description of a busy market on a Saturday morning.",
    "What are the parts of a flower, and what does each part do?",
    "How can a small town make its streets safer for children?",
    "Explain why the moon shows different shapes during the month.",
    "Write a note from a neighbour asking to borrow a ladder.",
]
CALIBRATION = range(0, 24)
HELDOUT = range(24, 36)


def generate(model, tok, prompts, seed, new_tokens, torch):
    torch.manual_seed(seed)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    # One batch, left-padded with an attention mask (transformers derives the positions from it), so each sequence
    # is generated as if alone; the padding and anything after the end-of-text token are dropped.
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=50, top_p=1.0,
                             max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    ids = []
    for row, mask in zip(out, enc["attention_mask"]):
        pad = int((mask == 0).sum())
        seq = [int(t) for t in row[pad:]]
        prompt_len = len(mask) - pad
        answer = seq[prompt_len:]
        if tok.eos_token_id in answer:
            answer = answer[:answer.index(tok.eos_token_id) + 1]
        ids.extend(seq[:prompt_len] + answer)
    print(f"  {len(ids)} ids", file=sys.stderr, flush=True)
    return ids


def write_ids(path, ids):
    with open(path, "w") as f:
        for i in range(0, len(ids), 20):
            f.write(" ".join(map(str, ids[i:i + 20])) + "\n")
    print(f"uptrain_calibration.py: {len(ids)} ids -> {path}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--tokens-per-prompt", type=int, default=700)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32).eval()
    os.makedirs(args.out_dir, exist_ok=True)
    write_ids(os.path.join(args.out_dir, "calibration.ids"),
              generate(model, tok, [PROMPTS[i] for i in CALIBRATION], 1, args.tokens_per_prompt, torch))
    write_ids(os.path.join(args.out_dir, "heldout.ids"),
              generate(model, tok, [PROMPTS[i] for i in HELDOUT], 2, args.tokens_per_prompt, torch))


if __name__ == "__main__":
    main()
