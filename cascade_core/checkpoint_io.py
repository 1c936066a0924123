"""Reading and writing safetensors checkpoints without holding more than about one copy of the weights.

Generic pieces (used by every model loader): `resolve_checkpoint_files` (a file, a diffusers folder,
sharded or not, or a repo root plus subfolder), `SafetensorsStateDict` (lazy, header-checked),
`materialize_module` (fills a meta-built module straight from a state dict, strict, with one report of
missing / unexpected / mis-shaped keys), `CastStateDict` (casts on access) and `write_safetensors`
(streaming, atomic). The model loaders built on them live in `stage_c_io` and `decoder_io`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "ResolvedCheckpoint",
    "SafetensorsStateDict",
    "PrefixedStateDict",
    "read_safetensors_header",
    "read_safetensors_state_dict",
    "resolve_checkpoint_files",
    "shape_of",
    "key_report",
    "materialize_module",
    "CastStateDict",
    "write_safetensors",
]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
WEIGHTS_NAME = "diffusion_pytorch_model"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------
# Locating files


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """The weight files of one model, plus its diffusers config.json when there is one."""

    files: tuple[Path, ...]
    config: dict[str, Any] | None
    origin: str


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}; the file is damaged, re-download it") from None


def _shards_from_index(index: Path) -> tuple[Path, ...]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map'; it is not a safetensors shard index")
    shards = tuple(index.parent / name for name in sorted(set(weight_map.values())))
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(
            f"{index} lists {len(missing)} shard(s) that are not in {index.parent}: {missing[:5]}; "
            "download every shard of the model (or the whole subfolder)"
        )
    return shards


def resolve_checkpoint_files(
    source: str | os.PathLike, subfolder: str | None = None, *, variant: str | None = None
) -> ResolvedCheckpoint:
    """Weight files for `source`: a .safetensors file, a shard index, a diffusers model folder, or a repo
    root with `subfolder` ('prior', 'prior_lite', 'decoder', ...). `variant` picks e.g. the '.bf16' files."""
    path = Path(source).expanduser()
    if subfolder:
        path = path / subfolder
    if not path.exists():
        hint = f" (no subfolder {subfolder!r} in {Path(source)})" if subfolder else ""
        raise CheckpointError(
            f"checkpoint {path} does not exist{hint}; give a .safetensors file or a model folder"
        )
    if path.is_file():
        if path.name.endswith(".safetensors.index.json") or (
            path.name.endswith(".json") and "index" in path.name
        ):
            return ResolvedCheckpoint(_shards_from_index(path), _sibling_config(path), str(path))
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path} is not a .safetensors file; only safetensors checkpoints are read (pickled "
                ".ckpt/.bin "
                "files can run code and are not supported; convert them with safetensors first)"
            )
        config = _sibling_config(path) if path.name.startswith(WEIGHTS_NAME) else None
        return ResolvedCheckpoint((path,), config, str(path))
    suffix = f".{variant}" if variant else ""
    indexes = sorted(path.glob(f"*.safetensors.index{suffix}.json"))
    if len(indexes) == 1:
        return ResolvedCheckpoint(_shards_from_index(indexes[0]), _sibling_config(indexes[0]), str(path))
    preferred = path / f"{WEIGHTS_NAME}{suffix}.safetensors"
    if preferred.is_file():
        return ResolvedCheckpoint((preferred,), _sibling_config(preferred), str(path))
    files = sorted(
        p for p in path.glob("*.safetensors") if not variant or p.name.endswith(f"{suffix}.safetensors")
    )
    if len(files) == 1 and len(indexes) == 0:
        return ResolvedCheckpoint((files[0],), None, str(path))
    subdirs = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = [p.name for p in files] + [p.name for p in indexes]
    raise CheckpointError(
        f"cannot tell which weights to load in folder {path}: found {found or 'no .safetensors files'}"
        + (f" and subfolders {subdirs}" if subdirs else "")
        + "; pass the .safetensors file itself, or the model subfolder (e.g. subfolder='prior')"
        + (", or variant=" if not variant and any(".bf16." in f or ".fp16." in f for f in found) else "")
    )


def _sibling_config(path: Path) -> dict[str, Any] | None:
    config = path.parent / "config.json"
    return _read_json(config) if config.is_file() else None


# ----------------------------------------------------------------------------------------------------
# Reading


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(key -> {'dtype', 'shape', 'data_offsets'}, metadata) after checking the file is complete."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated or empty ({size} bytes); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise CheckpointError(f"{path} is not a safetensors file (header length {n}); check the path")
        if 8 + n > size:
            raise CheckpointError(
                f"{path} is truncated: its header needs {8 + n} bytes, the file has {size}; re-download it"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(
                f"{path} is not a safetensors file (unreadable header); check the path"
            ) from None
    metadata = header.pop("__metadata__", None) or {}
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size} "
            f"({size * 100 // (8 + n + end)}% present); the download was interrupted, re-download it"
        )
    unknown = sorted({info["dtype"] for info in header.values()} - set(_DTYPES))
    if unknown:
        raise CheckpointError(f"{path} uses tensor dtypes this loader does not know: {unknown}")
    return header, metadata


class SafetensorsStateDict(Mapping[str, Tensor]):
    """A read-only state dict over one or more safetensors files: headers are read (and checked for
    truncation) up front, each tensor is read from the memory-mapped file only when accessed."""

    def __init__(self, files: Sequence[str | os.PathLike]) -> None:
        self.files = tuple(Path(f) for f in files)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.metadata: dict[str, str] = {}
        self._where: dict[str, int] = {}
        self._handles: dict[int, Any] = {}
        for i, f in enumerate(self.files):
            header, metadata = read_safetensors_header(f)
            self.metadata = self.metadata or metadata
            for key, info in header.items():
                if key in self._where:
                    raise CheckpointError(
                        f"tensor {key!r} appears in both {self.files[self._where[key]]} and {f}"
                    )
                self._where[key] = i
                self.shapes[key] = tuple(info["shape"])
                self.dtypes[key] = _DTYPES[info["dtype"]]

    def __getitem__(self, key: str) -> Tensor:
        i = self._where[key]
        if i not in self._handles:
            self._handles[i] = safe_open(str(self.files[i]), framework="pt", device="cpu")
        return self._handles[i].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]


def read_safetensors_state_dict(
    path: str | os.PathLike | Sequence[str | os.PathLike],
) -> SafetensorsStateDict:
    """A lazy state dict for one file or a list of shards (see SafetensorsStateDict)."""
    files = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return SafetensorsStateDict(files)


class PrefixedStateDict(Mapping[str, Tensor]):
    """The keys of `source` under `prefix`, with the prefix removed (other keys are hidden)."""

    def __init__(self, source: Mapping[str, Tensor], prefix: str) -> None:
        self._source, self._prefix = source, prefix
        self._keys = [k[len(prefix) :] for k in source if k.startswith(prefix)]

    def __getitem__(self, key: str) -> Tensor:
        return self._source[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape_of(self, key: str) -> tuple[int, ...]:
        return shape_of(self._source, self._prefix + key)


def shape_of(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    """A tensor's shape, from the headers when the mapping knows shapes (lazy dicts), else the tensor."""
    getter = getattr(state, "shape_of", None)
    return tuple(getter(key)) if getter is not None else tuple(state[key].shape)


# ----------------------------------------------------------------------------------------------------
# Filling a module


def key_report(
    missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str], limit: int = 5
) -> str:
    """'missing 3 keys: a, b, c, ...' lines, the first `limit` of each kind plus the counts."""
    lines = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
        if items:
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"  {label} {len(items)} key(s): {', '.join(items[:limit])}{more}")
    return "\n".join(lines)


def materialize_module(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    context: str = "",
) -> nn.Module:
    """Fill `module` (built on the meta device, or already real) from `state_dict`, tensor by tensor.

    Each tensor is read, cast and moved once and then owned by the module, so peak host memory stays
    about one copy of the weights (plus one tensor). Floating tensors become `dtype` when given, else
    keep the checkpoint's dtype; integer buffers (BatchNorm counters) keep theirs. `strict=False` ignores
    unexpected keys; missing keys are an error while their tensor is still on meta. `context` (the
    source and detected format) is put into the CheckpointError message."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    expected = module.state_dict(keep_vars=True)
    provided = set(state_dict.keys())
    missing = [k for k in expected if k not in provided and (strict or expected[k].is_meta)]
    unexpected = [k for k in state_dict if k not in expected] if strict else []
    mismatched = [
        f"{k} (checkpoint {list(shape_of(state_dict, k))}, model {list(expected[k].shape)})"
        for k in expected
        if k in provided and shape_of(state_dict, k) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"checkpoint does not fit {type(module).__name__}{' (' + context + ')' if context else ''}:\n"
            + key_report(missing, unexpected, mismatched)
            + "\n  fix: check that the file is the model you meant (flavour, Stage B vs Stage C) "
            "and is complete"
        )
    for name, old in expected.items():
        if name not in provided:
            continue
        tensor = state_dict[name]
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        tensor = tensor.to(device=device, dtype=target)
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            owner._buffers[leaf] = tensor
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left and device.type != "meta":
        raise CheckpointError(
            f"{type(module).__name__} still has tensors on the meta device after loading: {left[:5]}; "
            "they are not saved in checkpoints (non-persistent buffers) and must be created by the model"
        )
    return module


# ----------------------------------------------------------------------------------------------------
# Writing


class CastStateDict(Mapping[str, Tensor]):
    """A read-only view of `source` whose floating tensors are cast to `dtype` on access.

    Savers wrap a state dict in it so that writing in another dtype (e.g. bf16) converts one tensor at a
    time and never holds a converted full copy of the weights; integer buffers keep their dtype."""

    def __init__(self, source: Mapping[str, Tensor], dtype: torch.dtype) -> None:
        self._source, self._dtype = source, dtype

    def __getitem__(self, key: str) -> Tensor:
        tensor = self._source[key]
        return tensor.to(self._dtype) if tensor.is_floating_point() else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Stream `tensors` into a safetensors file one tensor at a time (no full in-memory copy), writing to
    a temporary name first so an interrupted save never leaves a truncated file behind."""
    path = Path(path)
    header: dict[str, Any] = {}
    offset = 0
    for key in tensors:
        tensor = tensors[key]
        if tensor.dtype not in _CODES:
            raise CheckpointError(f"cannot save tensor {key!r} of dtype {tensor.dtype} to safetensors")
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in header:
            if key == "__metadata__":
                continue
            tensor = tensors[key].detach().to("cpu").contiguous()
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
