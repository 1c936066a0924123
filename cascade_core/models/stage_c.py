"""The Stable Cascade Stage C prior (official `modules/stage_c.py`), with SDPA attention.

Build on the meta device (`device="meta"`) and materialize from a checkpoint with
`cascade_core.load_stage_c`; the state-dict keys are exactly those of Stability's single files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cascade_core.formats import diffusers_config_to_original, infer_unet_hparams
from cascade_core.models.blocks import (
    AttnBlock,
    FeedForwardBlock,
    LayerNorm2d,
    ResBlock,
    TimestepBlock,
    UpDownBlock2d,
    apply_block,
)
from cascade_core.models.unet import build_levels, embed_r, walk_levels
from cascade_core.models.unet_config import UNetConfig

__all__ = ["StageCConfig", "StageC", "STAGE_C_PRESETS", "stage_c_config_from_shapes"]



@dataclass(frozen=True)
class StageCConfig(UNetConfig):
    """Constructor arguments of the official StageC (defaults = the 3.6B model)."""

    c_in: int = 16
    c_out: int = 16
    c_r: int = 64
    patch_size: int = 1
    c_cond: int = 2048
    c_hidden: tuple[int, ...] = (2048, 2048)
    nhead: tuple[int, ...] = (32, 32)
    blocks: tuple[tuple[int, ...], ...] = ((8, 24), (24, 8))  # (down per level, up deepest-first)
    block_repeat: tuple[tuple[int, ...], ...] = ((1, 1), (1, 1))
    level_config: tuple[str, ...] = ("CTA", "CTA")
    c_clip_text: int = 1280
    c_clip_text_pooled: int = 1280
    c_clip_img: int = 768
    c_clip_seq: int = 4
    kernel_size: int = 3
    dropout: tuple[float, ...] = (0.1, 0.1)
    self_attn: bool = True
    t_conds: tuple[str, ...] = ("sca", "crp")
    switch_level: tuple[bool, ...] = (False,)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self._normalise(("c_hidden", "nhead", "level_config", "dropout", "t_conds", "switch_level"))
        problems = self._level_problems()
        if len(self.switch_level) != len(self.c_hidden) - 1:
            problems.append(f"switch_level needs {len(self.c_hidden) - 1} entries (one per level change), "
                            f"got {len(self.switch_level)}")
        self._raise_if(problems)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> StageCConfig:
        """A named configuration ('stage-c', 'stage-c-lite', 'tiny'), optionally with overrides."""
        if name not in STAGE_C_PRESETS:
            raise ValueError(f"unknown Stage C preset {name!r}; choose one of {sorted(STAGE_C_PRESETS)}")
        return dataclasses.replace(STAGE_C_PRESETS[name], **overrides)


STAGE_C_PRESETS: dict[str, StageCConfig] = {
    "stage-c": StageCConfig(),
    "stage-c-lite": StageCConfig(
        c_cond=1536, c_hidden=(1536, 1536), nhead=(24, 24), blocks=((4, 12), (12, 4))
    ),
    # The golden test model: two widths, extra t_conds, skip and non-skip ResBlocks.
    "tiny": StageCConfig(
        c_cond=32,
        c_hidden=(32, 48),
        nhead=(2, 4),
        blocks=((1, 2), (2, 1)),
        c_clip_text=24,
        c_clip_text_pooled=24,
        c_clip_img=20,
    ),
}


def stage_c_config_from_shapes(
    shapes: Mapping[str, Any], *, diffusers_config: Mapping[str, Any] | None = None
) -> tuple[StageCConfig, str]:
    """(config, flavour) for a checkpoint's original-layout key shapes.

    A checkpoint whose shapes match a preset gets that preset (flavour = its name); otherwise the
    architecture comes from the shapes (flavour 'custom') and what shapes cannot tell (attention heads,
    dropout, self_attn, switch_level) from a diffusers config.json when given, else the released models'
    rules: heads = width / 64, dropout 0.1, no resampling between levels. Raises ValueError."""
    c_in = int(diffusers_config.get("in_channels", 16)) if diffusers_config else 16
    inferred = infer_unet_hparams(shapes, c_in=c_in)
    for name, preset in STAGE_C_PRESETS.items():
        known = preset.to_dict()
        if all(known[k] == v for k, v in inferred.items()):
            return preset, name
    values = {**StageCConfig().to_dict(), **inferred}
    widths = inferred["c_hidden"]
    if diffusers_config:
        from_json = diffusers_config_to_original(diffusers_config)
        for key in ("nhead", "dropout", "self_attn", "switch_level"):
            if from_json.get(key) is not None:
                values[key] = from_json[key]
    else:
        bad = [
            c
            for c, letters in zip(widths, inferred["level_config"], strict=True)
            if "A" in letters and c % 64
        ]
        if bad:
            raise ValueError(
                f"cannot infer attention heads for widths {bad} (not multiples of 64): pass config= or "
                "put the model's diffusers config.json beside the weights"
            )
        values.update(
            nhead=[c // 64 for c in widths],
            dropout=[0.1] * len(widths),
            switch_level=[False] * (len(widths) - 1),
        )
    return StageCConfig.from_dict(values), "custom"


class StageC(nn.Module):
    """Stage C prior: model(x, r, clip_text, clip_text_pooled, clip_img, sca=None, crp=None) -> eps."""

    def __init__(self, config: StageCConfig | None = None, *, device=None, dtype=None) -> None:
        super().__init__()
        cfg = config or StageCConfig()
        self.config = cfg
        self.gradient_checkpointing = cfg.gradient_checkpointing
        # Activations run channels-last (NHWC in memory, NCHW in shape): the norms, GRN, the channel
        # MLPs and the attention tokens all work on the channel axis, so their permutes become free
        # views instead of copies. A speed switch, not state: contiguous_format gives the same numbers.
        self.memory_format = torch.channels_last
        kw = {"device": device, "dtype": dtype}
        c_cond, hidden = cfg.c_cond, cfg.c_hidden

        self.clip_txt_mapper = nn.Linear(cfg.c_clip_text, c_cond, **kw)
        self.clip_txt_pooled_mapper = nn.Linear(cfg.c_clip_text_pooled, c_cond * cfg.c_clip_seq, **kw)
        self.clip_img_mapper = nn.Linear(cfg.c_clip_img, c_cond * cfg.c_clip_seq, **kw)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(cfg.patch_size),
            nn.Conv2d(cfg.c_in * cfg.patch_size**2, hidden[0], kernel_size=1, **kw),
            LayerNorm2d(hidden[0]),
        )

        build_levels(
            self, cfg, c_cond, kw,
            downscaler=lambda i: nn.Sequential(
                LayerNorm2d(hidden[i - 1]),
                UpDownBlock2d(hidden[i - 1], hidden[i], mode="down", enabled=cfg.switch_level[i - 1], **kw),
            ),
            upscaler=lambda i: nn.Sequential(
                LayerNorm2d(hidden[i]),
                UpDownBlock2d(hidden[i], hidden[i - 1], mode="up", enabled=cfg.switch_level[i - 1], **kw),
            ),
        )

        self.clf = nn.Sequential(
            LayerNorm2d(hidden[0]),
            nn.Conv2d(hidden[0], cfg.c_out * cfg.patch_size**2, kernel_size=1, **kw),
            nn.PixelShuffle(cfg.patch_size),
        )
        if self.clf[1].weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init (section 3.6 of the facts): used for from-scratch training only."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for mapper in (self.clip_txt_mapper, self.clip_txt_pooled_mapper, self.clip_img_mapper):
            nn.init.normal_(mapper.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, 0.02)
        nn.init.zeros_(self.clf[1].weight)
        scale = math.sqrt(1 / sum(self.config.blocks[0]))
        for m in self.modules():
            if isinstance(m, (ResBlock, FeedForwardBlock)):
                m.channelwise[-1].weight.data.mul_(scale)
            elif isinstance(m, TimestepBlock):
                for lin in m.children():
                    nn.init.zeros_(lin.weight)
            elif isinstance(m, AttnBlock):
                nn.init.xavier_uniform_(m.attention.attn.in_proj_weight)
                nn.init.zeros_(m.attention.attn.in_proj_bias)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant)."""
        self.gradient_checkpointing = enabled

    def embed_r(self, r: Tensor, **conds: Tensor | None) -> Tensor:
        """[B] noise level (+ t_conds, default 0) -> [B, c_r * (1 + len(t_conds))]."""
        return embed_r(self.config, r, conds)

    def embed_clip(self, clip_text: Tensor, clip_text_pooled: Tensor, clip_img: Tensor) -> Tensor:
        """Conditioning tokens: text [B,T,.], pooled [B,1,.], image [B,1,.] -> [B, T + 2*4, c_cond]."""
        if clip_text_pooled.dim() == 2:
            clip_text_pooled = clip_text_pooled[:, None]
        if clip_img.dim() == 2:
            clip_img = clip_img[:, None]
        seq = self.config.c_clip_seq
        b = clip_text.shape[0]
        txt = self.clip_txt_mapper(clip_text)
        pooled = self.clip_txt_pooled_mapper(clip_text_pooled).view(b, clip_text_pooled.shape[1] * seq, -1)
        img = self.clip_img_mapper(clip_img).view(b, clip_img.shape[1] * seq, -1)
        return self.clip_norm(torch.cat([txt, pooled, img], dim=1))

    def _run(
        self, blk: nn.Module, x: Tensor, r_embed: Tensor, clip: Tensor, skip: Tensor | None = None
    ) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(apply_block, blk, x, r_embed, clip, skip, use_reentrant=False)
        return apply_block(blk, x, r_embed, clip, skip)

    def forward(
        self,
        x: Tensor,
        r: Tensor,
        clip_text: Tensor,
        clip_text_pooled: Tensor,
        clip_img: Tensor,
        sca: Tensor | None = None,
        crp: Tensor | None = None,
    ) -> Tensor:
        """x [B, c_in, H, W], r [B] -> predicted noise [B, c_out, H, W]."""
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.c_in:
            raise ValueError(f"StageC expects x of shape [B, {cfg.c_in}, H, W], got {tuple(x.shape)}")
        if r.dim() != 1 or r.shape[0] != x.shape[0]:
            raise ValueError(f"StageC expects r of shape [{x.shape[0]}], got {tuple(r.shape)}")
        dtype = x.dtype
        r_embed = self.embed_r(r, sca=sca, crp=crp).to(dtype)  # [B, c_r * (1 + n_conds)]
        clip = self.embed_clip(clip_text.to(dtype), clip_text_pooled.to(dtype), clip_img.to(dtype))

        x = self.embedding(x.contiguous(memory_format=self.memory_format))  # [B, c_hidden[0], H, W]
        x = walk_levels(self, x, lambda blk, h, skip: self._run(blk, h, r_embed, clip, skip), dtype)
        return self.clf(x).contiguous()  # [B, c_out, H, W], plain NCHW for the caller
