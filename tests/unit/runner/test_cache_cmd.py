"""`runner cache` on the tiny checkpoints: fills both caches, a re-run is all hits, training then hits the
text cache, and `runner plan` sees the filled caches under the same encoder identities."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from runner.cli import main
from runner.recipe import read_recipe
from runner.train import train

# what follows conftest.TINY_HEAD (the tiny models) in this file's recipe
RECIPE = """training:
  mode: lora
  lora: {{rank: 2, alpha: 2}}
  batch_size: 2
  max_steps: 1
  seed: 3
  caption_dropout: 0.0
data:
  sources:
    - {{name: tiny, type: local, path: {data}, caption_strategy: textfile, resolution: 128, repeats: 1}}
  cache: {{text_embeddings_dir: {cache}/text, latents: true, latents_dir: {cache}/latents}}
  workers: 0
validation: {{enabled: false, prompts: [x], width: 128, height: 128}}
export: {{lora_formats: [native]}}
logging: {{report_to: jsonl, progress_bar: false, every_n_steps: 1}}
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, noise_images) -> Path:
    """Three small pictures, one with two captions (4 distinct captions)."""
    images = [
        ("red", (160, 128), "a red square"),
        ("green", (128, 128), "a green square"),
        ("blue", (128, 170), "a blue square\na blue box"),
    ]
    return noise_images(tmp_path_factory.mktemp("images"), images, 1)


@pytest.fixture
def recipe(write_tiny_recipe, dataset) -> Path:
    return write_tiny_recipe(RECIPE, dataset, "tiny.yaml")


def counts(out: str, what: str) -> tuple[int, int]:
    m = re.search(rf"^{what} .*?(\d+) hits, (\d+) misses", out, re.M)
    assert m, out
    return int(m[1]), int(m[2])


def test_cache_fills_then_hits_and_training_uses_it(tmp_path, recipe, capsys) -> None:
    assert main(["cache", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert counts(out, "text embeddings") == (0, 4)
    # 3 images x (1 + 1 repeat) = 6 planned crops; the 128x128 one fits its bucket exactly, so both of its
    # repeats have the same crop, and the second finds the first's entry
    assert counts(out, "latents") == (1, 5)
    assert "prompts/s" in out and "images/s" in out

    assert main(["cache", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert counts(out, "text embeddings") == (4, 0) and counts(out, "latents") == (6, 0)

    assert main(["plan", str(recipe)]) == 0  # plan mirrors build's encoder identities
    out = capsys.readouterr().out
    assert "4 of 4 captions cached" in out and "6 of 6 planned crops cached" in out

    train(read_recipe(recipe))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["text_cache_hits"] == 2 and rows[-1]["latent_cache_hits"] == 2


def test_cache_with_both_caches_off_is_a_user_error(recipe, capsys) -> None:
    assert main(["cache", str(recipe), "data.cache.text_embeddings=false", "data.cache.latents=false"]) == 2
    assert "both off" in capsys.readouterr().err
