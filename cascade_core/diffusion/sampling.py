"""DDPM / DDIM sampling with classifier-free guidance and its 0.7 rescale (official GDF.sample).

Any epsilon model fits: `model(x, r, cond) -> eps` with x [B, ...], r [B] (the noise conditioning)
and cond a batch-first tensor, a mapping of them, or None (Stage C, Stage B and toy models alike).
Noise is drawn from a passed torch.Generator, or supplied by `noise_fn` so recorded noise can be
replayed. The result is the last step's x0 prediction, as the official pipelines return.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cascade_core.diffusion.objective import undiffuse
from cascade_core.diffusion.schedule import broadcast_to, logsnr_from_t, noise_cond, vp_scale

Cond = Tensor | Mapping[str, Tensor] | None
EpsModel = Callable[[Tensor, Tensor, Cond], Tensor]
NoiseFn = Callable[[int, Tensor], Tensor]

# sampler name -> eta (DDPM is DDIM with eta 1)
SAMPLER_ETA: dict[str, float] = {"ddpm": 1.0, "ddim": 0.0}


@dataclass(frozen=True)
class SamplerStep:
    """What one step produced: r given to the model, guided pred, x0 estimate, new x, the noise drawn."""

    index: int
    model_r: Tensor  # [B] or [2B] with CFG
    pred: Tensor
    x0: Tensor
    x: Tensor
    noise: Tensor


def sampling_grid(steps: int, t_start: float, shift: float) -> tuple[Tensor, Tensor]:
    """t grid linspace(t_start, 0, steps+1) and its logSNR at `shift` (float32, [steps+1] each)."""
    if steps < 1:
        raise ValueError(f"sampling needs at least 1 step, got {steps}")
    if not 0 < t_start <= 1:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}; 1.0 is text-to-image, less is img2img")
    t = torch.linspace(t_start, 0, steps + 1)
    return t, logsnr_from_t(t, shift)


def cond_cat(cond: Cond, uncond: Cond) -> Cond:
    """[cond; uncond] along the batch, per key for mappings; a missing uncond means zeros (GDF default)."""
    if cond is None:
        if uncond is not None:
            raise ValueError("uncond given without cond; pass both or neither")
        return None
    if isinstance(cond, Tensor):
        if uncond is not None and not isinstance(uncond, Tensor):
            raise TypeError("cond is a tensor, so uncond must be a tensor too")
        return torch.cat([cond, torch.zeros_like(cond) if uncond is None else uncond], dim=0)
    if uncond is not None and (not isinstance(uncond, Mapping) or set(uncond) != set(cond)):
        raise ValueError(f"uncond must have the same keys as cond: {sorted(cond)}")
    return {
        k: torch.cat([v, torch.zeros_like(v) if uncond is None else uncond[k]], dim=0)
        for k, v in cond.items()
    }


def cfg_combine(pred_cond: Tensor, pred_uncond: Tensor, cfg: float, cfg_rho: float) -> Tensor:
    """uncond + cfg*(cond - uncond), then rescaled towards the conditional std by cfg_rho.

    std is the unbiased std over the whole conditional batch (one scalar). The association
    rho*((pred*std_c)/(std_cfg+1e-9)) + pred*(1-rho) is kept: others drift ~1e-4 when a ~ 0.01.
    """
    pred = torch.lerp(pred_uncond, pred_cond, cfg)
    if cfg_rho > 0:
        std_cond, std_cfg = pred_cond.std(), pred.std()
        pred = cfg_rho * (pred * std_cond / (std_cfg + 1e-9)) + pred * (1 - cfg_rho)
    return pred


def ddim_step(
    x0: Tensor, eps: Tensor, logsnr: Tensor, logsnr_next: Tensor, eta: float, noise: Tensor
) -> Tensor:
    """Move from logSNR to logSNR_next: x = a'*x0 + sqrt(b'^2 - sigma^2)*eps + sigma*noise.

    sigma = eta*sqrt(b'^2/b^2)*sqrt(1 - a^2/a'^2); eta 1 is DDPM, eta 0 is deterministic DDIM.
    """
    a, b = (broadcast_to(v, x0) for v in vp_scale(logsnr))
    a_next, b_next = (broadcast_to(v, x0) for v in vp_scale(logsnr_next))
    if eta > 0:
        sigma = eta * (b_next**2 / b**2).sqrt() * (1 - a**2 / a_next**2).sqrt()
    else:
        sigma = torch.zeros_like(a)
    return a_next * x0 + (b_next**2 - sigma**2).sqrt() * eps + sigma * noise


def iterate_sampler(
    model: EpsModel,
    x_init: Tensor,
    cond: Cond,
    *,
    sampler: str,
    steps: int,
    shift: float,
    cfg: float | None,
    uncond: Cond = None,
    cfg_rho: float = 0.7,
    t_start: float = 1.0,
    generator: torch.Generator | None = None,
    noise_fn: NoiseFn | None = None,
) -> Iterator[SamplerStep]:
    """Yield every step of GDF sampling from x_init at t_start down to t = 0.

    cfg None runs the model once per step on [x]; a number runs it on [x; x] with [cond; uncond].
    For img2img pass x_init = diffuse(latent, eps, logsnr_from_t(t_start)) and t_start < 1.
    `generator` must live on x_init's device; `noise_fn(step, x)` replaces it (e.g. recorded noise).
    """
    if sampler not in SAMPLER_ETA:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLER_ETA)}")
    eta = SAMPLER_ETA[sampler]
    if noise_fn is None:

        def noise_fn(index: int, like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    _, logsnr_grid = sampling_grid(steps, t_start, shift)
    logsnr_grid = logsnr_grid.to(x_init.device)
    both = cond_cat(cond, uncond) if cfg is not None else None
    x = x_init
    batch = x.shape[0]
    for i in range(steps):
        logsnr = logsnr_grid[i].expand(batch)
        r = noise_cond(logsnr)
        if cfg is None:
            model_r = r
            pred = model(x, model_r, cond)
        else:
            model_r = r.repeat(2)
            pred_cond, pred_uncond = model(torch.cat([x, x], dim=0), model_r, both).chunk(2)
            pred = cfg_combine(pred_cond, pred_uncond, cfg, cfg_rho)
        x0, eps = undiffuse(x, logsnr, pred)
        noise = noise_fn(i, x)
        x = ddim_step(x0, eps, logsnr, logsnr_grid[i + 1].expand(batch), eta, noise)
        yield SamplerStep(index=i, model_r=model_r, pred=pred, x0=x0, x=x, noise=noise)


def sample(
    model: EpsModel,
    x_init: Tensor,
    cond: Cond,
    *,
    callback: Callable[[SamplerStep], None] | None = None,
    **options: Any,
) -> Tensor:
    """Run iterate_sampler to the end and return the last step's x0 (what the official pipelines keep).

    `options` are iterate_sampler's keyword arguments (sampler, steps, shift, cfg, ...), passed through so
    the two cannot drift apart; `callback` sees every step."""
    last = None
    with torch.no_grad():
        for step in iterate_sampler(model, x_init, cond, **options):
            if callback is not None:
                callback(step)
            last = step
    if last is None:
        raise RuntimeError("the sampler produced no step")
    return last.x0


def initial_noise(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Tensor:
    """x_init ~ N(0, 1) for text-to-image sampling, drawn before any step noise (official order)."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)
