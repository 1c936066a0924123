"""Stage C's cosine noise schedule in logSNR space, the VP scaler and the noise conditioning r.

These are the official GDF definitions (FACTS_official §8) with the same operation order, so the
tables in golden/gdf.json come out bit-identical in float32: s is kept as a float32 tensor, the
variance is clamped to [1e-4, 0.9999], a shift moves logSNR by -2 ln(shift) and is re-clamped to the
*unshifted* limits, and the r fed to the model inverts the schedule (the effective t).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

S = 0.008
VAR_CLAMP = (1e-4, 0.9999)
TRAIN_T_MIN = 0.001


@lru_cache(maxsize=16)
def _s_and_min_var(device: torch.device) -> tuple[Tensor, Tensor]:
    """s as a float32 tensor and min_var = cos(s/(1+s)*pi/2)^2, both shape [1]: the official constants.

    Made once per device (read-only): no host-to-device copy per training step, which also lets the
    step be captured in a CUDA graph (runner/graphed_step.py)."""
    s = torch.tensor([S], dtype=torch.float32, device=device)
    min_var = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
    return s, min_var


def _cosine_logsnr(t: Tensor) -> Tensor:
    """Unshifted, unclamped-in-logSNR cosine schedule: logSNR = ln(var / (1 - var))."""
    s, min_var = _s_and_min_var(t.device)
    var = torch.cos((s + t) / (1 + s) * torch.pi * 0.5).clamp(0, 1) ** 2 / min_var
    var = var.clamp(*VAR_CLAMP)
    return (var / (1 - var)).log()


@lru_cache(maxsize=1)
def logsnr_limits() -> tuple[float, float]:
    """[logSNR(t=1), logSNR(t=0)] = [-9.21024, 9.21007]: the range every shifted logSNR is clamped to."""
    lo = _cosine_logsnr(torch.ones(1))
    hi = _cosine_logsnr(torch.zeros(1))
    return float(lo), float(hi)


def logsnr_from_t(t: Tensor, shift: float = 1.0) -> Tensor:
    """logSNR of the cosine schedule at t in [0, 1] (clamped first), shifted by -2 ln(shift).

    shift > 1 moves every t towards more noise; training uses shift 1, Stage C inference shift 2.
    """
    if shift <= 0:
        raise ValueError(
            f"schedule shift must be > 0, got {shift}; use 1 for training, 2 for Stage C sampling"
        )
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor, got {t.dtype}")
    logsnr = _cosine_logsnr(t.clamp(0, 1))
    if shift != 1:
        logsnr = logsnr + 2 * math.log(1 / shift)
    return logsnr.clamp(*logsnr_limits())


def noise_cond(logsnr: Tensor) -> Tensor:
    """The r the model receives: the schedule inverted at logSNR (so r = t where nothing is clamped).

    Outside t in [0.0022568, 0.9935832] the variance clamp saturates r; with a shift, r is the
    effective (shifted) t. Also serves as t_from_logsnr for the unshifted schedule.
    """
    s, min_var = _s_and_min_var(logsnr.device)
    var = logsnr.sigmoid()
    r = ((var * min_var) ** 0.5).acos() / (torch.pi * 0.5) * (1 + s) - s
    return r.clamp(0, 1)


def vp_scale(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """VP scaler (a, b): a = sqrt(sigmoid(logSNR)), b = sqrt(1 - sigmoid(logSNR)); x_t = a*x0 + b*eps."""
    a_squared = logsnr.sigmoid()
    return a_squared.sqrt(), (1 - a_squared).sqrt()


def broadcast_to(v: Tensor, x: Tensor) -> Tensor:
    """View a per-sample vector [B] as [B, 1, ..., 1] so it broadcasts against x [B, ...]."""
    if v.dim() != 1 or v.shape[0] != x.shape[0]:
        raise ValueError(f"expected a per-sample vector of shape [{x.shape[0]}], got {tuple(v.shape)}")
    return v.view(-1, *[1] * (x.dim() - 1))


def sample_training_t(
    batch_size: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Training t ~ uniform on (0.001, 1], drawn as the official trainer does: clamp(1 - U[0,1) + 0.001)."""
    u = torch.rand(batch_size, generator=generator, device=device)
    return (1 - u).add(TRAIN_T_MIN).clamp(TRAIN_T_MIN, 1.0)
