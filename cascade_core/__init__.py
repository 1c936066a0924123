"""Pure-PyTorch Stable Cascade: models, checkpoint formats, LoRA, int8, diffusion math.

Tensors in, tensors out: nothing here prints, logs, downloads, reads environment variables or picks a
device. The application (`runner`) owns every side effect.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "StageC",
    "StageCConfig",
    "load_stage_c",
    "save_stage_c",
    "load_effnet",
    "load_previewer",
    "load_stage_a",
    "load_stage_b",
]

_LAZY = {
    "StageC": "cascade_core.models.stage_c",
    "StageCConfig": "cascade_core.models.stage_c",
    "load_stage_c": "cascade_core.stage_c_io",
    "save_stage_c": "cascade_core.stage_c_io",
    "load_effnet": "cascade_core.decoder_io",
    "load_previewer": "cascade_core.decoder_io",
    "load_stage_a": "cascade_core.decoder_io",
    "load_stage_b": "cascade_core.decoder_io",
}


def __getattr__(name: str) -> Any:
    # Lazy so `import cascade_core` stays cheap and submodules import without cycles.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cascade_core' has no attribute {name!r}")
