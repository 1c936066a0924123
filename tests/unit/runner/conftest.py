"""Setup shared by the runner tests that train on the tiny checkpoints: the recipe head that points every
model at the tiny checkpoint folder, and the two kinds of small captioned image folders they train on.

The helpers are fixtures that return functions, so each test file still states its own recipe body and
its own pictures (their counts and sizes are what its assertions depend on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The part of every tiny recipe that is the same: CPU, the output folder and the models (a test's body may
# go on with more `model:` keys, indented by two spaces). Doubled braces survive str.format.
TINY_HEAD = """device: cpu
output: {{dir: {out}}}
model:
  flavour: tiny
  prior: {{path: {ckpt}, subfolder: prior}}
  text_encoder: {{path: {ckpt}, subfolder: text_encoder}}
  tokenizer: {{path: {ckpt}, subfolder: tokenizer}}
  effnet: {{path: {ckpt}, filename: effnet_encoder.safetensors}}
"""

# `{decoder}` in a body: the tiny Previewer and validation decoder (Stage B lite + Stage A), as `model:` keys.
TINY_DECODER = """  previewer: {{path: {ckpt}, filename: previewer.safetensors}}
  decoder:
    flavour: tiny
    source: {{path: {ckpt}, subfolder: decoder_lite}}
    stage_a: {{path: {ckpt}, subfolder: vqgan}}
"""

RecipeWriter = Callable[[str, Path, str], Path]
Squares = Sequence[tuple[str, tuple[int, int]]]
Captioned = Sequence[tuple[str, tuple[int, int], "str | None"]]


@pytest.fixture
def write_tiny_recipe(tmp_path: Path, tiny_checkpoints: Path) -> RecipeWriter:
    """`write(body, data, filename)`: TINY_HEAD + body written to tmp_path/filename, with {out} =
    tmp_path/run, {ckpt} = the tiny checkpoints, {data} = `data`, {cache} = tmp_path/cache and
    {decoder} = TINY_DECODER."""

    def write(body: str, data: Path, filename: str) -> Path:
        path = tmp_path / filename
        text = (TINY_HEAD + body).format(
            out=tmp_path / "run", ckpt=tiny_checkpoints, data=data, cache=tmp_path / "cache",
            decoder=TINY_DECODER.format(ckpt=tiny_checkpoints),
        )
        path.write_text(text, encoding="utf-8")
        return path

    return write


def _gradient_squares(folder: Path, squares: Squares) -> Path:
    """Square i (name, (width, height)) is colour channel i % 3 rising left to right plus N(0, 0.05) noise
    (seed 0), captioned 'a NAME square': flat enough for a tiny LoRA to overfit in a few steps."""
    rng = np.random.default_rng(0)
    for i, (name, (width, height)) in enumerate(squares):
        base = np.zeros((height, width, 3), dtype=np.float32)
        base[..., i % 3] = np.linspace(0.2, 1.0, width)[None, :]
        base += rng.normal(0, 0.05, base.shape).astype(np.float32)
        Image.fromarray((base.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} square\n", encoding="utf-8")
    return folder


def _noise_images(folder: Path, images: Captioned, seed: int) -> Path:
    """Uniform random pictures (name, (width, height), caption); a None caption writes no .txt file."""
    rng = np.random.default_rng(seed)
    for name, (width, height), caption in images:
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        if caption:
            (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def gradient_squares() -> Callable[[Path, Squares], Path]:
    return _gradient_squares


@pytest.fixture(scope="session")
def noise_images() -> Callable[[Path, Captioned, int], Path]:
    return _noise_images
