"""BOFTConfig: what an adapter is (block layout, factors, targets), saved as JSON next to its weights."""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from .butterfly import resolve_blocks
from .files import read_json_object

CONFIG_NAME = "boft_config.json"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
INITS = ("identity", "random")
MAX_FEATURES = 2**16  # no projection is wider; bounds b and d/b before any arithmetic
MAX_FACTORS = MAX_FEATURES.bit_length()  # m <= 1 + log2(d/b); more can never fit


def integer_field(name: str, value, low: int, high: int) -> int:
    """`value` as an int in [low, high], else a ValueError naming the field (bools and 8.0 are not ints)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r} ({type(value).__name__}).")
    return int(value)


def fraction_field(name: str, value) -> float:
    """`value` as a float in [0, 1), else a ValueError naming the field."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r} ({type(value).__name__}).")
    return float(value)


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
        """Each field's type and bounds first (so no arithmetic ever sees a string or a huge m),
        then how the fields combine."""
        sizes = {"block_size": self.block_size, "block_num": self.block_num}
        for name, value in sizes.items():
            if value is not None:
                setattr(self, name, integer_field(name, value, 1, MAX_FEATURES))
        self.n_butterfly_factors = integer_field("n_butterfly_factors", self.n_butterfly_factors, 1, MAX_FACTORS)
        targets = self.target_modules
        if isinstance(targets, (str, bytes)) or not isinstance(targets, (list, tuple)) or not all(
            isinstance(t, str) for t in targets
        ):
            raise ValueError(f"target_modules must be a list of names from {list(PROJECTIONS)}, got {targets!r}.")
        self.target_modules = list(targets)
        unknown = [t for t in self.target_modules if t not in PROJECTIONS]
        if unknown or not self.target_modules or len(set(targets)) != len(targets):
            raise ValueError(
                f"target_modules must be a non-empty list of distinct names from {list(PROJECTIONS)}, got {targets!r}."
            )
        self.dropout = fraction_field("dropout", self.dropout)
        if not isinstance(self.train_scale, bool):
            raise ValueError(f"train_scale must be true or false, got {self.train_scale!r}.")
        if not isinstance(self.init, str) or self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}.")
        if (self.block_size is None) == (self.block_num is None):
            raise ValueError(
                f"BOFTConfig needs exactly one of block_size or block_num, got block_size={self.block_size}, "
                f"block_num={self.block_num}."
            )
        if self.block_size is not None and self.n_butterfly_factors > 1 and self.block_size % 2:
            raise ValueError(
                f"block_size={self.block_size} must be even when n_butterfly_factors > 1 "
                f"(each factor pairs half-blocks); try {self.block_size - 1} or {self.block_size + 1}."
            )

    def blocks_for(self, features: int, layer: str) -> tuple[int, int]:
        """(block_size, block_num) for a projection with `features` inputs; ValueError names the layer."""
        return resolve_blocks(features, self.n_butterfly_factors, self.block_size, self.block_num, layer)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BOFTConfig":
        if not isinstance(data, dict):
            raise ValueError(f"A BOFT config is a JSON object of fields, got a {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown BOFTConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> "BOFTConfig":
        """Read and validate a saved config; every error names the file (and the field)."""
        path = Path(path)
        data = read_json_object(path)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    @staticmethod
    def help_text(name: str) -> str:
        """Field help, reused by the trainers' argparse."""
        return next(f.metadata["help"] for f in dataclasses.fields(BOFTConfig) if f.name == name)
