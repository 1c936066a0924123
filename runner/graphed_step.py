"""`performance.cuda_graphs`: one micro-batch's loss forward + backward captured as a CUDA graph per input
shape, then replayed.

Why: at batch 4 a Stage C LoRA step is bound by the host, not the GPU: ~7,000 kernel launches per step
leave the H200 idle 40-55% of the time (benchmarks/h200-2026-11-29, profile tables). Replaying a
captured graph launches all of them with one call (stage-c, bf16 base, batch 4: 0.223 -> 0.134 s/step,
diag run 2026-11-29).

How it works:
* The first micro-batch of each shape (latents [B, 16, h, w] + text tokens) is run eagerly on a side
  stream a few times (cuDNN / cuBLAS autotuning, lazy initialisation), then `stage_c_loss` +
  `torch.autograd.grad` + adding the gradients into the parameters' `.grad` tensors are captured.
  Later micro-batches of that shape are copied into the graph's static inputs and the graph replays.
* Gradients accumulate explicitly into `.grad` tensors that live outside the graph (allocated here),
  so gradient accumulation works as in eager mode; the loop must zero them in place
  (`optimizer.zero_grad(set_to_none=False)`), never replace them.
* The loss, the per-sample losses and logSNRs are cloned out right after each replay, so the graphs of
  all shapes (aspect buckets) can share one memory pool: nothing of a graph is read after another one
  ran.
* Randomness: the CUDA RNG state is put back after warm-up and after capture, so a replay draws t and
  eps from the same generator position an eager step would (replays advance the generator), and
  checkpoints keep exact RNG states.
* The optimizer, clipping, the finite check, EMA and logging stay outside the graph (few launches).

Limits: CUDA only and one process (DDP's reducer hooks and FSDP's collectives are not captured), checked
at run time by `graph_support_problem`; no scheduled sampling (its number of model calls changes per
step) and no fp16 loss scaling, refused with the recipe (runner/recipe_rules.py). Every distinct shape
costs one capture and keeps its activations in the pool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cascade_core.diffusion.objective import AdaptiveLossWeight
from cascade_core.models.text import TextConditioning
from runner.errors import UserError
from runner.spec import TrainingSpec
from runner.step import LossResult, stage_c_loss

WARMUP_RUNS = 3


def graph_support_problem(device: torch.device, world_size: int) -> str | None:
    """Why `performance.cuda_graphs` cannot run here (None when it can): the facts known only at run time.

    What the recipe alone rules out (scheduled sampling, fp16, device: cpu) is refused when it is read
    (runner/recipe_rules.py)."""
    if device.type != "cuda":
        return f"performance.cuda_graphs needs a CUDA GPU (the run is on {device}); set it to false"
    if world_size > 1:
        return (f"performance.cuda_graphs runs in one process only (this run has {world_size}): DDP and "
                "FSDP communicate from hooks a graph cannot capture; set it to false for torchrun runs")
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    latents: Tensor  # static input [B, 16, h, w]
    cond: TextConditioning  # static inputs
    result: LossResult  # static outputs


class GraphedLoss:
    """Callable like `stage_c_loss` for one micro-batch; also accumulates the gradients (no `.backward()`)."""

    def __init__(self, prior: nn.Module, params: list[nn.Parameter], training: TrainingSpec, *,
                 autocast_dtype: torch.dtype | None, adaptive: AdaptiveLossWeight | None,
                 accumulation_steps: int) -> None:
        self.prior, self.params, self.training = prior, params, training
        self.autocast_dtype, self.adaptive = autocast_dtype, adaptive
        self.accumulation_steps = accumulation_steps
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None  # the memory pool every captured graph shares

    @property
    def captures(self) -> int:
        return len(self.graphs)

    def __call__(self, latents: Tensor, cond: TextConditioning) -> LossResult:
        """latents [B,16,h,w] fp32 and cond on the GPU -> the micro-batch's loss; grads added to `.grad`."""
        key = (tuple(latents.shape), latents.dtype,
               *((tuple(t.shape), t.dtype) for t in cond.as_dict().values()))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(latents, cond)
        else:
            entry.latents.copy_(latents)
            for static, value in zip(entry.cond.as_dict().values(), cond.as_dict().values(), strict=True):
                static.copy_(value)
        entry.graph.replay()
        out = entry.result
        return LossResult(out.loss.clone(), out.raw.clone(), out.logsnr.clone(), 0)

    # ---- capture
    def _forward_backward(self, latents: Tensor, cond: TextConditioning, accumulate: bool) -> LossResult:
        result = stage_c_loss(self.prior, latents, cond, self.training, step=0,
                              autocast_dtype=self.autocast_dtype, adaptive=self.adaptive,
                              autocast_cache=False)
        grads = torch.autograd.grad(result.loss / self.accumulation_steps, self.params, allow_unused=True)
        if accumulate:
            pairs = [(p.grad, g) for p, g in zip(self.params, grads, strict=True) if g is not None]
            torch._foreach_add_([p for p, _ in pairs], [g for _, g in pairs])
        return LossResult(result.loss.detach(), result.raw, result.logsnr.detach(), 0)

    def _capture(self, latents: Tensor, cond: TextConditioning) -> _Graph:
        for p in self.params:  # the accumulation targets: outside the graph pool, kept for the run
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        static_latents = latents.clone()
        static_cond = TextConditioning(*(t.clone() for t in cond.as_dict().values()))
        rng = torch.cuda.get_rng_state(latents.device)
        side = torch.cuda.Stream(latents.device)
        side.wait_stream(torch.cuda.current_stream(latents.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):  # autotuning and lazy init outside the capture; grads dropped
                self._forward_backward(static_latents, static_cond, accumulate=False)
        torch.cuda.current_stream(latents.device).wait_stream(side)
        torch.cuda.set_rng_state(rng, latents.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                result = self._forward_backward(static_latents, static_cond, accumulate=True)
        except RuntimeError as err:  # e.g. a host sync or a CPU tensor copy somewhere in the step
            raise UserError(
                f"performance.cuda_graphs: the training step of shape {list(latents.shape)} could not be "
                f"captured as a CUDA graph ({err!s:.300}); set performance.cuda_graphs: false for this "
                "model and settings") from err
        torch.cuda.set_rng_state(rng, latents.device)
        if self.pool is None:
            self.pool = graph.pool()
        return _Graph(graph, static_latents, static_cond, result)
