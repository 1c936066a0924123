"""Stage A (VQGAN) key layouts and configs: Stability's `stage_a.safetensors` vs diffusers' `vqgan/`.

diffusers' `PaellaVQModel` has the same modules as the official StageA; only the codebook is named
differently (`vquantizer.embedding` vs `vquantizer.codebook`) and its config uses other names. Its
`scale_factor` (0.3764 by default) multiplies latents before decoding, exactly as StageA's 0.43 does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from cascade_core.formats import KeyRule, LazyConvertedStateDict

__all__ = [
    "ORIGINAL_CODEBOOK",
    "DIFFUSERS_CODEBOOK",
    "OFFICIAL_SCALE_FACTOR",
    "convert_vqgan_state_dict",
    "detect_vqgan_layout",
    "infer_stage_a_kwargs",
    "paella_config_to_stage_a",
    "stage_a_to_paella_config",
]

ORIGINAL_CODEBOOK = "vquantizer.codebook.weight"
DIFFUSERS_CODEBOOK = "vquantizer.embedding.weight"
OFFICIAL_SCALE_FACTOR = 0.43  # official StageA default, used with stage_a.safetensors
_IN_BLOCK = "in_block.1.weight"


def detect_vqgan_layout(keys: Sequence[str] | Mapping[str, Any]) -> str:
    """'original' or 'diffusers' from the codebook key; ValueError if the keys are not a Stage A."""
    keys = set(keys)
    if ORIGINAL_CODEBOOK in keys:
        return "original"
    if DIFFUSERS_CODEBOOK in keys:
        return "diffusers"
    raise ValueError(
        f"not a Stage A / VQGAN checkpoint: neither {ORIGINAL_CODEBOOK!r} nor {DIFFUSERS_CODEBOOK!r} "
        "is present"
    )


def convert_vqgan_state_dict(state: Mapping[str, Tensor], to_layout: str) -> Mapping[str, Tensor]:
    """Rename the codebook key to `to_layout` ('original' or 'diffusers'); every other key is shared.
    Lazy: tensors are read from `state` only when accessed."""
    if to_layout not in ("original", "diffusers"):
        raise ValueError(f"layout must be 'original' or 'diffusers', got {to_layout!r}")
    src, dst = (
        (DIFFUSERS_CODEBOOK, ORIGINAL_CODEBOOK)
        if to_layout == "original"
        else (ORIGINAL_CODEBOOK, DIFFUSERS_CODEBOOK)
    )
    return LazyConvertedStateDict(state, {dst if k == src else k: KeyRule("same", (k,)) for k in state})


def infer_stage_a_kwargs(shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """StageA constructor kwargs from tensor shapes (either layout); scale_factor is not in the weights,
    so the official 0.43 is returned and a diffusers config overrides it."""
    codebook = shapes.get(ORIGINAL_CODEBOOK) or shapes.get(DIFFUSERS_CODEBOOK)
    if codebook is None or _IN_BLOCK not in shapes or "up_blocks.0.0.weight" not in shapes:
        raise ValueError(
            "not a Stage A / VQGAN checkpoint: codebook, in_block.1 or up_blocks.0.0 weights missing"
        )
    if tuple(shapes[_IN_BLOCK][1:]) != (12, 1, 1):
        raise ValueError(
            f"{_IN_BLOCK} has shape {list(shapes[_IN_BLOCK])}; only 3-channel images with a 2x "
            "pixel unshuffle (12 input channels) are supported"
        )
    res = re.compile(r"^(down|up)_blocks\.(\d+)\.gammas$")
    down = sum(1 for k in shapes if (m := res.match(k)) and m.group(1) == "down")
    up = sum(1 for k in shapes if (m := res.match(k)) and m.group(1) == "up")
    c_hidden, c_latent = shapes["up_blocks.0.0.weight"][:2]
    return {
        "levels": down,
        "bottleneck_blocks": up - (down - 1),
        "c_hidden": c_hidden,
        "c_latent": c_latent,
        "codebook_size": codebook[0],
        "scale_factor": OFFICIAL_SCALE_FACTOR,
    }


def paella_config_to_stage_a(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers `PaellaVQModel` config.json -> StageA constructor kwargs."""
    defaults = {"in_channels": 3, "out_channels": 3, "up_down_scale_factor": 2}
    for key, expected in defaults.items():
        if cfg.get(key, expected) != expected:
            raise ValueError(f"vqgan config {key}={cfg[key]!r} is not supported (Stage A uses {expected})")
    try:
        return {
            "levels": cfg["levels"],
            "bottleneck_blocks": cfg["bottleneck_blocks"],
            "c_hidden": cfg["embed_dim"],
            "c_latent": cfg["latent_channels"],
            "codebook_size": cfg["num_vq_embeddings"],
            "scale_factor": cfg["scale_factor"],
        }
    except KeyError as err:
        raise ValueError(f"vqgan config is missing {err.args[0]!r} (not a PaellaVQModel config?)") from None


def stage_a_to_paella_config(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """StageA constructor kwargs -> a diffusers `PaellaVQModel` config.json dict."""
    return {
        "_class_name": "PaellaVQModel",
        "bottleneck_blocks": kwargs["bottleneck_blocks"],
        "embed_dim": kwargs["c_hidden"],
        "in_channels": 3,
        "latent_channels": kwargs["c_latent"],
        "levels": kwargs["levels"],
        "num_vq_embeddings": kwargs["codebook_size"],
        "out_channels": 3,
        "scale_factor": kwargs["scale_factor"],
        "up_down_scale_factor": 2,
    }
