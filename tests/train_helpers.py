"""Helpers for the trainer tests."""

import pytest

from training import checkpoints


def run_until_first_checkpoint(main, argv, monkeypatch) -> None:
    """Run a trainer's main(argv) and stop it right after its first checkpoint, as a kill would."""
    real_save = checkpoints.save_checkpoint

    def save_then_die(accelerator, output_dir, step, limit):
        real_save(accelerator, output_dir, step, limit)
        raise KeyboardInterrupt("killed after checkpoint")

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
