#!/usr/bin/env python
"""Train the tiny CLIP-style byte-level BPE tokenizer embedded in apex_fast.

The tiny offline pipeline (apex_fast.models.tiny) needs a tokenizer that
`transformers.CLIPTokenizer.from_pretrained(dir)` can load without any download.
This script makes one from the project's own prompt files:

* normalisation and pre-tokenisation are exactly CLIP's (NFC, whitespace squashing,
  lowercase, CLIP's word regex, byte-level alphabet), taken from the `tokenizers`
  library so training sees the same words the CLIPTokenizer backend will produce;
* merges are learned with the `</w>` end-of-word suffix by a small deterministic BPE
  loop (most frequent pair first, ties broken lexicographically);
* the vocabulary is laid out like OpenAI CLIP's: 256 byte symbols, the same 256
  with `</w>`, one token per merge (in merge order), then `<|startoftext|>` and
  `<|endoftext|>`.

The output (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)
is deterministic: running the script twice gives byte-identical files.

Usage:
    python scripts/train_tokenizer.py                     # writes the committed asset
    python scripts/train_tokenizer.py --out DIR --vocab-size 1000 PROMPT_FILE ...
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from tokenizers import Regex, normalizers, pre_tokenizers

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_DIR = ROOT / "apex_fast" / "data" / "prompts"
DEFAULT_FILES = ("tiny_train.txt", "tiny_eval.txt", "ocr_train.txt", "ocr_eval.txt")
DEFAULT_OUT = ROOT / "apex_fast" / "models" / "assets" / "tiny_clip_tokenizer"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
SUFFIX = "</w>"
MODEL_MAX_LENGTH = 77  # as SD3's CLIP tokenizers
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )


def clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def read_prompts(paths: list[Path]) -> list[str]:
    prompts: list[str] = []
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                line = json.loads(line)["prompt"]
            prompts.append(line)
    return prompts


def word_counts(prompts: list[str]) -> Counter:
    norm, pre = clip_normalizer(), clip_pre_tokenizer()
    counts: Counter = Counter()
    for p in prompts:
        for word, _ in pre.pre_tokenize_str(norm.normalize_str(p)):
            counts[word] += 1
    return counts


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of GPT-2/CLIP byte-level BPE, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def learn_merges(counts: Counter, n_merges: int) -> list[tuple[str, str]]:
    """Learn up to `n_merges` BPE merges over the counted words (CLIP `</w>` convention).

    Each word starts as its byte-level characters with `</w>` glued to the last one; the
    most frequent adjacent pair is merged, ties broken by the lexicographically smallest
    pair. (The `tokenizers` BpeTrainer breaks count ties by internal ids assigned in hash
    order, so its merges differ from run to run; this loop is the deterministic
    equivalent and is small enough for a prompt-file corpus.)
    """
    words = {tuple(w[:-1]) + (w[-1] + SUFFIX,): c for w, c in counts.items() if w}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for sym, c in words.items():
            for pair in zip(sym[:-1], sym[1:]):
                pairs[pair] += c
        if not pairs:
            break  # every word is a single token already
        best = min(pairs, key=lambda pr: (-pairs[pr], pr))
        merges.append(best)
        joined = best[0] + best[1]
        new_words: dict = {}
        for sym, c in words.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    alphabet = byte_alphabet()
    tokens = alphabet + [c + SUFFIX for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        if t in vocab:
            raise RuntimeError(f"duplicate token {t!r}")
        vocab[t] = len(vocab)
    return vocab


def write_tokenizer(out: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=None) + "\n", encoding="utf-8")
    lines = ["#version: 0.2 - tiny CLIP-style BPE trained by apex_fast scripts/train_tokenizer.py"]
    lines += [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="prompt files (.txt one per line, or .jsonl); default: the four shipped prompt files")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--vocab-size", type=int, default=1000, help="target size incl. 512 byte symbols and 2 specials")
    args = ap.parse_args(argv)

    files = args.files or [PROMPTS_DIR / name for name in DEFAULT_FILES]
    prompts = read_prompts(files)
    n_merges = args.vocab_size - 512 - 2
    if n_merges < 0:
        raise SystemExit("--vocab-size must be at least 514 (256 bytes, 256 bytes + </w>, 2 specials)")
    merges = learn_merges(word_counts(prompts), n_merges)
    vocab = build_vocab(merges)
    write_tokenizer(args.out, vocab, merges)
    print(f"wrote {args.out}: {len(vocab)} tokens, {len(merges)} merges from {len(prompts)} prompts in {len(files)} files")


if __name__ == "__main__":
    main()
