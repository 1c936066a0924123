"""Loaders (and savers) for the models around Stage C: EfficientNet encoder, Previewer, Stage A, Stage B.

Each loader takes a Stability single file (`effnet_encoder.safetensors`, `previewer.safetensors`,
`stage_a.safetensors`, `stage_b*.safetensors`), a diffusers model folder (`vqgan/`, `decoder/`,
`decoder_lite/`, sharded or not), a repo root plus `subfolder`, or an in-memory state dict. Keys may sit
under a prefix (ComfyUI all-in-one files). The architecture comes from tensor shapes, completed by the
folder's config.json or a `config` entry in the file's header metadata (constructor kwargs as JSON, which
`save_*` writes). Models are built on the meta device and filled straight from the file.
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
    LazyConvertedStateDict,
    conversion_plan,
    convert_state_dict,
    converted_shapes,
    detect_layout,
    find_key_prefix,
    original_to_diffusers_config,
)
from cascade_core.formats_vqgan import (
    DIFFUSERS_CODEBOOK,
    ORIGINAL_CODEBOOK,
    convert_vqgan_state_dict,
    detect_vqgan_layout,
    infer_stage_a_kwargs,
    paella_config_to_stage_a,
    stage_a_to_paella_config,
)
from cascade_core.models.effnet import EfficientNetEncoder
from cascade_core.models.previewer import Previewer
from cascade_core.models.stage_a import StageA
from cascade_core.models.stage_b import StageB, StageBConfig, stage_b_config_from_shapes

__all__ = [
    "load_effnet",
    "load_previewer",
    "load_stage_a",
    "load_stage_b",
    "save_effnet",
    "save_previewer",
    "save_stage_a",
    "save_stage_b",
]

Source = str | os.PathLike | Mapping[str, Tensor]
_EFFNET_ANCHOR = "mapper.0.weight"
_PREVIEWER_ANCHORS = ("blocks.24.weight",)
_STAGE_A_KEYS = ("c_hidden", "c_latent", "levels", "bottleneck_blocks", "codebook_size", "scale_factor")


@dataclass(frozen=True)
class _Opened:
    """One model's tensors (prefix removed) plus the configs found next to or inside the file."""

    state: Mapping[str, Tensor]
    json_config: dict[str, Any] | None
    header_config: dict[str, Any] | None
    origin: str
    prefix: str

    def describe(self, layout: str) -> str:
        prefix = f", keys under {self.prefix!r}" if self.prefix else ""
        return f"{self.origin}: {layout} layout{prefix}"


def _open(
    source: Source,
    anchors: tuple[str, ...],
    what: str,
    hint: str,
    *,
    subfolder: str | None,
    variant: str | None,
) -> _Opened:
    if isinstance(source, Mapping):
        state, json_config, metadata, origin = source, None, {}, "<state dict>"
    else:
        resolved = resolve_checkpoint_files(source, subfolder, variant=variant)
        lazy = SafetensorsStateDict(resolved.files)
        state, json_config, metadata, origin = lazy, resolved.config, lazy.metadata, resolved.origin
    keys = list(state.keys())
    prefix = find_key_prefix(keys, anchors)
    if prefix is None:
        raise CheckpointError(
            f"{origin} holds no {what} weights (no key ending in {anchors[0]!r}; first keys: "
            f"{keys[:5]}); {hint}"
        )
    if prefix:
        state = PrefixedStateDict(state, prefix)
    header_config = None
    if "config" in metadata:
        try:
            header_config = json.loads(metadata["config"])
        except json.JSONDecodeError:
            header_config = None
        if not isinstance(header_config, dict):
            raise CheckpointError(
                f"{origin}: header metadata 'config' is not a JSON object of constructor "
                "arguments; rewrite the file without it or fix it"
            )
    return _Opened(state, json_config, header_config, origin, prefix)


class _WithShapes(Mapping[str, Tensor]):
    """A (lazily converted) state dict plus its known shapes, so the strict load checks shapes without
    reading, concatenating or splitting any tensor twice."""

    def __init__(self, state: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._state, self._shapes = state, shapes

    def __getitem__(self, key: str) -> Tensor:
        return self._state[key]

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def shape_of(self, key: str) -> tuple[int, ...]:
        return tuple(self._shapes[key])


def _shapes(state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: shape_of(state, k) for k in state}


def _finish(
    model: nn.Module,
    opened: _Opened,
    state: Mapping[str, Tensor],
    layout: str,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> nn.Module:
    materialize_module(model, state, device=device, dtype=dtype, context=opened.describe(layout))
    return model.eval()


def load_effnet(
    source: Source,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
) -> EfficientNetEncoder:
    """The EfficientNet latent encoder (eval mode; `dtype=None` keeps the file's dtype)."""
    opened = _open(
        source,
        (_EFFNET_ANCHOR,),
        "EfficientNet encoder",
        "point it at effnet_encoder.safetensors",
        subfolder=subfolder,
        variant=variant,
    )
    c_latent = shape_of(opened.state, _EFFNET_ANCHOR)[0]
    with torch.device("meta"):
        model = EfficientNetEncoder(c_latent)
    return _finish(model, opened, opened.state, ORIGINAL, device, dtype)


def load_previewer(
    source: Source,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
) -> Previewer:
    """The Previewer (eval mode); its widths come from the tensor shapes."""
    opened = _open(
        source,
        _PREVIEWER_ANCHORS,
        "Previewer",
        "point it at previewer.safetensors",
        subfolder=subfolder,
        variant=variant,
    )
    c_hidden, c_in = shape_of(opened.state, "blocks.0.weight")[:2]
    c_out = shape_of(opened.state, "blocks.24.weight")[0]
    with torch.device("meta"):
        model = Previewer(c_in=c_in, c_hidden=c_hidden, c_out=c_out)
    return _finish(model, opened, opened.state, ORIGINAL, device, dtype)


def load_stage_a(
    source: Source,
    *,
    scale_factor: float | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
) -> StageA:
    """Stage A from `stage_a.safetensors` (scale factor 0.43) or a diffusers `vqgan/` folder (the scale factor
    of its config.json); `scale_factor` overrides both. Eval mode."""
    opened = _open(
        source,
        (ORIGINAL_CODEBOOK, DIFFUSERS_CODEBOOK),
        "Stage A (VQGAN)",
        "point it at stage_a.safetensors or the 'vqgan' subfolder",
        subfolder=subfolder,
        variant=variant,
    )
    layout = detect_vqgan_layout(opened.state.keys())
    source_shapes = _shapes(opened.state)
    renamed = convert_vqgan_state_dict(opened.state, ORIGINAL)
    # a rename keeps key order and shapes
    renamed_shapes = dict(zip(renamed, source_shapes.values(), strict=True))
    state = _WithShapes(renamed, renamed_shapes)
    kwargs = infer_stage_a_kwargs(source_shapes)
    try:
        if opened.json_config is not None:
            kwargs = paella_config_to_stage_a(opened.json_config)
        elif opened.header_config is not None:
            kwargs = {k: opened.header_config[k] for k in _STAGE_A_KEYS}
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{opened.origin}: unusable Stage A config ({err}); fix or remove it") from None
    if scale_factor is not None:
        kwargs["scale_factor"] = scale_factor
    with torch.device("meta"):
        model = StageA(**kwargs)
    return _finish(model, opened, state, layout, device, dtype)


def load_stage_b(
    source: Source,
    *,
    flavour: str | None = None,
    config: StageBConfig | Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
) -> StageB:
    """Stage B ('decoder', 'decoder_lite' or custom) in either key layout; eval mode.

    The architecture is, in order: `config`, `flavour` (a preset name), the file's header config, else
    inferred from shapes (+ the folder's config.json for what shapes cannot tell)."""
    opened = _open(
        source,
        STAGE_B_ANCHORS,
        "Stage B decoder",
        "point it at stage_b*.safetensors or the 'decoder' / 'decoder_lite' subfolder",
        subfolder=subfolder,
        variant=variant,
    )
    layout = detect_layout(opened.state.keys())
    shapes = _shapes(opened.state)
    if layout == DIFFUSERS:
        shapes = converted_shapes(shapes, ORIGINAL)
    state = _WithShapes(convert_state_dict(opened.state, ORIGINAL), shapes)
    try:
        if config is not None:
            cfg = config if isinstance(config, StageBConfig) else StageBConfig.from_dict(config)
        elif flavour is not None:
            cfg = StageBConfig.preset(flavour)
        elif opened.header_config is not None:
            cfg = StageBConfig.from_dict(opened.header_config)
        else:
            cfg, flavour = stage_b_config_from_shapes(shapes, diffusers_config=opened.json_config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(
            f"cannot set up the Stage B architecture for {opened.origin} ({layout} layout): {err}"
        ) from None
    model = StageB(cfg, device="meta")
    context = opened.describe(layout) + (f", flavour {flavour}" if flavour else "")
    materialize_module(model, state, device=device, dtype=dtype, context=context)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Saving (the tiny-checkpoint tool and round-trip tests use these)


def _cast(state: Mapping[str, Tensor], dtype: torch.dtype | None) -> Mapping[str, Tensor]:
    return state if dtype is None else CastStateDict(state, dtype)


def _single_file(path: Path) -> Path:
    if path.suffix != ".safetensors":
        raise ValueError(f"the original layout is a single .safetensors file; got {path}")
    return path


def _folder(path: Path, config: Mapping[str, Any]) -> Path:
    if path.suffix == ".safetensors":
        raise ValueError(f"the diffusers layout is a folder (config.json + weights); got file path {path}")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path / f"{WEIGHTS_NAME}.safetensors"


def save_effnet(
    model: EfficientNetEncoder, path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Path:
    """`effnet_encoder.safetensors`-style single file."""
    return write_safetensors(_single_file(Path(path)), _cast(model.state_dict(), dtype), {"format": "pt"})


def save_previewer(model: Previewer, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """`previewer.safetensors`-style single file."""
    return write_safetensors(_single_file(Path(path)), _cast(model.state_dict(), dtype), {"format": "pt"})


def _stage_a_kwargs(model: StageA) -> dict[str, Any]:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return {**infer_stage_a_kwargs(shapes), "scale_factor": model.scale_factor}


def save_stage_a(
    model: StageA, path: str | os.PathLike, layout: str = ORIGINAL, *, dtype: torch.dtype | None = None
) -> Path:
    """'original': one file (config in its header); 'diffusers': a `vqgan/`-style folder.
    Returns the weights file."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    kwargs = _stage_a_kwargs(model)
    state = _cast(convert_vqgan_state_dict(model.state_dict(), layout), dtype)
    if layout == DIFFUSERS:
        return write_safetensors(
            _folder(Path(path), stage_a_to_paella_config(kwargs)), state, {"format": "pt"}
        )
    return write_safetensors(_single_file(Path(path)), state, {"format": "pt", "config": json.dumps(kwargs)})


def save_stage_b(
    model: StageB, path: str | os.PathLike, layout: str = ORIGINAL, *, dtype: torch.dtype | None = None
) -> Path:
    """'original': one `stage_b*.safetensors`-style file (config in its header); 'diffusers': a
    `decoder/`-style folder with config.json. Returns the weights file."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    kwargs = model.config.to_dict()
    state: Mapping[str, Tensor] = model.state_dict()
    if layout == DIFFUSERS:
        state = LazyConvertedStateDict(state, conversion_plan(state.keys(), DIFFUSERS))
        return write_safetensors(
            _folder(Path(path), original_to_diffusers_config(kwargs)), _cast(state, dtype), {"format": "pt"}
        )
    return write_safetensors(
        _single_file(Path(path)), _cast(state, dtype), {"format": "pt", "config": json.dumps(kwargs)}
    )
