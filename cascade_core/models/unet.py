"""What the Stage C and Stage B UNets share: the block factory, the level lists in the checkpoints' key
order, the noise-level embedding, and the down/up walk with its long skips (the official `_down_encode` /
`_up_decode`). Each model keeps what differs: its mappers, its down/upscalers and how a block is run.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cascade_core.models.blocks import (
    AttnBlock,
    FeedForwardBlock,
    ResBlock,
    TimestepBlock,
    r_embedding,
)

__all__ = ["build_levels", "embed_r", "resize", "walk_levels"]

# run_block(block, x, skip) -> x: how a model runs one block (with or without recompute)
RunBlock = Callable[[nn.Module, Tensor, "Tensor | None"], Tensor]


def build_levels(unet: nn.Module, cfg: Any, c_cond: int, kw: dict[str, Any],
                 downscaler: Callable[[int], nn.Module], upscaler: Callable[[int], nn.Module]) -> None:
    """Register down_blocks, down_downscalers, down_repeat_mappers, then up_blocks, up_upscalers,
    up_repeat_mappers on `unet`, in that order (the order of the checkpoints' keys).

    `downscaler(i)` maps level i-1 to level i and `upscaler(i)` level i to level i-1 (both for i > 0);
    level 0 gets nn.Identity. `cfg` is a Stage C or Stage B config (models/unet_config.py)."""
    hidden, n = cfg.c_hidden, len(cfg.c_hidden)

    def block(letter: str, i: int, c_skip: int = 0) -> nn.Module:
        c, p = hidden[i], cfg.dropout[i]
        if letter == "C":
            return ResBlock(c, c_skip, kernel_size=cfg.kernel_size, dropout=p, **kw)
        if letter == "A":
            return AttnBlock(c, c_cond, cfg.nhead[i], self_attn=cfg.self_attn, dropout=p, **kw)
        if letter == "F":
            return FeedForwardBlock(c, dropout=p, **kw)
        return TimestepBlock(c, cfg.c_r, conds=cfg.t_conds, **kw)

    def repeat_mappers(i: int, repeats: int) -> nn.ModuleList:
        return nn.ModuleList([nn.Conv2d(hidden[i], hidden[i], 1, **kw) for _ in range(repeats - 1)])

    unet.down_blocks, unet.down_downscalers, unet.down_repeat_mappers = (
        nn.ModuleList(),
        nn.ModuleList(),
        nn.ModuleList(),
    )
    for i in range(n):
        unet.down_downscalers.append(downscaler(i) if i > 0 else nn.Identity())
        unet.down_blocks.append(
            nn.ModuleList([block(t, i) for _ in range(cfg.blocks[0][i]) for t in cfg.level_config[i]])
        )
        unet.down_repeat_mappers.append(repeat_mappers(i, cfg.block_repeat[0][i]))

    unet.up_blocks, unet.up_upscalers, unet.up_repeat_mappers = (
        nn.ModuleList(),
        nn.ModuleList(),
        nn.ModuleList(),
    )
    for i in reversed(range(n)):  # up_blocks.0 is the deepest level
        unet.up_upscalers.append(upscaler(i) if i > 0 else nn.Identity())
        level = nn.ModuleList()
        for j in range(cfg.blocks[1][::-1][i]):
            for k, t in enumerate(cfg.level_config[i]):
                c_skip = hidden[i] if i < n - 1 and j == k == 0 else 0  # first ResBlock takes the long skip
                level.append(block(t, i, c_skip))
        unet.up_blocks.append(level)
        unet.up_repeat_mappers.append(repeat_mappers(i, cfg.block_repeat[1][::-1][i]))


def embed_r(cfg: Any, r: Tensor, conds: dict[str, Tensor | None]) -> Tensor:
    """[B] noise level (+ cfg.t_conds from `conds`, default 0) -> [B, c_r * (1 + len(t_conds))]."""
    parts = [r_embedding(r, cfg.c_r)]
    for name in cfg.t_conds:
        value = conds.get(name)
        parts.append(r_embedding(torch.zeros_like(r) if value is None else value.to(r), cfg.c_r))
    return torch.cat(parts, dim=1)


def resize(x: Tensor, size: torch.Size | tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Bilinear resize in float32 with align_corners=True (as the official code), then cast to `dtype`."""
    return F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=True).to(dtype)


def walk_levels(unet: nn.Module, x: Tensor, run_block: RunBlock, dtype: torch.dtype) -> Tensor:
    """The embedded input [B, c_hidden[0], H, W] through every down level, then every up level with the
    long skips, -> [B, c_hidden[0], H, W] for the model's head. `dtype` is the model input's dtype."""
    levels: list[Tensor] = []
    for blocks, downscaler, repmap in zip(
        unet.down_blocks, unet.down_downscalers, unet.down_repeat_mappers, strict=True
    ):
        x = downscaler(x)  # halves H, W for levels > 0 (floor for odd sizes)
        for rep in range(len(repmap) + 1):
            for blk in blocks:
                x = run_block(blk, x, None)
            if rep < len(repmap):
                x = repmap[rep](x)
        levels.insert(0, x)

    x = levels[0]
    up_path = zip(unet.up_blocks, unet.up_upscalers, unet.up_repeat_mappers, strict=True)
    for u, (blocks, upscaler, repmap) in enumerate(up_path):
        for rep in range(len(repmap) + 1):
            for k, blk in enumerate(blocks):
                skip = levels[u] if k == 0 and u > 0 and isinstance(blk, ResBlock) else None
                if skip is not None and x.shape[-2:] != skip.shape[-2:]:
                    x = resize(x, skip.shape[-2:], dtype)  # odd sizes: the upscaler undershoots
                x = run_block(blk, x, skip)
            if rep < len(repmap):
                x = repmap[rep](x)
        x = upscaler(x)
    return x
