"""runner.validation: PNGs + grid + settings.json from prompts and seeds, on the tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from cascade_core.pipeline import CascadeModels, SamplerSettings
from runner.validation import ValidationJob, make_grid, run_validation, to_pil, validation_dir

FAST = {"prior": SamplerSettings(2, 4.0, 2.0), "decoder": SamplerSettings(2, 1.1, 1.0)}


@pytest.fixture(scope="module")
def models(tiny_cascade_models) -> CascadeModels:
    return tiny_cascade_models


def test_validation_dir():
    assert validation_dir("runs/x", 1500).as_posix() == "runs/x/validation/step_001500"


def test_writes_pngs_grid_and_settings(models, tmp_path):
    job = ValidationJob(
        prompts=("a red cat", "dog", "the dog"),
        seeds=(7, 8, 9),
        negative_prompt="blurry",
        height=64,
        width=96,
        batch_size=2,
        extra={"step": 100},
        **FAST,
    )
    steps = []
    result = run_validation(models, job, tmp_path / "v", progress=lambda *a: steps.append(a))
    assert [p.name for p in result.images] == ["000_seed7.png", "001_seed8.png", "002_seed9.png"]
    for path in result.images:
        with Image.open(path) as im:
            assert im.size == (96, 64) and im.mode == "RGB"
            meta = json.loads(im.text["parameters"])
        assert meta["settings"]["prior"]["steps"] == 2
    with Image.open(result.grid) as grid:
        assert grid.size == (2 * 96, 2 * 64)  # 3 images -> 2 columns, 2 rows
    record = json.loads(result.settings.read_text())
    assert [e["prompt"] for e in record["images"]] == list(job.prompts)
    assert [e["seed"] for e in record["images"]] == [7, 8, 9]
    assert record["images"][0]["negative_prompt"] == "blurry"
    settings = record["settings"]
    assert (settings["height"], settings["width"], settings["batch_size"], settings["step"]) == (
        64,
        96,
        2,
        100,
    )
    assert settings["decoder"] == {
        "steps": 2,
        "guidance": 1.1,
        "shift": 1.0,
        "sampler": "ddpm",
        "cfg_rho": 0.7,
    }
    # 2 batches x (2 prior + 2 decoder steps)
    assert [s[0] for s in steps] == ["prior", "prior", "decoder", "decoder"] * 2


def test_preview_only_records_no_decoder_and_same_seed_same_png(models, tmp_path):
    job = ValidationJob(prompts=("dog",), seeds=(3,), height=80, width=80, preview_only=True, **FAST)
    first = run_validation(models, job, tmp_path / "a")
    second = run_validation(models, job, tmp_path / "b")
    assert json.loads(first.settings.read_text())["settings"]["decoder"] is None
    assert first.images[0].read_bytes() == second.images[0].read_bytes()
    other = run_validation(
        models,
        ValidationJob(prompts=("dog",), seeds=(4,), height=80, width=80, preview_only=True, **FAST),
        tmp_path / "c",
    )
    assert other.images[0].read_bytes() != first.images[0].read_bytes()


def test_to_pil_and_grid():
    images = torch.zeros(5, 3, 10, 20)
    images[1] = 1.0
    pictures = to_pil(images)
    assert pictures[1].getpixel((0, 0)) == (255, 255, 255) and pictures[0].getpixel((0, 0)) == (0, 0, 0)
    grid = make_grid(pictures)
    assert grid.size == (3 * 20, 2 * 10)
    assert grid.getpixel((25, 5)) == (255, 255, 255)  # second cell of the first row
    big = make_grid([Image.new("RGB", (1024, 512))], cell_max=256)
    assert big.size == (256, 128)
    with pytest.raises(ValueError, match="B,3,H,W"):
        to_pil(torch.zeros(3, 4, 4))


def test_job_errors():
    with pytest.raises(ValueError, match="one seed per prompt"):
        ValidationJob(prompts=("a", "b"), seeds=(1,))
    with pytest.raises(ValueError, match="height must be a positive integer"):
        ValidationJob(prompts=("a",), seeds=(1,), height=0)
    with pytest.raises(ValueError, match="seeds must be integers"):
        ValidationJob(prompts=("a",), seeds=(-1,))
