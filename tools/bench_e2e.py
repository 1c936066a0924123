"""A real-size run of the real LoRA recipes on a GPU, from synthesized weights: JSON out.

    python tools/bench_e2e.py --work /tmp/e2e --steps 200 --images 300 --out bench_e2e.json

1. Writes real-size random checkpoints in the hub layout (tools/synthesize_checkpoints.py) and a shard set
   of `--images` pictures of mixed aspect ratios around 1024 px (tools/shard_dataset.py).
2. Runs `runner recipes/stage_c_lite_lora.yaml` and `runner recipes/stage_c_lora.yaml` unchanged except
   for the paths, the step count and the validation cadence (`key=value` overrides), each in its own
   process, exactly as a user would.
3. Reports per recipe: time to first step, steps/s (with and without the validation passes), peak GPU
   memory, the loss at the start and the end, and the size of every validation image.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {  # flavour -> (recipe, prior subfolder)
    "stage-c-lite": ("stage_c_lite_lora.yaml", "prior_lite"),
    "stage-c": ("stage_c_lora.yaml", "prior"),
}
SIZES = [(1024, 1024), (1216, 832), (832, 1216), (1344, 768), (1100, 1100)]


def make_images(folder: Path, count: int) -> None:
    """Smooth random colour fields with a caption each (cheap to make, real JPEG decoding to do)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"img_{i:05d}.jpg"
        if path.is_file():
            continue
        w, h = SIZES[i % len(SIZES)]
        small = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(path, quality=90)
        (folder / f"img_{i:05d}.txt").write_text(f"a photo of subject number {i % 17}\n", encoding="utf-8")


def run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-4000:]}")
    return time.perf_counter() - start


def report(out_dir: Path, wall_s: float) -> dict:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out_dir / "summary.json").read_text())
    setup_s = wall_s - summary["wall_time_s"]
    elapsed = [r["elapsed_s"] for r in rows]
    steps = rows[-1]["step"] - rows[0]["step"]
    images = []
    for settings in sorted((out_dir / "validation").glob("*/settings.json")):
        for entry in json.loads(settings.read_text())["images"]:
            images.append(list(Image.open(settings.parent / entry["file"]).size))
    gaps = np.diff([0.0, *elapsed])
    train_gaps = np.sort(gaps)[: max(1, int(0.9 * len(gaps)))]  # drop the steps that include validation
    return {
        "steps": rows[-1]["step"],
        "process_wall_s": round(wall_s, 1),
        "setup_s": round(setup_s, 1),
        "time_to_first_step_s": round(setup_s + elapsed[0], 1),
        "steps_per_s_incl_validation": round(steps / (elapsed[-1] - elapsed[0]), 3),
        "median_step_s": round(float(np.median(train_gaps)), 4),
        "peak_memory_gib": summary.get("peak_memory_gib", summary.get("peak_memory")),
        "loss_first_10": round(float(np.mean([r["loss"] for r in rows[:10]])), 4),
        "loss_last_10": round(float(np.mean([r["loss"] for r in rows[-10:]])), 4),
        "validation_image_sizes": images,
        "cuda_graphs_captured": rows[-1].get("cuda_graphs"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--flavours", default="stage-c-lite,stage-c")
    parser.add_argument("--out", type=Path, default=Path("bench_e2e.json"))
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe overrides, applied last (e.g. a CPU smoke run on tiny weights)")
    args = parser.parse_args(argv)
    work, py = args.work, sys.executable
    work.mkdir(parents=True, exist_ok=True)
    flavours = [f for f in args.flavours.split(",") if f]
    result: dict = {"steps": args.steps, "images": args.images}
    ckpt = work / "checkpoints"
    if not (ckpt / "README.txt").is_file():
        result["synthesize_s"] = round(run([py, "tools/synthesize_checkpoints.py", str(ckpt), "--priors",
                                            ",".join(flavours)], work / "synthesize.log"), 1)
    make_images(work / "images", args.images)
    run([py, "tools/shard_dataset.py", "--input", str(work / "images"), "--output", str(work / "shards"),
         "--samples-per-shard", "100", "--workers", "8"], work / "shard.log")
    for flavour in flavours:
        recipe, subfolder = RECIPES[flavour]
        out = work / f"run_{flavour}"
        overrides = [f"{key}={ckpt}" for key in (
            "model.prior.path", "model.text_encoder.path", "model.tokenizer.path", "model.effnet.path",
            "model.previewer.path", "model.decoder.source.path", "model.decoder.stage_a.path")]
        overrides += [
            f"model.prior.subfolder={subfolder}", f"data.sources.0.path={work / 'shards'}/*.tar",
            f"output.dir={out}", "output.overwrite=true", f"training.max_steps={args.steps}",
            f"checkpoints.every_n_steps={args.steps}", f"validation.every_n_steps={args.steps // 2}",
            f"training.scheduler.warmup_steps={max(1, args.steps // 10)}",
            f"data.cache.text_embeddings_dir={work / 'cache' / 'text'}", "logging.progress_bar=false",
            "data.workers=6", "device=cuda", *args.override]
        wall = run([py, "-m", "runner", f"recipes/{recipe}", *overrides], work / f"train_{flavour}.log")
        result[flavour] = report(out, wall)
        print(flavour, json.dumps(result[flavour]), flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
