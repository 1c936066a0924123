"""Crash- and race-safe tensor files for the caches.

Each entry is one safetensors file written to a unique temp name in the same folder and then
renamed over the final name (`os.replace` is atomic on POSIX), so a reader sees either nothing or a
whole file, concurrent writers of the same key cannot interleave, and an interrupted run leaves at
most a stray temp file that `load_entry` never reads.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TMP_MARK = ".tmp-"


def entry_path(root: Path, key: str) -> Path:
    """Two-level fan-out so no folder holds millions of files."""
    return root / key[:2] / f"{key}.safetensors"


def save_entry(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + TMP_MARK, dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_entry(path: Path) -> dict[str, torch.Tensor] | None:
    """The stored tensors, or None when absent or unreadable (then it is recomputed and replaced)."""
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None


def stray_temp_files(root: Path) -> list[Path]:
    """Temp files left by interrupted writers (safe to delete when no writer runs)."""
    return [p for p in root.rglob(f"*{TMP_MARK}*") if p.is_file()] if root.is_dir() else []
