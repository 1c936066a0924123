"""performance: switches: compile none is a no-op, blocks keeps keys and outputs, attention names map."""

from __future__ import annotations

import pytest
import torch

from cascade_core.models.stage_c import StageC, StageCConfig
from cascade_core.peft.lora import inject_lora
from runner.performance import ATTENTION_BACKENDS, apply_performance, compile_blocks, set_attention_backend
from runner.spec import PerformanceSpec

SWITCHES = {
    "flash": torch.backends.cuda.flash_sdp_enabled,
    "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
    "cudnn": torch.backends.cuda.cudnn_sdp_enabled,
    "math": torch.backends.cuda.math_sdp_enabled,
}


@pytest.fixture
def restore_sdp_switches():
    before = {name: read() for name, read in SWITCHES.items()}
    yield
    for name, value in before.items():
        getattr(torch.backends.cuda, f"enable_{'mem_efficient' if name == 'efficient' else name}_sdp")(value)


def _tiny() -> StageC:
    torch.manual_seed(0)
    model = StageC(StageCConfig.preset("tiny")).train()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    inject_lora(model, rank=2, alpha=2, targets="attention")
    return model


def _inputs(b: int = 2):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(b, 16, 4, 4, generator=g),
        torch.rand(b, generator=g),
        torch.randn(b, 5, 24, generator=g),
        torch.randn(b, 1, 24, generator=g),
        torch.randn(b, 1, 20, generator=g),
    )


def _spec(**kw) -> PerformanceSpec:
    values = {"compile": "none", "compile_mode": "default", "attention_backend": "auto", "pin_memory": True,
              "cuda_graphs": False}
    return PerformanceSpec(**{**values, **kw})


def test_compile_none_is_a_no_op_on_cpu():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    report = apply_performance(model, _spec(), torch.device("cpu"))
    assert report.compiled_blocks == 0 and report.attention_backends == ()
    assert [type(m) for m in model.modules()] == classes
    assert all(m._compiled_call_impl is None for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(ATTENTION_BACKENDS))
def test_attention_backend_enables_exactly_its_kernels(name, restore_sdp_switches):
    enabled = set_attention_backend(name)
    assert set(enabled) == set(ATTENTION_BACKENDS[name])
    assert {k for k, read in SWITCHES.items() if read()} == set(ATTENTION_BACKENDS[name])
    assert name == "auto" or enabled == (name,)


def test_unknown_attention_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend("fastest")


def test_compile_blocks_keeps_keys_and_outputs():
    """Traced with the eager backend (no code generation: a CPU test in seconds)."""
    model = _tiny()
    x = _inputs()
    keys = list(model.state_dict())
    model.eval()
    with torch.no_grad():
        expected = model(*x)
    n = compile_blocks(model, backend="eager")
    assert n == sum(len(level) for level in (*model.down_blocks, *model.up_blocks))
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(*x), expected, atol=1e-6, rtol=0)
    model.train()
    model(*x).square().mean().backward()  # gradients flow through the compiled blocks to LoRA
    lora = [p for n, p in model.named_parameters() if "lora_up" in n]
    assert lora and all(p.grad is not None for p in lora)


def test_compile_blocks_refuses_a_model_without_blocks():
    with pytest.raises(ValueError, match="down_blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
