"""torchrun / DDP / FSDP2 for the training loop: one `Dist` object hides whether the run has 1 or N ranks.

`torchrun --nproc_per_node N -m runner RECIPE` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; a plain `runner RECIPE` sets none of them and gets a single-process `Dist` whose methods
are no-ops, so train.py has one code path and a single process behaves exactly as before.

Choices written down here because they shape the checkpoints:
- LoRA (and full fine-tuning with strategy ddp) uses DistributedDataParallel. Only parameters with
  requires_grad get gradient hooks, so LoRA reduces adapter gradients only. Buffers are synced once
  at init, not before every forward (`broadcast_buffers=False`, a keyword every torch >= 2.11 has):
  they are frozen constants.
- Full fine-tuning with strategy fsdp uses FSDP2 (`fully_shard` on every UNet block, then the root).
  Its checkpoints are sharded (runner/checkpoint_shards.py): every rank writes its own shards of the
  weights and the optimizer state with torch.distributed.checkpoint, so no rank ever holds the full
  state (a gather would cost rank 0 ~3x the fp32 weights: ~43 GiB for stage-c). They resume only under
  FSDP at the same world size; `runner export --checkpoint` assembles one file from them offline.
  Unsharded FSDP checkpoints of earlier versions still resume (the full state is sharded on load).
  Validation and the end-of-training export still gather an unsharded copy on rank 0 (`plain_prior`).
- Each rank draws its own noise: rank 0 continues the single-process RNG stream, rank r > 0 is reseeded
  from (seed, r) after the model is built, and every rank's RNG state is saved. Resuming therefore needs
  the same world size; a different one is refused with a clear message.
- A rank that dies: torchrun stops the others and prints which rank failed; when a collective fails
  first (another node died, or a rank stalled past `distributed.timeout_s`), `RankLostError` says so.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from runner.errors import UserError
from runner.spec import DistributedSpec, Recipe

FSDP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_COMM_FAILURE_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout",
                       "broken pipe", "processgroup", "peer")


class RankLostError(UserError):
    """A collective failed: another rank died or stalled longer than distributed.timeout_s."""


@dataclass(frozen=True)
class Launch:
    """What the launcher (torchrun) says about this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def read_launch(env: dict[str, str] | None = None) -> Launch:
    """torchrun's variables; none set means a single process."""
    env = dict(os.environ if env is None else env)

    def number(name: str, default: int) -> int:
        try:
            return int(env.get(name, default))
        except ValueError:
            raise UserError(f"environment variable {name}={env[name]!r} is not a number; launch with "
                            "`torchrun --nproc_per_node N -m runner RECIPE`") from None

    launch = Launch(number("RANK", 0), number("WORLD_SIZE", 1), number("LOCAL_RANK", 0))
    if not 0 <= launch.rank < max(1, launch.world_size):
        raise UserError(f"RANK={launch.rank} is outside WORLD_SIZE={launch.world_size}")
    if launch.world_size > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise UserError(f"WORLD_SIZE={launch.world_size} but {', '.join(missing)} unset; launch with "
                            "torchrun, which sets them")
    return launch


def _is_comm_failure(err: BaseException) -> bool:
    if isinstance(err, tdist.DistError):
        return True
    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, RuntimeError) and any(word in text for word in _COMM_FAILURE_WORDS)


class Dist:
    """This process's place in the run and every collective train.py needs (no-ops for one process)."""

    def __init__(self, launch: Launch, spec: DistributedSpec, device: torch.device, strategy: str) -> None:
        self.launch, self.spec, self.device, self.strategy = launch, spec, device, strategy
        self.rank, self.world_size = launch.rank, launch.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def fsdp(self) -> bool:
        return self.active and self.strategy == "fsdp"

    # ---- synchronisation
    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def sum_floats(self, *values: float) -> list[float]:
        """Sum Python floats over ranks (fp64 so one rank's float equals the single-process value)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t)
        return t.tolist()

    def gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a [B, ...] tensor of every rank in rank order (the global batch, as one process)."""
        if not self.active:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        tdist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def on_main(self, fn, *args: Any, **kwargs: Any) -> Any:
        """Run `fn` on rank 0 only (file writes); a UserError there is raised on every rank, so no rank
        waits for a peer that has already given up. Returns fn's result on rank 0, None elsewhere."""
        result, message = None, None
        try:
            if self.is_main:
                result = fn(*args, **kwargs)
        except UserError as err:
            message = str(err)
            if not self.active:
                raise
            self.gather_objects(message)
            raise
        if self.active:
            message = self.gather_objects(message)[0]
            if message is not None:
                raise UserError(message)
        return result

    # ---- randomness
    def diverge_rng(self, seed: int) -> None:
        """Give rank r > 0 its own noise stream; rank 0 keeps the single-process one untouched."""
        if self.rank == 0:
            return
        mixed = seed * 1_000_003 + self.rank
        random.seed(mixed)
        np.random.seed(mixed % 2**32)
        torch.manual_seed(mixed)

    def check_world_size(self, rng_states: list, where: Any) -> None:
        if len(rng_states) != self.world_size:
            raise UserError(f"checkpoint {where} was written by {len(rng_states)} process(es) but this run "
                            f"has {self.world_size}; resume with `torchrun --nproc_per_node "
                            f"{len(rng_states)}` (same world size: data order, per-rank RNG and the "
                            "sharding depend on it), or start a new run from its exported weights")

    # ---- wrapping
    def wrap(self, prior: nn.Module, mode: str) -> nn.Module:
        """The module to call in the training step (DDP wrapper, FSDP2-sharded prior, or the prior)."""
        if not self.active:
            return prior
        if self.strategy == "fsdp":
            return self._shard(prior, mode)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(prior, device_ids=ids, broadcast_buffers=False,
                                       find_unused_parameters=self.spec.find_unused_parameters,
                                       bucket_cap_mb=self.spec.bucket_cap_mb)

    def _shard(self, prior: nn.Module, mode: str) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        if mode != "full":
            raise UserError("distributed.strategy: fsdp shards a full fine-tune; LoRA trains few weights, "
                            "use strategy ddp (only adapter gradients are reduced)")
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        kwargs: dict[str, Any] = {
            "mesh": mesh,
            "mp_policy": MixedPrecisionPolicy(param_dtype=FSDP_DTYPES[self.spec.fsdp_param_dtype],
                                              reduce_dtype=FSDP_DTYPES[self.spec.fsdp_reduce_dtype]),
        }
        if self.spec.fsdp_cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        # Activation checkpointing must sit inside FSDP's unshard/reshard hooks: the model's own
        # per-block torch.utils.checkpoint wraps the hooked call, so its recompute sees other saved
        # tensors than the forward did. The composable checkpoint is FSDP2's supported pairing.
        recompute = getattr(prior, "gradient_checkpointing", False)
        if recompute:
            from torch.distributed._composable import checkpoint as checkpoint_activations

            prior.set_gradient_checkpointing(False)
        for level in (*prior.down_blocks, *prior.up_blocks):  # one all-gather unit per UNet block
            for block in level:
                if recompute:
                    checkpoint_activations(block)
                fully_shard(block, reshard_after_forward=self.spec.fsdp_reshard_after_forward, **kwargs)
        fully_shard(prior, **kwargs)  # the rest: mappers, embedding, scalers, clf
        return prior

    def accumulating(self, model: nn.Module, sync: bool):
        """Skip the gradient all-reduce on micro-batches that are not the last of an optimizer step."""
        if not self.active or sync:
            if self.fsdp:
                model.set_requires_gradient_sync(True)
            return nullcontext()
        if self.fsdp:
            model.set_requires_gradient_sync(False)
            return nullcontext()
        return model.no_sync()

    def clip_gradients(self, params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
        """The global gradient norm (clipped to max_norm); FSDP2 grads are shards, so reduce the norm."""
        from runner.optim import clip_gradients

        if not self.fsdp:
            return clip_gradients(params, max_norm)
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        # Scaled by hand: in torch 2.14 `clip_grads_with_norm_` leaves DTensor grads unscaled (found by
        # the FSDP2 test). Same formula as torch: coef = max_norm / (norm + 1e-6), clamped to 1.
        coef = 1.0 if max_norm is None else min(1.0, max_norm / (float(norm) + 1e-6))
        if coef < 1.0:
            for grad in grads:
                grad.mul_(coef)
        return norm

    # ---- state for checkpoints and exports
    def trainable_state(self, prior: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable weights by name (not under FSDP: its checkpoints use `sharded_state`)."""
        return {n: p.detach() for n, p in prior.named_parameters() if p.requires_grad}

    def sharded_state(self, prior: nn.Module,
                      optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """FSDP: this rank's shards (DTensors, no copies) of the trainable weights and the optimizer
        state, keyed by parameter name, for torch.distributed.checkpoint. Collective."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(prior, optimizer)
        names = {n for n, p in prior.named_parameters() if p.requires_grad}
        return {n: v for n, v in model.items() if n in names}, optim

    def load_sharded(self, prior: nn.Module, optimizer: torch.optim.Optimizer, where: Any) -> None:
        """FSDP: read this rank's shards of a sharded checkpoint into the prior and optimizer. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from runner.checkpoint_shards import load_shards

        model, optim = self.sharded_state(prior, optimizer)
        load_shards(where, model, optim)
        set_state_dict(prior, optimizer, model_state_dict=model, optim_state_dict=optim,
                       options=StateDictOptions(strict=False))

    def check_sharding(self, sharded: dict[str, Any] | None, where: Any) -> None:
        """A sharded checkpoint resumes only under FSDP with the world size that wrote it (the per-rank RNG
        states and the data order depend on it, though DCP itself could reshard the weights)."""
        if sharded is None or (self.fsdp and self.world_size == sharded["world_size"]):
            return
        n = sharded["world_size"]
        now = f"{self.world_size} processes with strategy {self.strategy}" if self.active else "one process"
        raise UserError(f"checkpoint {where} is sharded by FSDP over {n} processes but this run is {now}; "
                        f"resume it with `torchrun --nproc_per_node {n} -m runner RECIPE` and "
                        "distributed.strategy: fsdp, or export its weights (`runner export --checkpoint "
                        f"{where} --to original -o stage_c.safetensors`) and start a new run from them "
                        "(model.prior.path)")

    def load_trainable(self, prior: nn.Module, trainable: dict[str, torch.Tensor], where: Any) -> None:
        named = dict(prior.named_parameters())
        for name in trainable:
            if name not in named:
                raise UserError(f"checkpoint {where} holds {name!r}, which this recipe's model lacks; resume "
                                "with the recipe that wrote it (its recipe.yaml)")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            options = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(prior, trainable, options=options)
            return
        with torch.no_grad():
            for name, value in trainable.items():
                named[name].copy_(value)

    def load_optimizer(self, prior: nn.Module, optimizer: torch.optim.Optimizer,
                       state: dict[str, Any]) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(prior, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def plain_prior(self, prior: nn.Module, device: torch.device) -> nn.Module | None:
        """An ordinary StageC with the trained weights for validation/export: the prior itself unless
        FSDP sharded it; then rank 0 gets an unsharded copy on `device` (others None). Collective."""
        if not self.fsdp:
            return prior
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from cascade_core.stage_c_io import load_stage_c

        full = get_model_state_dict(prior, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        return load_stage_c(full, config=prior.config, device=device).train(prior.training)

    @contextmanager
    def translate_failures(self) -> Iterator[None]:
        """Turn a failed collective (a dead or stalled peer) into a readable error instead of a traceback."""
        try:
            yield
        except Exception as err:
            if not self.active or isinstance(err, UserError) or not _is_comm_failure(err):
                raise
            raise RankLostError(
                f"rank {self.rank} of {self.world_size}: a collective with the other ranks failed "
                f"({err!s:.300}). "
                f"Another rank died or stalled for more than distributed.timeout_s="
                f"{self.spec.timeout_s} s; see its log (torchrun prints which rank failed first). Restart "
                "with `checkpoints.resume: latest` and the same number of processes.") from None


@contextmanager
def session(recipe: Recipe, device: torch.device) -> Iterator[Dist]:
    """Join the process group for the run (when launched with several ranks) and always leave it.

    Returns through `Dist.device` the device of this rank: `cuda:LOCAL_RANK` on GPUs.
    """
    launch = read_launch()
    spec = recipe.distributed
    if launch.world_size > 1 and device.type == "cuda":
        if launch.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={launch.local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                            "visible; use --nproc_per_node <= the GPU count")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    dist = Dist(launch, spec, device, spec.strategy)
    if launch.world_size > 1 and spec.strategy == "fsdp" and recipe.training.ema.enabled:
        raise UserError("training.ema with distributed.strategy fsdp is not supported yet (the average "
                        "would be sharded); turn EMA off or use strategy ddp")
    if not dist.active:
        yield dist
        return
    backend = spec.backend if spec.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise UserError("distributed.backend: nccl needs CUDA GPUs; use gloo or auto on the CPU")
    tdist.init_process_group(backend=backend, timeout=timedelta(seconds=spec.timeout_s),
                             rank=launch.rank, world_size=launch.world_size,
                             device_id=device if device.type == "cuda" else None)
    try:
        with dist.translate_failures():
            yield dist
    finally:
        tdist.destroy_process_group()
