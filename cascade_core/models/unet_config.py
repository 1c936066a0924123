"""What the Stage C and Stage B configs share: the official UNet constructor's level lists, their checks,
and the conversion to and from the official keyword arguments.

Both configs are frozen dataclasses that inherit `UNetConfig`; it holds no fields of its own.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

BLOCK_TYPES = frozenset("CTAF")  # ResBlock, TimestepBlock, AttnBlock, FeedForwardBlock
PER_LEVEL = ("c_hidden", "nhead", "level_config", "dropout")  # one entry per UNet level
NESTED = ("blocks", "block_repeat")  # [down per level, up deepest-first]
SETTINGS = ("gradient_checkpointing",)  # runtime switches, not official constructor arguments

C = TypeVar("C", bound="UNetConfig")


class UNetConfig:
    """Mixin for a frozen dataclass of official UNet constructor arguments."""

    def _normalise(self, flat: tuple[str, ...]) -> None:
        """Lists (from YAML/JSON) become tuples, so configs compare and hash."""
        for name in flat:
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in NESTED:
            object.__setattr__(self, name, tuple(tuple(v) for v in getattr(self, name)))

    def _level_problems(self) -> list[str]:
        """Every inconsistency between the per-level lists, as readable messages."""
        n = len(self.c_hidden)
        problems = [f"{name} has {len(getattr(self, name))} entries, c_hidden has {n}"
                    for name in PER_LEVEL[1:] if len(getattr(self, name)) != n]
        for name in NESTED:
            value = getattr(self, name)
            if len(value) != 2 or any(len(v) != n for v in value):
                problems.append(f"{name} must be [down, up] with {n} entries each, got {value}")
        if any(r < 1 for v in self.block_repeat for r in v):
            problems.append(f"block_repeat entries must be >= 1, got {self.block_repeat}")
        for i, letters in enumerate(self.level_config[: min(n, len(self.nhead))]):
            if not letters or set(letters) - BLOCK_TYPES:
                problems.append(f"level_config[{i}]={letters!r} may only use the letters C, T, A, F")
            elif "A" in letters and (self.nhead[i] <= 0 or self.c_hidden[i] % self.nhead[i]):
                problems.append(
                    f"level {i}: c_hidden {self.c_hidden[i]} is not a multiple of nhead {self.nhead[i]}"
                )
        return problems

    def _raise_if(self, problems: list[str]) -> None:
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """From official constructor kwargs (extra keys are rejected with their names)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Official constructor kwargs as JSON-friendly lists (runtime switches left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in SETTINGS:
                continue
            value = getattr(self, f.name)
            if f.name in NESTED:
                out[f.name] = [list(v) for v in value]
            else:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
