"""Native LoRA tensors and the checks every format shares.

Native layout: `<target>.lora_down.weight` [r, in(,1,1)], `<target>.lora_up.weight` [out, r(,1,1)],
`<target>.alpha` (0-d float32); scale = alpha / r. Targets are module paths, and
`<attention path>.in_proj` for the fused q/k/v in-projection ([3c, c]). An entry is the triple
(down, up, alpha). `check_lora_fits` refuses a LoRA made for another model (Stage C vs lite) with a
message naming both.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "Entry",
    "Shapes",
    "LoRAFormatError",
    "LoRAMismatchError",
    "native_keys",
    "split_native",
    "join_native",
    "targets_from_checkpoint_shapes",
    "check_lora_fits",
]

_WIDTH_NAMES = {2048: "Stage C (3.6B, width 2048)", 1536: "Stage C lite (1B, width 1536)"}

Entry = tuple[Tensor, Tensor, float]  # (lora_down, lora_up, alpha)
Shapes = Mapping[str, Sequence[int]]


class LoRAFormatError(ValueError):
    """A LoRA file whose keys or metadata cannot be read as any supported format."""


class LoRAMismatchError(ValueError):
    """A LoRA whose targets or shapes do not fit the model (e.g. made for Stage C lite, loaded on full)."""


def native_keys(target: str) -> tuple[str, str, str]:
    return f"{target}.lora_down.weight", f"{target}.lora_up.weight", f"{target}.alpha"


def rank_check(name: str, down: Tensor, up: Tensor) -> None:
    if down.dim() not in (2, 4) or up.dim() != down.dim() or down.shape[0] != up.shape[1]:
        raise LoRAFormatError(
            f"LoRA {name!r}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} are not "
            "[rank, in] and [out, rank] factors of one rank"
        )


def split_native(state_dict: Mapping[str, Tensor]) -> dict[str, Entry]:
    """Native tensors -> {target: (down, up, alpha)}; every target needs down, up and alpha."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[suffix] = value
                break
        else:
            raise LoRAFormatError(
                f"native LoRA key {key!r} does not end in .lora_down.weight, .lora_up.weight or .alpha"
            )
    entries: dict[str, Entry] = {}
    for target, p in parts.items():
        missing = [s for s in (".lora_down.weight", ".lora_up.weight", ".alpha") if s not in p]
        if missing:
            raise LoRAFormatError(f"native LoRA target {target!r} lacks {missing}")
        down, up = p[".lora_down.weight"], p[".lora_up.weight"]
        rank_check(target, down, up)
        entries[target] = (down, up, float(p[".alpha"]))
    return entries


def join_native(entries: Mapping[str, Entry]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for target, (down, up, alpha) in entries.items():
        kd, ku, ka = native_keys(target)
        out[kd], out[ku], out[ka] = down, up, torch.tensor(float(alpha), dtype=torch.float32)
    return out


def targets_from_checkpoint_shapes(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    """Original-layout Stage C key -> shape (e.g. a manifest) to LoRA target -> base weight shape."""
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if key.endswith(".in_proj_weight") and len(shape) == 2:
            out[key[: -len("_weight")]] = shape
        elif key.endswith(".weight") and (len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1))):
            out[key[: -len(".weight")]] = shape
    return out


def _width_name(width: int | None) -> str:
    return _WIDTH_NAMES.get(width, f"a model of width {width}") if width else "an unknown model"


def most_common(values: list[int]) -> int | None:
    return Counter(values).most_common(1)[0][0] if values else None


def _lora_width(entries: Mapping[str, Entry]) -> int | None:
    attn = [d.shape[1] for name, (d, _, _) in entries.items() if "attn" in name or "attention" in name]
    return most_common(attn) or most_common([d.shape[1] for d, _, _ in entries.values()])


def _model_width(shapes: Shapes) -> int | None:
    attn = [int(s[1]) for name, s in shapes.items() if name.endswith(".in_proj")]
    return most_common(attn) or (int(shapes["clip_txt_mapper"][0]) if "clip_txt_mapper" in shapes else None)


def mismatch_error(what: str, lora_width: int | None, shapes: Shapes) -> LoRAMismatchError:
    return LoRAMismatchError(
        f"LoRA does not fit this model: it looks made for {_width_name(lora_width)} but the model is "
        f"{_width_name(_model_width(shapes))}; {what}. Load it onto the base model it was trained for "
        "(Stage C and Stage C lite LoRAs are not interchangeable)."
    )


def check_lora_fits(entries: Mapping[str, Entry], shapes: Shapes) -> None:
    """Raise LoRAMismatchError naming the LoRA's and the model's flavour unless every target fits."""
    missing = [t for t in entries if t not in shapes]
    wrong = []
    for target, (down, up, _) in entries.items():
        if target in shapes:
            base = tuple(int(s) for s in shapes[target])
            if (up.shape[0], down.shape[1]) != base[:2]:
                wrong.append(f"{target}: LoRA [{up.shape[0]}, {down.shape[1]}] vs model {list(base[:2])}")
    if missing or wrong:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} of {len(entries)} targets are not in the model (e.g. {missing[:3]})"
            )
        if wrong:
            parts.append(f"{len(wrong)} targets have other shapes (e.g. {wrong[:2]})")
        raise mismatch_error(" and ".join(parts), _lora_width(entries), shapes)


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def is_fused(target: str) -> bool:
    return target.endswith(".in_proj")


def fuse_qkv(target: str, parts: dict[int, Entry]) -> Entry:
    """q/k/v LoRAs of one attention module -> one LoRA on the fused [3c, c] in-projection."""
    downs = [parts[i][0] for i in sorted(parts)]
    ups = [parts[i][1] for i in sorted(parts)]
    alphas = [parts[i][2] for i in sorted(parts)]
    if len(parts) == 3 and all(torch.equal(downs[0], d) for d in downs) and len(set(alphas)) == 1:
        return downs[0], torch.cat(ups, dim=0), alphas[0]  # exact inverse of the split: rank r
    c = ups[0].shape[0]
    if any(u.shape[0] != c or d.shape[1:] != downs[0].shape[1:] for d, u in zip(downs, ups, strict=True)):
        raise LoRAFormatError(f"LoRA q/k/v parts of {target!r} have inconsistent shapes")
    rank = sum(d.shape[0] for d in downs)
    up = ups[0].new_zeros(3 * c, rank)  # block-diagonal: part i writes rows i*c:(i+1)*c from its own columns
    col = 0
    for i in sorted(parts):
        d, u, a = parts[i]
        up[i * c : (i + 1) * c, col : col + d.shape[0]] = u * (a / d.shape[0])
        col += d.shape[0]
    return torch.cat(downs, dim=0), up, float(rank)  # scale folded into up, alpha = rank -> scale 1


def assemble(found: dict[str, dict], fused_parts: dict[str, dict[int, Entry]]) -> dict[str, Entry]:
    entries = dict(found)
    for target, parts in fused_parts.items():
        entries[target] = fuse_qkv(target, parts)
    return entries
