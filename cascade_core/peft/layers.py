"""LoRA modules: one low-rank adapter, and Linear-like hosts that add adapters to their forward.

A host keeps the base parameter names (`weight`, `bias`, ...) and only adds `adapters:
ModuleDict[name -> LoRAAdapter]`; `lora.py` turns an existing module into a host by switching its
class in place (`LoRALinear`, `LoRAConv2d`, `LoRAInt8Linear`, or a generated `LoRA<Base>`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade_core.quant.int8 import Int8Linear

__all__ = [
    "InitMode",
    "LoRAAdapter",
    "LoRAHostMixin",
    "LoRALinear",
    "LoRAConv2d",
    "LoRAInt8Linear",
    "host_class",
]

InitMode = Literal["standard", "official"]


class LoRAAdapter(nn.Module):
    """One low-rank delta: up @ down, scaled by alpha / rank and a user strength.

    `lora_down` is [rank, in] ([rank, in, 1, 1] for a 1x1 conv), `lora_up` is [out, rank] (or
    [out, rank, 1, 1]). Init "standard" (kohya/peft): down kaiming-uniform, up zero; "official"
    (Stability modules/lora.py): down zero, up N(0, 1). Either way the product starts at zero.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        conv: bool = False,
        init: InitMode = "standard",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        if init not in ("standard", "official"):
            raise ValueError(f"LoRA init must be 'standard' or 'official', got {init!r}")
        tail = (1, 1) if conv else ()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.conv = rank, float(alpha), conv
        self.strength = 1.0
        self.enabled = True
        self.merged_strength: float | None = None  # strength folded into the base weight, if merged
        self.lora_down = nn.Parameter(torch.empty(rank, in_features, *tail, device=device, dtype=dtype))
        self.lora_up = nn.Parameter(torch.empty(out_features, rank, *tail, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.lora_down.device.type != "meta":
            self.reset_parameters(init)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def active(self) -> bool:
        """Contributes in forward: enabled, not merged, non-zero strength."""
        return self.enabled and self.merged_strength is None and self.strength != 0.0

    def reset_parameters(self, init: InitMode = "standard") -> None:
        with torch.no_grad():
            if init == "official":
                nn.init.zeros_(self.lora_down)
                nn.init.normal_(self.lora_up, 0.0, 1.0)
            else:
                nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))
                nn.init.zeros_(self.lora_up)

    def delta_weight(self) -> Tensor:
        """scale * up @ down in the base weight's layout ([out, in] or [out, in, 1, 1]); no strength."""
        delta = self.lora_up.flatten(1) @ self.lora_down.flatten(1)  # [out, in]
        return (delta * self.scale).view(self.out_features, self.in_features, *self.lora_down.shape[2:])

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] (or [B, in, H, W] for conv) -> delta output [..., out]; zero when inactive."""
        if not self.active:
            return x.new_zeros(())
        h = self.dropout(x.to(self.lora_down.dtype))
        if self.conv:
            h = F.conv2d(F.conv2d(h, self.lora_down), self.lora_up)  # [B, r, H, W] -> [B, out, H, W]
        else:
            h = F.linear(F.linear(h, self.lora_down), self.lora_up)  # [..., r] -> [..., out]
        return (h * (self.scale * self.strength)).to(x.dtype)


class LoRAHostMixin:
    """Adds `adapters` to a Linear-like module's forward; the base forward is untouched."""

    adapters: nn.ModuleDict
    _lora_base_class: type[nn.Module]

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)  # type: ignore[misc]
        for adapter in self.adapters.values():
            if adapter.active:
                out = out + adapter(x)
        return out


class LoRALinear(LoRAHostMixin, nn.Linear):
    """nn.Linear with named LoRA adapters (keys `weight`, `bias`, `adapters.<name>.lora_*`)."""

    _lora_base_class = nn.Linear


class LoRAConv2d(LoRAHostMixin, nn.Conv2d):
    """1x1 nn.Conv2d with named LoRA adapters."""

    _lora_base_class = nn.Conv2d


class LoRAInt8Linear(LoRAHostMixin, Int8Linear):
    """Int8Linear (frozen int8 base) with named LoRA adapters trained in floating point."""

    _lora_base_class = Int8Linear


_HOST_CLASSES: dict[type, type] = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d, Int8Linear: LoRAInt8Linear}


def host_class(base: type) -> type:
    """The LoRA host subclass for a base class (generated once for other Linear subclasses, e.g. bnb)."""
    if base not in _HOST_CLASSES:
        _HOST_CLASSES[base] = type(f"LoRA{base.__name__}", (LoRAHostMixin, base), {"_lora_base_class": base})
    return _HOST_CLASSES[base]
