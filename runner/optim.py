"""Optimizers, learning-rate schedules, gradient clipping and the NaN/inf guard of the training loop.

Names from the recipe map to builders through the small dicts `OPTIMIZERS` and `SCHEDULERS`; nothing
here reads the recipe object, so the loop passes explicit values.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from runner.errors import UserError

if TYPE_CHECKING:
    from runner.spec import OptimizerSpec

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def stochastic_round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to bf16 up or down with probability proportional to the distance (unbiased).

    Round-to-nearest drops every update smaller than half a bf16 ulp (2**-9 relative), which is most
    AdamW updates at lr ~1e-4; random rounding keeps them in expectation. The 16 bits that bf16 drops
    are replaced by uniform noise before truncation, so the draw uses the global torch RNG of x's
    device (saved in checkpoints, hence resume stays exact).
    """
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
    truncated = (bits + noise) & -65536  # -65536 == 0xFFFF0000: keep sign, exponent, 7 mantissa bits
    return truncated.view(torch.float32).to(torch.bfloat16)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writes land in the DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class AdamWBF16(torch.optim.Optimizer):
    """AdamW whose moments live in the parameter's dtype (bf16 for bf16 weights), math in fp32.

    Halves optimizer memory against fp32 AdamW. Writes into bf16 tensors (weights and both moments)
    use stochastic rounding unless `stochastic_rounding=False` (kept for the comparison test); fp32
    tensors are written exactly, so on fp32 parameters this is torch.optim.AdamW.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, stochastic_rounding: bool = True) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)

    @staticmethod
    def _write(dst: torch.Tensor, value: torch.Tensor, stochastic: bool) -> None:
        if dst.dtype == torch.bfloat16 and stochastic:
            dst.copy_(stochastic_round_to_bf16(value))
        else:
            dst.copy_(value)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, sr = group["lr"], group["eps"], group["weight_decay"], group["stochastic_rounding"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("adamw_bf16 does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                # Elementwise, so FSDP2's sharded parameters (DTensors) update shard by shard.
                param, m1, m2 = _local(p), _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                # Same operation order as torch.optim.AdamW (single-tensor path), in fp32.
                grad = _local(p.grad).to(torch.float32)
                weight = param.to(torch.float32).mul_(1.0 - lr * wd)
                exp_avg = m1.to(torch.float32).lerp_(grad, 1.0 - beta1)
                exp_avg_sq = m2.to(torch.float32).mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                step_size = lr / (1.0 - beta1 ** t)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2 ** t)).add_(eps)
                weight.addcdiv_(exp_avg, denom, value=-step_size)
                self._write(m1, exp_avg, sr)
                self._write(m2, exp_avg_sq, sr)
                self._write(param, weight, sr)
        return loss


def _params_list(params: ParamsT) -> list[Any]:
    return list(params)


def _all_on_cuda(params: list[Any]) -> bool:
    tensors = [t for g in params for t in g["params"]] if params and isinstance(params[0], dict) else params
    return bool(tensors) and all(t.is_cuda for t in tensors)


def _check_extra(name: str, extra: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(extra) - allowed)
    if unknown:
        allowed_txt = ", ".join(sorted(allowed)) or "none"
        raise UserError(f"optimizer {name!r} does not take {unknown}; it accepts: {allowed_txt}")


def _adamw(params: list[Any], lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
           **extra: Any) -> torch.optim.Optimizer:
    _check_extra("adamw", extra, set())
    # Fused kernels are the fastest CUDA path; elsewhere torch picks foreach/single-tensor itself.
    fused = True if _all_on_cuda(params) else None
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def _adamw_bf16(params: list[Any], lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                **extra: Any) -> torch.optim.Optimizer:
    _check_extra("adamw_bf16", extra, {"stochastic_rounding"})
    return AdamWBF16(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra)


def _adamw8bit(params: list[Any], lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
               **extra: Any) -> torch.optim.Optimizer:
    _check_extra("adamw8bit", extra, set())
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UserError("optimizer 'adamw8bit' needs bitsandbytes, which is not installed: "
                           "pip install bitsandbytes (or pip install 'cascade-runner[gpu]'), "
                           "or choose optimizer: adamw_bf16 / adamw") from exc
    if not torch.cuda.is_available():
        raise UserError("optimizer 'adamw8bit' (bitsandbytes) needs a CUDA GPU and none is visible; "
                           "choose optimizer: adamw or adamw_bf16 on this machine")
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _adafactor(params: list[Any], lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
               **extra: Any) -> torch.optim.Optimizer:
    """torch.optim.Adafactor: no first moment, so `betas` is unused; `eps` is its eps2 (the relative
    update floor, max(eps2, RMS(param)) scales the step); eps1 stays torch's dtype-eps default."""
    _check_extra("adafactor", extra, {"beta2_decay", "d"})
    adafactor = getattr(torch.optim, "Adafactor", None)
    if adafactor is None:
        raise UserError(f"optimizer 'adafactor' needs torch.optim.Adafactor (torch >= 2.5); this torch is "
                           f"{torch.__version__}: upgrade torch or choose optimizer: adamw / adamw_bf16")
    return adafactor(params, lr=lr, eps=(None, eps), weight_decay=weight_decay, **extra)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw_bf16": _adamw_bf16,
    "adamw8bit": _adamw8bit,
    "adafactor": _adafactor,
}


def build_optimizer(name: str, params: ParamsT, *, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float, **extra: Any) -> torch.optim.Optimizer:
    """Build the optimizer named in the recipe over `params` (tensors or param-group dicts)."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    plist = _params_list(params)
    if not plist:
        raise UserError(f"optimizer {name!r} got no parameters to train; check which weights are trainable "
                         "(LoRA targets / full fine-tune settings)")
    return OPTIMIZERS[name](plist, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **extra)


def optimizer_from_spec(spec: OptimizerSpec, params: ParamsT, lr: float) -> torch.optim.Optimizer:
    """`build_optimizer` given every `training.optimizer` key of the recipe, per-optimizer ones too."""
    extra: dict[str, Any] = {}
    if spec.name == "adafactor":  # torch calls the update-clipping threshold d
        extra = {"beta2_decay": spec.adafactor_beta2_decay, "d": spec.adafactor_clip_threshold}
    return build_optimizer(spec.name, params, lr=lr, weight_decay=spec.weight_decay, betas=tuple(spec.betas),
                           eps=spec.eps, **extra)


# ---- learning-rate schedules: factor(step) multiplies the base lr; warmup is linear from 0 ----

def _constant(progress: float, num_cycles: int, power: float) -> float:
    return 1.0


def _linear(progress: float, num_cycles: int, power: float) -> float:
    return 1.0 - progress


def _cosine(progress: float, num_cycles: int, power: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _cosine_with_restarts(progress: float, num_cycles: int, power: float) -> float:
    if progress >= 1.0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))


def _polynomial(progress: float, num_cycles: int, power: float) -> float:
    return (1.0 - progress) ** power


SCHEDULERS: dict[str, Callable[[float, int, float], float]] = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
}


def lr_factor(name: str, step: int, *, warmup_steps: int, total_steps: int, num_cycles: int = 1,
              power: float = 1.0, min_lr_ratio: float = 0.0) -> float:
    """The multiplier of the base lr at optimizer step `step` (0-based, as LambdaLR counts).

    Warmup: step / warmup_steps for step < warmup_steps (the first step runs at lr 0, as the official
    GradualWarmupScheduler does). Then decay over progress = (step - warmup) / (total - warmup) in
    [0, 1], rescaled to end at `min_lr_ratio` (constant ignores it).
    """
    if step < warmup_steps:
        return step / warmup_steps
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = SCHEDULERS[name](progress, num_cycles, power)
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    num_cycles: int = 1, power: float = 1.0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """A LambdaLR over `optimizer` for the named schedule; step it once per optimizer step."""
    if name not in SCHEDULERS:
        raise UserError(f"unknown lr scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    problems = []
    if warmup_steps < 0:
        problems.append(f"warmup steps must be >= 0 (got {warmup_steps})")
    if total_steps < 1:
        problems.append(f"total steps must be >= 1 (got {total_steps})")
    if name != "constant" and warmup_steps > total_steps:
        problems.append(f"warmup steps ({warmup_steps}) exceed total steps ({total_steps}); lower the warmup")
    if num_cycles < 1:
        problems.append(f"num_cycles must be >= 1 (got {num_cycles})")
    if power <= 0:
        problems.append(f"power must be > 0 (got {power})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        problems.append(f"min_lr_ratio must be in [0, 1] (got {min_lr_ratio})")
    if problems:
        raise UserError(f"lr scheduler {name!r}: " + "; ".join(problems))

    def factor(step: int) -> float:
        return lr_factor(name, step, warmup_steps=warmup_steps, total_steps=total_steps,
                         num_cycles=num_cycles, power=power, min_lr_ratio=min_lr_ratio)

    return LambdaLR(optimizer, factor)


# ---- gradients ----

def clip_gradients(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip the total L2 norm of the gradients to `max_norm` (None: measure only); return the norm.

    The norm is returned as a tensor (no host sync) so the loop can log it and feed `all_finite`.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    if max_norm is None:
        return torch.nn.utils.get_total_norm([p.grad for p in with_grad], norm_type=2.0)
    if max_norm <= 0:
        raise UserError(f"gradient clipping max_norm must be > 0, or null to disable (got {max_norm})")
    return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)


def all_finite(loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> bool:
    """True when the loss (and the total gradient norm, if given) hold no NaN or inf.

    A non-finite gradient anywhere makes the total norm non-finite, so one `isfinite` reduction over
    two scalars (one host sync) covers loss and every gradient.
    """
    values = [loss.detach().to(torch.float32).reshape(-1)]
    if grad_norm is not None:
        values.append(grad_norm.detach().to(device=loss.device, dtype=torch.float32).reshape(-1))
    return bool(torch.isfinite(torch.cat(values)).all())
