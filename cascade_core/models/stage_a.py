"""Stage A (the f4 VQGAN): pixels in [0,1] <-> 4-channel latents that Stage B generates.

Follows the official `StageA` (keys of `stage_a.safetensors`) including its vector quantiser. Decode
never quantises: Stage B outputs are decoded directly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


class StageAResBlock(nn.Module):
    """Norms without affine weights, modulated by 6 learned scalars (`gammas`, zero-initialised)."""

    def __init__(self, c: int, c_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def _norm(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        t = self._norm(x, self.norm1) * (1 + g[0]) + g[1]
        x = x + self.depthwise(t) * g[2]
        t = self._norm(x, self.norm2) * (1 + g[3]) + g[4]
        return x + self.channelwise(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * g[5]


class Quantized(NamedTuple):
    quantized: torch.Tensor  # [B,C,H,W], straight-through gradient to the input
    vq_loss: torch.Tensor  # pulls the codebook towards the encodings
    commit_loss: torch.Tensor  # pulls the encodings towards the codebook
    indices: torch.Tensor  # int64 [B,H,W]


class VectorQuantizer(nn.Module):
    """Nearest codebook row by squared L2 over the channel axis (torchtools `VectorQuantize`)."""

    def __init__(self, c_latent: int, codebook_size: int) -> None:
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, c_latent)

    def forward(self, x: torch.Tensor) -> Quantized:
        """x [B,C,H,W]; distances as |c|^2 + |x|^2 - 2 x.c (the official association, so ties and
        near-ties pick the same code)."""
        x_t = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        flat = x_t.reshape(-1, x_t.shape[-1])  # (B*H*W, C)
        codebook = self.codebook.weight
        with torch.no_grad():
            dist = torch.addmm(
                codebook.pow(2).sum(dim=1) + flat.pow(2).sum(dim=1, keepdim=True),
                flat,
                codebook.t(),
                alpha=-2.0,
                beta=1.0,
            )
            indices = dist.min(dim=1).indices
        chosen = codebook.index_select(0, indices)  # (B*H*W, C), carries the codebook gradient
        vq_loss = (chosen - flat.detach()).pow(2).mean()
        commit_loss = (flat - chosen.detach()).pow(2).mean()
        straight_through = chosen.detach() + (flat - flat.detach())
        quantized = straight_through.view(x_t.shape).permute(0, 3, 1, 2)
        return Quantized(quantized, vq_loss, commit_loss, indices.view(x_t.shape[:-1]))


class StageAEncoding(NamedTuple):
    """What `StageA.encode` returns; the last three are None without quantisation."""

    latent: torch.Tensor  # quantised (or raw) latent / scale_factor
    unquantized: torch.Tensor | None  # raw latent / scale_factor
    indices: torch.Tensor | None  # int64 [B,h,w]
    loss: torch.Tensor | None  # vq_loss + 0.25 * commit_loss


class StageA(nn.Module):
    """Encoder: PixelUnshuffle(2) -> convs/ResBlocks (one stride-2 conv per extra level) -> 1x1 conv -> BN.

    `scale_factor` divides encoder outputs and multiplies decoder inputs (0.43 for `stage_a.safetensors`;
    diffusers' `vqgan/` carries its own value in its config).
    """

    def __init__(
        self,
        levels: int = 2,
        bottleneck_blocks: int = 12,
        c_hidden: int = 384,
        c_latent: int = 4,
        codebook_size: int = 8192,
        scale_factor: float = 0.43,
    ) -> None:
        super().__init__()
        self.c_latent = c_latent
        self.scale_factor = scale_factor
        c_levels = [c_hidden // (2**i) for i in reversed(range(levels))]  # e.g. [192, 384]
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        down: list[nn.Module] = []
        for i in range(levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1))
            down.append(StageAResBlock(c_levels[i], c_levels[i] * 4))
        down.append(
            nn.Sequential(
                nn.Conv2d(c_levels[-1], c_latent, kernel_size=1, bias=False), nn.BatchNorm2d(c_latent)
            )
        )
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantizer(c_latent, codebook_size)
        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(c_latent, c_levels[-1], kernel_size=1))]
        for i in range(levels):
            c = c_levels[levels - 1 - i]
            up.extend(StageAResBlock(c, c * 4) for _ in range(bottleneck_blocks if i == 0 else 1))
            if i < levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))
        self.downscale = 2**levels  # pixels per latent cell

    def encode(self, images: torch.Tensor, quantize: bool = False) -> StageAEncoding:
        """images [B,3,H,W] in [0,1], H and W multiples of 2**levels -> latent [B,4,H/4,W/4] (levels 2)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"StageA.encode expects RGB images [B,3,H,W] in [0,1], got {tuple(images.shape)}"
            )
        if images.shape[-2] % self.downscale or images.shape[-1] % self.downscale:
            raise ValueError(
                f"StageA.encode needs H and W divisible by {self.downscale}, got {tuple(images.shape[-2:])}; "
                "resize or crop the images first"
            )
        x = self.down_blocks(self.in_block(images))
        if not quantize:
            return StageAEncoding(x / self.scale_factor, None, None, None)
        q = self.vquantizer(x)
        return StageAEncoding(
            q.quantized / self.scale_factor,
            x / self.scale_factor,
            q.indices,
            q.vq_loss + q.commit_loss * 0.25,
        )

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B,4,h,w] (already / scale_factor, as Stage B produces it) -> RGB [B,3,4h,4w], unclamped."""
        if latent.dim() != 4 or latent.shape[1] != self.c_latent:
            raise ValueError(
                f"StageA.decode expects latents [B,{self.c_latent},h,w], got {tuple(latent.shape)}"
            )
        return self.out_block(self.up_blocks(latent * self.scale_factor))

    def forward(
        self, images: torch.Tensor, quantize: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Autoencode: (decode(encode(images).latent), VQ loss or None)."""
        enc = self.encode(images, quantize)
        return self.decode(enc.latent), enc.loss


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad H and W up to a multiple (so any image size can be encoded); crop after decoding."""
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
