"""Learned input embeddings for a subject's identifier tokens (pivotal tuning), swapped in by a hook.

On a real Stable Diffusion the identifier ("sks") is a rare but trained CLIP token, so DreamBooth
with a UNet adapter alone works. A text encoder that never learned the identifier (the embedded
tiny model: "sks" appears in no pretraining caption) encodes "a sks square" almost like "a square",
so an adapter cannot tie the subject to the identifier and every prompt drifts towards it.
Learning the identifier's embedding rows next to the adapter (as diffusers' advanced DreamBooth
script does with `--train_text_encoder_ti`) makes the prompt distinct.

The rows are replaced in the output of the text encoder's token-embedding layer by a forward
hook: the text encoder's weights never change, prompts without the identifier are untouched, and
removing the hook restores the base exactly. Files: `identifier_embeddings.safetensors`, one
vector per token string, in the adapter folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .files import read_tensors, write_tensors

IDENTIFIER_FILE = "identifier_embeddings.safetensors"
_HOOK_ATTR = "_boft_identifier_hook"


class IdentifierEmbeddings(nn.Module):
    """Trainable vectors for some token ids; `forward(input_ids, embeds)` swaps them in."""

    def __init__(self, tokens: list[str], token_ids: list[int], vectors: torch.Tensor):
        super().__init__()
        if len(tokens) != len(token_ids) or vectors.shape[0] != len(token_ids):
            raise ValueError(f"{len(tokens)} tokens, {len(token_ids)} ids and {vectors.shape[0]} vectors must match.")
        self.tokens = list(tokens)
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.vectors = nn.Parameter(vectors.detach().float().clone())  # (n, D), fp32 under mixed precision

    def forward(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        match = input_ids[..., None] == self.token_ids.to(input_ids.device)  # (B, L, n)
        hit = match.any(-1, keepdim=True)  # (B, L, 1)
        swapped = match.to(self.vectors.dtype) @ self.vectors  # (B, L, D)
        return torch.where(hit, swapped.to(embeds.dtype), embeds)

    def state(self) -> dict[str, torch.Tensor]:
        return {token: vector for token, vector in zip(self.tokens, self.vectors)}


def identifier_tokens(tokenizer, words: list[str], class_prompts: list[str]) -> tuple[list[str], list[int]]:
    """Token strings and ids of the identifier words, refusing tokens the class prompts also use
    (learning those would change the class prompts, the very thing prior preservation keeps)."""
    ids = [i for w in words for i in tokenizer(w, add_special_tokens=False).input_ids]
    ids = list(dict.fromkeys(ids))
    shared = {i for p in class_prompts for i in tokenizer(p, add_special_tokens=False).input_ids} & set(ids)
    if shared:
        names = tokenizer.convert_ids_to_tokens(sorted(shared))
        raise ValueError(
            f"The identifier {words} shares token(s) {names} with the class prompt(s); learning them would "
            "change the class prompts too. Pick an identifier the tokenizer keeps as its own token(s) (e.g. 'sks')."
        )
    return tokenizer.convert_ids_to_tokens(ids), ids


def new_identifier_embeddings(text_encoder, tokenizer, words: list[str], class_prompts: list[str]) -> IdentifierEmbeddings:
    """Start from the text encoder's current rows, so training starts at the base model."""
    tokens, ids = identifier_tokens(tokenizer, words, class_prompts)
    rows = text_encoder.get_input_embeddings().weight[ids]
    return IdentifierEmbeddings(tokens, ids, rows)


def attach_identifier(text_encoder, embeddings) -> None:
    """Swap the identifier rows in on every text-encoder call; `embeddings` is any callable
    (input_ids, embeds) -> embeds, e.g. an IdentifierEmbeddings."""
    detach_identifier(text_encoder)
    layer = text_encoder.get_input_embeddings()
    layer.__dict__[_HOOK_ATTR] = layer.register_forward_hook(lambda _, args, out: embeddings(args[0], out))


def detach_identifier(text_encoder) -> None:
    """Remove the hook: the text encoder is exactly the base again."""
    handle = text_encoder.get_input_embeddings().__dict__.pop(_HOOK_ATTR, None)
    if handle is not None:
        handle.remove()


def load_identifier_embeddings(path: str | os.PathLike, text_encoder, tokenizer) -> IdentifierEmbeddings | None:
    """The identifier embeddings in an adapter folder (None if it has none), checked against the
    text encoder's width and the tokenizer's vocabulary."""
    file = Path(path) / IDENTIFIER_FILE
    if not file.is_file():
        return None
    width = text_encoder.get_input_embeddings().weight.shape[1]
    vocab = tokenizer.get_vocab()

    def check(shapes: dict[str, tuple[int, ...]]) -> None:  # from the header, before any tensor is read
        unknown = [t for t in shapes if t not in vocab]
        if unknown:
            raise ValueError(f"{file} has token(s) {unknown} that this model's tokenizer does not know: "
                             "the adapter was made for another model.")
        wrong = {t: shape for t, shape in shapes.items() if shape != (width,)}
        if wrong:
            raise ValueError(f"{file} holds vectors of shape {wrong}, but this text encoder's embeddings have width "
                             f"{width}: the adapter was made for another model.")

    state = read_tensors(file, check)  # NaN/Inf refused by token
    tokens = list(state)
    vectors = torch.stack([state[t] for t in tokens]).float()
    return IdentifierEmbeddings(tokens, [vocab[t] for t in tokens], vectors)


def save_identifier_embeddings(embeddings: IdentifierEmbeddings, folder: str | os.PathLike) -> Path:
    """Write `identifier_embeddings.safetensors` into an adapter folder (atomically)."""
    path = Path(folder) / IDENTIFIER_FILE
    write_tensors(path, embeddings.state(), {"format": "pt", "kind": "boft-diffusion identifier embeddings"})
    return path
