"""One Stage C training loss, exactly as the official trainer computes it, plus the recipe's options.

Continuous t ~ U(0.001, 1] on the cosine schedule with shift 1, x_t = a*x0 + b*eps, the model predicts
eps, per-sample MSE times the loss weight (P2, adaptive or none), mean over the batch. Diff2Flow swaps the
per-sample loss for its flow form; scheduled sampling swaps x_t for a self-generated one.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cascade_core.diffusion.objective import (
    AdaptiveLossWeight,
    diff2flow_loss,
    diffuse,
    p2_loss_weight,
    per_sample_mse,
)
from cascade_core.diffusion.rollout import rollout, rollout_probability
from cascade_core.diffusion.schedule import logsnr_from_t, noise_cond, sample_training_t
from cascade_core.models.text import TextConditioning
from runner.spec import TrainingSpec

TRAIN_SHIFT = 1.0  # the official trainers never shift the schedule in training


@dataclass
class LossResult:
    loss: Tensor  # scalar, already weighted and averaged
    raw: Tensor  # [B] unweighted per-sample loss (for the adaptive weight and logs)
    logsnr: Tensor  # [B]
    extra_forwards: int  # model calls spent on scheduled-sampling rollouts


def loss_name(training: TrainingSpec) -> str:
    """The logged name of the objective that ran (so curves of different objectives are not mixed up)."""
    base = "diff2flow" if training.diff2flow.enabled else "eps_mse"
    return f"{base}+rollout" if training.scheduled_sampling.enabled else base


def autocast_context(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """bf16/fp16 autocast (or nothing); `cache=False` while a CUDA graph is captured (torch's advice)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def stage_c_loss(
    prior: nn.Module,
    latents: Tensor,
    cond: TextConditioning,
    training: TrainingSpec,
    *,
    step: int,
    autocast_dtype: torch.dtype | None,
    adaptive: AdaptiveLossWeight | None,
    autocast_cache: bool = True,
) -> LossResult:
    """latents [B,16,h,w] fp32, cond on the same device -> the loss of one micro-batch."""
    device = latents.device
    batch = latents.shape[0]
    t = sample_training_t(batch, device=device)  # [B]
    logsnr = logsnr_from_t(t, TRAIN_SHIFT)
    eps = torch.randn_like(latents)
    cond_kwargs = cond.as_dict()

    def predict(x: Tensor, r: Tensor, c: dict[str, Tensor]) -> Tensor:
        with autocast_context(device, autocast_dtype, autocast_cache):
            return prior(x, r, **c).float()

    extra = 0
    ss = training.scheduled_sampling
    if ss.enabled:
        shape = "constant" if ss.ramp == "none" else ss.ramp
        p = rollout_probability(step, shape=shape, p_start=ss.probability_start,
                                p_end=ss.probability if ss.ramp == "none" else ss.probability_end,
                                ramp_steps=ss.ramp_steps, start_step=ss.start_step)
        rolled = rollout(predict, latents, eps, t, cond_kwargs, p=p, max_offset=ss.max_offset,
                         strategy=ss.offset_strategy, step_dt=ss.offset_step, sampler=ss.sampler,
                         shift=TRAIN_SHIFT)  # global RNG: saved in checkpoints, so resume is exact
        x_t, extra = rolled.x_t, rolled.sample_forwards
    else:
        x_t = diffuse(latents, eps, logsnr)
    pred = predict(x_t, noise_cond(logsnr), cond_kwargs)  # [B,16,h,w]
    if training.diff2flow.enabled:
        raw = diff2flow_loss(pred, x_t, latents, eps, logsnr)
    else:
        raw = per_sample_mse(pred, eps)  # epsilon target
    if training.loss_weighting == "p2":
        weight = p2_loss_weight(logsnr)
    elif training.loss_weighting == "adaptive":
        weight = adaptive(logsnr)
    else:
        weight = torch.ones_like(raw)
    return LossResult((raw * weight).mean(), raw.detach(), logsnr, extra)
