"""Reading the golden files (../shared/reference/golden): one place for their conventions.

A golden file holds the model's weights under `model.`, its inputs, intermediates and outputs under
`input.` / `intermediate.` / `output.`, and its constructor kwargs as JSON in the header entry `config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor


class GoldenFiles:
    """The golden folder, read by file name (e.g. `golden_files.load("stage_b_tiny.safetensors")`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def load(self, name: str) -> dict[str, Tensor]:
        return load_file(self.root / name)

    def config(self, name: str) -> dict[str, Any]:
        """The constructor kwargs stored in the file's header."""
        with safe_open(str(self.root / name), "pt") as f:
            return json.loads(f.metadata()["config"])

    @staticmethod
    def weights(tensors: dict[str, Tensor], *, as_float32: bool = False) -> dict[str, Tensor]:
        """The `model.` tensors without the prefix; `as_float32` casts floating ones (files that store
        fp16 weights whose reference outputs were computed from them cast back to float32)."""
        return {
            k[len("model.") :]: v.float() if as_float32 and v.is_floating_point() else v
            for k, v in tensors.items()
            if k.startswith("model.")
        }


@pytest.fixture(scope="session")
def golden_files(golden_dir: Path) -> GoldenFiles:
    return GoldenFiles(golden_dir)
