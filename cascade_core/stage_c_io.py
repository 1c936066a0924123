"""Stage C (the prior) checkpoints: detect the layout and architecture, load, and save.

Built on the generic pieces of `checkpoint_io`: a source (Stability single file, diffusers folder,
sharded or not, repo root + subfolder, or a state dict) is opened lazily, its keys are found under any
prefix and converted to the original layout, and the architecture is inferred from tensor shapes; saving
writes either layout that other tools load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cascade_core.checkpoint_io import (
    WEIGHTS_NAME,
    CastStateDict,
    CheckpointError,
    PrefixedStateDict,
    SafetensorsStateDict,
    materialize_module,
    resolve_checkpoint_files,
    shape_of,
    write_safetensors,
)
from cascade_core.formats import (
    DIFFUSERS,
    LAYOUTS,
    ORIGINAL,
    STAGE_B_ANCHORS,
    STAGE_C_ANCHOR,
    LazyConvertedStateDict,
    conversion_plan,
    convert_state_dict,
    detect_layout,
    find_key_prefix,
    original_to_diffusers_config,
)
from cascade_core.models.stage_c import StageC, StageCConfig, stage_c_config_from_shapes

__all__ = [
    "StageCCheckpoint",
    "detect_stage_c_checkpoint",
    "load_stage_c",
    "stage_c_state_dict",
    "save_stage_c",
]


@dataclass(frozen=True)
class StageCCheckpoint:
    """What a Stage C source holds: its weights (original layout, lazy), config and detected format."""

    state: Mapping[str, Tensor]
    config: StageCConfig
    flavour: str
    layout: str
    prefix: str
    origin: str

    def describe(self) -> str:
        prefix = f", keys under {self.prefix!r}" if self.prefix else ""
        return f"{self.origin}: {self.layout} layout, Stage C flavour {self.flavour}{prefix}"


def detect_stage_c_checkpoint(
    source: str | os.PathLike | Mapping[str, Tensor],
    *,
    flavour: str | None = None,
    config: Any = None,
    subfolder: str | None = None,
    variant: str | None = None,
) -> StageCCheckpoint:
    """Open a Stage C source (file, folder, repo root + subfolder, or an in-memory state dict) and work
    out its layout and architecture from tensor shapes; `config` (StageCConfig or kwargs) or `flavour`
    (preset name) override the inferred architecture."""
    if isinstance(source, Mapping):
        state, json_config, origin = source, None, "<state dict>"
    else:
        resolved = resolve_checkpoint_files(source, subfolder, variant=variant)
        state, json_config, origin = SafetensorsStateDict(resolved.files), resolved.config, resolved.origin
    keys = list(state.keys())
    prefix = find_key_prefix(keys, [STAGE_C_ANCHOR])
    if prefix is None:
        if find_key_prefix(keys, STAGE_B_ANCHORS) is not None:
            raise CheckpointError(
                f"{origin} is a Stage B (decoder) checkpoint (it has clip_mapper / effnet_mapper weights), "
                "not a Stage C prior; point the prior at stage_c*.safetensors or the 'prior' / 'prior_lite' "
                "subfolder"
            )
        raise CheckpointError(
            f"{origin} holds no Stage C prior weights (no key ending in {STAGE_C_ANCHOR!r}; "
            f"first keys: {keys[:5]}); "
            "point it at stage_c*.safetensors or the 'prior' / 'prior_lite' subfolder"
        )
    if prefix:
        state = PrefixedStateDict(state, prefix)
    layout = detect_layout(state.keys())
    original = convert_state_dict(state, ORIGINAL)
    if config is not None:
        cfg = config if isinstance(config, StageCConfig) else StageCConfig.from_dict(config)
        return StageCCheckpoint(original, cfg, "given config", layout, prefix, origin)
    if flavour is not None:
        try:
            cfg = StageCConfig.preset(flavour)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        return StageCCheckpoint(original, cfg, flavour, layout, prefix, origin)
    shapes = {k: shape_of(original, k) for k in original}
    try:
        cfg, found = stage_c_config_from_shapes(shapes, diffusers_config=json_config)
    except ValueError as err:
        raise CheckpointError(
            f"cannot infer the Stage C architecture of {origin} ({layout} layout): {err}"
        ) from None
    return StageCCheckpoint(original, cfg, found, layout, prefix, origin)


def load_stage_c(
    source: str | os.PathLike | Mapping[str, Tensor],
    *,
    flavour: str | None = None,
    config: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    strict: bool = True,
) -> StageC:
    """A StageC (eval mode) from a Stability single file, a diffusers folder (sharded or not), a repo
    root + `subfolder`, or a state dict; built on meta and filled straight from the file. `dtype=None`
    keeps the checkpoint's dtype. Raises CheckpointError naming the problem keys and detected format."""
    found = detect_stage_c_checkpoint(
        source, flavour=flavour, config=config, subfolder=subfolder, variant=variant
    )
    model = StageC(found.config, device="meta")
    materialize_module(
        model, found.state, device=device, dtype=dtype, strict=strict, context=found.describe()
    )
    return model.eval()


def stage_c_state_dict(model: nn.Module, layout: str = "original") -> Mapping[str, Tensor]:
    """The model's base weights in `layout` ('original' or 'diffusers'); adapter tensors are left out
    (merge LoRA first to bake it in). Diffusers q/k/v are views of the fused weight, not copies."""
    if not isinstance(model, StageC):
        raise TypeError(f"stage_c_state_dict expects a StageC model, got {type(model).__name__}")
    with torch.device("meta"):
        base_keys = StageC(model.config).state_dict().keys()
    full = model.state_dict()
    missing = [k for k in base_keys if k not in full]
    if missing:
        raise CheckpointError(
            f"the model lacks base weights {missing[:5]} ({len(missing)} in all); a quantized or wrapped "
            "model "
            "must be converted back to plain weights before saving"
        )
    state = {k: full[k] for k in base_keys}
    if layout == ORIGINAL:
        return state
    return LazyConvertedStateDict(state, conversion_plan(state.keys(), layout))


def save_stage_c(
    model: nn.Module, path: str | os.PathLike, layout: str = "original", *, dtype: torch.dtype | None = None
) -> Path:
    """Write a Stage C checkpoint other tools load: layout 'original' -> one .safetensors file (Stability
    keys); 'diffusers' -> a folder with config.json + diffusion_pytorch_model.safetensors. Returns the
    weights file. `dtype` casts floating tensors on the way out (e.g. torch.bfloat16)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    state = stage_c_state_dict(model, layout)
    if dtype is not None:
        state = CastStateDict(state, dtype)
    path = Path(path)
    if layout == DIFFUSERS:
        if path.suffix == ".safetensors":
            raise ValueError(
                f"the diffusers layout is a folder (config.json + weights); got file path {path}"
            )
        path.mkdir(parents=True, exist_ok=True)
        config = original_to_diffusers_config(model.config.to_dict())
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return write_safetensors(path / f"{WEIGHTS_NAME}.safetensors", state, {"format": "pt"})
    if path.suffix != ".safetensors":
        raise ValueError(f"the original layout is a single .safetensors file; got {path}")
    return write_safetensors(path, state, {"format": "pt"})
