"""torch.profiler summary of a few training steps: where the GPU time goes, by kernel family.

Used by tools/bench_train_step.py; the full kernel table goes to a text file beside the JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

# Kernel-name fragments -> family (first match wins; names are lower-cased).
FAMILIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("gemm", ("gemm", "xmma", "nvjet", "cutlass", "sm90_", "cublas")),
    ("conv", ("conv", "depthwise", "implicit_convolve", "winograd")),
    ("norm", ("layer_norm", "layernorm", "norm_kernel")),
    ("reduce", ("reduce",)),
    ("dropout", ("dropout", "fused_dropout")),
    ("optimizer", ("adam", "multi_tensor")),
    ("copy/cast", ("copy", "cat", "catarray", "to_copy")),
    ("triton (compiled)", ("triton",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def profile_steps(step: Callable[[], object], s_per_step: float, table_path: Path, steps: int = 2) -> dict:
    """GPU kernel time per step by family and the top kernels; the table is written to `table_path`."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = []
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        kernels.append((e.key, us / steps / 1000, e.count // steps))  # ms and launches per step
    kernels.sort(key=lambda k: -k[1])
    busy = sum(k[1] for k in kernels)
    fams: dict[str, float] = {}
    for name, ms, _ in kernels:
        fams[family(name)] = fams.get(family(name), 0.0) + ms
    sort_key = "self_cuda_time_total"
    table_path.write_text(prof.key_averages().table(sort_by=sort_key, row_limit=60, max_name_column_width=90))
    return {
        "gpu_busy_ms_per_step": round(busy, 2),
        "step_ms": round(s_per_step * 1000, 2),
        "idle_pct": round(100 * (1 - busy / (s_per_step * 1000)), 1),
        "launches_per_step": sum(k[2] for k in kernels),
        "families_ms": {k: round(v, 2) for k, v in sorted(fams.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:120], "ms": round(ms, 3), "calls": c} for n, ms, c in kernels[:20]],
    }
