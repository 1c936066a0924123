"""Int8 weight-only quantization of a frozen base model (LoRA trains on top in floating point).

Symmetric per-output-channel scheme: scale[o] = max|W[o, :]| / 127 and q = round(W / scale), so
|W - q * scale| <= scale / 2 element-wise. Pure PyTorch (`backend="int8"`): runs on CPU and GPU;
`int8_linear` computes y = (x @ q^T) * scale + b in the activation (or autocast) dtype and saves only
the int8 weight for backward, so gradients reach the input (and any LoRA adapter) through a frozen
base without keeping a floating copy of any weight alive between forward and backward.

Where quantized weights live:
* every `nn.Linear` becomes an `Int8Linear` (keys `weight` int8 [out, in], `weight_scale` float32
  [out], `bias`);
* an attention module with the fused in-projection (`in_proj_weight` [3c, c] + `project_in`, see
  models/blocks.py) switches class in place to `Int8<Class>`, whose `project_in` runs `int8_linear`
  (keys `in_proj_weight` int8, `in_proj_weight_scale` float32 [3c], `in_proj_bias`); its
  `in_proj_adapters` (LoRA) are applied exactly as in the base class.

Loading without a full-precision copy on the GPU: build the model on `meta`, call
`quantize_model_(model)` (works on meta), then for each checkpoint tensor whose key is in
`int8_weight_keys(model)` call `assign_int8_weight_(model, key, tensor, device)` (or
`assign_int8_weights_(model, state, device)` for a whole lazy state dict); it quantizes one tensor
where it lies (CPU) and moves only int8 values and scales to `device`. Load the other keys as usual.

A model already loaded on the host: `quantize_model_(model, backend, device="cuda")` moves and
quantizes one layer at a time, so at most one full-precision layer is ever on the GPU (the rest of the
model follows with `model.to(device)`).

Backends `int8-torchao` and `int8-bnb` quantize the nn.Linear layers with those libraries (CUDA
only, imported lazily); the fused in-projection always uses the pure-PyTorch path. bitsandbytes
computes in float16 internally (Stage C is known to overflow in fp16): prefer `int8` or `int8-torchao`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "INT8_BACKENDS",
    "quantize_weight",
    "dequantize_weight",
    "Int8Linear",
    "Int8InProjMixin",
    "int8_linear",
    "quantize_model_",
    "int8_weight_keys",
    "assign_int8_weight_",
    "assign_int8_weights_",
]

INT8_BACKENDS = ("int8", "int8-torchao", "int8-bnb")
QMAX = 127


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [out, ...] -> (q int8 same shape, scale float32 [out]) with |w - q * scale| <= scale / 2."""
    if w.dim() < 2:
        raise ValueError(
            f"int8 quantization needs a weight of at least 2 dims [out, in], got {tuple(w.shape)}"
        )
    wf = w.detach().float()
    absmax = wf.flatten(1).abs().amax(dim=1)  # [out]
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))  # all-zero rows: q = 0, scale 1
    q = torch.round(wf / scale.view(-1, *([1] * (w.dim() - 1)))).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_weight(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q * scale per output channel, in `dtype`."""
    return (q.float() * scale.float().view(-1, *([1] * (q.dim() - 1)))).to(dtype)


class _Int8LinearFn(torch.autograd.Function):
    """y = (x @ q^T) * scale; saves only q and scale, and rebuilds the float weight in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        ctx.save_for_backward(q, scale)
        ctx.x_dtype, ctx.dtype = x.dtype, dtype
        y = F.linear(x.to(dtype), q.to(dtype))  # [..., out]; int8 values are exact in bf16/fp16/fp32
        return y * scale.to(dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        q, scale = ctx.saved_tensors
        grad_x = (grad.to(ctx.dtype) * scale.to(ctx.dtype)) @ q.to(ctx.dtype)  # [..., out] @ [out, in]
        return grad_x.to(ctx.x_dtype), None, None


def int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., in] with an int8 weight q [out, in] and per-row scale [out] -> [..., out]."""
    y = _Int8LinearFn.apply(x, q, scale)
    return y if bias is None else y + bias.to(y.dtype)


class Int8Linear(nn.Module):
    """Frozen int8 Linear: y = (x @ q^T) * scale + bias, computed in the activation dtype.

    The int8 weight and the scale are Parameters with requires_grad=False (DDP/FSDP treat them as
    frozen parameters, not as buffers re-broadcast every step). Cast the model to its compute dtype
    before quantizing: `.to(dtype)` afterwards would also cast `weight_scale`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> Int8Linear:
        """Quantize an nn.Linear (on its device; the result lives on `device` or the same device)."""
        w = linear.weight
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None, device="meta", dtype=w.dtype
        )
        device = w.device if w.device.type == "meta" or device is None else device
        module.set_weight_(w, device=device)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
        return module

    def set_weight_(self, weight: Tensor, device: torch.device | str | None = None) -> None:
        """Quantize a full-precision [out, in] weight where it lies and keep int8 + scale on `device`."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"Int8Linear expects a weight of shape {[self.out_features, self.in_features]}, "
                f"got {list(weight.shape)}"
            )
        q, scale = quantize_weight(weight)
        device = device or weight.device
        self.weight = nn.Parameter(q.to(device), requires_grad=False)
        self.weight_scale = nn.Parameter(scale.to(device), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class Int8InProjMixin:
    """An attention module whose fused q/k/v in-projection is int8 (the interface of blocks.py)."""

    in_proj_weight: Tensor
    in_proj_weight_scale: Tensor
    in_proj_bias: Tensor | None
    in_proj_adapters: nn.ModuleDict

    def project_in(self, tokens: Tensor) -> Tensor:
        """[B, N, c] -> [B, N, 3c] (q | k | v), including any registered adapters."""
        out = int8_linear(tokens, self.in_proj_weight, self.in_proj_weight_scale, self.in_proj_bias)
        for adapter in self.in_proj_adapters.values():
            out = out + adapter(tokens)
        return out


_INT8_ATTENTION: dict[type, type] = {}


def _quantize_in_proj_(module: nn.Module, device: torch.device | None = None) -> None:
    base = type(module)
    if base not in _INT8_ATTENTION:
        _INT8_ATTENTION[base] = type(f"Int8{base.__name__}", (Int8InProjMixin, base), {})
    q, scale = quantize_weight(module.in_proj_weight)  # where the weight lies, then only int8 moves
    device = device if device is not None and q.device.type != "meta" else q.device
    module.__class__ = _INT8_ATTENTION[base]
    module.in_proj_weight = nn.Parameter(q.to(device), requires_grad=False)
    module.in_proj_weight_scale = nn.Parameter(scale.to(device), requires_grad=False)
    if module.in_proj_bias is not None:
        module.in_proj_bias = nn.Parameter(module.in_proj_bias.detach().to(device), requires_grad=False)


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in skip)


def _linears(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not module.weight.is_floating_point() or _skipped(name, skip):
            continue
        if hasattr(module, "adapters"):
            raise ValueError(
                f"int8: {name!r} already carries LoRA adapters; quantize the base before injecting LoRA"
            )
        found.append((name, module))
    return found


def _fused_attention(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if "in_proj_weight" in m._parameters
        and hasattr(m, "project_in")
        and m.in_proj_weight.is_floating_point()
        and not _skipped(f"{n}.in_proj", skip)
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _check_cuda(backend: str, device: torch.device | None, linears: list[tuple[str, nn.Linear]]) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"int8 backend {backend!r} needs a CUDA GPU; on this machine use backend 'int8'")
    if device is not None:
        if device.type != "cuda":
            raise RuntimeError(f"int8 backend {backend!r} quantizes on a CUDA device, not {device}")
        return
    devices = {linear.weight.device.type for _, linear in linears}
    if devices - {"cuda"}:
        raise RuntimeError(
            f"int8 backend {backend!r} needs the model on the GPU first (found {sorted(devices)}), "
            "or pass device='cuda' to move and quantize it layer by layer"
        )


def _import(backend: str, module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise RuntimeError(
            f"int8 backend {backend!r} needs the `{module.split('.')[0]}` package: pip install "
            f"'cascade-runner[gpu]', or use backend 'int8' (pure PyTorch)"
        ) from err


def _torchao_(model: nn.Module, linears: list[tuple[str, nn.Linear]], device: torch.device | None) -> None:
    """One layer at a time: move it to `device` (when given), quantize it there, put it back."""
    quant = _import("int8-torchao", "torchao.quantization")
    config = (
        quant.Int8WeightOnlyConfig() if hasattr(quant, "Int8WeightOnlyConfig") else quant.int8_weight_only()
    )
    for name, linear in linears:
        holder = nn.Sequential(linear.to(device) if device is not None else linear)
        quant.quantize_(holder, config)  # replaces holder[0]'s weight with torchao's int8 tensor
        _set_submodule(model, name, holder[0])


def _bnb_class(bnb) -> type:
    """bnb's Linear8bitLt takes 2-D/3-D inputs only; Stage C's channel MLPs feed [B, H, W, C]."""
    base = bnb.nn.Linear8bitLt

    def forward(self, x: Tensor) -> Tensor:
        return base.forward(self, x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)

    return type("Bnb8bitLinear", (base,), {"forward": forward})


def _bnb_(model: nn.Module, linears: list[tuple[str, nn.Linear]], target: torch.device | None) -> None:
    bnb = _import("int8-bnb", "bitsandbytes")
    cls = _bnb_class(bnb)
    for name, linear in linears:
        device = target if target is not None else linear.weight.device
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=6.0,
            device="meta",
        )
        new.weight = bnb.nn.Int8Params(
            linear.weight.detach().cpu(), requires_grad=False, has_fp16_weights=False
        )
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        _set_submodule(model, name, new.to(device))  # bnb quantizes when the weight moves to the GPU


def quantize_model_(
    model: nn.Module,
    backend: str = "int8",
    skip: Sequence[str] = (),
    device: torch.device | str | None = None,
) -> list[str]:
    """Quantize every nn.Linear and fused attention in-projection of `model` in place; returns their keys.

    `skip` holds module-name globs (fnmatch, `*` crosses dots) kept in full precision, e.g.
    `["clf.*", "*.mapper*"]` (a fused in-projection is named `<attention path>.in_proj`). Works on
    the meta device (backend 'int8'), so a model can be quantized before its weights are loaded.
    `device`: where the quantized layers go (default: where each lies). Layers are quantized one at a
    time, so a host model never has more than one full-precision layer on `device`; the modules that
    stay in full precision are left where they are (follow with `model.to(device)`).
    """
    if backend not in INT8_BACKENDS:
        raise ValueError(f"unknown int8 backend {backend!r}; use one of {INT8_BACKENDS}")
    target = torch.device(device) if device is not None else None
    linears = _linears(model, skip)
    attention = _fused_attention(model, skip)
    if backend == "int8":
        for name, linear in linears:
            _set_submodule(model, name, Int8Linear.from_linear(linear, device=target))
    else:
        _check_cuda(backend, target, linears)
        if backend == "int8-torchao":
            _torchao_(model, linears, target)
        else:
            _bnb_(model, linears, target)
    for _, module in attention:
        _quantize_in_proj_(module, target)
    return [f"{n}.weight" for n, _ in linears] + [
        f"{n}.in_proj_weight" if n else "in_proj_weight" for n, _ in attention
    ]


def int8_weight_keys(model: nn.Module) -> set[str]:
    """Checkpoint keys (original names) whose tensors `assign_int8_weight_` must quantize while loading."""
    keys = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Int8Linear):
            keys.add(f"{prefix}weight")
        if isinstance(module, Int8InProjMixin):
            keys.add(f"{prefix}in_proj_weight")
    return keys


@torch.no_grad()
def assign_int8_weight_(
    model: nn.Module, key: str, weight: Tensor, device: torch.device | str | None = None
) -> None:
    """Quantize one checkpoint tensor (where it lies) into the int8 slot named by its original key."""
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path)
    device = device or weight.device
    if leaf == "weight" and isinstance(module, Int8Linear):
        module.set_weight_(weight, device=device)
        return
    if leaf == "in_proj_weight" and isinstance(module, Int8InProjMixin):
        expected = tuple(module.in_proj_weight.shape)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"int8 weight {key!r}: expected shape {list(expected)}, got {list(weight.shape)}"
            )
        q, scale = quantize_weight(weight)
        module.in_proj_weight = nn.Parameter(q.to(device), requires_grad=False)
        module.in_proj_weight_scale = nn.Parameter(scale.to(device), requires_grad=False)
        return
    raise ValueError(f"{key!r} is not an int8-quantized weight of this model; see int8_weight_keys(model)")


def assign_int8_weights_(
    model: nn.Module, state: Mapping[str, Tensor], device: torch.device | str | None = None
) -> set[str]:
    """Fill every int8 slot of `model` from a (lazy) state dict, one tensor at a time; returns the keys used.

    The caller loads the remaining keys (e.g. `checkpoint_io.materialize_module(..., strict=False)`).
    """
    keys = int8_weight_keys(model)
    missing = sorted(k for k in keys if k not in state)
    if missing:
        raise ValueError(
            f"the checkpoint lacks weights of quantized layers: {missing[:5]} ({len(missing)} in all)"
        )
    for key in sorted(keys):
        assign_int8_weight_(model, key, state[key], device)
    return keys
