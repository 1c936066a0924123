"""Seconds per image and peak GPU memory of the sampling pipeline (Stage C -> Stage B -> Stage A, ) at real
resolution: JSON out.

    python tools/bench_pipeline.py --model CHECKPOINT_FOLDER [--decoder decoder_lite] --out DIR \
        --json bench_pipeline.json

The models are found and loaded exactly as `runner sample` does (same options). Each case runs once to warm
up, then `--repeats` timed runs; the default settings are the official ones (20 prior steps at guidance 4,
shift 2; 10 decoder steps at guidance 1.1).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cascade_core.pipeline import DECODER_DEFAULTS, PRIOR_DEFAULTS, generate
from runner.sample import add_arguments, load_models


def time_case(models, *, batch: int, size: tuple[int, int], repeats: int) -> dict:
    prompts = ["a photo of a red fox in the snow"] * batch

    def once() -> torch.Tensor:
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        return generate(models, prompts, generators=gens, height=size[0], width=size[1],
                        prior=PRIOR_DEFAULTS, decoder=DECODER_DEFAULTS).images

    with torch.no_grad():
        once()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            images = once()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    best = min(times)
    return {"batch": batch, "size": list(size),
            "image_shape": list(images.shape), "seconds_per_batch": round(best, 3),
            "seconds_per_image": round(best / batch, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench_pipeline.json"), help="where the JSON goes")
    args = parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--prompt", "x"])
    if not torch.cuda.is_available():
        raise SystemExit("bench_pipeline needs a CUDA GPU")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}["bf16" if args.dtype == "auto" else args.dtype]
    start = time.perf_counter()
    models, found = load_models(args, torch.device("cuda"), dtype)
    load_s = time.perf_counter() - start
    torch.cuda.synchronize()
    result = {"dtype": str(dtype), "models": {k: str(v) for k, v in found.items()},
              "load_s": round(load_s, 1),
              "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 2), "cases": []}
    for batch in (1, 4):
        result["cases"].append(time_case(models, batch=batch, size=(1024, 1024),
                                         repeats=args.repeats))
    result["cases"].append(time_case(models, batch=1, size=(1024, 1536),
                                     repeats=args.repeats))
    print(json.dumps(result, indent=2))
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
