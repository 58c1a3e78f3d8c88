"""Resumable checkpoints: accelerate's save/load_state with hooks that write only what trains, in
the public formats, into folders that appear complete or not at all."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from boft_diffusion import save_boft
from boft_diffusion.control import ControlHead
from boft_diffusion.identifier import IDENTIFIER_FILE, IdentifierEmbeddings, save_identifier_embeddings
from boft_diffusion.io import read_adapter
from boft_diffusion.unet import rotations

logger = logging.getLogger("boft_diffusion.training")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list[Path]:
    """Completed checkpoints (checkpoint-N folders; half-written ones end in .tmp), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, total_limit: int | None) -> Path | None:
    """accelerate.save_state into checkpoint-N.tmp, then rename: a killed run never leaves a
    checkpoint that looks complete but is not. Oldest ones beyond `total_limit` are removed."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    logger.info("Saved checkpoint %s", final)
    return final



def resolve_resume(output_dir: str, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("No checkpoint in %s: starting from scratch.", output_dir)
            return None
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint folder.")
    return path


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_RE.match(path.name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint-N folder.")
    return int(match.group(1))


def register_checkpoint_hooks(accelerator: Accelerator, unet, control_head: ControlHead | None,
                              identifier: IdentifierEmbeddings | None = None) -> None:
    """Checkpoints hold only what trains, in the public formats: the adapter (boft_config.json +
    boft_weights.safetensors under boft/), the control head (control_head/) and learned identifier
    embeddings (boft/identifier_embeddings.safetensors), never the frozen UNet."""

    def save_hook(models, weights, folder):
        if not accelerator.is_main_process:
            return
        for model in models:
            inner = accelerator.unwrap_model(model)
            if inner is unet:
                save_boft(unet, os.path.join(folder, "boft"))
            elif control_head is not None and inner is control_head:
                control_head.save_pretrained(os.path.join(folder, "control_head"))
        if identifier is not None:  # not an accelerate model: see train_subject
            save_identifier_embeddings(identifier, os.path.join(folder, "boft"))
        weights.clear()

    def load_hook(models, folder):
        for model in list(models):
            inner = accelerator.unwrap_model(model)
            if inner is unet:
                load_adapter_values(unet, os.path.join(folder, "boft"))
            elif control_head is not None and inner is control_head:
                loaded = ControlHead.from_pretrained(os.path.join(folder, "control_head"))
                control_head.load_state_dict(loaded.state_dict())
            models.remove(model)
        if identifier is not None:
            load_identifier_values(identifier, os.path.join(folder, "boft"))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


@torch.no_grad()
def load_identifier_values(identifier: IdentifierEmbeddings, folder: str) -> None:
    """Copy saved identifier embeddings into the ones being trained (resume), checking they match."""
    state = load_file(os.path.join(folder, IDENTIFIER_FILE))
    if list(state) != identifier.tokens or any(v.shape != identifier.vectors.shape[1:] for v in state.values()):
        raise ValueError(f"Checkpoint {folder} holds identifier embeddings for {list(state)}, "
                         f"not for {identifier.tokens} being trained.")
    identifier.vectors.copy_(torch.stack(list(state.values())))


@torch.no_grad()
def load_adapter_values(unet, folder: str, adapter_name: str | None = None) -> None:
    """Copy a saved adapter's values into the installed one (resume), checking that it matches."""
    _, state, _ = read_adapter(folder)
    for path, rotation in rotations(unet, adapter_name):
        skew = state.get(f"{path}.boft_skew")
        if skew is None or skew.shape != rotation.boft_skew.shape:
            raise ValueError(f"Checkpoint {folder} does not match the adapter being trained (at {path}).")
        rotation.boft_skew.copy_(skew)
        if f"{path}.boft_s" in state:
            rotation.boft_s.copy_(state[f"{path}.boft_s"])




def resume(accelerator: Accelerator, args) -> int:
    """Load --resume_from_checkpoint (a folder or "latest") into the run; returns the step to continue from."""
    path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if path is None:
        return 0
    accelerator.load_state(str(path))
    logger.info("Resumed from %s", path)
    return checkpoint_step(path)
