"""Scheduled sampling (rollout, issue 11) on Stage C's own continuous cosine schedule.

With probability p a training sample's x_t is not the directly noised latent but one the current
model produced: noise x0 to a later t_src = min(t + k*step_dt, 1) and walk back to t in k DDIM or
DDPM steps of the model's epsilon prediction, without gradients. The target stays the original eps.
The cost is the extra forward passes, reported in the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from cascade_core.diffusion.objective import diffuse, undiffuse
from cascade_core.diffusion.sampling import SAMPLER_ETA, Cond, EpsModel, NoiseFn, ddim_step
from cascade_core.diffusion.schedule import logsnr_from_t, noise_cond

RAMP_SHAPES = ("constant", "linear", "cosine")
OFFSET_STRATEGIES = ("uniform", "biased_early", "biased_late")


def rollout_probability(
    step: int, *, shape: str, p_start: float, p_end: float, ramp_steps: int, start_step: int
) -> float:
    """Probability of a rollout at optimizer step `step`.

    constant: p_end at every step. linear / cosine: p_start until start_step, then ramp to p_end over
    ramp_steps steps (cosine: p_start + (p_end - p_start)*(1 - cos(pi*f))/2), then hold p_end.
    """
    if shape not in RAMP_SHAPES:
        raise ValueError(f"unknown rollout probability shape {shape!r}; choose one of {list(RAMP_SHAPES)}")
    for name, p in (("p_start", p_start), ("p_end", p_end)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"rollout {name} must be in [0, 1], got {p}")
    if ramp_steps < 0 or start_step < 0:
        raise ValueError(f"ramp_steps ({ramp_steps}) and start_step ({start_step}) must be >= 0")
    if shape == "constant":
        return p_end
    if step < start_step:
        return p_start
    frac = 1.0 if ramp_steps == 0 else min((step - start_step) / ramp_steps, 1.0)
    if shape == "cosine":
        frac = (1 - math.cos(math.pi * frac)) / 2
    return p_start + (p_end - p_start) * frac


def offset_distribution(max_offset: int, strategy: str) -> Tensor:
    """Probabilities of k = 1..max_offset [max_offset]: flat, linearly favouring short, or long rollouts."""
    if max_offset < 1:
        raise ValueError(f"rollout max_offset must be >= 1, got {max_offset}")
    k = torch.arange(1, max_offset + 1, dtype=torch.float64)
    weights = {
        "uniform": torch.ones_like(k),
        "biased_early": max_offset + 1 - k,
        "biased_late": k,
    }
    if strategy not in weights:
        raise ValueError(
            f"unknown rollout offset strategy {strategy!r}; choose one of {list(OFFSET_STRATEGIES)}"
        )
    w = weights[strategy]
    return w / w.sum()


def draw_offsets(
    batch_size: int, max_offset: int, strategy: str, *, generator: torch.Generator | None = None
) -> Tensor:
    """k in [1, max_offset] per sample [B] (int64, CPU) from offset_distribution."""
    probs = offset_distribution(max_offset, strategy)
    return torch.multinomial(probs, batch_size, replacement=True, generator=generator) + 1


@dataclass(frozen=True)
class Rollout:
    """x_t to train on, which samples were rolled out, their k and t_src, and the extra cost."""

    x_t: Tensor
    rolled: Tensor  # [B] bool
    offsets: Tensor  # [B] int64, 0 where not rolled
    t_src: Tensor  # [B], = t where not rolled
    model_calls: int  # batched forward passes made (max k over rolled samples)
    sample_forwards: int  # per-sample forward passes (sum of k over rolled samples)


def _index_cond(cond: Cond, idx: Tensor) -> Cond:
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[idx]
    if isinstance(cond, Mapping):
        return {k: v[idx] for k, v in cond.items()}
    raise TypeError(f"cond must be a tensor, a mapping of tensors or None, got {type(cond).__name__}")


def rollout(
    model: EpsModel,
    x0: Tensor,
    eps: Tensor,
    t: Tensor,
    cond: Cond,
    *,
    p: float,
    max_offset: int,
    strategy: str,
    step_dt: float,
    sampler: str,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    noise_fn: NoiseFn | None = None,
) -> Rollout:
    """The x_t to train on at t: directly noised, or (with probability p) rolled out by the model.

    step_dt is the t-distance of one rollout step (e.g. 1/20 for Stage C's 20-step sampler).
    With p = 0 nothing is drawn from `generator` and x_t is exactly diffuse(x0, eps, logSNR(t)).
    `generator` is a CPU generator (the draws are tiny; noise moves to x0's device); give rollouts
    one of their own so they do not shift the main training random stream.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"rollout probability must be in [0, 1], got {p}")
    if step_dt <= 0:
        raise ValueError(f"rollout step_dt must be > 0, got {step_dt}")
    if sampler not in SAMPLER_ETA:
        raise ValueError(f"unknown rollout sampler {sampler!r}; choose one of {sorted(SAMPLER_ETA)}")
    offset_distribution(max_offset, strategy)  # reject bad settings even when p is 0
    batch = x0.shape[0]
    x_t = diffuse(x0, eps, logsnr_from_t(t, shift))
    no_roll = Rollout(
        x_t,
        torch.zeros(batch, dtype=torch.bool, device=x0.device),
        torch.zeros(batch, dtype=torch.long, device=x0.device),
        t,
        0,
        0,
    )
    if p == 0.0:
        return no_roll
    rolled_cpu = torch.rand(batch, generator=generator) < p
    k_cpu = torch.where(rolled_cpu, draw_offsets(batch, max_offset, strategy, generator=generator), 0)
    rolled, k_all = rolled_cpu.to(x0.device), k_cpu.to(x0.device)
    idx = rolled.nonzero().squeeze(1)
    if idx.numel() == 0:
        return no_roll
    if noise_fn is None:

        def noise_fn(index: int, like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)

    k = k_all[idx]
    t_end = t[idx]
    t_src = (t_end + k.to(t.dtype) * step_dt).clamp(max=1.0)
    eta = SAMPLER_ETA[sampler]
    steps = int(k.max())
    with torch.no_grad():
        x = diffuse(x0[idx], eps[idx], logsnr_from_t(t_src, shift))  # [n, ...] at t_src
        for j in range(steps):
            active = (k > j).nonzero().squeeze(1)
            kj = k[active].to(t.dtype)
            t_a, t_s = t_end[active], t_src[active]
            t_now = t_s + (t_a - t_s) * (j / kj)
            t_next = torch.where(k[active] == j + 1, t_a, t_s + (t_a - t_s) * ((j + 1) / kj))
            logsnr, logsnr_next = logsnr_from_t(t_now, shift), logsnr_from_t(t_next, shift)
            xa = x[active]
            pred = model(xa, noise_cond(logsnr), _index_cond(cond, idx[active]))
            x0_hat, eps_hat = undiffuse(xa, logsnr, pred)
            x[active] = ddim_step(x0_hat, eps_hat, logsnr, logsnr_next, eta, noise_fn(j, xa)).to(x.dtype)
    t_src_all = t.clone()
    t_src_all[idx] = t_src
    x_out = x_t.clone()
    x_out[idx] = x
    return Rollout(x_out, rolled, k_all, t_src_all, steps, int(k.sum()))
