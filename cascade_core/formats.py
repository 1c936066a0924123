"""Checkpoint key layouts of the Stable Cascade UNet (Stage C prior and Stage B decoder).

Two layouts exist for the same weights: Stability's single files ("original": fused
`attention.attn.in_proj_*`, `out_proj`, Stage B `clip_mapper`) and diffusers' StableCascadeUNet
("diffusers": `attention.to_q/to_k/to_v`, `to_out.0`, `clip_txt_pooled_mapper`). Conversion is a
per-key plan applied lazily, so converting never holds a second full copy of the weights. The
architecture is read from tensor shapes, because hub config files have been wrong before.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ORIGINAL",
    "DIFFUSERS",
    "KeyRule",
    "LazyConvertedStateDict",
    "detect_layout",
    "detect_unet_kind",
    "find_key_prefix",
    "conversion_plan",
    "converted_shapes",
    "convert_state_dict",
    "infer_unet_hparams",
    "diffusers_config_to_original",
    "original_to_diffusers_config",
]

ORIGINAL = "original"
DIFFUSERS = "diffusers"
LAYOUTS = (ORIGINAL, DIFFUSERS)

_FUSED_W, _FUSED_B = ".attention.attn.in_proj_weight", ".attention.attn.in_proj_bias"
_OUT_ORIG, _OUT_DIFF = ".attention.attn.out_proj.", ".attention.to_out.0."
_QKV = ("to_q", "to_k", "to_v")
_SPLIT_DIFF = re.compile(r"^(.*)\.attention\.(to_q|to_k|to_v)\.(weight|bias)$")
# Anchor keys that identify a model kind in either layout (diffusers/ComfyUI use the same test).
STAGE_C_ANCHOR = "clip_txt_mapper.weight"
STAGE_B_ANCHORS = ("clip_mapper.weight", "effnet_mapper.0.weight")
_DIFFUSERS_BLOCK_NAMES = {"C": "SDCascadeResBlock", "T": "SDCascadeTimestepBlock", "A": "SDCascadeAttnBlock"}
_KNOWN_T_CONDS = ("sca", "crp")


def detect_layout(keys: Iterable[str]) -> str:
    """'original' or 'diffusers' from key names; a UNet without attention keys is 'original' unless it has
    diffusers' Stage B pooled-mapper name."""
    keys = set(keys)
    if any(k.endswith(_FUSED_W) or _OUT_ORIG in k or k == "clip_mapper.weight" for k in keys):
        return ORIGINAL
    if any(_SPLIT_DIFF.match(k) or _OUT_DIFF in k for k in keys):
        return DIFFUSERS
    if "effnet_mapper.0.weight" in keys and "clip_txt_pooled_mapper.weight" in keys:
        return DIFFUSERS
    return ORIGINAL


def detect_unet_kind(keys: Iterable[str]) -> str | None:
    """'stage_c', 'stage_b' or None (not a Stable Cascade UNet) from anchor keys."""
    keys = set(keys)
    if any(a in keys for a in STAGE_B_ANCHORS):
        return "stage_b"
    if STAGE_C_ANCHOR in keys:
        return "stage_c"
    return None


def find_key_prefix(keys: Iterable[str], anchors: Sequence[str]) -> str | None:
    """The prefix under which an anchor key appears ('' for bare keys, 'model.diffusion_model.' for
    ComfyUI all-in-one files); the shortest wins. None if no anchor is present."""
    found = [
        k[: -len(a)] for k in keys for a in anchors if k.endswith(a) and (k == a or k[-len(a) - 1] == ".")
    ]
    return min(found, key=len) if found else None


@dataclass(frozen=True)
class KeyRule:
    """How one target tensor is made: 'same' (rename), 'split' (chunk i of 3 along dim 0) or 'cat'."""

    op: str
    sources: tuple[str, ...]
    index: int = 0

    def shape(self, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
        first = tuple(shapes[self.sources[0]])
        if self.op == "split":
            return (first[0] // 3, *first[1:])
        if self.op == "cat":
            return (sum(shapes[s][0] for s in self.sources), *first[1:])
        return first

    def apply(self, source: Mapping[str, Tensor]) -> Tensor:
        if self.op == "split":
            return source[self.sources[0]].chunk(3, dim=0)[self.index]
        if self.op == "cat":
            return torch.cat([source[s] for s in self.sources], dim=0)
        return source[self.sources[0]]


def conversion_plan(keys: Iterable[str], to_layout: str) -> dict[str, KeyRule]:
    """target key -> rule converting a UNet key set (in the other layout) to `to_layout`.

    Keys that need no change map to themselves, so unknown keys pass through and are reported by the
    strict load, not silently dropped."""
    if to_layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {to_layout!r}")
    keys = list(keys)
    plan: dict[str, KeyRule] = {}
    if to_layout == DIFFUSERS:
        for k in keys:
            if k.endswith((_FUSED_W, _FUSED_B)):
                base, kind = (
                    (k[: -len(_FUSED_W)], "weight") if k.endswith(_FUSED_W) else (k[: -len(_FUSED_B)], "bias")
                )
                for i, name in enumerate(_QKV):
                    plan[f"{base}.attention.{name}.{kind}"] = KeyRule("split", (k,), i)
            elif _OUT_ORIG in k:
                plan[k.replace(_OUT_ORIG, _OUT_DIFF)] = KeyRule("same", (k,))
            elif k.startswith("clip_mapper."):
                plan["clip_txt_pooled_mapper." + k[len("clip_mapper.") :]] = KeyRule("same", (k,))
            else:
                plan[k] = KeyRule("same", (k,))
        return plan
    key_set = set(keys)
    stage_b = any(k.startswith("effnet_mapper.") for k in keys)
    for k in keys:
        m = _SPLIT_DIFF.match(k)
        if m:
            base, kind = m.group(1), m.group(3)
            sources = tuple(f"{base}.attention.{n}.{kind}" for n in _QKV)
            if all(s in key_set for s in sources):
                suffix = _FUSED_W if kind == "weight" else _FUSED_B
                plan[base + suffix] = KeyRule("cat", sources)
            else:  # an incomplete q/k/v triple stays visible as an unexpected key
                plan[k] = KeyRule("same", (k,))
        elif _OUT_DIFF in k:
            plan[k.replace(_OUT_DIFF, _OUT_ORIG)] = KeyRule("same", (k,))
        elif stage_b and k.startswith("clip_txt_pooled_mapper."):
            plan["clip_mapper." + k[len("clip_txt_pooled_mapper.") :]] = KeyRule("same", (k,))
        else:
            plan[k] = KeyRule("same", (k,))
    return plan


def converted_shapes(shapes: Mapping[str, Sequence[int]], to_layout: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape after conversion, from shapes alone (no tensors needed; works for manifests)."""
    return {k: rule.shape(shapes) for k, rule in conversion_plan(shapes, to_layout).items()}


class LazyConvertedStateDict(Mapping[str, Tensor]):
    """A read-only state dict in another layout whose tensors are built on access (one block at a time)."""

    def __init__(self, source: Mapping[str, Tensor], plan: Mapping[str, KeyRule]) -> None:
        self._source = source
        self._plan = dict(plan)

    def __getitem__(self, key: str) -> Tensor:
        return self._plan[key].apply(self._source)

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)

    def shape_of(self, key: str) -> tuple[int, ...]:
        """The converted tensor's shape without building it."""
        return self._plan[key].shape(_ShapeView(self._source))


class _ShapeView(Mapping[str, tuple[int, ...]]):
    """Shapes of a (possibly lazy) state dict, read from its headers when it knows them."""

    def __init__(self, source: Mapping[str, Tensor]) -> None:
        self._source = source

    def __getitem__(self, key: str) -> tuple[int, ...]:
        getter = getattr(self._source, "shape_of", None)
        return tuple(getter(key)) if getter is not None else tuple(self._source[key].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def convert_state_dict(state: Mapping[str, Tensor], to_layout: str) -> Mapping[str, Tensor]:
    """`state` in `to_layout` (returned as is when already there); lazy, see LazyConvertedStateDict."""
    if detect_layout(state.keys()) == to_layout:
        return state
    return LazyConvertedStateDict(state, conversion_plan(state.keys(), to_layout))


# ----------------------------------------------------------------------------------------------------
# Architecture from shapes (original layout)


def _block_letter(shapes: Mapping[str, Sequence[int]], prefix: str) -> str:
    if f"{prefix}.depthwise.weight" in shapes:
        return "C"
    if f"{prefix}.mapper.weight" in shapes:
        return "T"
    if f"{prefix}.attention.attn.in_proj_weight" in shapes or f"{prefix}.kv_mapper.1.weight" in shapes:
        return "A"
    if f"{prefix}.channelwise.0.weight" in shapes:
        return "F"
    raise ValueError(f"cannot tell the block type of {prefix!r} from its keys")


def _level_sequence(shapes: Mapping[str, Sequence[int]], group: str, level: int) -> list[str]:
    pat = re.compile(rf"^{group}\.{level}\.(\d+)\.")
    indices = sorted({int(m.group(1)) for k in shapes if (m := pat.match(k))})
    if indices != list(range(len(indices))):
        gaps = sorted(set(range(max(indices) + 1)) - set(indices))
        raise ValueError(f"{group}.{level} has no keys for block indices {gaps}; the file is incomplete")
    return [_block_letter(shapes, f"{group}.{level}.{i}") for i in indices]


def _period(seq: Sequence[str]) -> str:
    for p in range(1, len(seq) + 1):
        if len(seq) % p == 0 and list(seq) == list(seq[:p]) * (len(seq) // p):
            return "".join(seq[:p])
    return "".join(seq)


def _block_width(shapes: Mapping[str, Sequence[int]], prefix: str, letter: str) -> int:
    if letter == "C":
        return shapes[f"{prefix}.depthwise.weight"][0]
    if letter == "T":
        return shapes[f"{prefix}.mapper.weight"][0] // 2
    if letter == "A":
        return shapes[f"{prefix}.kv_mapper.1.weight"][0]
    return shapes[f"{prefix}.channelwise.4.weight"][0]


def _count(shapes: Mapping[str, Sequence[int]], group: str) -> dict[int, int]:
    """For `group.{i}.{j}.` keys: i -> number of distinct j."""
    pat = re.compile(rf"^{group}\.(\d+)\.(\d+)\.")
    found: dict[int, set[int]] = {}
    for k in shapes:
        if m := pat.match(k):
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return {i: len(js) for i, js in found.items()}


def infer_unet_hparams(shapes: Mapping[str, Sequence[int]], *, c_in: int) -> dict[str, Any]:
    """Official constructor kwargs that the shapes determine (original layout keys).

    Not observable and therefore absent: nhead, dropout, self_attn and whether a Stage C level change
    resamples (switch_level); the caller takes them from a config or the released defaults. `c_in` is the
    latent channel count (16 for Stage C, 4 for Stage B) that fixes the patch size.
    Raises ValueError naming the key that does not fit."""
    kind = detect_unet_kind(shapes)
    if kind is None:
        raise ValueError(
            "not a Stable Cascade UNet: neither clip_txt_mapper.weight nor clip_mapper.weight found"
        )
    emb = shapes["embedding.1.weight"]  # [c_hidden0, c_in * p^2, 1, 1]
    patch = math.isqrt(emb[1] // c_in) if emb[1] % c_in == 0 else 0
    if patch < 1 or c_in * patch * patch != emb[1]:
        raise ValueError(f"embedding.1.weight has {emb[1]} input channels, not {c_in} x patch_size^2")
    n = len({int(k.split(".")[1]) for k in shapes if k.startswith("down_blocks.")})
    n_up = len({int(k.split(".")[1]) for k in shapes if k.startswith("up_blocks.")})
    if n == 0 or n != n_up:
        raise ValueError(f"found {n} down levels and {n_up} up levels; expected the same non-zero number")
    down = [_level_sequence(shapes, "down_blocks", i) for i in range(n)]
    up = [_level_sequence(shapes, "up_blocks", n - 1 - i) for i in range(n)]  # indexed by level
    level_config, widths, blocks_down, blocks_up = [], [], [], []
    for i in range(n):
        pattern = _period(down[i] or up[i])
        for seq, where in ((down[i], f"down_blocks.{i}"), (up[i], f"up_blocks.{n - 1 - i}")):
            if seq and _period(seq) != pattern:
                raise ValueError(
                    f"{where} repeats {_period(seq)!r}, other path of level {i} repeats {pattern!r}"
                )
        level_config.append(pattern)
        blocks_down.append(len(down[i]) // len(pattern))
        blocks_up.append(len(up[i]) // len(pattern))
        seq, group = (down[i], f"down_blocks.{i}") if down[i] else (up[i], f"up_blocks.{n - 1 - i}")
        widths.append(_block_width(shapes, f"{group}.0", seq[0]))
    out: dict[str, Any] = {
        "c_in": c_in,
        "c_out": shapes["clf.1.weight"][0] // (patch * patch),
        "patch_size": patch,
        "c_hidden": widths,
        "blocks": [blocks_down, blocks_up[::-1]],
        "block_repeat": [
            [_count(shapes, "down_repeat_mappers").get(i, 0) + 1 for i in range(n)],
            [_count(shapes, "up_repeat_mappers").get(u, 0) + 1 for u in range(n)],
        ],
        "level_config": level_config,
    }
    all_blocks = [(f"down_blocks.{i}.{j}", t) for i in range(n) for j, t in enumerate(down[i])]
    t_block = next((p for p, t in all_blocks if t == "T"), None)
    if t_block is not None:
        names = [
            k[len(t_block) + 8 : -7]
            for k in shapes
            if k.startswith(f"{t_block}.mapper_") and k.endswith(".weight")
        ]
        out["c_r"] = shapes[f"{t_block}.mapper.weight"][1]
        out["t_conds"] = [c for c in _KNOWN_T_CONDS if c in names] + sorted(set(names) - set(_KNOWN_T_CONDS))
    c_block = next((p for p, t in all_blocks if t == "C"), None)
    if c_block is not None:
        out["kernel_size"] = shapes[f"{c_block}.depthwise.weight"][-1]
    a_block = next((p for p, t in all_blocks if t == "A"), None)
    if kind == "stage_c":
        c_cond = shapes["clip_txt_mapper.weight"][0]
        out.update(
            c_cond=c_cond,
            c_clip_text=shapes["clip_txt_mapper.weight"][1],
            c_clip_text_pooled=shapes["clip_txt_pooled_mapper.weight"][1],
            c_clip_img=shapes["clip_img_mapper.weight"][1],
            c_clip_seq=shapes["clip_txt_pooled_mapper.weight"][0] // c_cond,
        )
    else:
        clip = shapes["clip_mapper.weight"]
        if a_block is None:
            raise ValueError("a Stage B checkpoint without attention blocks: c_cond cannot be inferred")
        c_cond = shapes[f"{a_block}.kv_mapper.1.weight"][1]
        out.update(c_cond=c_cond, c_clip=clip[1], c_clip_seq=clip[0] // c_cond)
        out["c_effnet"] = shapes["effnet_mapper.0.weight"][1]
        out["c_pixels"] = shapes["pixels_mapper.0.weight"][1]
    return out


# ----------------------------------------------------------------------------------------------------
# diffusers config.json <-> official constructor kwargs


def diffusers_config_to_original(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A StableCascadeUNet config.json -> official StageC/StageB constructor kwargs."""
    letters = {v: k for k, v in _DIFFUSERS_BLOCK_NAMES.items()}
    try:
        level_config = ["".join(letters[b] for b in level) for level in cfg.get("block_types_per_layer", ())]
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"diffusers config has an unknown block type in block_types_per_layer: {err}"
        ) from None
    try:
        out: dict[str, Any] = {
            "c_in": cfg["in_channels"],
            "c_out": cfg["out_channels"],
            "c_r": cfg["timestep_ratio_embedding_dim"],
            "patch_size": cfg["patch_size"],
            "c_cond": cfg["conditioning_dim"],
            "c_hidden": list(cfg["block_out_channels"]),
            "nhead": [h if h > 0 else -1 for h in cfg["num_attention_heads"]],
            "blocks": [list(cfg["down_num_layers_per_block"]), list(cfg["up_num_layers_per_block"])],
            "block_repeat": [list(cfg["down_blocks_repeat_mappers"]), list(cfg["up_blocks_repeat_mappers"])],
            "level_config": level_config,
        }
        if cfg.get("effnet_in_channels"):
            out.update(
                c_clip=cfg["clip_text_pooled_in_channels"],
                c_clip_seq=cfg["clip_seq"],
                c_effnet=cfg["effnet_in_channels"],
                c_pixels=cfg["pixel_mapper_in_channels"],
            )
        else:
            out.update(
                c_clip_text=cfg["clip_text_in_channels"],
                c_clip_text_pooled=cfg["clip_text_pooled_in_channels"],
                c_clip_img=cfg["clip_image_in_channels"],
                c_clip_seq=cfg["clip_seq"],
            )
        out.update(
            kernel_size=cfg["kernel_size"],
            dropout=list(cfg["dropout"]),
            self_attn=cfg["self_attn"],
            t_conds=list(cfg["timestep_conditioning_type"]),
        )
        if not cfg.get("effnet_in_channels"):
            out["switch_level"] = list(cfg["switch_level"]) if cfg.get("switch_level") is not None else None
    except KeyError as err:
        raise ValueError(
            f"diffusers config is missing {err.args[0]!r} (not a StableCascadeUNet config?)"
        ) from None
    return out


def original_to_diffusers_config(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Official StageC/StageB constructor kwargs -> a StableCascadeUNet config.json dict."""
    stage_b = "c_effnet" in kwargs
    try:
        block_types = [[_DIFFUSERS_BLOCK_NAMES[c] for c in level] for level in kwargs["level_config"]]
    except KeyError as err:
        raise ValueError(f"diffusers StableCascadeUNet has no block type {err.args[0]!r}") from None
    return {
        "_class_name": "StableCascadeUNet",
        "block_out_channels": list(kwargs["c_hidden"]),
        "block_types_per_layer": block_types,
        "clip_image_in_channels": None if stage_b else kwargs["c_clip_img"],
        "clip_seq": kwargs["c_clip_seq"],
        "clip_text_in_channels": None if stage_b else kwargs["c_clip_text"],
        "clip_text_pooled_in_channels": kwargs["c_clip"] if stage_b else kwargs["c_clip_text_pooled"],
        "conditioning_dim": kwargs["c_cond"],
        "down_blocks_repeat_mappers": list(kwargs["block_repeat"][0]),
        "down_num_layers_per_block": list(kwargs["blocks"][0]),
        "dropout": list(kwargs["dropout"]),
        "effnet_in_channels": kwargs["c_effnet"] if stage_b else None,
        "in_channels": kwargs["c_in"],
        "kernel_size": kwargs["kernel_size"],
        "num_attention_heads": [max(h, 0) for h in kwargs["nhead"]],
        "out_channels": kwargs["c_out"],
        "patch_size": kwargs["patch_size"],
        "pixel_mapper_in_channels": kwargs["c_pixels"] if stage_b else None,
        "self_attn": kwargs["self_attn"],
        "switch_level": None
        if stage_b or kwargs.get("switch_level") is None
        else list(kwargs["switch_level"]),
        "timestep_conditioning_type": list(kwargs["t_conds"]),
        "timestep_ratio_embedding_dim": kwargs["c_r"],
        "up_blocks_repeat_mappers": list(kwargs["block_repeat"][1]),
        "up_num_layers_per_block": list(kwargs["blocks"][1]),
    }
