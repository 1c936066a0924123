"""torch.profiler summary of a few training steps (where the GPU time goes, by kernel family) and the
SDPA backends timed at Stage C's attention shape.

Used by tools/bench_train_step.py; the full kernel table goes to a text file beside the JSON.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

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

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
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
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table_path.write_text(prof.key_averages().table(sort_by=sort_key, row_limit=60, max_name_column_width=90))
    return {
        "gpu_busy_ms_per_step": round(busy, 2),
        "step_ms": round(s_per_step * 1000, 2),
        "idle_pct": round(100 * (1 - busy / (s_per_step * 1000)), 1),  # launch gaps, host syncs
        "launches_per_step": sum(k[2] for k in kernels),
        "families_ms": {k: round(v, 2) for k, v in sorted(fams.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:120], "ms": round(ms, 3), "calls": c} for n, ms, c in kernels[:20]],
    }


def _median_ms(fn: Callable[[], object], repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def attention_kernels(
    device: torch.device, batch: int = 4, heads: int = 32, hw: int = 576, cond: int = 85
) -> dict:
    """ms for SDPA forward + backward at Stage C's shape (bf16, head dim 64, q = HW, kv = HW + 85) per
    backend, with the training dropout (0.1) and without; None where the backend refuses the case."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=device).manual_seed(2)
    q, k, v = (
        torch.randn(
            batch, heads, n, 64, device=device, dtype=torch.bfloat16, generator=gen, requires_grad=True
        )
        for n in (hw, hw + cond, hw + cond)
    )
    grad = torch.randn_like(q)
    out: dict = {}
    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("default", None),
    ):
        for p in (0.1, 0.0):

            def run(p: float = p) -> None:
                F.scaled_dot_product_attention(q, k, v, dropout_p=p).backward(grad)

            try:
                with sdpa_kernel([backend]) if backend else contextlib.nullcontext():
                    for _ in range(3):
                        run()
                    ms = _median_ms(run)
                out[f"{name}_dropout{p}"] = round(ms, 3)
            except RuntimeError:
                out[f"{name}_dropout{p}"] = None
    return out
