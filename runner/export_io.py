"""Writing exports users load elsewhere (LoRA files in every format, merged and full weights), each checked.

Every file is written under a staging name, read back from disk through a different path than the one
that wrote it (LoRA: `read_lora_file` -> format detection -> `convert_to_native`, compared as merged
deltas (alpha / r) * up @ down per target; weights: header-only architecture detection plus a tensor by
tensor comparison) and only then moved to its final name. A failed check raises `ExportCheckError` and
leaves no file behind. `runner/export.py` decides what a run or `runner export` writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from runner.errors import UserError

__all__ = [
    "LORA_FILE_FORMATS",
    "EXPORT_DTYPES",
    "WHERE",
    "ExportCheckError",
    "Written",
    "encode_lora",
    "write_lora",
    "write_merged",
    "write_full",
    "lora_deltas",
    "compare_lora",
    "lora_metadata",
    "base_fingerprint",
]

# export names (recipe / CLI) -> cascade_core.peft.formats names
LORA_FILE_FORMATS = {"native": "native", "comfyui": "kohya", "peft": "peft", "official": "official"}
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMAT_VERSION = "1"
# max |written - live| / max(|scale| * |up| @ |down|): fp32 conversions are exact up to rounding of one
# multiply; bf16 rounds each factor to 8 mantissa bits (relative 2^-9), so a product is within ~2^-7.
LORA_BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
WHERE = {
    "native": "cascade-runner: `runner sample --lora FILE`, training.lora.init_weights, `runner export`",
    "comfyui": "ComfyUI (LoraLoaderModelOnly / Load LoRA on the Stage C model), kohya sd-scripts "
    "(stable-cascade branch, networks.lora), cascade-runner",
    "peft": "PEFT: inject_adapter_in_model + set_peft_model_state_dict on diffusers' StableCascadeUNet "
    "(strip the `prior.` prefix; alpha is in the header `lora_adapter_metadata`). diffusers 0.42 has no "
    "load_lora_weights for Stable Cascade. Also OneTrainer/SimpleTuner-style tools and cascade-runner",
    "official": "Stability-AI/StableCascade (modules/lora.py, train_c_lora config with module_filters "
    "['.attn'] and the same rank): its `weights.<i>` LoRA state dict, scale 1/rank; cascade-runner. "
    "Not ComfyUI",
    "merged": "any Stage C single-file loader: ComfyUI (UNETLoader), Stability's code, cascade-runner "
    "(model.prior.path)",
    "original": "any Stage C single-file loader: ComfyUI (UNETLoader), Stability's code, cascade-runner",
    "diffusers": "diffusers StableCascadeUNet.from_pretrained(EXPORT_DIR, subfolder='prior'), cascade-runner",
}


class ExportCheckError(RuntimeError):
    """A written file did not read back equal to what was exported (a bug, never the user's input)."""


@dataclass(frozen=True)
class Written:
    """One exported file and what its read-back check measured."""

    path: Path
    kind: str
    check: str


# ---------------------------------------------------------------- shared helpers
def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """Export dtype for factors and weights; 0-d scalars (alpha) stay float32 as every loader expects."""
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dim() > 0 else tensor


def lora_deltas(native: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """target -> ((alpha / r) * up @ down, |alpha / r| * |up| @ |down|) in float32, both [out, in]."""
    from cascade_core.peft.native import split_native

    out = {}
    for target, (down, up, alpha) in split_native(native).items():
        d, u, s = down.flatten(1).float(), up.flatten(1).float(), alpha / down.shape[0]
        out[target] = (s * (u @ d), abs(s) * (u.abs() @ d.abs()))
    return out


def compare_lora(
    live: Mapping[str, Tensor], back: Mapping[str, Tensor], dtype: torch.dtype, what: str
) -> str:
    """Compare merged deltas target by target; raise ExportCheckError above the dtype's bound."""
    ref, got = lora_deltas(live), lora_deltas(back)
    if set(ref) != set(got):
        raise ExportCheckError(f"{what}: read back targets differ: {sorted(set(ref) ^ set(got))[:5]}")
    worst_abs, worst_rel, worst = 0.0, 0.0, ""
    for target, (delta, size) in ref.items():
        diff = (got[target][0] - delta).abs().max().item()
        rel = diff / max(size.max().item(), 1e-30)
        worst_abs = max(worst_abs, diff)
        if rel >= worst_rel:
            worst_rel, worst = rel, target
    bound = LORA_BOUNDS[dtype]
    if worst_rel > bound:
        raise ExportCheckError(
            f"{what}: read back merged weights differ by {worst_rel:.3g} (relative, at {worst}) > {bound}"
        )
    return f"{len(ref)} targets, max |delta W| {worst_abs:.3g}, relative {worst_rel:.3g} (bound {bound})"


def _staged(final: Path) -> Path:
    """A staging path beside `final` (same file system, so the last step is an atomic rename)."""
    staging = final.parent / ".export_partial"
    staging.mkdir(parents=True, exist_ok=True)
    return staging / final.name


def _publish(staged: Path, final: Path) -> None:
    """Move a verified file or folder to its final name (replacing an earlier export of the same name)."""
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(staged, final)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()


def _discard(staged: Path) -> None:
    if staged.is_dir():
        shutil.rmtree(staged, ignore_errors=True)
    else:
        staged.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()


def base_fingerprint(files: list[Path]) -> str:
    """A cheap identity of the base weights: sha256 over names, sizes, headers and the first and last MiB of
    each file (no full read of a 7 GB checkpoint)."""
    h = hashlib.sha256()
    mib = 1 << 20
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(mib))
            fh.seek(max(size - mib, 0))
            h.update(fh.read(mib))
    return "sha256-head-tail:" + h.hexdigest()


def lora_metadata(
    native: Mapping[str, Tensor],
    *,
    flavour: str,
    fingerprint: str | None,
    trigger_words: tuple[str, ...] | list[str] = (),
    recipe: dict | None = None,
) -> dict[str, str]:
    """Header metadata of our native file: rank, alpha, targets, base, trigger words, recipe."""
    from cascade_core.peft.native import split_native

    entries = split_native(native)
    ranks = sorted({int(d.shape[0]) for d, _, _ in entries.values()})
    alphas = sorted({float(a) for _, _, a in entries.values()})
    meta = {
        "format": "pt",
        "cascade_runner.format": "native-lora",
        "cascade_runner.format_version": FORMAT_VERSION,
        "cascade_runner.rank": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "cascade_runner.alpha": str(alphas[0]) if len(alphas) == 1 else json.dumps(alphas),
        "cascade_runner.targets": json.dumps(list(entries)),
        "cascade_runner.base_flavour": flavour,
        "cascade_runner.trigger_words": json.dumps(list(trigger_words)),
        "modelspec.architecture": "stable-cascade/lora",
    }
    if fingerprint:
        meta["cascade_runner.base_fingerprint"] = fingerprint
    if trigger_words:
        meta["modelspec.trigger_phrase"] = ", ".join(trigger_words)
    if recipe is not None:
        meta["cascade_runner.recipe"] = json.dumps(recipe)
    return meta


# ---------------------------------------------------------------- LoRA files
def encode_lora(
    native: Mapping[str, Tensor], fmt: str, shapes: Mapping, dtype: torch.dtype, metadata: Mapping[str, str]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Native tensors -> (tensors, header) of export format `fmt`; raises UserError when not expressible."""
    from cascade_core.peft.formats import convert_from_native

    try:
        tensors, header = convert_from_native(dict(native), LORA_FILE_FORMATS[fmt], shapes)
    except ValueError as err:
        raise UserError(f"LoRA export format {fmt!r}: {err}") from None
    keep = {k: v for k, v in metadata.items() if fmt == "native" or not k.startswith("cascade_runner.recipe")}
    return {k: _cast(v, dtype) for k, v in tensors.items()}, {**keep, **header}


def write_lora(
    path: Path,
    native: Mapping[str, Tensor],
    fmt: str,
    shapes: Mapping,
    dtype: torch.dtype,
    metadata: Mapping[str, str],
) -> Written:
    """Write one LoRA file, read it back from disk as a user's loader would, compare, then publish."""
    from cascade_core.checkpoint_io import write_safetensors
    from cascade_core.peft.formats import convert_to_native, detect_lora_format
    from runner.lora_files import read_lora_file

    tensors, header = encode_lora(native, fmt, shapes, dtype, metadata)
    staged = _staged(path)
    try:
        write_safetensors(staged, tensors, header)
        back, back_meta = read_lora_file(staged)
        detected = detect_lora_format(back, back_meta)
        if detected != LORA_FILE_FORMATS[fmt]:
            raise ExportCheckError(f"{path.name}: written as {fmt} but reads back as {detected}")
        check = compare_lora(native, convert_to_native(back, back_meta, shapes, detected), dtype, path.name)
    except BaseException:
        _discard(staged)
        raise
    _publish(staged, path)
    return Written(path, fmt, check)


# ---------------------------------------------------------------- full weights
def _target_key(target: str) -> str:
    """LoRA target -> its base weight's key in the original layout."""
    return target + "_weight" if target.endswith(".in_proj") else target + ".weight"


class MergedStateDict(Mapping[str, Tensor]):
    """Base weights (original layout, lazy) plus LoRA deltas, cast to `dtype` (None: float32 sums, base
    dtype elsewhere) on access: one tensor at a time in memory, so merging into a 3.6B checkpoint never
    holds a second copy."""

    def __init__(
        self, base: Mapping[str, Tensor], deltas: Mapping[str, Tensor], dtype: torch.dtype | None
    ) -> None:
        self._base, self._deltas, self._dtype = base, deltas, dtype

    def __getitem__(self, key: str) -> Tensor:
        tensor = self._base[key]
        if key in self._deltas:
            tensor = tensor.float() + self._deltas[key].reshape(tensor.shape)
        return _cast(tensor, self._dtype) if self._dtype is not None else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)

    def shape_of(self, key: str) -> tuple[int, ...]:
        from cascade_core.checkpoint_io import shape_of

        return shape_of(self._base, key)


def _check_weights(
    path: Path, expected: Mapping[str, Tensor], config, dtype: torch.dtype, rel_tol: float
) -> str:
    """Re-detect the written checkpoint from its header, check architecture, keys and shapes, then compare
    every tensor with what should have been written (relative to the tensor's largest magnitude)."""
    from cascade_core.checkpoint_io import key_report, shape_of
    from cascade_core.stage_c_io import detect_stage_c_checkpoint

    found = detect_stage_c_checkpoint(path)
    if found.config != config:
        raise ExportCheckError(f"{path.name}: reads back as another architecture ({found.flavour})")
    have, want_keys = set(found.state.keys()), set(expected.keys())  # sets: `in` on a lazy dict reads tensors
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in found.state if k not in want_keys]
    mismatched = [k for k in expected if k in have and shape_of(found.state, k) != shape_of(expected, k)]
    if missing or unexpected or mismatched:
        raise ExportCheckError(
            f"{path.name} reads back wrong:\n" + key_report(missing, unexpected, mismatched)
        )
    worst_abs, worst_rel, where = 0.0, 0.0, ""
    for key in expected:
        got, want = found.state[key], expected[key].detach().cpu()
        want_dtype = dtype if want.is_floating_point() and want.dim() else want.dtype
        if got.dtype != want_dtype:
            raise ExportCheckError(f"{path.name}: {key} reads back as {got.dtype}, expected {want_dtype}")
        if not want.is_floating_point():
            if not torch.equal(got, want):
                raise ExportCheckError(f"{path.name}: integer tensor {key} reads back changed")
            continue
        diff = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
        rel = diff / max(want.float().abs().max().item(), 1e-30) if want.numel() else 0.0
        worst_abs = max(worst_abs, diff)
        if rel >= worst_rel:
            worst_rel, where = rel, key
    if worst_rel > rel_tol:
        raise ExportCheckError(
            f"{path.name}: tensor {where} reads back off by {worst_rel:.3g} relative (> {rel_tol})"
        )
    return (
        f"{len(expected)} tensors, architecture/keys/shapes match, max |delta| {worst_abs:.3g}, "
        f"relative {worst_rel:.3g}"
    )


def write_full(model: nn.Module, path: Path, layout: str, dtype: torch.dtype) -> Written:
    """The model's weights in `layout` ('original' file or 'diffusers' folder), verified against the live
    weights (a diffusers folder is read back through the diffusers -> original conversion)."""
    from cascade_core.stage_c_io import save_stage_c, stage_c_state_dict

    expected = MergedStateDict(stage_c_state_dict(model, "original"), {}, dtype)  # cast lazily
    staged = _staged(path)
    try:
        save_stage_c(model, staged, layout, dtype=dtype)
        check = _check_weights(staged, expected, model.config, dtype, 0.0)
    except BaseException:
        _discard(staged)
        raise
    _publish(staged, path)
    return Written(path, layout, check)


def write_merged(
    path: Path,
    base_state: Mapping[str, Tensor],
    config,
    native: Mapping[str, Tensor],
    dtype: torch.dtype,
    strength: float = 1.0,
) -> Written:
    """Base (original layout, e.g. `detect_stage_c_checkpoint(...).state`) + strength * LoRA, streamed to
    an original-layout file, then every tensor re-read and compared with base + delta."""
    from cascade_core.checkpoint_io import write_safetensors

    deltas = {_target_key(t): strength * d for t, (d, _) in lora_deltas(native).items()}
    unknown = sorted(set(deltas) - set(base_state.keys()))
    if unknown:
        raise UserError(
            f"the LoRA targets weights the base checkpoint lacks: {unknown[:3]}; merge it into "
            "the base model it was trained for"
        )
    merged = MergedStateDict(base_state, deltas, dtype)
    staged = _staged(path)
    try:
        write_safetensors(staged, merged, {"format": "pt", "cascade_runner.merged_lora": "1"})
        # fp32 holds exactly the float32 sums; bf16 rounds each value once (relative 2^-9 of its magnitude)
        rel_tol = 1e-6 if dtype == torch.float32 else 2.0**-8
        check = _check_weights(staged, MergedStateDict(base_state, deltas, None), config, dtype, rel_tol)
    except BaseException:
        _discard(staged)
        raise
    _publish(staged, path)
    return Written(path, "merged", check)
