"""BOFTConfig: what an adapter is (block layout, factors, targets), saved as JSON next to its weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .butterfly import resolve_blocks

CONFIG_NAME = "boft_config.json"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
INITS = ("identity", "random")


@dataclass
class BOFTConfig:
    block_size: int | None = field(
        default=None, metadata={"help": "Size b of each orthogonal block (set this or block_num)."}
    )
    block_num: int | None = field(
        default=None, metadata={"help": "Blocks per factor, d/b (set this or block_size)."}
    )
    n_butterfly_factors: int = field(
        default=1, metadata={"help": "Butterfly factors m; 1 is block-diagonal OFT, 1 + log2(d/b) is dense."}
    )
    target_modules: list[str] = field(
        default_factory=lambda: list(PROJECTIONS),
        metadata={"help": f"Attention projections to rotate, any of {', '.join(PROJECTIONS)}."},
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Multiplicative dropout: chance that a block acts as identity in a training step."}
    )
    train_scale: bool = field(
        default=True, metadata={"help": "Learn the per-output scale s of W' = diag(s) W R^T (PEFT's boft_s)."}
    )
    init: str = field(
        default="identity", metadata={"help": "'identity' (exact base model at start) or 'random' (for tests)."}
    )

    def __post_init__(self) -> None:
        if (self.block_size is None) == (self.block_num is None):
            raise ValueError(
                f"BOFTConfig needs exactly one of block_size or block_num, got block_size={self.block_size}, "
                f"block_num={self.block_num}."
            )
        if self.n_butterfly_factors < 1:
            raise ValueError(f"n_butterfly_factors must be >= 1, got {self.n_butterfly_factors}.")
        if self.block_size is not None and self.n_butterfly_factors > 1 and self.block_size % 2:
            raise ValueError(
                f"block_size={self.block_size} must be even when n_butterfly_factors > 1 "
                f"(each factor pairs half-blocks); try {self.block_size - 1} or {self.block_size + 1}."
            )
        self.target_modules = list(self.target_modules)
        unknown = [t for t in self.target_modules if t not in PROJECTIONS]
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules must be a non-empty subset of {list(PROJECTIONS)}, got {unknown or []}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}.")

    def blocks_for(self, features: int, layer: str) -> tuple[int, int]:
        """(block_size, block_num) for a projection with `features` inputs; ValueError names the layer."""
        return resolve_blocks(features, self.n_butterfly_factors, self.block_size, self.block_num, layer)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BOFTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown BOFTConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> "BOFTConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No BOFT config at {path}.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); the adapter folder is corrupt.") from err
        return cls.from_dict(data)

    @staticmethod
    def help_text(name: str) -> str:
        """Field help, reused by the trainers' argparse."""
        return next(f.metadata["help"] for f in dataclasses.fields(BOFTConfig) if f.name == name)
