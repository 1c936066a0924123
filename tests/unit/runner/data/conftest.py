"""Small image folders for the data tests: scikit-image photos plus made-up images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

# (width, height) of the generated images: square, landscape and portrait of varied sizes.
SIZES = [(96, 96), (160, 90), (90, 160), (128, 96), (96, 128), (200, 100), (100, 200), (120, 120)]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def make_folder(root: Path, n_generated: int = 20) -> list[str]:
    """Write photos + generated images with .txt captions; returns the relative names written."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for name in PHOTOS:
        im = Image.fromarray(getattr(skimage.data, name)())
        im.thumbnail((160, 160))
        im.save(root / f"{name}.jpg", quality=90)
        (root / f"{name}.txt").write_text(f"a photo of {name}", encoding="utf-8")
        names.append(f"{name}.jpg")
    rng = np.random.default_rng(0)
    for i in range(n_generated):
        w, h = SIZES[i % len(SIZES)]
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"gen {i:02d}.png")
        (root / f"gen {i:02d}.txt").write_text(f"generated image {i}", encoding="utf-8")
        names.append(f"gen {i:02d}.png")
    return names


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    make_folder(tmp_path / "images")
    return tmp_path / "images"


def run_shard_tool(argv: list[str]) -> int:
    """tools/shard_dataset.py's main(), loaded by path (tools/ is not an installed package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[4] / "tools" / "shard_dataset.py"
    spec = importlib.util.spec_from_file_location("shard_dataset_tool", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    make_folder(tmp_path / "images")
    out = tmp_path / "shards"
    assert (
        run_shard_tool(
            ["--input", str(tmp_path / "images"), "--output", str(out), "--samples-per-shard", "5"]
        )
        == 0
    )
    return out
