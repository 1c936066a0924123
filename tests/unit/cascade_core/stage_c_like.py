"""A tiny module with Stage C's names (for tests of LoRA injection and int8 quantization by name)."""

from __future__ import annotations

import torch
from torch import nn

from cascade_core.models.blocks import AttnBlock, ResBlock


class TinyNet(nn.Module):
    """Stage C-like names: 1x1 conv stem/head, a ResBlock and an AttnBlock with the fused in-projection."""

    def __init__(self, c: int = 16, c_cond: int = 8) -> None:
        super().__init__()
        self.embedding = nn.Sequential(nn.Identity(), nn.Conv2d(4, c, 1))
        self.down_blocks = nn.ModuleList([nn.ModuleList([ResBlock(c), AttnBlock(c, c_cond, nhead=2)])])
        self.clf = nn.Sequential(nn.Identity(), nn.Conv2d(c, 4, 1))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # [B,4,H,W], [B,T,c_cond]
        x = self.embedding(x)
        for block in self.down_blocks[0]:
            x = block(x, cond) if isinstance(block, AttnBlock) else block(x)
        return self.clf(x)
