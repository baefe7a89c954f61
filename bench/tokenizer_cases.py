#!/usr/bin/env python3
"""bench/tokenizer_cases.py -- writes the tokenizer.json files and expected ids that tests/test_tokenizer.cpp reads.

    python3 bench/tokenizer_cases.py [OUT_DIR]        (default: tests/data)

Writes into OUT_DIR:
  tokenizer_byte_level.json     byte-level BPE in Llama 3's form: Split on Llama 3's regex, then ByteLevel without
                                its own regex; a Replace normalizer; ignore_merges; added tokens with the lstrip,
                                rstrip, single_word and normalized flags; a BOS template in a Sequence post-processor
  tokenizer_sentencepiece.json  the SentencePiece form of Llama 2: normalizer Prepend("▁") + Replace(" ", "▁"), no
                                pre-tokenizer, BPE with byte_fallback over <0x00>..<0xFF>, unk_token and fuse_unk,
                                added <unk> <s> </s>, a "<s> $A" template
  tokenizer_metaspace.json      the same vocabulary in the newer form: no normalizer, Metaspace pre-tokenizer with
                                prepend_scheme "first" and split false
  tokenizer_metaspace_split.json  the same with prepend_scheme "always" and split true
  tokenizer_splits.json         byte-level BPE behind a Regex Replace normalizer and a Sequence of Split
                                pre-tokenizers with every behavior (removed, merged_with_previous, merged_with_next,
                                contiguous, isolated with invert) and Digits without individual_digits
  tokenizer_expected.json       {"cases": [text, ...], "<file>": [[ids of case 0], ...], ...}: the ids the installed
                                `tokenizers` package gives (encode(text).ids, special tokens added)

The vocabularies and merges are trained here, by tokenizers' BpeTrainer, on bench/quality_sentences.txt (small,
so that byte fallback and unknown characters occur); the files are deterministic for one tokenizers version. The
C++ test checks its encoder against the stored numbers, so CI needs no Python. Run again (and commit the result)
only when the cases change. Requires: tokenizers (PyPI).
"""
import json
import os
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Each case exercises one stage; the comments say which.
CASES = [
    "",                                                   # nothing: the template alone
    "Hello world",
    "The kettle clicked off just as the phone started ringing in the hallway.",
    "  leading and trailing spaces   ",                   # whitespace runs: \s+(?!\S) and Metaspace runs of ▁
    "tabs\tand\nnew\r\nlines\n\n\n",
    "I'll say it's DON'T, we've we'd they're",           # contractions, (?i:...) in Llama 3's pattern
    "1234567 + 89 = 1234656; 3.14159",                    # \p{N}{1,3}
    "café naïve über – “quotes” … ½ ²",                   # Latin-1 and beyond, No digits
    "中文字符 and 日本語テキスト",                          # characters outside the trained alphabet
    "emoji 🙂🙃 and a zero\u200bwidth space, NBSP\u00a0here",
    "<|begin|>after the begin token",                     # a special added token, not normalized
    "text  <|end|>   more text",                          # lstrip and rstrip swallow the spaces
    "a [mask] here, not x[mask]y, [mask]",                # single_word, normalized token
    "a ``quoted`` word",                                  # the Replace normalizer (`` -> ")
    "<s>hello</s> <unk> and <s> again",                   # SentencePiece's added tokens mid-text
    "literal <0x41> is text, not a byte",
    "ends with a newline\n",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ",
    "\n",
    "x",
    "a-b--c. d..e -x- 12-34.5 end.",                     # Split behaviors around '-' and '.'
    "well,known;list, of;; things,",                      # inverted Split
    "2024  12\t31",                                       # Regex Replace of whitespace runs, Digits contiguous
]


def train(tok, alphabet_limit, vocab_size):
    """Byte-level: the 256 byte characters to start from. SentencePiece form: the alphabet_limit most frequent
    characters only, so that the rest take the byte fallback."""
    options = dict(vocab_size=vocab_size, min_frequency=2, show_progress=False)
    if alphabet_limit is None:
        options["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
    else:
        options["limit_alphabet"] = alphabet_limit
    tok.train([os.path.join(HERE, "quality_sentences.txt")], trainers.BpeTrainer(**options))


def byte_level():
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("``", '"')])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    train(tok, None, 600)
    tok.add_special_tokens([AddedToken("<|begin|>", special=True, normalized=False),
                            AddedToken("<|end|>", special=True, normalized=False, lstrip=True, rstrip=True)])
    tok.add_tokens([AddedToken("[mask]", single_word=True, normalized=True)])
    begin = tok.token_to_id("<|begin|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", begin)]),
    ])
    return tok


def splits():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(Regex(r"\s+"), " ")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="removed"),
        pre_tokenizers.Split("-", behavior="merged_with_previous"),
        pre_tokenizers.Split(".", behavior="merged_with_next"),
        pre_tokenizers.Split(Regex(r"\d"), behavior="contiguous"),
        pre_tokenizers.Split(Regex(r"[^,;]+"), behavior="isolated", invert=True),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False),
    ])
    train(tok, None, 400)
    return tok


def sentencepiece(metaspace, scheme="first", split=False):
    """Llama 2's layout: <unk> <s> </s>, the 256 byte pieces, then the trained pieces; byte fallback."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    train(trained, 60, 420)
    data = json.loads(trained.to_str())
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {p: i for i, p in enumerate(specials)}
    for p, _ in pieces:
        vocab.setdefault(p, len(vocab))
    data["model"].update({"vocab": vocab, "unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True,
                          "ignore_merges": False})
    data["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in enumerate(specials[:3])]
    data["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}},
                                       {"SpecialToken": {"id": "<s>", "type_id": 1}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    if metaspace:
        data["normalizer"] = None
        data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": split}
    data["decoder"] = None
    return Tokenizer.from_str(json.dumps(data))


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "tests", "data")
    os.makedirs(out, exist_ok=True)
    expected = {"cases": CASES}
    for name, tok in (("tokenizer_byte_level.json", byte_level()),
                      ("tokenizer_sentencepiece.json", sentencepiece(False)),
                      ("tokenizer_metaspace.json", sentencepiece(True)),
                      ("tokenizer_metaspace_split.json", sentencepiece(True, "always", True)),
                      ("tokenizer_splits.json", splits())):
        tok.save(os.path.join(out, name), pretty=False)
        reloaded = Tokenizer.from_file(os.path.join(out, name))  # the ids of the file as written
        expected[name] = [reloaded.encode(text).ids for text in CASES]
        print(f"tokenizer_cases.py: {name}: vocabulary {reloaded.get_vocab_size()}, "
              f"{sum(map(len, expected[name]))} ids over {len(CASES)} cases")
    with open(os.path.join(out, "tokenizer_expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
