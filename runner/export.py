"""What a finished run exports (`export_training_result`) and the `runner export` command.

A LoRA run writes `OUTPUT/export/lora_<format>.safetensors` for each `export.lora_formats` entry (plus the
merged weights with `export.merge`); a full run writes its weights in each `export.full_formats` layout.
EMA weights are exported when EMA is on. Every file is read back and compared before it is listed
(runner/export_io.py), and `export/README.txt` says which file loads where and what its check measured.
Heavy imports happen inside the functions so `runner --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from runner.ema import EMA
    from runner.export_io import Written
    from runner.spec import Recipe

__all__ = ["export_training_result", "write_readme", "add_export_arguments", "run_export"]

README = "README.txt"
MERGED_NAME = "stage_c_merged.safetensors"
FULL_NAMES = {"original": "stage_c.safetensors", "diffusers": "prior"}
LORA_FORMATS = ("native", "comfyui", "peft", "official")  # = export_io.LORA_FILE_FORMATS keys


def write_readme(folder: Path, written: list[Written]) -> Path:
    """`README.txt`: each exported file, where it loads, and its read-back check (written atomically)."""
    from runner.export_io import WHERE

    lines = [
        "Files exported by cascade-runner. Each was read back from disk and compared with the trained",
        "weights before it was listed here (LoRA: merged (alpha / rank) * up @ down per target).",
        "",
    ]
    for w in written:
        name = w.path.name + ("/" if w.path.is_dir() else "")
        lines += [name, f"  loads in: {WHERE[w.kind]}", f"  check:    {w.check}", ""]
    path = folder / README
    tmp = folder / (README + ".partial")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


def _live_lora(prior: nn.Module) -> dict[str, Tensor]:
    from cascade_core.peft.lora import lora_state_dict

    return {k: v.detach().cpu() for k, v in lora_state_dict(prior, "default").items()}


def _prior_source(recipe: Recipe) -> tuple[Path, str | None]:
    """The base checkpoint (path, subfolder) the run loaded, as build.py resolves it."""
    from runner.build import resolve_source

    spec = recipe.model.prior
    return resolve_source(spec, "model.prior"), None if spec.filename else (spec.subfolder or None)


def _fingerprint(path: Path, subfolder: str | None) -> str | None:
    from cascade_core.checkpoint_io import CheckpointError, resolve_checkpoint_files
    from runner.export_io import base_fingerprint

    try:
        return base_fingerprint(list(resolve_checkpoint_files(path, subfolder).files))
    except (CheckpointError, OSError):
        return None  # the metadata then simply has no fingerprint; nothing else depends on it


def export_training_result(recipe: Recipe, prior: nn.Module, ema: EMA | None, out_dir: Path) -> list[Path]:
    """Write, verify and list the run's exports under `out_dir/export/` (EMA weights when `ema` is given).

    The output folder is the run's own (guarded by checkpoint.prepare_output_dir), so earlier exports of
    the same run are replaced. Returns the written paths, README.txt last.
    """
    from cascade_core.checkpoint_io import CheckpointError
    from cascade_core.peft.lora import lora_target_shapes
    from cascade_core.stage_c_io import detect_stage_c_checkpoint
    from runner.export_io import (
        EXPORT_DTYPES,
        encode_lora,
        lora_metadata,
        write_full,
        write_lora,
        write_merged,
    )
    from runner.spec import spec_to_dict

    export = recipe.export
    dtype = EXPORT_DTYPES[export.dtype]
    folder = Path(out_dir) / "export"
    folder.mkdir(parents=True, exist_ok=True)
    swapped = ema.swap_into(prior) if ema is not None else contextlib.nullcontext(prior)
    written: list[Written] = []
    if recipe.training.mode == "full":
        with swapped:
            for layout in export.full_formats:
                written.append(write_full(prior, folder / FULL_NAMES[layout], layout, dtype))
        return [*(w.path for w in written), write_readme(folder, written)]

    with swapped:
        native = _live_lora(prior)
    shapes = lora_target_shapes(prior)
    path, subfolder = _prior_source(recipe)
    meta = lora_metadata(
        native,
        flavour=recipe.model.flavour,
        fingerprint=_fingerprint(path, subfolder),
        trigger_words=export.trigger_words,
        recipe=spec_to_dict(recipe),
    )
    for fmt in export.lora_formats:  # every format must be expressible before any file is written
        encode_lora(native, fmt, shapes, dtype, meta)
    for fmt in export.lora_formats:
        written.append(write_lora(folder / f"lora_{fmt}.safetensors", native, fmt, shapes, dtype, meta))
    if export.merge:
        flavour = None if recipe.model.flavour == "tiny" else recipe.model.flavour
        try:
            found = detect_stage_c_checkpoint(path, flavour=flavour, subfolder=subfolder)
        except CheckpointError as err:
            raise UserError(f"export.merge: model.prior ({recipe.model.prior.path}): {err}") from None
        written.append(write_merged(folder / MERGED_NAME, found.state, found.config, native, dtype))
    return [*(w.path for w in written), write_readme(folder, written)]


# ---------------------------------------------------------------- runner export
def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a full fine-tune's checkpoint folder (OUTPUT/checkpoints/step_NNNNNN, sharded FSDP ones too), "
        "or an output folder for its latest checkpoint: writes its weights --to original (one file) or "
        "--to diffusers (a folder); needs no --model or --lora",
    )
    parser.add_argument(
        "--model",
        metavar="SOURCE",
        help="with --lora: the base Stage C: a .safetensors file, a diffusers folder, or a hub id such as "
        "stabilityai/stable-cascade-prior (with --subfolder prior); only its shapes are read "
        "unless --merge",
    )
    parser.add_argument(
        "--subfolder", default=None, help="subfolder of SOURCE holding the prior (prior, prior_lite)"
    )
    parser.add_argument(
        "--lora",
        metavar="FILE[:STRENGTH]",
        help="with --model: a LoRA in any supported format (native, ComfyUI/kohya, PEFT/diffusers, "
        "official); a trailing :STRENGTH scales it (default 1)",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--to",
        choices=[*LORA_FORMATS, *FULL_NAMES],
        help="with --lora: the LoRA format to write; with --checkpoint: the layout of the full weights "
        "(original: one .safetensors file; diffusers: a folder with config.json)",
    )
    what.add_argument(
        "--merge",
        action="store_true",
        help="write base + LoRA merged full weights in the original single-file layout",
    )
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the written tensors"
    )
    parser.add_argument(
        "-o", "--output", required=True, help="the .safetensors file to write (--to diffusers: a folder)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")


def _output(output: str, force: bool, *, folder: bool) -> Path:
    """The path to write: a .safetensors file, or a folder (the diffusers layout); refuses to overwrite."""
    out = Path(output).expanduser()
    if folder and out.suffix == ".safetensors":
        raise UserError(f"-o {out}: the diffusers layout is a folder (config.json + weights); give a "
                        "folder name such as export/prior")
    if not folder and out.suffix != ".safetensors":
        raise UserError(f"-o {out}: give a file name ending in .safetensors")
    if out.exists() and not force:
        raise UserError(f"-o {out} already exists; pass --force to overwrite it, or choose another name")
    if out.is_dir() and not folder:
        raise UserError(f"-o {out} is a folder; give a .safetensors file name")
    return out


def _checkpoint_folder(arg: str) -> Path:
    """A checkpoint folder, or an output folder's latest checkpoint."""
    from runner.checkpoint import CHECKPOINTS, find_latest

    path = Path(arg).expanduser()
    if (path / "meta.json").is_file():
        return path
    latest = find_latest(path) if (path / CHECKPOINTS).is_dir() else None
    if latest is None:
        raise UserError(f"--checkpoint {arg}: not a checkpoint folder (no meta.json) nor an output folder "
                        f"with complete checkpoints; give e.g. {path / CHECKPOINTS / 'step_000500'}")
    return latest


def _export_checkpoint(args: argparse.Namespace) -> int:
    """A full fine-tune's checkpoint (whole or sharded) -> one file in the original or diffusers layout."""
    import yaml

    from cascade_core.checkpoint_io import CheckpointError
    from cascade_core.stage_c_io import load_stage_c
    from runner.checkpoint import read_meta
    from runner.checkpoint_shards import checkpoint_weights
    from runner.export_io import EXPORT_DTYPES, WHERE, write_full

    extra = [flag for flag, given in (("--model", args.model), ("--subfolder", args.subfolder),
                                      ("--lora", args.lora), ("--merge", args.merge)) if given]
    if extra:
        raise UserError(f"--checkpoint exports the checkpoint's own weights; drop {', '.join(extra)} "
                        "(they convert or merge LoRA files)")
    if args.to not in FULL_NAMES:
        raise UserError(f"--to {args.to} is a LoRA format; a full fine-tune's checkpoint exports --to "
                        "original (one .safetensors file) or --to diffusers (a folder)")
    folder = _checkpoint_folder(args.checkpoint)
    out = _output(args.output, args.force, folder=args.to == "diffusers")
    meta = read_meta(folder)
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8")) or {}
    if (recipe.get("training") or {}).get("mode") == "lora":
        raise UserError(f"--checkpoint {folder} is from a LoRA run (training.mode: lora); --checkpoint "
                        "exports full fine-tunes. A LoRA run writes its adapter to "
                        "OUTPUT/export/lora_<format>.safetensors; convert or merge that with --model/--lora")
    try:
        model = load_stage_c(checkpoint_weights(folder))  # architecture from the tensor shapes
    except CheckpointError as err:
        raise UserError(f"--checkpoint {folder}: {err}") from None
    written = write_full(model, out, args.to, EXPORT_DTYPES[args.dtype])
    sharded = meta.get("sharded")
    origin = f", assembled from {sharded['world_size']} FSDP shards" if sharded else ""
    print(f"{out}: step {meta['step']} of {folder}{origin} -> {args.to} ({args.dtype})")
    print(f"  loads in: {WHERE[written.kind]}")
    print(f"  check:    {written.check}")
    return 0


def _carried_metadata(metadata: dict[str, str]) -> tuple[list[str], dict | None]:
    """Trigger words and recipe from an input file's header (ours or modelspec), to keep them on convert."""
    words: list[str] = []
    with contextlib.suppress(ValueError, TypeError):
        words = list(json.loads(metadata.get("cascade_runner.trigger_words", "[]")))
    if not words and metadata.get("modelspec.trigger_phrase"):
        words = [w.strip() for w in metadata["modelspec.trigger_phrase"].split(",") if w.strip()]
    recipe = None
    with contextlib.suppress(ValueError, TypeError):
        recipe = (
            json.loads(metadata["cascade_runner.recipe"]) if "cascade_runner.recipe" in metadata else None
        )
    return words, recipe


def run_export(args: argparse.Namespace) -> int:
    """Convert a LoRA file to another format, merge it into the base weights, or write a full fine-tune's
    checkpoint as one file; verified after writing."""
    from cascade_core.checkpoint_io import CheckpointError, resolve_checkpoint_files
    from cascade_core.models.stage_c import StageC
    from cascade_core.peft.lora import lora_target_shapes
    from cascade_core.stage_c_io import detect_stage_c_checkpoint
    from runner.export_io import (
        EXPORT_DTYPES,
        WHERE,
        base_fingerprint,
        lora_metadata,
        write_lora,
        write_merged,
    )
    from runner.hub import HubError, resolve_model_source
    from runner.lora_files import convert_lora, parse_lora_arg, read_lora_file

    if args.checkpoint is not None:
        return _export_checkpoint(args)
    if args.to in FULL_NAMES:
        raise UserError(f"--to {args.to} writes a full fine-tune's weights: give --checkpoint DIR (to bake a "
                        "LoRA into the base weights use --model/--lora with --merge)")
    missing = [flag for flag, given in (("--model", args.model), ("--lora", args.lora)) if not given]
    if missing:
        raise UserError(f"give {' and '.join(missing)}: converting or merging a LoRA needs the base model "
                        "and the LoRA file; to export a full fine-tune's checkpoint give --checkpoint DIR")
    out = _output(args.output, args.force, folder=False)
    lora_path, strength = parse_lora_arg(args.lora)
    try:
        root = resolve_model_source(args.model, subfolder=args.subfolder)
        found = detect_stage_c_checkpoint(root, subfolder=args.subfolder)
    except (HubError, CheckpointError) as err:
        raise UserError(f"--model {args.model}: {err}") from None
    shapes = lora_target_shapes(StageC(found.config, device="meta"))  # shapes only: no weights read
    tensors, metadata = read_lora_file(lora_path)
    native, fmt_in = convert_lora(tensors, metadata, shapes, lora_path)
    dtype = EXPORT_DTYPES[args.dtype]
    if args.merge:
        written = write_merged(out, found.state, found.config, native, dtype, strength)
        print(f"{out}: {found.flavour} base + {fmt_in} LoRA x {strength:g}, merged ({args.dtype})")
    else:
        if strength != 1.0:  # exact: strength scales the product, so fold it into lora_up
            native = {k: v * strength if k.endswith(".lora_up.weight") else v for k, v in native.items()}
        words, recipe = _carried_metadata(metadata)
        fingerprint = base_fingerprint(list(resolve_checkpoint_files(root, args.subfolder).files))
        meta = lora_metadata(
            native, flavour=found.flavour, fingerprint=fingerprint, trigger_words=words, recipe=recipe
        )
        written = write_lora(out, native, args.to, shapes, dtype, meta)
        print(f"{out}: {fmt_in} -> {args.to} ({args.dtype})")
    print(f"  loads in: {WHERE[written.kind]}")
    print(f"  check:    {written.check}")
    return 0
