"""Building blocks shared by the Stage C prior and the Stage B decoder (official `modules/common.py`).

Parameter names follow the official checkpoints exactly (`depthwise`, `channelwise.0`, `mapper_sca`,
`attention.attn.in_proj_weight`, ...), so a state dict loads without renaming. All norms are
channels-last LayerNorms without affine parameters and eps 1e-6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LayerNorm2d",
    "GlobalResponseNorm",
    "ResBlock",
    "FeedForwardBlock",
    "TimestepBlock",
    "MultiheadAttention",
    "Attention2D",
    "AttnBlock",
    "UpDownBlock2d",
    "r_embedding",
    "apply_block",
]

NORM_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor (no affine parameters by default).

    On a channels-last tensor (what StageC runs on) both permutes are free views: no copy.
    """

    def __init__(self, c: int, *, elementwise_affine: bool = False, eps: float = NORM_EPS, **kwargs) -> None:
        super().__init__(c, elementwise_affine=elementwise_affine, eps=eps, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        # [B, C, H, W] -> [B, H, W, C] -> norm -> [B, C, H, W]
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on a channels-last tensor; gamma/beta are [1, 1, 1, C] as in the checkpoints."""

    def __init__(self, c: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, c, device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, c, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # x [B, H, W, C]; G is the L2 norm over H, W per sample and channel
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)  # [B, 1, 1, C]
        n = g / (g.mean(dim=-1, keepdim=True) + NORM_EPS)
        # gamma * (x * n) + beta + x, rewritten as x * (gamma * n + 1) + beta: one pass over the
        # [B, H, W, 4c] activation instead of four, and one full-size tensor kept for backward, not two.
        return torch.addcmul(self.beta, x, self.gamma * n + 1)


def _channel_mlp(c_in: int, c: int, dropout: float, device, dtype) -> nn.Sequential:
    """Linear(c_in, 4c) -> GELU -> GRN(4c) -> Dropout -> Linear(4c, c), keys channelwise.{0,2,4}."""
    return nn.Sequential(
        nn.Linear(c_in, c * 4, device=device, dtype=dtype),
        nn.GELU(),
        GlobalResponseNorm(c * 4, device=device, dtype=dtype),
        nn.Dropout(dropout),
        nn.Linear(c * 4, c, device=device, dtype=dtype),
    )


class ResBlock(nn.Module):
    """Depthwise conv -> LN2d -> [concat skip] -> channel MLP with GRN -> + input."""

    def __init__(
        self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0, *, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c, device=device, dtype=dtype
        )
        self.norm = LayerNorm2d(c)
        self.channelwise = _channel_mlp(c + c_skip, c, dropout, device, dtype)

    def forward(self, x: Tensor, x_skip: Tensor | None = None) -> Tensor:
        x_res = x
        x = self.norm(self.depthwise(x))
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)  # [B, c + c_skip, H, W]
        x = self.channelwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + x_res


class FeedForwardBlock(nn.Module):
    """Block type 'F': LN2d -> channel MLP with GRN -> + input (no real config uses it)."""

    def __init__(self, c: int, dropout: float = 0.0, *, device=None, dtype=None) -> None:
        super().__init__()
        self.norm = LayerNorm2d(c)
        self.channelwise = _channel_mlp(c, c, dropout, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.channelwise(self.norm(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TimestepBlock(nn.Module):
    """x * (1 + a) + b with (a, b) summed over one Linear per r-embedding chunk (r, then each cond)."""

    def __init__(self, c: int, c_timestep: int, conds: Sequence[str] = ("sca",), *, device=None, dtype=None):
        super().__init__()
        self.mapper = nn.Linear(c_timestep, c * 2, device=device, dtype=dtype)
        self.conds = tuple(conds)
        for name in self.conds:
            setattr(self, f"mapper_{name}", nn.Linear(c_timestep, c * 2, device=device, dtype=dtype))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        chunks = t.chunk(len(self.conds) + 1, dim=1)  # each [B, c_timestep]
        a, b = self.mapper(chunks[0])[:, :, None, None].chunk(2, dim=1)  # [B, c, 1, 1] each
        for i, name in enumerate(self.conds):
            ac, bc = getattr(self, f"mapper_{name}")(chunks[i + 1])[:, :, None, None].chunk(2, dim=1)
            a, b = a + ac, b + bc
        return torch.addcmul(b, x, 1 + a)  # x * (1 + a) + b in one pass; keeps x's memory format


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention's parameters (packed q/k/v in-projection) computed with SDPA.

    `in_proj_adapters` lets LoRA add a delta to the fused projection without renaming base keys.
    """

    def __init__(self, c: int, nhead: int, dropout: float = 0.0, *, device=None, dtype=None) -> None:
        super().__init__()
        if nhead <= 0 or c % nhead != 0:
            raise ValueError(f"attention width {c} must be a positive multiple of nhead={nhead}")
        self.embed_dim = c
        self.num_heads = nhead
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * c, c, device=device, dtype=dtype))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * c, device=device, dtype=dtype))
        self.out_proj = nn.Linear(c, c, device=device, dtype=dtype)
        self.in_proj_adapters = nn.ModuleDict()
        if self.in_proj_weight.device.type != "meta":
            nn.init.xavier_uniform_(self.in_proj_weight)
            nn.init.zeros_(self.out_proj.bias)

    def project_in(self, tokens: Tensor) -> Tensor:
        """[B, N, c] -> [B, N, 3c] (q | k | v), including any registered adapters."""
        out = F.linear(tokens, self.in_proj_weight, self.in_proj_bias)
        for adapter in self.in_proj_adapters.values():
            out = out + adapter(tokens)
        return out

    def forward(self, x: Tensor, context: Tensor, self_attn: bool = True) -> Tensor:
        """x [B, L, c] queries; context [B, S, c] extra keys/values (appended after x if self_attn)."""
        c, n = self.embed_dim, x.shape[1]
        # q/k/v are strided views of the fused projection, [B, N, nh, hd] each (unbind, not three
        # slices: its backward writes one stacked gradient instead of three zero-filled full copies).
        if self_attn:
            q, k, v = self._split(self.project_in(torch.cat([x, context], dim=1)))  # N = L + S
            q = q[:, :n]
        else:
            q = self._split(self.project_in(x))[0]
            _, k, v = self._split(self.project_in(context))
        p = self.dropout if self.training else 0.0
        # [B, nh, N, hd] views; the flash / cuDNN / efficient kernels take them without a copy
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p
        )
        out = out.transpose(1, 2).reshape(x.shape[0], n, c)  # [B, L, c]
        return self.out_proj(out)

    def _split(self, qkv: Tensor) -> tuple[Tensor, ...]:
        """[B, N, 3c] -> (q, k, v), each a [B, N, nh, hd] view."""
        return qkv.unflatten(-1, (3, self.num_heads, -1)).unbind(2)


class Attention2D(nn.Module):
    """Flattens an NCHW map to tokens for `attn` (key path `attention.attn`)."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0, *, device=None, dtype=None) -> None:
        super().__init__()
        self.attn = MultiheadAttention(c, nhead, dropout, device=device, dtype=dtype)

    def forward(self, x: Tensor, kv: Tensor, self_attn: bool = True) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).permute(0, 2, 1)  # [B, HW, c]; a free view when channels-last
        out = self.attn(tokens, kv, self_attn=self_attn)
        return out.permute(0, 2, 1).reshape(b, c, h, w)  # a channels-last view of [B, HW, c]


class AttnBlock(nn.Module):
    """x + Attention(LN2d(x), keys/values = [image tokens ; Linear(SiLU(conditioning tokens))])."""

    def __init__(
        self,
        c: int,
        c_cond: int,
        nhead: int,
        self_attn: bool = True,
        dropout: float = 0.0,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c)
        self.attention = Attention2D(c, nhead, dropout, device=device, dtype=dtype)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c, device=device, dtype=dtype))

    def forward(self, x: Tensor, kv: Tensor) -> Tensor:
        kv = self.kv_mapper(kv)  # [B, S, c]
        return x + self.attention(self.norm(x), kv, self_attn=self.self_attn)


class UpDownBlock2d(nn.Module):
    """1x1 conv plus an optional 2x bilinear resample; `enabled=False` keeps the resolution (Stage C)."""

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool = True, *, device=None, dtype=None):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"UpDownBlock2d mode must be 'up' or 'down', got {mode!r}")
        interpolation: nn.Module = (
            nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear", align_corners=True)
            if enabled
            else nn.Identity()
        )
        mapping = nn.Conv2d(c_in, c_out, kernel_size=1, device=device, dtype=dtype)
        self.blocks = nn.ModuleList([interpolation, mapping] if mode == "up" else [mapping, interpolation])

    def forward(self, x: Tensor) -> Tensor:
        # The official block runs each sub-op in float32; that only differs from a plain call under autocast.
        upcast = torch.is_autocast_enabled(x.device.type)
        for block in self.blocks:
            x = block(x.float() if upcast else x)
        return x


def r_embedding(r: Tensor, c_r: int, max_positions: int = 10000) -> Tensor:
    """Sinusoidal embedding of a [B] vector in [0, 1] -> [B, c_r] (sin half first, as the official code)."""
    r = r * max_positions
    half = c_r // 2
    scale = math.log(max_positions) / (half - 1)
    freqs = torch.arange(half, device=r.device).float().mul(-scale).exp()  # [half] in float32
    emb = r[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)  # [B, 2*half]
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def apply_block(
    block: nn.Module, x: Tensor, r_embed: Tensor, clip: Tensor, skip: Tensor | None = None
) -> Tensor:
    """Run one UNet block with the inputs its type takes (the official `_down_encode` dispatch)."""
    if isinstance(block, ResBlock):
        return block(x, skip)
    if isinstance(block, AttnBlock):
        return block(x, clip)
    if isinstance(block, TimestepBlock):
        return block(x, r_embed)
    return block(x)
