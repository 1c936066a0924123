"""Real-size Stage C from a synthesized checkpoint file: load time, peak host / GPU memory, one bf16 step.

    python tools/bench_stage_c_load.py --cases stage-c-lite:original stage-c-lite:diffusers stage-c:original
    python tools/bench_stage_c_load.py --cases stage-c:original:int8-torchao stage-c:original:int8-bnb

Random bf16 weights are built on the GPU, written with `save_stage_c` in the given key layout (a
Stability single file or a diffusers folder), then loaded with `load_stage_c(..., device="cuda",
dtype=bfloat16)` while a thread samples the process RSS; then forward + backward of a batch of 4
24x24 latents with gradient checkpointing (the GPU test's step) is timed. The file was just
written, so the load reads it from the page cache: this measures the loader, not the disk.
A third field `int8` | `int8-torchao` | `int8-bnb` loads the way `runner` builds an int8 base: bf16 on
the host, then `quantize_model_(..., device="cuda")` layer by layer and the rest moved after it; the
GPU peak then shows that no full-precision copy of the model ever reached the GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cascade_core.models.stage_c import StageC, StageCConfig  # noqa: E402
from cascade_core.quant.int8 import quantize_model_  # noqa: E402
from cascade_core.stage_c_io import load_stage_c, save_stage_c  # noqa: E402

GIB = 2**30


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class RssPeak(threading.Thread):
    """Samples the resident set every 10 ms until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = rss_bytes(), threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())


def step_seconds(model: StageC, device: torch.device, batch: int = 4) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 16, 24, 24, device=device, dtype=torch.bfloat16, generator=gen)
    args = (
        torch.rand(batch, device=device, generator=gen),
        torch.randn(batch, 77, 1280, device=device, generator=gen),
        torch.randn(batch, 1, 1280, device=device, generator=gen),
        torch.zeros(batch, 1, 768, device=device),
    )
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(x, *args).float().square().mean().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def run(flavour: str, layout: str, work: Path, device: torch.device, base: str | None = None) -> dict:
    model = StageC(StageCConfig.preset(flavour), device="meta", dtype=torch.bfloat16)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    target = work / (f"{flavour}.safetensors" if layout == "original" else f"{flavour}_diffusers")
    start = time.perf_counter()
    weights = save_stage_c(model, target, layout)
    write_s = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    sampler = RssPeak()
    rss_before = rss_bytes()
    sampler.start()
    start = time.perf_counter()
    if base is None:
        model = load_stage_c(target, device=device, dtype=torch.bfloat16)
    else:  # runner/build.py's int8 path
        model = load_stage_c(target, device="cpu", dtype=torch.bfloat16)
        quantize_model_(model, base, device=device)
        model = model.to(device)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    gpu_after_load = torch.cuda.max_memory_allocated(device) / GIB
    model.train().set_gradient_checkpointing(True)
    step = step_seconds(model, device)
    result = {
        "case": f"{flavour}:{layout}" + (f":{base}" if base else ""),
        "file_gib": round(weights.stat().st_size / GIB, 2),
        "write_s": round(write_s, 1),
        "load_s": round(load_s, 2),
        "host_rss_peak_gib": round(sampler.peak / GIB, 2),
        "host_rss_growth_gib": round((sampler.peak - rss_before) / GIB, 2),
        "gpu_peak_after_load_gib": round(gpu_after_load, 2),
        "gpu_peak_step_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2),
        "fwd_bwd_b4_ckpt_s": round(step, 3),
    }
    del model
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=["stage-c-lite:original", "stage-c:original"])
    parser.add_argument("--out", default="bench_stage_c_load.json")
    parser.add_argument("--work", default=None, help="folder for the synthesized files (default: a temp dir)")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    results = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for case in args.cases:
            flavour, layout, *base = case.split(":")
            results.append(run(flavour, layout, Path(tmp), device, base[0] if base else None))
            print(json.dumps(results[-1]), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
