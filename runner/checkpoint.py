"""Training-state checkpoints with atomic writes and exact resume, and the output-folder guard.

Layout of one checkpoint, `OUTPUT/checkpoints/step_NNNNNN/`:
  trainable.safetensors   the trainable weights (LoRA or full), name -> tensor
  ema.safetensors         the EMA shadow weights (when EMA is on)
  optimizer.pt            optimizer.state_dict()
  training_state.pt       scheduler, EMA counters, loss-weight state, per-rank RNG states
  data_cursor.json        where the data stream stands (owned by the loader)
  recipe.yaml             the resolved recipe text
  versions.json           python, platform and package versions
  meta.json               step and file list; written last
A checkpoint is written into a hidden temp folder, every file and the folder fsynced, then renamed into
place; `checkpoints/latest` (the folder name) is replaced atomically after that. A crash at any point
leaves the previous checkpoint as the latest and no partial folder under a `step_*` name.
All .pt files load with `weights_only=True`, so a checkpoint cannot run code when loaded.

Sharded checkpoints (full fine-tuning with distributed.strategy fsdp; runner/checkpoint_shards.py) hold
no trainable.safetensors, optimizer.pt or ema.safetensors (EMA is refused with FSDP). Instead:
  sharded/                one torch.distributed.checkpoint (DCP) folder: `.metadata` plus one
                          `__<rank>_0.distcp` per rank with that rank's shards of {"model": trainable
                          weights, "optim": optimizer state}, keyed by parameter name (DCP keys
                          `model.<name>`, `optim.state.<name>.<state>`)
  meta.json               format 2 and "sharded": {"strategy": "fsdp", "world_size": N, "files": [...]}
Every rank writes its own shard file into the same temp folder `.tmp-step_NNNNNN` (no pid: all ranks
must agree on it); rank 0 writes the small files and publishes exactly as above, after every rank's
shard is on disk. Format 1 (unsharded) is read exactly as before; a cascade-runner that predates sharding
refuses format 2 with its "checkpoint format" message instead of failing on a missing file.
"""
from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from runner.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
FORMAT_VERSION = 1  # one folder of whole tensors (single process, DDP)
SHARDED_FORMAT_VERSION = 2  # the same plus sharded/ instead of trainable/optimizer files (FSDP2)
SHARDED = "sharded"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_PACKAGES = ("cascade-runner", "torch", "torchvision", "numpy", "safetensors", "transformers", "webdataset",
             "huggingface_hub", "pillow", "bitsandbytes", "torchao", "tensorboard", "wandb")


@dataclass(frozen=True)
class Checkpoint:
    """Everything a resumed run needs, loaded on `map_location`."""

    path: Path
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    ema: dict[str, Any] | None
    loss_weight: dict[str, Any] | None
    data_cursor: dict[str, Any]
    rng_states: list[dict[str, Any]]
    recipe_text: str
    versions: dict[str, str]
    sharded: dict[str, Any] | None = None  # meta.json's "sharded" (strategy, world_size); weights in sharded/


# ---- RNG ----

def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (global), torch CPU and every CUDA device's generator, as weights_only-safe types."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put the generators back; call it last when resuming, after anything that draws random numbers."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = np.asarray(n["keys"], dtype=np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) != torch.cuda.device_count():
            raise UserError(f"the checkpoint holds CUDA RNG states for {len(saved)} devices but "
                            f"{torch.cuda.device_count()} are visible; resume with the same "
                            "CUDA_VISIBLE_DEVICES")
        torch.cuda.set_rng_state_all([t.cpu() for t in saved])


def package_versions() -> dict[str, str]:
    """Versions that matter for reproducing a run; packages that are not installed are left out."""
    out = {"python": platform.python_version(), "platform": platform.platform(),
           "torch_cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version())}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


# ---- durable file writes ----

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_torch(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], step: int) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(path), metadata={"step": str(step), "format": "cascade-runner"})
    _fsync_path(path)


def _replace_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    _write_text(tmp, text)
    os.replace(tmp, path)
    _fsync_path(path.parent)


# ---- save ----

def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:06d}"


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders under `root` (those with meta.json), oldest step first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "meta.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _check_keep_last(keep_last: int | None) -> None:
    if keep_last is not None and keep_last < 1:
        raise UserError(f"checkpoints.keep_last must be >= 1 (got {keep_last})")


def _checkpoints_root(output_dir: str | Path) -> Path:
    """`OUTPUT/checkpoints`, created, with temp folders of saves killed midway removed."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    return root


def save_checkpoint(output_dir: str | Path, step: int, *, trainable: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], scheduler_state: dict[str, Any],
                    data_cursor: dict[str, Any], recipe_text: str, ema_state: dict[str, Any] | None = None,
                    loss_weight_state: dict[str, Any] | None = None, keep_last: int | None = None,
                    rng_states: list[dict[str, Any]] | None = None) -> Path:
    """Write the checkpoint of optimizer step `step` atomically, point `latest` at it, prune old ones.

    `ema_state` is `EMA.state_dict()` (its "shadow" goes to ema.safetensors). `rng_states` is one
    `capture_rng_state()` per rank (default: this process only). `keep_last` keeps the newest N by
    step and never deletes the folder just written. Returns that folder.
    """
    _check_keep_last(keep_last)
    cursor_text = _cursor_text(data_cursor)
    root = _checkpoints_root(output_dir)
    final = checkpoint_dir(output_dir, step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    ema_meta = None
    try:
        _write_safetensors(tmp / "trainable.safetensors", trainable, step)
        if ema_state is not None:
            _write_safetensors(tmp / "ema.safetensors", ema_state["shadow"], step)
            ema_meta = {k: v for k, v in ema_state.items() if k != "shadow"}
        _write_torch(tmp / "optimizer.pt", optimizer_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(tmp, final, step, {"format": FORMAT_VERSION}, keep_last, state={
        "step": step, "scheduler": scheduler_state, "ema": ema_meta, "loss_weight": loss_weight_state,
        "rng": rng_states if rng_states is not None else [capture_rng_state()],
    }, cursor_text=cursor_text, recipe_text=recipe_text)


def sharded_temp_dir(output_dir: str | Path, step: int) -> Path:
    """The temp folder every rank of a sharded save writes into: a fixed name, so all ranks agree on it."""
    return Path(output_dir) / CHECKPOINTS / f"{_TMP_PREFIX}{checkpoint_dir(output_dir, step).name}"


def start_sharded_save(output_dir: str | Path, step: int, keep_last: int | None) -> Path:
    """Rank 0, before any rank writes: clear stale temp folders and create the shared temp folder."""
    _check_keep_last(keep_last)
    _checkpoints_root(output_dir)
    tmp = sharded_temp_dir(output_dir, step)
    tmp.mkdir()
    return tmp


def finish_sharded_save(output_dir: str | Path, step: int, *, world_size: int,
                        scheduler_state: dict[str, Any], data_cursor: dict[str, Any], recipe_text: str,
                        loss_weight_state: dict[str, Any] | None, keep_last: int | None,
                        rng_states: list[dict[str, Any]]) -> Path:
    """Rank 0, after every rank wrote its shards into `sharded_temp_dir/sharded/`: write the small files
    and meta.json, then publish as `save_checkpoint` does. Returns the checkpoint folder."""
    tmp = sharded_temp_dir(output_dir, step)
    try:
        shard_files = sorted(p.name for p in (tmp / SHARDED).iterdir())
        _fsync_path(tmp / SHARDED)  # the file names; DCP fsynced each file's contents (sync_files)
        cursor_text = _cursor_text(data_cursor)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = {"format": SHARDED_FORMAT_VERSION,
            SHARDED: {"strategy": "fsdp", "world_size": world_size, "files": shard_files}}
    return _finish(tmp, checkpoint_dir(output_dir, step), step, meta, keep_last, state={
        "step": step, "scheduler": scheduler_state, "ema": None, "loss_weight": loss_weight_state,
        "rng": rng_states,
    }, cursor_text=cursor_text, recipe_text=recipe_text)


def _cursor_text(data_cursor: dict[str, Any]) -> str:
    try:
        return json.dumps(data_cursor, indent=2, sort_keys=True) + "\n"
    except TypeError as exc:
        raise TypeError(f"the data cursor must be JSON-serialisable: {exc}") from exc


def _finish(tmp: Path, final: Path, step: int, meta: dict[str, Any], keep_last: int | None, *,
            state: dict[str, Any], cursor_text: str, recipe_text: str) -> Path:
    """Write the small files and meta.json (last) into `tmp`, rename it to `final`, move `latest`, prune."""
    try:
        _write_torch(tmp / "training_state.pt", state)
        _write_text(tmp / "data_cursor.json", cursor_text)
        _write_text(tmp / "recipe.yaml", recipe_text)
        _write_json(tmp / "versions.json", package_versions())
        files = sorted(p.name for p in tmp.iterdir())
        _write_json(tmp / "meta.json", {**meta, "step": step, "files": files,
                                        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        _fsync_path(tmp)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    root = final.parent
    _replace_text_atomically(root / LATEST, final.name + "\n")
    if keep_last is not None:
        older = [path for _, path in _step_dirs(root) if path != final]
        for path in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(path)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (the same step saved again) is swapped out first."""
    old = None
    if final.exists():
        old = final.with_name(f"{_OLD_PREFIX}{final.name}-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old)


# ---- find and load ----

def find_latest(output_dir: str | Path) -> Path | None:
    """The checkpoint named by `checkpoints/latest`, else the complete one of highest step, else None."""
    root = Path(output_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if _STEP_DIR.match(named.name) and (named / "meta.json").is_file():
            return named
    found = _step_dirs(root)
    return found[-1][1] if found else None


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """Map `checkpoints.resume` to a checkpoint folder, or None for a fresh start.

    `latest` with no checkpoint yet starts fresh, so one command serves the first start and every
    restart of a pre-emptible job.
    """
    if resume is None:
        return None
    if resume == LATEST:
        return find_latest(output_dir)
    path = Path(resume).expanduser()
    if (path / "meta.json").is_file():
        return path
    hint = ("it is an output folder; use `checkpoints.resume: latest` with `output.dir` set to it"
            if (path / CHECKPOINTS).is_dir() else
            f"give `latest` or a folder like {checkpoint_dir(output_dir, 500)}")
    raise UserError(f"checkpoints.resume: {resume!r} is not a checkpoint folder (no meta.json); {hint}")


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint folder, checked for a format this version reads."""
    folder = Path(path)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{folder} is not a complete checkpoint (no meta.json); resume from another "
                        f"one under {folder.parent}, or `latest`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") not in (FORMAT_VERSION, SHARDED_FORMAT_VERSION):
        raise UserError(f"{folder} has checkpoint format {meta.get('format')!r}; this cascade-runner reads "
                        f"formats {FORMAT_VERSION} and {SHARDED_FORMAT_VERSION}: resume with the version "
                        "that wrote it")
    sharded = meta.get(SHARDED)
    if sharded is not None:
        missing = [name for name in sharded["files"] if not (folder / SHARDED / name).is_file()]
        if missing:
            raise UserError(f"{folder} is incomplete: {SHARDED}/ lacks {', '.join(missing[:4])} (of "
                            f"{len(sharded['files'])} files written by {sharded['world_size']} ranks); copy "
                            "the whole checkpoint folder, or resume from another one")
    return meta


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu", restore_rng: bool = True,
                    rank: int = 0) -> Checkpoint:
    """Read a checkpoint folder; with `restore_rng`, also put this rank's RNG states back.

    Load the optimizer/scheduler/EMA states from the result into freshly built objects; restore RNG
    only after everything random (model init, LoRA init) has been built. Weights and optimizer state
    land on `map_location`; the loss-weight state stays on the CPU (its owner copies it in). A sharded
    checkpoint comes back with empty `trainable` and `optimizer` and its `sharded` info: each rank then
    reads its own shards (runner/checkpoint_shards.py).
    """
    folder = Path(path)
    meta = read_meta(folder)
    sharded = meta.get(SHARDED)
    device = str(map_location)
    # On the CPU whatever map_location says: RNG states must be CPU ByteTensors.
    state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    ema = None
    if state["ema"] is not None:
        ema = dict(state["ema"], shadow=load_file(str(folder / "ema.safetensors"), device=device))
    rng = state["rng"]
    if restore_rng:
        if rank >= len(rng):
            raise UserError(f"{folder} holds RNG states for {len(rng)} rank(s), not rank {rank}; resume "
                            "with the same number of processes")
        restore_rng_state(rng[rank])
    trainable, optimizer = {}, {}
    if sharded is None:
        trainable = load_file(str(folder / "trainable.safetensors"), device=device)
        optimizer = torch.load(folder / "optimizer.pt", map_location=map_location, weights_only=True)
    return Checkpoint(
        path=folder, step=int(meta["step"]), trainable=trainable, optimizer=optimizer,
        scheduler=state["scheduler"], ema=ema, loss_weight=state["loss_weight"],
        data_cursor=json.loads((folder / "data_cursor.json").read_text(encoding="utf-8")),
        rng_states=rng, recipe_text=(folder / "recipe.yaml").read_text(encoding="utf-8"),
        versions=json.loads((folder / "versions.json").read_text(encoding="utf-8")), sharded=sharded,
    )


# ---- the output folder ----

def prepare_output_dir(output_dir: str | Path, *, resuming: bool, overwrite: bool) -> Path:
    """Create the output folder, refusing to start a fresh run over a previous one.

    A non-empty folder needs `checkpoints.resume` (continue) or `output.overwrite: true` (start over:
    its checkpoints are deleted so they can never be resumed by mistake; other files are left).
    """
    out = Path(output_dir)
    if resuming and overwrite:
        raise UserError(f"both checkpoints.resume and output.overwrite are set for {out}; overwrite would "
                        "delete the checkpoints to resume from: choose one")
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir {out} exists and is not a folder; choose another output.dir")
    if out.is_dir() and any(out.iterdir()) and not resuming:
        if not overwrite:
            raise UserError(f"output.dir {out} is not empty (a previous run?); set "
                            "`checkpoints.resume: latest` to continue it, or `output.overwrite: true` to "
                            "start over (deletes its checkpoints), or choose a new output.dir")
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out
