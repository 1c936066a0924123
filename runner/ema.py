"""Exponential moving average of the trainable parameters, used by validation and export when enabled.

ema <- decay * ema + (1 - decay) * param, every `update_interval` optimizer steps, with no decay warmup:
the average starts as a copy of the weights at construction, and updates before `start_step` are
plain copies (the official trainer's `ema_start_iters`). The shadow weights are
fp32 (a bf16 average with decay 0.999 would round every update away) and may live on the CPU to
spare accelerator memory.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from runner.errors import UserError


class EMA:
    """EMA of `model`'s parameters with requires_grad=True at construction, keyed by their names."""

    def __init__(self, model: nn.Module, *, decay: float, update_interval: int = 1, start_step: int = 0,
                 device: torch.device | str | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise UserError(f"EMA decay must be in [0, 1) (got {decay}); typical values are 0.999-0.9999")
        if update_interval < 1:
            raise UserError(f"EMA update interval must be >= 1 optimizer step (got {update_interval})")
        if start_step < 0:
            raise UserError(f"EMA start step must be >= 0 (got {start_step})")
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise UserError("EMA found no trainable parameters in the model; enable training of some "
                             "weights (LoRA or full fine-tune) or turn EMA off")
        self.decay = decay
        self.update_interval = update_interval
        self.start_step = start_step
        self.num_updates = 0
        self._device = None if device is None else torch.device(device)
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(device=self._device or p.device, dtype=torch.float32, copy=True)
            for name, p in named
        }
        self._params: dict[str, nn.Parameter] = dict(named)

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Fold the current weights in when `step` (1-based optimizer step) is a multiple of the interval.

        Before `start_step` the fold is a plain copy. Returns whether an update happened; depending only
        on `step` keeps resume exact.
        """
        if step % self.update_interval:
            return False
        weight = 1.0 if step < self.start_step else 1.0 - self.decay
        for name, param in self._params.items():
            avg = self.shadow[name]
            avg.lerp_(param.detach().to(device=avg.device, dtype=torch.float32), weight)
        self.num_updates += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """`shadow` (name -> fp32 tensor) plus counters; checkpoint.py stores the shadow as safetensors."""
        return {"shadow": dict(self.shadow), "num_updates": self.num_updates,
                "decay": self.decay, "update_interval": self.update_interval, "start_step": self.start_step}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy a saved average in; the names and shapes must be those of this model's trainable weights.

        decay, update_interval and start_step stay as configured now (a recipe may change them on resume).
        """
        shadow = state["shadow"]
        missing, unexpected = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
        common = set(self.shadow) & set(shadow)
        bad_shape = sorted(n for n in common if shadow[n].shape != self.shadow[n].shape)
        if missing or unexpected or bad_shape:
            raise UserError(f"EMA state does not match the trainable weights: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, shape mismatch {bad_shape[:5]}; resume with "
                             "the same LoRA / trainable-module settings as the saved run")
        for name, avg in self.shadow.items():
            avg.copy_(shadow[name])
        self.num_updates = int(state["num_updates"])

    @contextmanager
    def swap_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into `model` (for validation or export), restoring after.

        The training weights are backed up where the EMA lives (the CPU when EMA is on the CPU), so
        swapping costs no extra accelerator memory in that case.
        """
        params = {name: model.get_parameter(name) for name in self.shadow}
        backup = {name: p.detach().to(self.shadow[name].device, copy=True) for name, p in params.items()}
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self.shadow[name])
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])
