"""What the UNet is conditioned on in training, per model family, computed as the diffusers pipelines do.

SD 1.x/2.x: the text encoder's last hidden state. SDXL: the penultimate hidden states of both text
encoders, concatenated (B, L, 768 + 1280 at full size), the pooled (projected) embedding of the
second, and `add_time_ids` = (original height, width, crop top, left, target height, width) of each
sample, as diffusers' train_controlnet_sdxl.py / train_dreambooth_lora_sdxl.py compute them. The
datasets record each sample's size and crop (`time_ids`) only for SDXL.
"""

from __future__ import annotations

import torch

TEXT, POOLED = "encoder_hidden_states", "text_embeds"


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target: int) -> torch.Tensor:
    """SDXL's size and crop conditioning of one sample, (6,): (h, w) before resizing, (top, left) of
    the crop in the resized image, (target, target)."""
    return torch.tensor([*original_size, *crop_top_left, target, target], dtype=torch.float32)


class PromptEncoder:
    """Captions -> {TEXT: (B, L, D)} (SD) or {TEXT: (B, L, D1 + D2), POOLED: (B, P)} (SDXL).
    Learned identifier embeddings act through a hook on the first text encoder (`attach_identifier`),
    so `encode` carries their gradients."""

    def __init__(self, run):
        self.device = run.device
        self.tokenizers = [t for t in (run.tokenizer, run.tokenizer_2) if t is not None]
        self.encoders = [e for e in (run.text_encoder, run.text_encoder_2) if e is not None]
        self.xl = run.family == "sdxl"

    def ids(self, captions: list[str]) -> list[torch.Tensor]:
        """Token ids, (B, L) per tokenizer, padded and truncated to its length as the pipelines do."""
        return [
            t(captions, padding="max_length", max_length=t.model_max_length, truncation=True, return_tensors="pt").input_ids
            for t in self.tokenizers
        ]

    def encode(self, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.xl:
            return {TEXT: self.encoders[0](ids[0].to(self.device))[0]}
        hidden, pooled = [], None
        for encoder, tokens in zip(self.encoders, ids):
            out = encoder(tokens.to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected pooled embedding, (B, P)
        return {TEXT: torch.cat(hidden, dim=-1), POOLED: pooled}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.encode(self.ids(captions))


class CaptionTable:
    """PromptEncoder outputs of every distinct caption (and ""), encoded once in fixed batches: with
    frozen text encoders a step then gathers rows instead of tokenizing and encoding (--cache_latents)."""

    def __init__(self, prompts: PromptEncoder, captions, batch_size: int = 64):
        self.captions = sorted(set(captions) | {""})
        self.index = {caption: i for i, caption in enumerate(self.captions)}
        with torch.no_grad():
            parts = [prompts(self.captions[i : i + batch_size]) for i in range(0, len(self.captions), batch_size)]
        self.table = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        rows = torch.tensor([self.index[caption] for caption in captions])
        return {key: values[rows.to(values.device)] for key, values in self.table.items()}


def predict(unet, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict, time_ids: torch.Tensor | None = None):
    """The UNet's prediction for noisy latents under `text` (PromptEncoder's output) and, for SDXL,
    the batch's (B, 6) time ids."""
    if POOLED not in text:
        return unet(noisy, timesteps, text[TEXT]).sample
    added = {POOLED: text[POOLED], "time_ids": time_ids.to(noisy.device, text[TEXT].dtype)}
    return unet(noisy, timesteps, text[TEXT], added_cond_kwargs=added).sample
