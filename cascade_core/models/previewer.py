"""Previewer: Stage C latent [B,16,h,w] -> rough RGB preview [B,3,8h,8w] (24x24 -> 192x192).

It lets training previews and `--preview-only` sampling show what a latent means without running Stage B
and Stage A. Layout follows the official `Previewer` (one Sequential `blocks`, activation before BatchNorm)
so `previewer.safetensors` loads unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_gelu_bn(conv: nn.Module, c_out: int) -> list[nn.Module]:
    return [conv, nn.GELU(), nn.BatchNorm2d(c_out)]


class Previewer(nn.Module):
    """Three 2x transposed-conv upsamplings between 1x1 / 3x3 convs; output roughly in [0,1] (unclamped)."""

    def __init__(self, c_in: int = 16, c_hidden: int = 512, c_out: int = 3) -> None:
        super().__init__()
        c2, c4 = c_hidden // 2, c_hidden // 4
        self.c_in = c_in
        self.blocks = nn.Sequential(
            *_conv_gelu_bn(nn.Conv2d(c_in, c_hidden, 1), c_hidden),
            *_conv_gelu_bn(nn.Conv2d(c_hidden, c_hidden, 3, padding=1), c_hidden),
            *_conv_gelu_bn(nn.ConvTranspose2d(c_hidden, c2, 2, stride=2), c2),  # (B, c/2, 2h, 2w)
            *_conv_gelu_bn(nn.Conv2d(c2, c2, 3, padding=1), c2),
            *_conv_gelu_bn(nn.ConvTranspose2d(c2, c4, 2, stride=2), c4),  # (B, c/4, 4h, 4w)
            *_conv_gelu_bn(nn.Conv2d(c4, c4, 3, padding=1), c4),
            *_conv_gelu_bn(nn.ConvTranspose2d(c4, c4, 2, stride=2), c4),  # (B, c/4, 8h, 8w)
            *_conv_gelu_bn(nn.Conv2d(c4, c4, 3, padding=1), c4),
            nn.Conv2d(c4, c_out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.c_in:
            raise ValueError(
                f"Previewer expects Stage C latents [B,{self.c_in},h,w], got shape {tuple(x.shape)}"
            )
        return self.blocks(x)
