"""Loader throughput: images per second per worker at 1024 px, written as JSON.

    python tools/bench_loader.py --output bench_loader.json [--images 64] [--workers 0 2 4]

Builds synthetic 1280x960 / 960x1280 / 1024x1024 JPEGs, shards them with tools/shard_dataset.py,
then times full epochs of the loader (decode, EXIF, resize-to-cover, crop, encoder-size tensor)
at resolution 1024 with the default Stage C buckets.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from runner.data.loader import LoaderConfig, StageCLoader, build_index
from runner.data.sources import SourceSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_dataset import main as shard_main  # noqa: E402

SIZES = [(1280, 960), (960, 1280), (1024, 1024), (1600, 900)]


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        base = rng.integers(0, 256, size=(h // 16, w // 16, 3), dtype=np.uint8)  # smooth-ish photo stand-in
        Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC).save(
            folder / f"img_{i:05d}.jpg", quality=90
        )
        (folder / f"img_{i:05d}.txt").write_text(f"synthetic image {i}")


def time_epoch(index, workers: int, batch_size: int) -> dict:
    cfg = LoaderConfig(batch_size=batch_size, resolution=1024, workers=workers, seed=0)
    loader = StageCLoader(index, cfg)
    start = time.perf_counter()
    n = sum(len(b["keys"]) for b in loader)
    seconds = time.perf_counter() - start
    ips = n / seconds
    return {
        "workers": workers,
        "images": n,
        "seconds": round(seconds, 3),
        "images_per_s": round(ips, 2),
        "images_per_s_per_worker": round(ips / max(1, workers), 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp) / "img", args.images)
        shard_main(["--input", f"{tmp}/img", "--output", f"{tmp}/shards", "--samples-per-shard", "16"])
        spec = SourceSpec(type="webdataset", urls=(f"{tmp}/shards/shard-*.tar",))
        index = build_index([spec], LoaderConfig(batch_size=args.batch_size, resolution=1024))
        runs = [time_epoch(index, w, args.batch_size) for w in args.workers]
    result = {
        "benchmark": "loader",
        "resolution": 1024,
        "batch_size": args.batch_size,
        "runs": runs,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor(),
    }
    args.output.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
