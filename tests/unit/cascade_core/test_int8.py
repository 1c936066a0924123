"""Int8 weight-only base: per-channel error bounds, module parity, meta loading, LoRA training on top."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from stage_c_like import TinyNet  # tests/unit/cascade_core/stage_c_like.py
from torch import nn

from cascade_core.peft.lora import LoRAInt8Linear, inject_lora, lora_parameters, merge_lora
from cascade_core.quant.int8 import (
    Int8Linear,
    assign_int8_weight_,
    assign_int8_weights_,
    dequantize_weight,
    int8_weight_keys,
    quantize_model_,
    quantize_weight,
)

# Rounding w / s to the nearest integer is off by at most 1/2; the float32 division adds at most
# one ulp of |w / s| <= 127, i.e. 127 * 2^-23, and the product q * s one ulp of |w| <= 127 s.
BOUND = 0.5 + 2 * 127 * 2.0**-23


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 5, 8, generator=g)


def test_quantize_weight_per_channel_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 33, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 300.0, 0.0])[:, None]
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6,)
    assert q.abs().max() <= 127
    err = (w - dequantize_weight(q, scale)).abs()
    assert (err <= scale[:, None] * BOUND).all()
    assert (q[:5].abs().amax(dim=1) == 127).all()  # each non-zero row uses the full range
    assert (q[5] == 0).all() and scale[5] == 1.0  # an all-zero row stays exactly zero
    q4, s4 = quantize_weight(torch.randn(5, 3, 1, 1, generator=g))
    assert q4.shape == (5, 3, 1, 1) and s4.shape == (5,)
    with pytest.raises(ValueError, match="at least 2 dims"):
        quantize_weight(torch.randn(4))


def test_int8_linear_matches_dequantized_and_bound():
    g = torch.Generator().manual_seed(3)
    linear = nn.Linear(24, 10)
    x = torch.randn(7, 24, generator=g)
    q_linear = Int8Linear.from_linear(linear)
    assert not any(p.requires_grad for p in q_linear.parameters())
    y = q_linear(x)
    ref = F.linear(x, q_linear.dequantized_weight(), linear.bias)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-6)
    # |y - y_fp| <= sum_i |x_i| * |w_oi - q_oi s_o| <= (s_o * BOUND) * ||x||_1, plus float32 rounding
    bound = x.abs().sum(1, keepdim=True) * q_linear.weight_scale[None] * BOUND + 1e-5
    assert ((y - linear(x)).abs() <= bound).all()
    with pytest.raises(ValueError, match="expects a weight of shape"):
        q_linear.set_weight_(torch.randn(3, 3))


def test_backward_matches_float_and_saves_no_float_weight():
    """Gradients w.r.t. the input equal those of the dequantized float weight; autograd keeps only int8."""
    g = torch.Generator().manual_seed(4)
    q_linear = Int8Linear.from_linear(nn.Linear(24, 10))
    x = torch.randn(3, 5, 24, generator=g, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q_linear(x)
    assert not any(dtype.is_floating_point and shape == (10, 24) for dtype, shape in saved)
    y.backward(torch.ones_like(y))
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, q_linear.dequantized_weight(), q_linear.bias).backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-6)


def test_quantize_model_equals_dequantized_float_model(batch):
    model = TinyNet().eval()
    quantized = copy.deepcopy(model)
    keys = quantize_model_(quantized)
    assert set(keys) == int8_weight_keys(quantized)
    attn = quantized.down_blocks[0][1].attention.attn
    assert attn.in_proj_weight.dtype == torch.int8 and type(attn).__name__ == "Int8MultiheadAttention"
    assert isinstance(attn.out_proj, Int8Linear) and isinstance(
        quantized.down_blocks[0][1].kv_mapper[1], Int8Linear
    )
    assert isinstance(quantized.clf[1], nn.Conv2d)  # convs stay in full precision
    # reference: the float model with every quantized weight replaced by q * scale
    reference = copy.deepcopy(model)
    sd = reference.state_dict()
    for key in keys:
        sd[key] = dequantize_weight(*quantize_weight(sd[key]))
    reference.load_state_dict(sd)
    torch.testing.assert_close(quantized(*batch), reference(*batch), atol=1e-5, rtol=0)
    skipped = quantize_model_(copy.deepcopy(model), skip=["*.attn.*", "*.kv_mapper.*"])
    assert skipped == ["down_blocks.0.0.channelwise.0.weight", "down_blocks.0.0.channelwise.4.weight"]


def test_meta_build_then_tensor_by_tensor_load(batch):
    source = TinyNet().eval()
    expected = copy.deepcopy(source)
    quantize_model_(expected)
    with torch.device("meta"):
        model = TinyNet().eval()
    quantize_model_(model)
    int8_keys = int8_weight_keys(model)
    rest = {}
    for (
        key,
        tensor,
    ) in source.state_dict().items():  # one tensor at a time, as a checkpoint reader yields them
        if key in int8_keys:
            assign_int8_weight_(model, key, tensor, device="cpu")
        else:
            rest[key] = tensor
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    assert not unexpected
    assert all(k in int8_keys or k.endswith("weight_scale") for k in missing)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert torch.equal(model(*batch), expected(*batch))
    with pytest.raises(ValueError, match="not an int8-quantized weight"):
        assign_int8_weight_(model, "clf.1.weight", torch.zeros(4, 16, 1, 1))


def test_stage_c_quantized_while_loading(golden_files):
    """The real tiny Stage C, built on meta and filled from the golden file without a float copy of the
    quantized layers, equals the float model quantized after loading."""
    from cascade_core.checkpoint_io import materialize_module
    from cascade_core.models.stage_c import StageC, StageCConfig

    tensors = golden_files.load("stage_c_tiny.safetensors")
    state = golden_files.weights(tensors)
    args = [tensors[f"input.{n}"] for n in ("x", "r", "clip_text", "clip_text_pooled", "clip_img")]
    reference = StageC(StageCConfig.preset("tiny")).eval()
    reference.load_state_dict(state)
    quantize_model_(reference)
    model = StageC(StageCConfig.preset("tiny"), device="meta").eval()
    keys = quantize_model_(model)
    used = assign_int8_weights_(model, state, device="cpu")
    assert used == set(keys) and len([k for k in keys if k.endswith(".in_proj_weight")]) == 6
    materialize_module(model, {k: v for k, v in state.items() if k not in used}, device="cpu", strict=False)
    with torch.no_grad():
        assert torch.equal(model(*args), reference(*args))
    with pytest.raises(ValueError, match="lacks weights of quantized layers"):
        assign_int8_weights_(model, {})


def test_lora_trains_on_int8_base(batch):
    torch.manual_seed(0)
    model = TinyNet().eval()
    quantize_model_(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, rank=4, alpha=4, targets="attention+ffn")
    assert isinstance(model.down_blocks[0][0].channelwise[0], LoRAInt8Linear)
    target = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(*batch), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    for key, value in frozen.items():  # the int8 base never moves
        assert torch.equal(model.state_dict()[key], value), key
    assert all(p.grad is not None for p in lora_parameters(model))
    with pytest.raises(ValueError, match="quantized"):
        merge_lora(model)


def test_backend_errors():
    with pytest.raises(ValueError, match="unknown int8 backend"):
        quantize_model_(TinyNet(), backend="int4")
    if not torch.cuda.is_available():
        for backend in ("int8-torchao", "int8-bnb"):
            with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
                quantize_model_(TinyNet(), backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["int8", "int8-torchao", "int8-bnb"])
def test_gpu_backends_close_to_float(backend, batch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if backend != "int8":
        pytest.importorskip({"int8-torchao": "torchao", "int8-bnb": "bitsandbytes"}[backend])
    model = TinyNet().eval().cuda().to(torch.bfloat16)
    x, cond = (t.cuda().to(torch.bfloat16) for t in batch)
    expected = model(x, cond).float()
    quantize_model_(model, backend=backend)
    inject_lora(model, rank=4, alpha=4, targets="attention+ffn", dtype=torch.float32)
    out = model(x, cond).float()
    out.square().mean().backward()
    assert all(p.grad is not None for p in lora_parameters(model))
    rel = (out - expected).abs().max() / expected.abs().max()
    assert rel < 0.05, f"{backend}: relative max error {rel:.4f}"  # int8 steps are <= 1/254 of a row's max


def test_quantize_to_another_device_moves_only_quantized_layers(batch):
    """device=: int8 layers land there one by one; full-precision modules stay for model.to(device)."""
    model = TinyNet()
    reference = copy.deepcopy(model)
    quantize_model_(reference)
    quantize_model_(model, device="meta")
    for name, param in model.named_parameters():
        expected = reference.get_parameter(name)
        assert param.dtype == expected.dtype and param.shape == expected.shape, name
        owner, _, leaf = name.rpartition(".")
        quantized = isinstance(model.get_submodule(owner), Int8Linear) or leaf.startswith("in_proj")
        assert param.device.type == ("meta" if quantized else "cpu"), name


def _linear_stack(n: int, width: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    layers = [nn.Linear(width, width) for _ in range(n)]
    for layer in layers:
        nn.init.normal_(layer.weight, std=width**-0.5, generator=g)
    return nn.Sequential(*layers).to(torch.bfloat16).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["int8", "int8-torchao", "int8-bnb"])
def test_gpu_quantize_from_host_never_holds_the_float_model(backend):
    """A host model quantized onto the GPU: its peak GPU memory is the int8 model plus one layer's
    quantization temporaries, far below the bf16 model (measured on the H200: torchao needs ~17 bf16
    layers of scratch per layer, bitsandbytes and ours less)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if backend != "int8":
        pytest.importorskip({"int8-torchao": "torchao", "int8-bnb": "bitsandbytes"}[backend])
    n, width = 96, 1024
    model = _linear_stack(n, width)
    x = torch.randn(8, width, dtype=torch.bfloat16)
    expected = model[0].float()(x.float())  # one layer: the per-layer error bound, not depth's growth
    model = model.to(torch.bfloat16)
    float_layer = width * width * 2
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    quantize_model_(model, backend=backend, device="cuda")
    model.to("cuda")
    peak = torch.cuda.max_memory_allocated() - before
    int8_model = n * width * width
    assert peak <= int8_model + 24 * float_layer, f"{backend}: peak {peak / 2**20:.0f} MiB"
    assert peak < 0.8 * n * float_layer, "the full bf16 model must never sit on the GPU"
    out = model[0](x.cuda()).float().cpu()
    rel = (out - expected).abs().max() / expected.abs().max()
    assert rel < 0.05, f"{backend}: relative max error {rel:.4f}"
