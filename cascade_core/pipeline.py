"""Text -> images with the whole cascade: Stage C prior sampling, then Stage B + Stage A, or the Previewer.

Defaults are the official inference settings (FACTS_official §8.1): prior DDPM, 20 steps, CFG 4 with the
0.7 rescale, shift 2; decoder DDPM, 10 steps, CFG 1.1, shift 1. Guidance 0 switches CFG off (one model
call per step, as the diffusers decoder's default 0.0 does). The unconditional branch uses the negative
prompt's embeddings ("" when none is given; clip_img is zeros). Stage B is conditioned on the sampled
Stage C latent (unconditional: zeros) and the pooled text embedding; its pixels input stays at its
default zeros (FACTS_official §4).

Sizes follow `models/latent_size.py`: H x W pixels -> Stage C latent ceil(H/42.67) x ceil(W/42.67) and
Stage B latent ceil(H/4) x ceil(W/4), rounded up to Stage B's patch size; Stage A's output is cropped to
H x W. The Previewer's output (8x the prior latent, 24x24 -> 192x192) is resized to H x W, so both paths
return the requested size.

Noise comes from one torch.Generator per image, so an image's noise does not depend on the batch it is
in (its result still does slightly: the official CFG rescale takes one std over the whole batch). Noise
is drawn on each generator's device and moved to the models' device: CPU generators give the same noise
on any device. Models are passed in as objects; the sampling
device and dtype are those of their parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cascade_core.diffusion.sampling import SAMPLER_ETA, SamplerStep, sample
from cascade_core.models.latent_size import stage_b_latent_size, stage_c_latent_size
from cascade_core.models.text import TextConditioning, encode_text

__all__ = [
    "ProgressFn",
    "SamplerSettings",
    "PRIOR_DEFAULTS",
    "DECODER_DEFAULTS",
    "CascadeModels",
    "Generation",
    "expand_prompts",
    "encode_prompts",
    "sample_prior",
    "decode_with_stage_b",
    "preview_latents",
    "generate",
]

# progress(phase, steps done, steps in phase); phase is 'prior' or 'decoder'
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SamplerSettings:
    """One sampling run's knobs; guidance 0 means no classifier-free guidance."""

    steps: int
    guidance: float
    shift: float
    sampler: str = "ddpm"
    cfg_rho: float = 0.7

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            problems.append(f"steps must be an integer >= 1, got {self.steps!r}")
        if not self.guidance >= 0:
            problems.append(f"guidance must be >= 0 (0 = no CFG), got {self.guidance!r}")
        if not self.shift > 0:
            problems.append(f"shift must be > 0 (1 = unshifted), got {self.shift!r}")
        if self.sampler not in SAMPLER_ETA:
            problems.append(f"sampler must be one of {sorted(SAMPLER_ETA)}, got {self.sampler!r}")
        if not 0 <= self.cfg_rho <= 1:
            problems.append(f"cfg_rho must be in [0, 1], got {self.cfg_rho!r}")
        if problems:
            raise ValueError("invalid sampler settings: " + "; ".join(problems))

    @property
    def cfg(self) -> float | None:
        """The sampler's cfg argument: None runs the conditional branch only."""
        return None if self.guidance == 0 else float(self.guidance)


PRIOR_DEFAULTS = SamplerSettings(steps=20, guidance=4.0, shift=2.0)
DECODER_DEFAULTS = SamplerSettings(steps=10, guidance=1.1, shift=1.0)


@dataclass(frozen=True)
class CascadeModels:
    """The frozen models of the cascade; the previewer or Stage B + Stage A may be left out."""

    stage_c: nn.Module
    text_model: Any  # transformers CLIPTextModelWithProjection
    tokenizer: Any  # transformers CLIPTokenizer
    previewer: nn.Module | None = None
    stage_b: nn.Module | None = None
    stage_a: nn.Module | None = None


@dataclass(frozen=True)
class Generation:
    """What `generate` returns: images [B,3,H,W] float32 in [0,1] and Stage C latents [B,16,h,w]."""

    images: Tensor
    latents: Tensor


def _param(model: nn.Module) -> Tensor:
    return next(model.parameters())


def expand_prompts(
    prompts: Sequence[str], negative_prompts: str | Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """(prompts, negatives) as equal-length lists; a missing negative is "", a string is repeated."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings; wrap a single prompt as [prompt]")
    if negative_prompts is None or isinstance(negative_prompts, str):
        return list(prompts), [negative_prompts or ""] * len(prompts)
    negatives = list(negative_prompts)
    if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
        raise ValueError(
            f"negative_prompts must be one string or a list of {len(prompts)} strings (one per prompt), "
            f"got {len(negatives)} items"
        )
    return list(prompts), negatives


def encode_prompts(
    models: CascadeModels, prompts: Sequence[str], negative_prompts: str | Sequence[str] | None = None
) -> tuple[TextConditioning, TextConditioning]:
    """(cond, uncond) for Stage C, on Stage C's device and dtype; uncond encodes the negative prompts."""
    prompts, negatives = expand_prompts(prompts, negative_prompts)
    ref = _param(models.stage_c)
    clip_img_dim = models.stage_c.config.c_clip_img
    cond, uncond = (
        encode_text(models.text_model, models.tokenizer, texts, clip_img_dim=clip_img_dim).to(
            ref.device, ref.dtype
        )
        for texts in (prompts, negatives)
    )
    return cond, uncond


def _noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """[len(generators), *shape] float32, sample i from generator i, moved to `device`."""
    return torch.stack(
        [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32).to(device) for g in generators]
    )


def _run(
    model_fn: Callable[[Tensor, Tensor, Any], Tensor],
    x_init: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor],
    settings: SamplerSettings,
    generators: Sequence[torch.Generator],
    phase: str,
    progress: ProgressFn | None,
) -> Tensor:
    def noise_fn(index: int, like: Tensor) -> Tensor:
        return _noise(generators, tuple(like.shape[1:]), like.device).to(like.dtype)

    def callback(step: SamplerStep) -> None:
        if progress is not None:
            progress(phase, step.index + 1, settings.steps)

    cfg = settings.cfg
    return sample(
        model_fn,
        x_init,
        cond,
        sampler=settings.sampler,
        steps=settings.steps,
        shift=settings.shift,
        cfg=cfg,
        uncond=uncond if cfg is not None else None,
        cfg_rho=settings.cfg_rho,
        noise_fn=noise_fn,
        callback=callback,
    )


def _check_generators(generators: Sequence[torch.Generator], batch: int) -> None:
    if len(generators) != batch or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(
            f"give one torch.Generator per image: {batch} expected, got {len(generators)} "
            "(e.g. [torch.Generator().manual_seed(s) for s in seeds])"
        )


@torch.no_grad()
def sample_prior(
    stage_c: nn.Module,
    cond: TextConditioning,
    uncond: TextConditioning,
    *,
    latent_size: tuple[int, int],
    generators: Sequence[torch.Generator],
    settings: SamplerSettings = PRIOR_DEFAULTS,
    progress: ProgressFn | None = None,
) -> Tensor:
    """Stage C latents [B, 16, h, w] (float32) for `latent_size` (h, w), one generator per sample."""
    batch = cond.clip_text.shape[0]
    _check_generators(generators, batch)
    ref = _param(stage_c)

    def model_fn(x: Tensor, r: Tensor, c: dict[str, Tensor]) -> Tensor:
        return stage_c(x.to(ref.dtype), r.to(ref.dtype), **c).float()

    x_init = _noise(generators, (stage_c.config.c_in, *latent_size), ref.device)
    cast = {k: v.to(ref.device, ref.dtype) for k, v in cond.as_dict().items()}
    cast_u = {k: v.to(ref.device, ref.dtype) for k, v in uncond.as_dict().items()}
    return _run(model_fn, x_init, cast, cast_u, settings, generators, "prior", progress)


@torch.no_grad()
def decode_with_stage_b(
    stage_b: nn.Module,
    stage_a: nn.Module,
    latents: Tensor,
    pooled: Tensor,
    pooled_uncond: Tensor,
    *,
    image_size: tuple[int, int],
    generators: Sequence[torch.Generator],
    settings: SamplerSettings = DECODER_DEFAULTS,
    progress: ProgressFn | None = None,
) -> Tensor:
    """Stage C latents [B,16,h,w] + pooled text [B,1,C] -> images [B,3,H,W] float32 in [0,1]."""
    batch = latents.shape[0]
    _check_generators(generators, batch)
    ref = _param(stage_b)
    height, width = image_size
    patch = stage_b.config.patch_size
    lat_h, lat_w = (-(-v // patch) * patch for v in stage_b_latent_size(height, width))
    smallest = patch * 2 ** (len(stage_b.config.c_hidden) - 1)  # every level halves: 16 latent cells
    if min(lat_h, lat_w) < smallest:
        raise ValueError(
            f"image size {height}x{width} is too small for Stage B: its latent must be at least {smallest} "
            f"cells ({smallest * 4} px) per side; ask for a larger size or use the Previewer"
        )

    def model_fn(x: Tensor, r: Tensor, c: dict[str, Tensor]) -> Tensor:
        return stage_b(x.to(ref.dtype), r.to(ref.dtype), effnet=c["effnet"], clip=c["clip"]).float()

    effnet = latents.to(ref.device, ref.dtype)
    cond = {"effnet": effnet, "clip": pooled.to(ref.device, ref.dtype)}
    uncond = {"effnet": torch.zeros_like(effnet), "clip": pooled_uncond.to(ref.device, ref.dtype)}
    x_init = _noise(generators, (stage_b.config.c_in, lat_h, lat_w), ref.device)
    stage_b_latents = _run(model_fn, x_init, cond, uncond, settings, generators, "decoder", progress)
    a_ref = _param(stage_a)
    images = stage_a.decode(stage_b_latents.to(a_ref.device, a_ref.dtype)).float()  # [B,3,4h,4w]
    return images[..., :height, :width].clamp(0, 1)


@torch.no_grad()
def preview_latents(previewer: nn.Module, latents: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Stage C latents -> Previewer RGB (8x) resized to image_size, float32 in [0,1]."""
    ref = _param(previewer)
    rgb = previewer(latents.to(ref.device, ref.dtype)).float()  # [B,3,8h,8w]
    if tuple(rgb.shape[-2:]) != tuple(image_size):
        rgb = F.interpolate(rgb, size=tuple(image_size), mode="bicubic", align_corners=False)
    return rgb.clamp(0, 1)


def generate(
    models: CascadeModels,
    prompts: Sequence[str],
    *,
    generators: Sequence[torch.Generator],
    height: int = 1024,
    width: int = 1024,
    negative_prompts: str | Sequence[str] | None = None,
    prior: SamplerSettings = PRIOR_DEFAULTS,
    decoder: SamplerSettings = DECODER_DEFAULTS,
    preview_only: bool = False,
    progress: ProgressFn | None = None,
) -> Generation:
    """Prompts -> images [B,3,height,width] in [0,1] (+ the Stage C latents), one generator per prompt."""
    if preview_only and models.previewer is None:
        raise ValueError("preview_only needs a previewer; load previewer.safetensors into CascadeModels")
    if not preview_only and (models.stage_b is None or models.stage_a is None):
        raise ValueError(
            "full decoding needs Stage B and Stage A in CascadeModels; load them, or use preview_only"
        )
    latent_size = stage_c_latent_size(height, width)
    cond, uncond = encode_prompts(models, prompts, negative_prompts)
    latents = sample_prior(
        models.stage_c,
        cond,
        uncond,
        latent_size=latent_size,
        generators=generators,
        settings=prior,
        progress=progress,
    )
    if preview_only:
        images = preview_latents(models.previewer, latents, (height, width))
    else:
        images = decode_with_stage_b(
            models.stage_b,
            models.stage_a,
            latents,
            cond.clip_text_pooled,
            uncond.clip_text_pooled,
            image_size=(height, width),
            generators=generators,
            settings=decoder,
            progress=progress,
        )
    return Generation(images=images, latents=latents)
