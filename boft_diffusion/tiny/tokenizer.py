"""A real `CLIPTokenizer` whose vocabulary is the words our captions use, built offline.

CLIP's BPE splits a word into characters (the last one carrying "</w>") and applies merges by
rank. We write every letter (so unknown words still tokenize, letter by letter) plus a merge
chain per word that ends in the whole word, and check that each word becomes one token.
A 49k-entry vocabulary would be 98% of a tiny text encoder's weights; ours is a few hundred.
"""

from __future__ import annotations

import json
import os
import string

from ..data.shapes import BACKGROUNDS, COLORS, SHAPES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 20  # "a photo of sks square with checkered pattern on a white background" fits with BOS/EOS

# Words other trainers and users need beyond the pretraining captions.
EXTRA_WORDS = (
    "a an and of with on in the photo picture image drawing sks object shape thing "
    "background plain pattern patterned checker checkered checkerboard stripes striped dots "
    "dotted spotted orange purple pink cyan brown grey big small large tiny left right top "
    "bottom center middle corner star diamond face person"
).split()


def vocabulary_words() -> list[str]:
    words = list(COLORS) + list(SHAPES) + list(BACKGROUNDS) + EXTRA_WORDS
    return sorted(set(words))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lower-case word: lowest-rank pair first, all its occurrences at once."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, _ = min(pairs)
        if best == 1 << 30:
            break
        a, b = next((parts[i], parts[i + 1]) for r, i in pairs if r == best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab (token -> id) and ranked merges that turn each word into a single token.

    Words are added one at a time: run the merges so far, then append merges that join the
    resulting pieces left to right. Appended merges rank last, so words already handled
    still finish before they could fire; the final check proves it.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    tokens: list[str] = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    for w in words:
        parts = _bpe(w, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
            parts = [parts[0] + parts[1]] + parts[2:]
    for w in words:
        assert _bpe(w, ranks) == [w + "</w>"], f"word {w!r} does not merge to one token"
    # Specials last, as in CLIP: EOS has the highest id.
    ordered = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(ordered)}, merges


def write_vocab_files(folder: str, words: list[str] | None = None) -> None:
    """vocab.json + merges.txt: what a slow CLIPTokenizer (transformers 4) loads from; a
    transformers 5 `save_pretrained` writes only tokenizer.json, so savers call this too."""
    vocab, merges = build_vocab(words or vocabulary_words())
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f, indent=0)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def save_tokenizer(folder: str, words: list[str] | None = None):
    """Write vocab.json + merges.txt and return `CLIPTokenizer.from_pretrained(folder)` saved back."""
    from transformers import CLIPTokenizer

    write_vocab_files(folder, words)
    tok = CLIPTokenizer(
        os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
        bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS, model_max_length=MAX_LENGTH,
    )
    tok.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)
