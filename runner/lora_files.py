"""LoRA files on disk -> adapters in a model: reading, format detection, strength, clear errors.

Used by training (`training.lora.init_weights`, to continue from a LoRA), by `runner sample --lora
FILE[:STRENGTH]` and by `runner export` (which re-reads every file it writes through `read_lora_file`).
Every supported format (cascade_core.peft.formats.LORA_FORMATS) is detected from the file's keys and
header; a LoRA made for another flavour (Stage C vs lite) is refused with a message naming both.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from runner.errors import UserError

__all__ = ["read_lora_file", "convert_lora", "native_lora_for", "load_lora_into", "parse_lora_arg"]

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
_STRENGTH = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """`FILE[:STRENGTH]` -> (path, strength). Only a trailing plain number counts as a strength, so paths
    such as `C:\\loras\\x.safetensors` keep their colon; an existing file of the whole name wins."""
    if not arg:
        raise UserError("--lora needs a file: --lora FILE[:STRENGTH], e.g. --lora my_lora.safetensors:0.8")
    head, sep, tail = arg.rpartition(":")
    if sep and head and _STRENGTH.match(tail) and not Path(arg).expanduser().exists():
        return Path(head).expanduser(), float(tail)
    return Path(arg).expanduser(), 1.0


def _resolve_file(path: Path) -> Path:
    """The safetensors file behind `path` (a folder is accepted when it holds diffusers' LoRA file name)."""
    if not path.exists():
        raise UserError(f"LoRA file {path} does not exist; check the path (a LoRA is a .safetensors file)")
    if path.is_dir():
        inside = path / DIFFUSERS_LORA_NAME
        if inside.is_file():
            return inside
        found = sorted(p.name for p in path.glob("*.safetensors"))
        raise UserError(
            f"LoRA path {path} is a folder without {DIFFUSERS_LORA_NAME}; give the file itself"
            + (f" (safetensors files there: {found[:5]})" if found else "")
        )
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"LoRA file {path} is a pickled PyTorch file; only .safetensors LoRAs are read (pickles can run "
            "code). Convert it with safetensors.torch.save_file(torch.load(path, weights_only=True), out)"
        )
    return path


def read_lora_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a LoRA safetensors file, after checking it is complete."""
    from safetensors import SafetensorError, safe_open

    from cascade_core.checkpoint_io import CheckpointError, read_safetensors_header

    file = _resolve_file(Path(path).expanduser())
    try:
        read_safetensors_header(file)  # truncation and "not safetensors" get their own messages here
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = dict(f.metadata() or {})
    except CheckpointError as err:
        raise UserError(f"LoRA file: {err}") from None
    except (SafetensorError, OSError) as err:
        raise UserError(
            f"LoRA file {file} cannot be read as safetensors ({err}); re-download or re-export it"
        ) from None
    if not tensors:
        raise UserError(f"LoRA file {file} holds no tensors; re-export it")
    return tensors, metadata


def convert_lora(
    tensors: dict[str, Tensor], metadata: dict[str, str], shapes: Mapping, where: str | Path
) -> tuple[dict[str, Tensor], str]:
    """A LoRA file's tensors -> (native tensors fitting `shapes`, detected format); `where` names the file."""
    from cascade_core.peft.formats import convert_to_native, detect_lora_format, official_embeddings

    try:
        fmt = detect_lora_format(tensors, metadata)
        native = convert_to_native(tensors, metadata, shapes, fmt)
    except ValueError as err:  # LoRAFormatError, LoRAMismatchError
        raise UserError(f"LoRA file {where}: {err}") from None
    if fmt == "official" and official_embeddings(tensors):
        warnings.warn(
            f"LoRA file {where}: its ReToken text embeddings (embeddings.*, new trigger tokens) are not "
            "used; only the Stage C LoRA weights are",
            stacklevel=2,
        )
    return native, fmt


def native_lora_for(model: nn.Module, path: str | Path) -> tuple[dict[str, Tensor], str]:
    """A LoRA file converted to native tensors fitting `model`'s targets, and its detected format."""
    from cascade_core.peft.lora import lora_target_shapes

    tensors, metadata = read_lora_file(path)
    return convert_lora(tensors, metadata, lora_target_shapes(model), path)


def _copy_into_existing(model: nn.Module, native: dict[str, Tensor], name: str, path: str | Path) -> None:
    """Continue training: fill the recipe's adapters from the file, keeping their rank, alpha and targets.

    A different alpha is folded into lora_up (exact), so the effective weights equal the file's.
    """
    from cascade_core.peft.lora import iter_lora_adapters
    from cascade_core.peft.native import split_native

    live = {target: adapter for target, _, adapter in iter_lora_adapters(model, name)}
    entries = split_native(native)
    if set(entries) != set(live):
        extra, missing = sorted(set(entries) - set(live)), sorted(set(live) - set(entries))
        raise UserError(
            f"LoRA file {path} does not cover the same modules as training.lora: in the file only "
            f"{extra[:3]}, in the recipe only {missing[:3]}; set training.lora.targets to the file's "
            "targets or start without training.lora.init_weights"
        )
    for target, (down, up, alpha) in entries.items():
        adapter = live[target]
        if down.shape[0] != adapter.rank:
            raise UserError(
                f"LoRA file {path} has rank {down.shape[0]} on {target!r} but training.lora.rank is "
                f"{adapter.rank}; set training.lora.rank: {down.shape[0]} to continue from this file"
            )
        with torch.no_grad():
            adapter.lora_down.copy_(down.reshape(adapter.lora_down.shape))
            adapter.lora_up.copy_((up.float() * (alpha / adapter.alpha)).reshape(adapter.lora_up.shape))


def load_lora_into(
    model: nn.Module, path: str | Path, *, name: str = "default", strength: float = 1.0
) -> str:
    """Put the LoRA in `path` (any supported format) into `model` as adapter `name` at `strength`.

    When `model` already carries adapters called `name` (training injected them from the recipe), their
    values are replaced and their structure must match the file; otherwise new adapters are created.
    Returns the detected format.
    """
    from cascade_core.peft.lora import iter_lora_adapters, load_lora_state_dict, set_lora_strength

    native, fmt = native_lora_for(model, path)
    if any(True for _ in iter_lora_adapters(model, name)):
        _copy_into_existing(model, native, name, path)
    else:
        try:
            load_lora_state_dict(model, native, name=name, strength=strength)
        except ValueError as err:
            raise UserError(f"LoRA file {path}: {err}") from None
    set_lora_strength(model, strength, name)
    return fmt
