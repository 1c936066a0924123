"""Prompts + seeds + settings -> PNG files, a grid image and a JSON record, all in one folder.

Training writes its validation images to `OUTPUT/validation/step_NNNNNN/` (see `validation_dir`) and
`runner sample` writes to `--out`; both go through `run_validation`, so the files look the same:
`NNN_seedS.png` per image (the image's settings are also in its PNG text chunk 'parameters'),
`grid.png` (all images, rows of ceil(sqrt(n)), cells at most 512 px), and `settings.json` (every
setting used, one entry per image with its file, prompt, negative prompt and seed).

Each image has its own seed and its own CPU torch.Generator, so its noise is the same whatever the batch
size and whichever device runs the models. (With the official CFG rescale, whose std is taken over the
whole batch, batched images still differ slightly from batch size 1; settings.json records batch_size.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from cascade_core.pipeline import (
    DECODER_DEFAULTS,
    PRIOR_DEFAULTS,
    CascadeModels,
    ProgressFn,
    SamplerSettings,
    generate,
)

__all__ = [
    "ValidationJob",
    "ValidationResult",
    "validation_dir",
    "to_pil",
    "make_grid",
    "run_validation",
    "GRID_NAME",
    "SETTINGS_NAME",
]

GRID_NAME = "grid.png"
SETTINGS_NAME = "settings.json"
GRID_CELL_MAX = 512


@dataclass(frozen=True)
class ValidationJob:
    """What to render: image i is prompts[i] with seeds[i]; the other settings are shared."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    negative_prompt: str = ""
    height: int = 1024
    width: int = 1024
    prior: SamplerSettings = PRIOR_DEFAULTS
    decoder: SamplerSettings = DECODER_DEFAULTS
    preview_only: bool = False
    batch_size: int = 1
    extra: Mapping[str, Any] = field(default_factory=dict)  # recorded in settings.json as is

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        problems = []
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            problems.append("prompts must be a non-empty list of strings")
        if len(self.seeds) != len(self.prompts):
            problems.append(f"one seed per prompt: {len(self.prompts)} prompts, {len(self.seeds)} seeds")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            problems.append(f"seeds must be integers >= 0, got {list(self.seeds)}")
        for name in ("height", "width", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if problems:
            raise ValueError("invalid validation job: " + "; ".join(problems))

    def settings(self) -> dict[str, Any]:
        """The shared settings as JSON-friendly values (decoder is null on the Previewer path)."""
        return {
            "height": self.height,
            "width": self.width,
            "negative_prompt": self.negative_prompt,
            "preview_only": self.preview_only,
            "prior": asdict(self.prior),
            "decoder": None if self.preview_only else asdict(self.decoder),
            "batch_size": self.batch_size,
            **dict(self.extra),
        }


@dataclass(frozen=True)
class ValidationResult:
    """The files written."""

    images: tuple[Path, ...]
    grid: Path
    settings: Path


def validation_dir(output_dir: str | Path, step: int) -> Path:
    """OUTPUT/validation/step_NNNNNN: where training writes the validation images of `step`."""
    return Path(output_dir) / "validation" / f"step_{step:06d}"


def to_pil(images: Tensor) -> list[Image.Image]:
    """[B,3,H,W] floats in [0,1] -> RGB PIL images (rounded to 8 bits)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB") for a in arrays]


def make_grid(images: Sequence[Image.Image], cell_max: int = GRID_CELL_MAX) -> Image.Image:
    """Images side by side in rows of ceil(sqrt(n)), each scaled to fit a cell_max square."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    scale = min(1.0, cell_max / max(max(im.size) for im in images))
    cell_w = max(1, round(max(im.width for im in images) * scale))
    cell_h = max(1, round(max(im.height for im in images) * scale))
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h))
    for i, im in enumerate(images):
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        cell = im if size == im.size else im.resize(size, Image.Resampling.LANCZOS)
        grid.paste(cell, ((i % cols) * cell_w, (i // cols) * cell_h))
    return grid


def run_validation(
    models: CascadeModels,
    job: ValidationJob,
    out_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
) -> ValidationResult:
    """Render every (prompt, seed) of `job` in batches of job.batch_size and write the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = job.settings()
    entries: list[dict[str, Any]] = []
    pictures: list[Image.Image] = []
    paths: list[Path] = []
    for start in range(0, len(job.prompts), job.batch_size):
        prompts = list(job.prompts[start : start + job.batch_size])
        seeds = job.seeds[start : start + job.batch_size]
        result = generate(
            models,
            prompts,
            generators=[torch.Generator().manual_seed(s) for s in seeds],
            height=job.height,
            width=job.width,
            negative_prompts=job.negative_prompt,
            prior=job.prior,
            decoder=job.decoder,
            preview_only=job.preview_only,
            progress=progress,
        )
        for k, image in enumerate(to_pil(result.images)):
            index = start + k
            path = out / f"{index:03d}_seed{seeds[k]}.png"
            entry = {
                "file": path.name,
                "prompt": prompts[k],
                "negative_prompt": job.negative_prompt,
                "seed": seeds[k],
            }
            info = PngInfo()
            info.add_text("parameters", json.dumps({**entry, "settings": settings}))
            image.save(path, pnginfo=info)
            entries.append(entry)
            pictures.append(image)
            paths.append(path)
    grid = out / GRID_NAME
    make_grid(pictures).save(grid)
    record = out / SETTINGS_NAME
    record.write_text(json.dumps({"settings": settings, "images": entries}, indent=2) + "\n")
    return ValidationResult(images=tuple(paths), grid=grid, settings=record)
