"""The Stable Cascade Stage B decoder (official `modules/stage_b.py`), with SDPA attention.

Stage B turns a Stage C latent (the `effnet` condition) plus the pooled text embedding into a Stage A
latent by diffusion. It shares every block with Stage C (`blocks.py`); what differs is the 4-level UNet
with real 2x down/up-sampling (strided conv / transposed conv), the effnet and pixel mappers, and a
pooled-text-only conditioning (`clip_mapper`). Keys are exactly those of `stage_b*.safetensors`.
We never train Stage B, so there is no official init here: build on meta and load a checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from cascade_core.formats import diffusers_config_to_original, infer_unet_hparams
from cascade_core.models.blocks import (
    LayerNorm2d,
    apply_block,
)
from cascade_core.models.unet import build_levels, embed_r, resize, walk_levels
from cascade_core.models.unet_config import UNetConfig

__all__ = ["StageBConfig", "StageB", "STAGE_B_PRESETS", "stage_b_config_from_shapes"]

DEFAULT_PIXELS_SIZE = 8  # official default `pixels`: zeros [B, 3, 8, 8]


@dataclass(frozen=True)
class StageBConfig(UNetConfig):
    """Constructor arguments of the official StageB (defaults = the large "3B" decoder, 1.56B params)."""

    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1280
    c_hidden: tuple[int, ...] = (320, 640, 1280, 1280)
    nhead: tuple[int, ...] = (-1, -1, 20, 20)  # -1: the level has no attention
    blocks: tuple[tuple[int, ...], ...] = ((2, 6, 28, 6), (6, 28, 6, 2))  # (down per level, up deepest-first)
    block_repeat: tuple[tuple[int, ...], ...] = ((1, 1, 1, 1), (3, 3, 2, 2))  # same order as blocks
    level_config: tuple[str, ...] = ("CT", "CT", "CTA", "CTA")
    c_clip: int = 1280
    c_clip_seq: int = 4
    c_effnet: int = 16
    c_pixels: int = 3
    kernel_size: int = 3
    dropout: tuple[float, ...] = (0.0, 0.0, 0.1, 0.1)
    self_attn: bool = True
    t_conds: tuple[str, ...] = ("sca",)

    def __post_init__(self) -> None:
        self._normalise(("c_hidden", "nhead", "level_config", "dropout", "t_conds"))
        self._raise_if(self._level_problems())

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> StageBConfig:
        """A named configuration ('decoder', 'decoder_lite', 'tiny'), optionally with overrides."""
        if name not in STAGE_B_PRESETS:
            raise ValueError(f"unknown Stage B preset {name!r}; choose one of {sorted(STAGE_B_PRESETS)}")
        return dataclasses.replace(STAGE_B_PRESETS[name], **overrides)


STAGE_B_PRESETS: dict[str, StageBConfig] = {
    "decoder": StageBConfig(),
    # train_b.py's 700M model: only these four arguments differ from the defaults.
    "decoder_lite": StageBConfig(
        c_hidden=(320, 576, 1152, 1152),
        nhead=(-1, 9, 18, 18),
        blocks=((2, 4, 14, 4), (4, 14, 4, 2)),
        block_repeat=((1, 1, 1, 1), (2, 2, 2, 2)),
    ),
    # The golden test model (golden/stage_b_tiny): 4 widths, attention on two levels, up-path repeats.
    "tiny": StageBConfig(
        c_cond=32,
        c_hidden=(16, 24, 32, 32),
        nhead=(-1, -1, 2, 4),
        blocks=((1, 2, 1, 1), (2, 1, 1, 1)),
        c_clip=24,
    ),
}


_UNOBSERVABLE = ("nhead", "dropout", "self_attn")  # not visible in tensor shapes


def stage_b_config_from_shapes(
    shapes: Mapping[str, Any], *, diffusers_config: Mapping[str, Any] | None = None
) -> tuple[StageBConfig, str]:
    """(config, flavour) for a checkpoint's original-layout key shapes.

    Shapes fix everything but attention heads, dropout and self_attn. Those come from a diffusers
    config.json when given (it wins even over a preset with the same shapes), else from the preset whose
    shapes match (flavour = its name), else from the released models' rules: 64-wide heads and dropout
    0.1 on levels with attention (flavour 'custom'). Raises ValueError."""
    c_in = int(diffusers_config.get("in_channels", 4)) if diffusers_config else 4
    inferred = infer_unet_hparams(shapes, c_in=c_in)
    if "c_effnet" not in inferred:
        raise ValueError("the shapes are those of a Stage C prior, not a Stage B decoder")
    flavour = next(
        (
            name
            for name, p in STAGE_B_PRESETS.items()
            if all(p.to_dict()[k] == v for k, v in inferred.items())
        ),
        None,
    )
    if flavour is not None:
        values = STAGE_B_PRESETS[flavour].to_dict()
    else:
        attn = ["A" in letters for letters in inferred["level_config"]]
        widths = inferred["c_hidden"]
        values = {
            **StageBConfig().to_dict(),
            **inferred,
            "nhead": [c // 64 if a else -1 for c, a in zip(widths, attn, strict=True)],
            "dropout": [0.1 if a else 0.0 for a in attn],
        }
        bad = [c for c, a in zip(widths, attn, strict=True) if a and c % 64]
        if bad and not diffusers_config:
            raise ValueError(
                f"cannot infer attention heads for widths {bad} (not multiples of 64): pass config= or put "
                "the model's diffusers config.json beside the weights"
            )
    if diffusers_config:
        from_json = diffusers_config_to_original(diffusers_config)
        values.update({k: from_json[k] for k in _UNOBSERVABLE if from_json.get(k) is not None})
    config = StageBConfig.from_dict(values)
    if flavour is not None and config == STAGE_B_PRESETS[flavour]:
        return config, flavour
    return config, "custom"


def _mapper(c_in: int, c_out: int, kw: dict) -> nn.Sequential:
    """Conv1x1(c_in -> 4 c_out) -> GELU -> Conv1x1(-> c_out) -> LN2d (keys .0, .2)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out * 4, kernel_size=1, **kw),
        nn.GELU(),
        nn.Conv2d(c_out * 4, c_out, kernel_size=1, **kw),
        LayerNorm2d(c_out),
    )


class StageB(nn.Module):
    """Stage B: model(x, r, effnet, clip, pixels=None, sca=None) -> predicted noise like x."""

    def __init__(self, config: StageBConfig | None = None, *, device=None, dtype=None) -> None:
        super().__init__()
        cfg = config or StageBConfig()
        self.config = cfg
        kw = {"device": device, "dtype": dtype}
        hidden = cfg.c_hidden

        self.effnet_mapper = _mapper(cfg.c_effnet, hidden[0], kw)
        self.pixels_mapper = _mapper(cfg.c_pixels, hidden[0], kw)
        self.clip_mapper = nn.Linear(cfg.c_clip, cfg.c_cond * cfg.c_clip_seq, **kw)
        self.clip_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(cfg.patch_size),
            nn.Conv2d(cfg.c_in * cfg.patch_size**2, hidden[0], kernel_size=1, **kw),
            LayerNorm2d(hidden[0]),
        )

        build_levels(
            self, cfg, cfg.c_cond, kw,
            downscaler=lambda i: nn.Sequential(
                LayerNorm2d(hidden[i - 1]),
                nn.Conv2d(hidden[i - 1], hidden[i], kernel_size=2, stride=2, **kw),
            ),
            upscaler=lambda i: nn.Sequential(
                LayerNorm2d(hidden[i]),
                nn.ConvTranspose2d(hidden[i], hidden[i - 1], kernel_size=2, stride=2, **kw),
            ),
        )

        self.clf = nn.Sequential(
            LayerNorm2d(hidden[0]),
            nn.Conv2d(hidden[0], cfg.c_out * cfg.patch_size**2, kernel_size=1, **kw),
            nn.PixelShuffle(cfg.patch_size),
        )

    def embed_r(self, r: Tensor, **conds: Tensor | None) -> Tensor:
        """[B] noise level (+ t_conds, default 0) -> [B, c_r * (1 + len(t_conds))]."""
        return embed_r(self.config, r, conds)

    def embed_clip(self, clip: Tensor) -> Tensor:
        """Pooled text [B,1,c_clip] (or [B,c_clip]) -> c_clip_seq LayerNorm'd tokens [B, 4, c_cond]."""
        if clip.dim() == 2:
            clip = clip[:, None]
        b, s = clip.shape[:2]
        return self.clip_norm(self.clip_mapper(clip).view(b, s * self.config.c_clip_seq, -1))

    def forward(
        self,
        x: Tensor,
        r: Tensor,
        effnet: Tensor,
        clip: Tensor,
        pixels: Tensor | None = None,
        sca: Tensor | None = None,
    ) -> Tensor:
        """x [B,4,H,W] (H, W even), r [B], effnet [B,16,h,w] (any size), clip [B,1,1280] -> [B,4,H,W]."""
        cfg = self.config
        b = x.shape[0]
        if x.dim() != 4 or x.shape[1] != cfg.c_in:
            raise ValueError(f"StageB expects x of shape [B, {cfg.c_in}, H, W], got {tuple(x.shape)}")
        if x.shape[-2] % cfg.patch_size or x.shape[-1] % cfg.patch_size:
            raise ValueError(
                f"StageB needs H and W divisible by patch_size {cfg.patch_size}, got {tuple(x.shape)}"
            )
        if r.dim() != 1 or r.shape[0] != b:
            raise ValueError(f"StageB expects r of shape [{b}], got {tuple(r.shape)}")
        if effnet.dim() != 4 or effnet.shape[:2] != (b, cfg.c_effnet):
            raise ValueError(
                f"StageB expects effnet of shape [{b}, {cfg.c_effnet}, h, w], got {tuple(effnet.shape)}"
            )
        dtype = x.dtype
        if pixels is None:
            pixels = x.new_zeros(b, cfg.c_pixels, DEFAULT_PIXELS_SIZE, DEFAULT_PIXELS_SIZE)
        r_embed = self.embed_r(r, sca=sca).to(dtype)  # [B, c_r * (1 + n_conds)]
        clip_tokens = self.embed_clip(clip.to(dtype))  # [B, 4, c_cond]

        x = self.embedding(x)  # [B, c_hidden[0], H/2, W/2]
        size = x.shape[-2:]
        x = x + self.effnet_mapper(resize(effnet, size, dtype))  # resize, then map
        x = x + resize(self.pixels_mapper(pixels.to(dtype)), size, dtype)  # map, then resize

        x = walk_levels(self, x, lambda blk, h, skip: apply_block(blk, h, r_embed, clip_tokens, skip), dtype)
        return self.clf(x)
