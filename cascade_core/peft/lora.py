"""LoRA written by us: explicit adapter modules, injection by target name, merge, state dict.

Target names (what patterns match and what the native LoRA state dict is keyed by):
* a plain `nn.Linear`, a 1x1 `nn.Conv2d` (groups 1) or an `Int8Linear`: its module path, e.g.
  `down_blocks.0.0.channelwise.0`, `down_blocks.0.2.attention.attn.out_proj`, `embedding.1`;
* the fused q/k/v in-projection of an attention module (anything with `in_proj_weight`,
  `in_proj_adapters` and `project_in`): the attention path + `.in_proj`, e.g.
  `down_blocks.0.2.attention.attn.in_proj` (weight `in_proj_weight` [3c, c]).

Pattern syntax (`targets=`): a preset name (`attention`, `attention+ffn`, `all-linear`) or a list of
shell-style globs (`fnmatch`, case-sensitive) matched against the WHOLE target name; `*` also matches
dots. Examples: `*.attention.attn.*` (the official choice), `down_blocks.1.*.channelwise.0`, `clip_*_mapper`.
Every pattern must match at least one target.

Hosts (peft/layers.py) keep the base parameter names: a Linear/Conv2d gets LoRA by switching its
class in place to a subclass (`LoRALinear`, `LoRAConv2d`, `LoRAInt8Linear`, or a generated
`LoRA<Base>` class) that adds `adapters: ModuleDict[name -> LoRAAdapter]`, so `weight`/`bias` keys
never change and optimizers or other references to the base parameters stay valid. The fused
in-projection gets its adapter in the attention module's own `in_proj_adapters`.
Effective weight: W + strength * (alpha / rank) * up @ down. Inject after the base weights are loaded
(and quantized, if int8), and before wrapping the model for FSDP.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from cascade_core.peft.layers import (
    InitMode,
    LoRAAdapter,
    LoRAConv2d,
    LoRAHostMixin,
    LoRAInt8Linear,
    LoRALinear,
    host_class,
)
from cascade_core.peft.native import check_lora_fits, native_keys, split_native
from cascade_core.quant.int8 import Int8Linear

__all__ = [
    "TARGET_PRESETS",
    "LoRAAdapter",
    "LoRAHostMixin",
    "LoRALinear",
    "LoRAConv2d",
    "LoRAInt8Linear",
    "lora_target_shapes",
    "resolve_targets",
    "inject_lora",
    "iter_lora_adapters",
    "lora_parameters",
    "mark_only_lora_trainable",
    "merge_lora",
    "unmerge_lora",
    "set_lora_strength",
    "set_lora_enabled",
    "remove_lora",
    "lora_state_dict",
    "load_lora_state_dict",
]

IN_PROJ = "in_proj"
# Presets: globs over target names. `attention` is the official train_c_lora choice (filter '.attn').
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("*.attention.attn.in_proj", "*.attention.attn.out_proj"),
    "attention+ffn": (
        "*.attention.attn.in_proj",
        "*.attention.attn.out_proj",
        "*.channelwise.0",
        "*.channelwise.4",
    ),
    "all-linear": ("*",),
}


def _is_fused_attention(module: nn.Module) -> bool:
    return (
        hasattr(module, "in_proj_adapters")
        and hasattr(module, "project_in")
        and hasattr(module, "in_proj_weight")
    )


def _linear_like_shape(module: nn.Module) -> tuple[int, ...] | None:
    """Base weight shape if the module can host LoRA as a target, else None."""
    if isinstance(module, (nn.Linear, Int8Linear)):
        return (module.out_features, module.in_features)
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
        return (module.out_channels, module.in_channels, 1, 1)
    return None


def lora_target_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every possible LoRA target in `model` -> its base weight shape, in module order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRAAdapter):
            continue
        if _is_fused_attention(module):
            c = module.embed_dim if hasattr(module, "embed_dim") else module.in_proj_weight.shape[1]
            shapes[f"{name}.{IN_PROJ}" if name else IN_PROJ] = (3 * c, c)
        shape = _linear_like_shape(module)
        if shape is not None and name:
            shapes[name] = shape
    return shapes


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Expand a preset name or glob list to target names (module order); unmatched patterns raise."""
    candidates = list(lora_target_shapes(model))
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ValueError(
                f"unknown LoRA target preset {targets!r}; use one of {sorted(TARGET_PRESETS)} "
                "or a list of module-name globs such as ['*.attention.attn.*']"
            )
        patterns = TARGET_PRESETS[targets]
    else:
        patterns = tuple(targets)
        if not patterns:
            raise ValueError("LoRA targets: the pattern list is empty; name at least one module glob")
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(c, p) for c in candidates)]
    if unmatched:
        raise ValueError(
            f"LoRA target patterns {unmatched} match no Linear, 1x1 Conv2d or attention in-projection; "
            f"examples of valid names: {candidates[:4]}"
        )
    return [c for c in candidates if any(fnmatch.fnmatchcase(c, p) for p in patterns)]


def _split_target(target: str) -> tuple[str, bool]:
    """Target name -> (module path, is fused in-projection)."""
    if target == IN_PROJ or target.endswith(f".{IN_PROJ}"):
        return target[: -len(IN_PROJ)].rstrip("."), True
    return target, False


def _adapter_dict(model: nn.Module, target: str, create: bool) -> nn.ModuleDict:
    path, fused = _split_target(target)
    try:
        module = model.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"LoRA target {target!r}: no module {path!r} in the model") from err
    if fused:
        if not _is_fused_attention(module):
            raise ValueError(
                f"LoRA target {target!r}: {path!r} is not an attention module with in_proj_weight"
            )
        return module.in_proj_adapters
    if isinstance(module, LoRAHostMixin):
        return module.adapters
    if _linear_like_shape(module) is None:
        raise ValueError(
            f"LoRA target {target!r} is a {type(module).__name__}; only Linear and 1x1 Conv2d host LoRA"
        )
    if not create:
        raise ValueError(f"LoRA target {target!r} carries no adapters")
    module.__class__ = host_class(type(module))
    module.adapters = nn.ModuleDict()
    return module.adapters


def _base_weight(model: nn.Module, target: str) -> Tensor:
    path, fused = _split_target(target)
    module = model.get_submodule(path)
    return module.in_proj_weight if fused else module.weight


def _new_adapter(
    model: nn.Module,
    target: str,
    shape: tuple[int, ...],
    rank: int,
    alpha: float,
    *,
    dropout: float,
    init: InitMode,
    dtype: torch.dtype | None,
) -> LoRAAdapter:
    weight = _base_weight(model, target)
    if dtype is None:
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
    return LoRAAdapter(
        shape[1],
        shape[0],
        rank,
        alpha,
        dropout=dropout,
        conv=len(shape) == 4,
        init=init,
        device=weight.device,
        dtype=dtype,
    )


def inject_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    targets: str | Sequence[str] = "attention",
    dropout: float = 0.0,
    name: str = "default",
    init: InitMode = "standard",
    dtype: torch.dtype | None = None,
    freeze_base: bool = True,
) -> list[str]:
    """Add adapter `name` to every selected target (scale alpha / rank); returns the target names.

    With `freeze_base` every parameter except LoRA adapters stops requiring grad. `dtype` defaults
    to the base weight's dtype (float32 over an int8 base).
    """
    shapes = lora_target_shapes(model)
    chosen = resolve_targets(model, targets)
    for target in chosen:
        adapters = _adapter_dict(model, target, create=True)
        if name in adapters:
            raise ValueError(
                f"LoRA adapter {name!r} already exists on {target!r}; pick another name or remove it"
            )
        adapters[name] = _new_adapter(
            model, target, shapes[target], rank, alpha, dropout=dropout, init=init, dtype=dtype
        )
    if freeze_base:
        mark_only_lora_trainable(model)
    return chosen


def iter_lora_adapters(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, str, LoRAAdapter]]:
    """(target name, adapter name, adapter) for every adapter (or only those called `name`)."""
    for path, module in model.named_modules():
        if isinstance(module, LoRAHostMixin):
            target, adapters = path, module.adapters
        elif _is_fused_attention(module):
            target, adapters = f"{path}.{IN_PROJ}" if path else IN_PROJ, module.in_proj_adapters
        else:
            continue
        for adapter_name, adapter in adapters.items():
            if name is None or adapter_name == name:
                yield target, adapter_name, adapter


def _selected(model: nn.Module, name: str | None) -> list[tuple[str, str, LoRAAdapter]]:
    found = list(iter_lora_adapters(model, name))
    if name is not None and not found:
        names = sorted({n for _, n, _ in iter_lora_adapters(model)})
        raise ValueError(f"no LoRA adapter named {name!r} in the model; present: {names}")
    return found


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The adapter parameters (what the optimizer should see)."""
    return [p for _, _, a in _selected(model, name) for p in (a.lora_down, a.lora_up)]


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the LoRA adapters' down/up factors."""
    keep = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep and p.is_floating_point())


def _mergeable_weight(model: nn.Module, target: str) -> Tensor:
    weight = _base_weight(model, target)
    if not weight.is_floating_point():
        raise ValueError(
            f"cannot merge LoRA into {target!r}: its base weight is quantized (int8); "
            "merge onto the full-precision checkpoint instead"
        )
    return weight


@torch.no_grad()
def merge_lora(model: nn.Module, name: str | None = None) -> int:
    """Fold adapters (all, or `name`) into the base weights at their current strength; returns the count."""
    selected = [s for s in _selected(model, name) if s[2].merged_strength is None and s[2].enabled]
    for target, _, adapter in selected:
        weight = _mergeable_weight(model, target)
        weight.add_((adapter.delta_weight() * adapter.strength).to(weight.dtype))
        adapter.merged_strength = adapter.strength
    return len(selected)


@torch.no_grad()
def unmerge_lora(model: nn.Module, name: str | None = None) -> int:
    """Subtract merged adapters from the base weights again; returns the count."""
    selected = [s for s in _selected(model, name) if s[2].merged_strength is not None]
    for target, _, adapter in selected:
        weight = _mergeable_weight(model, target)
        weight.sub_((adapter.delta_weight() * adapter.merged_strength).to(weight.dtype))
        adapter.merged_strength = None
    return len(selected)


def set_lora_strength(model: nn.Module, strength: float, name: str | None = None) -> None:
    """Scale adapters' contribution (0 = base model); merged adapters are re-merged at the new strength."""
    for target, _, adapter in _selected(model, name):
        merged = adapter.merged_strength is not None
        if merged:
            with torch.no_grad():
                weight = _mergeable_weight(model, target)
                weight.add_((adapter.delta_weight() * (strength - adapter.merged_strength)).to(weight.dtype))
            adapter.merged_strength = float(strength)
        adapter.strength = float(strength)


def set_lora_enabled(model: nn.Module, enabled: bool, name: str | None = None) -> None:
    """Switch adapters on or off without touching their weights (merged ones must be unmerged first)."""
    for target, adapter_name, adapter in _selected(model, name):
        if adapter.merged_strength is not None and not enabled:
            raise ValueError(f"LoRA adapter {adapter_name!r} on {target!r} is merged; unmerge_lora first")
        adapter.enabled = bool(enabled)


def remove_lora(model: nn.Module, name: str) -> int:
    """Delete adapter `name` everywhere (unmerging it first); hosts without adapters get their class back."""
    unmerge_lora(model, name)
    selected = _selected(model, name)
    for target, adapter_name, _ in selected:
        path, fused = _split_target(target)
        module = model.get_submodule(path)
        adapters = module.in_proj_adapters if fused else module.adapters
        del adapters[adapter_name]
        if not fused and len(adapters) == 0:
            del module.adapters
            module.__class__ = module._lora_base_class
    return len(selected)


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Native LoRA tensors of adapter `name`: `<target>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    out: dict[str, Tensor] = {}
    for target, _, adapter in _selected(model, name):
        down, up, alpha = native_keys(target)
        out[down] = adapter.lora_down.detach().clone()
        out[up] = adapter.lora_up.detach().clone()
        out[alpha] = torch.tensor(adapter.alpha, dtype=torch.float32)
    return out


def load_lora_state_dict(
    model: nn.Module,
    state_dict: dict[str, Tensor],
    *,
    name: str = "default",
    strength: float = 1.0,
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
    freeze_base: bool = True,
) -> list[str]:
    """Create adapter `name` from native LoRA tensors (see `formats.convert_to_native`); returns targets.

    Shapes are checked against the model first; a LoRA made for another model (e.g. Stage C lite vs
    full) is refused with a message that names both.
    """
    shapes = lora_target_shapes(model)
    entries = split_native(state_dict)
    check_lora_fits(entries, shapes)
    for target, (down, up, alpha) in entries.items():
        adapters = _adapter_dict(model, target, create=True)
        if name in adapters:
            raise ValueError(
                f"LoRA adapter {name!r} already exists on {target!r}; remove it or use another name"
            )
        adapter = _new_adapter(
            model, target, shapes[target], down.shape[0], alpha, dropout=dropout, init="standard", dtype=dtype
        )
        with torch.no_grad():
            adapter.lora_down.copy_(down.reshape(adapter.lora_down.shape))
            adapter.lora_up.copy_(up.reshape(adapter.lora_up.shape))
        adapter.strength = float(strength)
        adapters[name] = adapter
    if freeze_base:
        mark_only_lora_trainable(model)
    return list(entries)
