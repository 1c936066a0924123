"""LoRA file formats for Stage C: our native layout <-> kohya/ComfyUI, PEFT/diffusers, official Stability.

Native layout (what `lora.lora_state_dict` returns): `<target>.lora_down.weight` [r, in(,1,1)],
`<target>.lora_up.weight` [out, r(,1,1)], `<target>.alpha` (0-d float32); scale = alpha / r. The
fused attention in-projection is the target `<...>.attention.attn.in_proj` ([3c, c], q | k | v rows).

Other layouts (FACTS_formats_and_ecosystem.md §5):
* kohya / ComfyUI: `lora_unet_` + original module path with `.` -> `_`; q/k/v split as
  `attention_attn_to_{q,k,v}`; `.lora_down.weight`, `.lora_up.weight`, `.alpha` (missing alpha = scale 1).
* PEFT / diffusers: `prior.` + diffusers path (`attention.to_{q,k,v}`, `attention.to_out.0`),
  `.lora_A.weight` / `.lora_B.weight`; alpha in the header key `lora_adapter_metadata` ("peft") or
  folded into lora_B with no metadata ("peft-folded", scale 1). ComfyUI's `diffusion_model.` +
  original path with lora_A/lora_B reads the same way.
* official Stability (train_c_lora): positional `weights.{i}.lora_down/up`, scale 1/rank; attention
  block k (module order) has i = 2k -> out_proj, 2k + 1 -> fused in_proj. `embeddings.*` (ReToken)
  are text-encoder tensors, returned separately by `official_embeddings`.

Splitting the fused in-projection shares lora_down across q/k/v and cuts lora_up in thirds (exact);
fusing split q/k/v back is exact too: same rank when the three downs and alphas agree, otherwise a
stacked rank-(sum of ranks) factor with each part's scale folded into its block of lora_up.

`shapes` arguments map target names to base weight shapes (`lora.lora_target_shapes(model)`, or
`native.targets_from_checkpoint_shapes` for a checkpoint key -> shape manifest).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from cascade_core.peft.native import (
    Entry,
    LoRAFormatError,
    LoRAMismatchError,
    Shapes,
    assemble,
    check_lora_fits,
    is_fused,
    join_native,
    mismatch_error,
    most_common,
    natural_key,
    rank_check,
    split_native,
)

# The two error types come from native.py; they are listed here because these functions raise them.
__all__ = [
    "LORA_FORMATS",
    "LoRAFormatError",
    "LoRAMismatchError",
    "detect_lora_format",
    "convert_to_native",
    "convert_from_native",
    "official_embeddings",
]

LORA_FORMATS = ("native", "kohya", "peft", "peft-folded", "official")
KOHYA_PREFIXES = ("lora_unet_", "lora_prior_unet_")
PEFT_PREFIXES = ("prior.", "diffusion_model.", "base_model.model.")
_OFFICIAL_KEY = re.compile(r"^weights\.(\d+)\.lora_(down|up)$")
QKV = ("q", "k", "v")


# ---- kohya / ComfyUI --------------------------------------------------------------------------


def _split_names(target: str) -> list[str]:
    """Original-layout module names of a target (the fused in_proj becomes to_q, to_k, to_v)."""
    base = target[: -len(".in_proj")]
    return [f"{base}.to_{p}" for p in QKV] if is_fused(target) else [target]


def _lookup(shapes: Shapes, rename) -> dict[str, tuple[str, int | None]]:
    table: dict[str, tuple[str, int | None]] = {}
    for target in shapes:
        names = _split_names(target)
        for i, name in enumerate(names):
            table[rename(name)] = (target, i if is_fused(target) else None)
    return table


def _collect(items: dict[str, dict[str, Tensor]], table, where: str) -> dict[str, Entry]:
    """Per-module {down, up, alpha?} -> native entries, fusing q/k/v; unknown modules kept by name."""
    found: dict[str, Entry] = {}
    fused: dict[str, dict[int, Entry]] = {}
    for module, p in items.items():
        if "down" not in p or "up" not in p:
            raise LoRAFormatError(f"{where} LoRA module {module!r} lacks its down or up factor")
        down, up = p["down"], p["up"]
        rank_check(module, down, up)
        alpha = float(p["alpha"]) if "alpha" in p else float(down.shape[0])  # no alpha: scale 1
        target, part = table.get(module, (module, None))
        if part is None:
            found[target] = (down, up, alpha)
        else:
            fused.setdefault(target, {})[part] = (down, up, alpha)
    return assemble(found, fused)


def _from_kohya(sd: Mapping[str, Tensor], shapes: Shapes) -> dict[str, Entry]:
    table = _lookup(shapes, lambda n: n.replace(".", "_"))
    items: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key.startswith("lora_te"):
            raise LoRAFormatError(
                f"text-encoder LoRA key {key!r}: only Stage C (lora_unet_) LoRAs are supported"
            )
        prefix = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
        module, _, suffix = key[len(prefix or "") :].partition(".")
        kind = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
        if prefix is None or kind is None:
            raise LoRAFormatError(
                f"kohya LoRA key {key!r} is not lora_unet_<module>.(lora_down.weight|lora_up.weight|alpha)"
            )
        items.setdefault(module, {})[kind] = value
    return _collect(items, table, "kohya")


def _to_kohya(entries: Mapping[str, Entry]) -> tuple[dict[str, Tensor], dict[str, str]]:
    out: dict[str, Tensor] = {}
    for target, (down, up, alpha) in entries.items():
        ups = up.chunk(3, dim=0) if is_fused(target) else (up,)
        for name, u in zip(_split_names(target), ups, strict=True):
            key = "lora_unet_" + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = down.clone()
            out[f"{key}.lora_up.weight"] = u.clone()
            out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    rank = most_common([d.shape[0] for d, _, _ in entries.values()])
    alpha = Counter(a for _, _, a in entries.values()).most_common(1)[0][0]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "stable_cascade",
        "modelspec.architecture": "stable-cascade/lora",
    }
    return out, meta


# ---- PEFT / diffusers --------------------------------------------------------------------------


def _diffusers_names(target: str) -> list[str]:
    """diffusers StableCascadeUNet module names: attn.in_proj -> to_q/k/v, attn.out_proj -> to_out.0."""
    if is_fused(target):
        base = target[: -len(".in_proj")]
        base = base[: -len(".attn")] if base.endswith(".attn") else base
        return [f"{base}.to_{p}" for p in QKV]
    if target.endswith(".attn.out_proj"):
        return [target[: -len(".attn.out_proj")] + ".to_out.0"]
    return [target]


def _peft_config(metadata: Mapping[str, str] | None) -> dict | None:
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoRAFormatError(f"header lora_adapter_metadata is not JSON: {err}") from err
    return {k.split(".", 1)[1] if k.startswith(PEFT_PREFIXES[0]) else k: v for k, v in config.items()}


def _pattern_value(module: str, patterns: Mapping[str, float], default: float) -> float:
    """PEFT rank/alpha_pattern lookup: a key matches the module name or a dotted suffix of it."""
    for key, value in patterns.items():
        if module == key or re.match(rf"(.*\.)?{key}$", module):
            return float(value)
    return float(default)


def _from_peft(
    sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None, shapes: Shapes
) -> dict[str, Entry]:
    config = _peft_config(metadata)
    if config and config.get("use_dora"):
        raise LoRAFormatError("DoRA LoRAs (use_dora) are not supported; export a plain LoRA")
    table = _lookup(shapes, lambda n: n)
    for target in shapes:
        for i, name in enumerate(_diffusers_names(target)):
            table[name] = (target, i if is_fused(target) else None)
    items: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        prefix = next((p for p in PEFT_PREFIXES if key.startswith(p)), "")
        body = key[len(prefix) :]
        for suffix, kind in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")):
            if body.endswith(suffix):
                items.setdefault(body[: -len(suffix)], {})[kind] = value
                break
        else:
            raise LoRAFormatError(f"PEFT LoRA key {key!r} does not end in .lora_A.weight or .lora_B.weight")
    if config is not None:
        for module, p in items.items():
            if "alpha" in p or "down" not in p:
                continue
            rank = p["down"].shape[0]
            alpha = _pattern_value(module, config.get("alpha_pattern") or {}, config.get("lora_alpha", rank))
            if config.get("use_rslora"):
                alpha = alpha * rank**0.5  # rsLoRA scale alpha / sqrt(r) written as alpha' / r
            p["alpha"] = torch.tensor(alpha)
    return _collect(items, table, "PEFT")


def _to_peft(entries: Mapping[str, Entry], fold: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    out: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for target, (down, up, alpha) in entries.items():
        names = _diffusers_names(target)
        ups = up.chunk(3, dim=0) if is_fused(target) else (up,)
        for name, u in zip(names, ups, strict=True):
            key = PEFT_PREFIXES[0] + name
            out[f"{key}.lora_A.weight"] = down.clone()
            out[f"{key}.lora_B.weight"] = u * (alpha / down.shape[0]) if fold else u.clone()
            ranks[name], alphas[name] = down.shape[0], alpha
    meta = {"format": "pt"}
    if not fold:
        r = most_common(list(ranks.values()))
        a = Counter(alphas.values()).most_common(1)[0][0]
        config = {
            "r": r,
            "lora_alpha": a,
            "target_modules": sorted(ranks),
            "rank_pattern": {n: v for n, v in ranks.items() if v != r},
            "alpha_pattern": {n: v for n, v in alphas.items() if v != a},
            "bias": "none",
            "use_dora": False,
            "lora_bias": False,
            "init_lora_weights": True,
        }
        prefix = PEFT_PREFIXES[0]
        meta["lora_adapter_metadata"] = json.dumps({prefix + k: v for k, v in config.items()}, indent=2)
    return out, meta


# ---- official Stability -----------------------------------------------------------------------


def _attention_blocks(targets: Sequence[str]) -> list[str]:
    """Attention module paths in the official module order (down levels, then up levels, numerically)."""
    return sorted((t[: -len(".in_proj")] for t in targets if is_fused(t)), key=natural_key)


def official_embeddings(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ReToken text-embedding tensors of an official file (`embeddings.*`), empty if none."""
    return {k: v for k, v in sd.items() if k.startswith("embeddings.")}


def _from_official(sd: Mapping[str, Tensor], shapes: Shapes) -> dict[str, Entry]:
    factors: dict[int, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key.startswith("embeddings."):
            continue
        m = _OFFICIAL_KEY.match(key)
        if m is None:
            raise LoRAFormatError(
                f"official LoRA key {key!r} is not weights.<i>.lora_down/up or embeddings.*"
            )
        factors.setdefault(int(m.group(1)), {})[m.group(2)] = value
    blocks = _attention_blocks(list(shapes))
    if sorted(factors) != list(range(2 * len(blocks))):
        width = factors[1]["down"].shape[1] if 1 in factors and "down" in factors[1] else None
        raise mismatch_error(
            f"the official file holds {len(factors)} positional LoRAs but this model's attention "
            f"layout needs {2 * len(blocks)} ({len(blocks)} blocks x out_proj, in_proj)",
            width,
            shapes,
        )
    entries: dict[str, Entry] = {}
    for i, p in sorted(factors.items()):
        if "down" not in p or "up" not in p:
            raise LoRAFormatError(f"official LoRA weights.{i} lacks lora_down or lora_up")
        target = f"{blocks[i // 2]}.{'in_proj' if i % 2 else 'out_proj'}"
        rank_check(target, p["down"], p["up"])
        entries[target] = (p["down"], p["up"], 1.0)  # official scale = 1 / rank
    return entries


def _to_official(
    entries: Mapping[str, Entry], shapes: Shapes | None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    blocks = _attention_blocks(list(shapes) if shapes is not None else list(entries))
    expected = {f"{b}.{p}" for b in blocks for p in ("out_proj", "in_proj")}
    if set(entries) != expected:
        extra, missing = sorted(set(entries) - expected), sorted(expected - set(entries))
        raise LoRAFormatError(
            "the official Stability layout holds exactly one LoRA on out_proj and one on in_proj of every "
            f"attention block (targets preset 'attention'); not expressible: {extra[:3]}, "
            f"missing: {missing[:3]}"
        )
    out: dict[str, Tensor] = {}
    for k, block in enumerate(blocks):
        for i, proj in ((2 * k, "out_proj"), (2 * k + 1, "in_proj")):
            down, up, alpha = entries[f"{block}.{proj}"]
            if down.dim() != 2:
                raise LoRAFormatError(
                    f"official layout needs 2-D factors; {block}.{proj} has {tuple(down.shape)}"
                )
            out[f"weights.{i}.lora_down"] = down.clone()
            out[f"weights.{i}.lora_up"] = up * alpha  # official scale is 1/rank: fold alpha into up
    return out, {"format": "Stability-AI StableCascade train_c_lora (weights.{i}); scale = 1/rank"}


# ---- dispatch ---------------------------------------------------------------------------------


def detect_lora_format(sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """Which of LORA_FORMATS a LoRA file's tensors are in (from key names and header metadata)."""
    keys = list(sd)
    if not keys:
        raise LoRAFormatError("the LoRA file holds no tensors")
    if all(_OFFICIAL_KEY.match(k) or k.startswith("embeddings.") for k in keys):
        return "official"
    if all(k.startswith(KOHYA_PREFIXES + ("lora_te",)) for k in keys):
        return "kohya"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "peft" if _peft_config(metadata) is not None else "peft-folded"
    if all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys):
        return "native"
    raise LoRAFormatError(
        f"unrecognised LoRA key layout (first keys {keys[:3]}); supported: native, kohya/ComfyUI "
        "(lora_unet_*), PEFT/diffusers (*.lora_A/B.weight), official (weights.<i>.lora_down/up)"
    )


def convert_to_native(
    sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None, shapes: Shapes, fmt: str | None = None
) -> dict[str, Tensor]:
    """Any supported LoRA file -> native tensors for this model (checked to fit its shapes)."""
    fmt = fmt or detect_lora_format(sd, metadata)
    if fmt == "native":
        entries = split_native(sd)
    elif fmt == "kohya":
        entries = _from_kohya(sd, shapes)
    elif fmt in ("peft", "peft-folded"):
        entries = _from_peft(sd, metadata if fmt == "peft" else None, shapes)
    elif fmt == "official":
        entries = _from_official(sd, shapes)
    else:
        raise LoRAFormatError(f"unknown LoRA format {fmt!r}; use one of {LORA_FORMATS}")
    check_lora_fits(entries, shapes)
    return join_native(entries)


def convert_from_native(
    native: Mapping[str, Tensor], fmt: str, shapes: Shapes | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Native tensors -> (tensors, header metadata) in `fmt`.

    `shapes` (the model's targets) lets the official layout check that every attention block is covered.
    """
    entries = split_native(native)
    if fmt == "native":
        return join_native(entries), {}
    if fmt == "kohya":
        return _to_kohya(entries)
    if fmt in ("peft", "peft-folded"):
        return _to_peft(entries, fold=fmt == "peft-folded")
    if fmt == "official":
        return _to_official(entries, shapes)
    raise LoRAFormatError(f"unknown LoRA format {fmt!r}; use one of {LORA_FORMATS}")
