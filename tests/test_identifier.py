"""Learned identifier embeddings: the hook equals a text encoder whose embedding rows were edited,
prompts without the identifier and a detached encoder are bit-identical to the base, files round-trip,
and files for another model or identifiers shared with the class prompt are refused by name."""

import copy

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from boft_diffusion.identifier import (
    IDENTIFIER_FILE,
    attach_identifier,
    detach_identifier,
    identifier_tokens,
    load_identifier_embeddings,
    new_identifier_embeddings,
    save_identifier_embeddings,
)


@pytest.fixture(scope="module")
def encoder(tiny_sd_dir):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder").eval().requires_grad_(False)
    return tokenizer, text_encoder


def encode(tokenizer, text_encoder, prompt):
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_hook_equals_edited_rows_and_detach_restores(encoder):
    tokenizer, text_encoder = encoder
    base_sks, base_class = (encode(tokenizer, text_encoder, p) for p in ("a photo of sks square", "a photo of a square"))
    identifier = new_identifier_embeddings(text_encoder, tokenizer, ["sks"], ["a photo of a square"])
    assert identifier.tokens == ["sks</w>"]
    attach_identifier(text_encoder, identifier)
    try:
        # Fresh: the rows are the encoder's own, so nothing changes.
        torch.testing.assert_close(encode(tokenizer, text_encoder, "a photo of sks square"), base_sks, atol=0, rtol=0)
        with torch.no_grad():
            identifier.vectors.normal_(generator=torch.Generator().manual_seed(0))
        hooked = encode(tokenizer, text_encoder, "a photo of sks square")
        unchanged = encode(tokenizer, text_encoder, "a photo of a square")
    finally:
        detach_identifier(text_encoder)
    edited = copy.deepcopy(text_encoder)
    with torch.no_grad():
        edited.get_input_embeddings().weight[identifier.token_ids] = identifier.vectors
    torch.testing.assert_close(hooked, encode(tokenizer, edited, "a photo of sks square"), atol=1e-6, rtol=0)
    assert (hooked - base_sks).abs().max() > 1e-3
    torch.testing.assert_close(unchanged, base_class, atol=0, rtol=0)  # no identifier: untouched
    torch.testing.assert_close(encode(tokenizer, text_encoder, "a photo of sks square"), base_sks, atol=0, rtol=0)


def test_gradient_reaches_only_the_identifier_vectors(encoder):
    tokenizer, text_encoder = encoder
    identifier = new_identifier_embeddings(text_encoder, tokenizer, ["sks"], ["a square"])
    attach_identifier(text_encoder, identifier)
    try:
        ids = tokenizer(["a sks square"], return_tensors="pt").input_ids
        text_encoder(ids)[0].square().sum().backward()
    finally:
        detach_identifier(text_encoder)
    assert identifier.vectors.grad is not None and identifier.vectors.grad.abs().sum() > 0
    assert all(p.grad is None for p in text_encoder.parameters())


def test_files_round_trip_and_bad_files_are_named(encoder, tmp_path):
    tokenizer, text_encoder = encoder
    identifier = new_identifier_embeddings(text_encoder, tokenizer, ["sks"], ["a square"])
    with torch.no_grad():
        identifier.vectors.add_(1.0)
    save_identifier_embeddings(identifier, tmp_path)
    loaded = load_identifier_embeddings(tmp_path, text_encoder, tokenizer)
    assert loaded.tokens == identifier.tokens and loaded.token_ids.tolist() == identifier.token_ids.tolist()
    torch.testing.assert_close(loaded.vectors, identifier.vectors, atol=0, rtol=0)
    assert load_identifier_embeddings(tmp_path / "nothing", text_encoder, tokenizer) is None

    save_file({"sks</w>": torch.zeros(7)}, str(tmp_path / IDENTIFIER_FILE))
    with pytest.raises(ValueError, match="width .*another model"):
        load_identifier_embeddings(tmp_path, text_encoder, tokenizer)
    save_file({"notatoken</w>": torch.zeros(text_encoder.config.hidden_size)}, str(tmp_path / IDENTIFIER_FILE))
    with pytest.raises(ValueError, match="does not know.*another model"):
        load_identifier_embeddings(tmp_path, text_encoder, tokenizer)
    (tmp_path / IDENTIFIER_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_identifier_embeddings(tmp_path, text_encoder, tokenizer)


def test_identifier_sharing_tokens_with_the_class_prompt_is_refused(encoder):
    tokenizer, _ = encoder
    # Unknown words split into letters: "zz" -> z, z</w>, and the class prompt ends in the letter z.
    with pytest.raises(ValueError, match="shares token.*class prompt"):
        identifier_tokens(tokenizer, ["zz"], ["a photo of a z"])
    tokens, ids = identifier_tokens(tokenizer, ["sks"], ["a photo of a square"])
    assert tokens == ["sks</w>"] and len(ids) == 1
