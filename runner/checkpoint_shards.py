"""Sharded checkpoints of FSDP2 full fine-tuning, through torch.distributed.checkpoint (DCP).

Each rank writes only its own shards of the trainable weights and the optimizer state; nothing is
gathered (a full gather costs rank 0 ~43 GiB of host memory for stage-c). runner/checkpoint.py owns the
folder layout, the small files and the atomic publish. One save (`save_sharded_checkpoint`):
  1. rank 0 removes stale temp folders and creates `checkpoints/.tmp-step_NNNNNN` (a fixed name, so every
     rank agrees on it); the others wait for it (collective)
  2. every rank writes `sharded/__<rank>_0.distcp` (fsynced); DCP gathers the write results and rank 0
     writes `sharded/.metadata`, so when dcp.save returns every shard is on disk
  3. rank 0 checks that every shard file named in `.metadata` is there (output.dir must be one folder all
     ranks share), writes training_state.pt (every rank's RNG), data_cursor.json, recipe.yaml,
     versions.json and meta.json last, fsyncs, renames to `step_NNNNNN` and moves `latest`
A crash before step 3 ends leaves only the temp folder: never taken as a checkpoint, removed by the next
save. Resume (`load_shards`) reads each rank's shards in place at the same world size; export
(`checkpoint_weights`) assembles the full weights in one process with no process group.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from runner.checkpoint import SHARDED, finish_sharded_save, read_meta, sharded_temp_dir, start_sharded_save
from runner.errors import UserError

if TYPE_CHECKING:
    from runner.distributed import Dist

MODEL, OPTIM = "model", "optim"  # the two entries of the DCP state dict (keys `model.<name>`, `optim.…`)


def save_sharded_checkpoint(output_dir: str | Path, step: int, *, dist: Dist, model_state: dict[str, Any],
                            optimizer_state: dict[str, Any], **small: Any) -> Path | None:
    """Collective: every rank passes its sharded states (`Dist.sharded_state`); `small` are the keyword
    arguments of `finish_sharded_save` except `world_size`. Returns the folder on rank 0, None elsewhere."""
    import torch.distributed.checkpoint as dcp

    tmp = sharded_temp_dir(output_dir, step)
    dist.on_main(start_sharded_save, output_dir, step, small["keep_last"])
    try:
        dcp.save({MODEL: model_state, OPTIM: optimizer_state},
                 storage_writer=dcp.FileSystemWriter(tmp / SHARDED, sync_files=True))
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return dist.on_main(_publish, output_dir, step, tmp, world_size=dist.world_size, **small)


def _publish(output_dir: str | Path, step: int, tmp: Path, **kwargs: Any) -> Path:
    missing = _missing_files(tmp / SHARDED)
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"rank 0 cannot see the shard files {', '.join(missing[:4])} the other ranks wrote "
                        f"under {tmp}: with distributed.strategy fsdp every rank writes its part of each "
                        "checkpoint, so output.dir must be one folder all ranks share (a network file system "
                        "mounted on every node, or run on one node)")
    return finish_sharded_save(output_dir, step, **kwargs)


def _missing_files(folder: Path) -> list[str]:
    import torch.distributed.checkpoint as dcp

    storage = dcp.FileSystemReader(folder).read_metadata().storage_data
    return sorted({info.relative_path for info in storage.values()} - {p.name for p in folder.iterdir()})


def load_shards(folder: str | Path, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
    """Collective: read this rank's shards of a sharded checkpoint into `Dist.sharded_state` dicts, in place.

    Names and shapes are checked first, so a checkpoint of another model says which weights differ."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    reader = dcp.FileSystemReader(folder / SHARDED)
    saved = {name: tuple(md.size) for name, md in _model_entries(reader).items()}
    wanted = {name: tuple(t.shape) for name, t in model_state.items()}  # DTensor: the global shape
    lacking = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    shaped = sorted(n for n in set(wanted) & set(saved) if wanted[n] != saved[n])
    if lacking or extra or shaped:
        raise UserError(f"checkpoint {folder} does not fit this recipe's model (missing {lacking[:3]}, "
                        f"unexpected {extra[:3]}, other shape {shaped[:3]}); resume with the recipe that "
                        "wrote it (its recipe.yaml)")
    try:
        dcp.load({MODEL: model_state, OPTIM: optimizer_state}, storage_reader=reader)
    except dcp.CheckpointException as err:
        raise UserError(f"checkpoint {folder}: reading its shards failed ({err!s:.400}); resume with the "
                        "recipe that wrote it (the same optimizer and its settings)") from None


def _model_entries(reader: Any) -> dict[str, Any]:
    """Parameter name -> TensorStorageMetadata (global size, dtype) of the weights in a DCP folder."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = MODEL + "."
    return {key[len(prefix):]: md for key, md in reader.read_metadata().state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)}


def checkpoint_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The full trainable weights of a checkpoint, on the CPU: its trainable.safetensors, or a sharded
    checkpoint's shards assembled in this one process (no process group; one copy of the weights)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    if SHARDED not in read_meta(folder):
        return load_file(str(folder / "trainable.safetensors"))
    reader = dcp.FileSystemReader(folder / SHARDED)
    state = {name: torch.empty(md.size, dtype=md.properties.dtype)  # the global shape, filled below
             for name, md in _model_entries(reader).items()}
    with warnings.catch_warnings():  # DCP warns that it loads in a single process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({MODEL: state}, storage_reader=reader, no_dist=True)
    return state
