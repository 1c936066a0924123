"""LoRA layers: zero init, scale alpha/rank, merge/unmerge, strength, several adapters, trainability."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from stage_c_like import TinyNet  # tests/unit/cascade_core/stage_c_like.py
from torch import nn

from cascade_core.peft.lora import (
    LoRAAdapter,
    LoRAConv2d,
    LoRALinear,
    inject_lora,
    iter_lora_adapters,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    resolve_targets,
    set_lora_enabled,
    set_lora_strength,
    unmerge_lora,
)

ATTN = "down_blocks.0.1.attention.attn"


@pytest.fixture
def net() -> TinyNet:
    return TinyNet().eval()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 5, 8, generator=g)


def _randomize(model: nn.Module, name: str | None = None) -> None:
    with torch.no_grad():
        for p in lora_parameters(model, name):
            p.normal_(0.0, 0.3)


def test_presets_and_patterns(net):
    assert resolve_targets(net, "attention") == [f"{ATTN}.in_proj", f"{ATTN}.out_proj"]
    assert resolve_targets(net, "attention+ffn") == [
        "down_blocks.0.0.channelwise.0",
        "down_blocks.0.0.channelwise.4",
        f"{ATTN}.in_proj",
        f"{ATTN}.out_proj",
    ]
    every = resolve_targets(net, "all-linear")
    assert "embedding.1" in every and "clf.1" in every and "down_blocks.0.1.kv_mapper.1" in every
    assert "down_blocks.0.0.depthwise" not in every  # grouped 3x3 conv cannot host LoRA
    assert resolve_targets(net, ["*.kv_mapper.1", "clf.*"]) == ["down_blocks.0.1.kv_mapper.1", "clf.1"]
    with pytest.raises(ValueError, match="match no Linear"):
        resolve_targets(net, ["*.to_q"])
    with pytest.raises(ValueError, match="unknown LoRA target preset"):
        resolve_targets(net, "attn")


@pytest.mark.parametrize("init", ["standard", "official"])
def test_zero_init_equals_base(net, batch, init):
    base = net(*batch)
    base_keys = set(net.state_dict())
    inject_lora(net, rank=4, alpha=8, targets="all-linear", init=init)
    assert torch.equal(net(*batch), base)  # the product up @ down starts exactly at zero
    assert isinstance(net.clf[1], LoRAConv2d) and isinstance(net.down_blocks[0][1].kv_mapper[1], LoRALinear)
    adapter_keys = set(net.state_dict()) - base_keys
    assert base_keys <= set(net.state_dict()) and all(".lora_" in k for k in adapter_keys)


def test_forward_matches_scaled_weight_formula(net, batch):
    """Effective weight is W + (alpha / rank) * up @ down, for a Linear, a 1x1 conv and the fused in_proj."""
    inject_lora(net, rank=2, alpha=3, targets="all-linear")
    _randomize(net)
    x = torch.randn(3, 16)
    lin = net.down_blocks[0][0].channelwise[0]
    a = lin.adapters["default"]
    expected = F.linear(x, lin.weight + 1.5 * a.lora_up @ a.lora_down, lin.bias)
    torch.testing.assert_close(lin(x), expected, atol=1e-5, rtol=0)
    conv = net.clf[1]
    ca = conv.adapters["default"]
    w = conv.weight + 1.5 * (ca.lora_up.flatten(1) @ ca.lora_down.flatten(1))[:, :, None, None]
    h = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(conv(h), F.conv2d(h, w, conv.bias), atol=1e-5, rtol=0)
    attn = net.down_blocks[0][1].attention.attn
    fa = attn.in_proj_adapters["default"]
    t = torch.randn(2, 7, 16)
    expected = F.linear(t, attn.in_proj_weight + 1.5 * fa.lora_up @ fa.lora_down, attn.in_proj_bias)
    torch.testing.assert_close(attn.project_in(t), expected, atol=1e-5, rtol=0)


def test_merge_equals_unmerged_and_unmerge_restores(net, batch):
    base_sd = copy.deepcopy(net.state_dict())
    inject_lora(net, rank=4, alpha=2, targets="all-linear")
    _randomize(net)
    unmerged = net(*batch)
    assert merge_lora(net) == 7
    assert all(a.merged_strength == 1.0 for _, _, a in iter_lora_adapters(net))
    torch.testing.assert_close(net(*batch), unmerged, atol=1e-5, rtol=0)
    assert unmerge_lora(net) == 7
    for key, value in base_sd.items():
        torch.testing.assert_close(net.state_dict()[key], value, atol=1e-6, rtol=0)
    torch.testing.assert_close(net(*batch), unmerged, atol=1e-5, rtol=0)


def test_strength(net, batch):
    base = net(*batch)
    inject_lora(net, rank=4, alpha=4, targets="attention+ffn")
    _randomize(net)
    full = net(*batch)
    set_lora_strength(net, 0.0)
    assert torch.equal(net(*batch), base)
    set_lora_strength(net, 0.5)
    half = net(*batch)
    merge_lora(net)  # merged at 0.5: W + 0.5 * delta
    torch.testing.assert_close(net(*batch), half, atol=1e-5, rtol=0)
    set_lora_strength(net, 1.0)  # re-merges at the new strength
    torch.testing.assert_close(net(*batch), full, atol=1e-5, rtol=0)
    assert not torch.allclose(half, full, atol=1e-3)


def test_several_adapters_enable_disable_remove(net, batch):
    base = net(*batch)
    base_keys = set(net.state_dict())
    inject_lora(net, rank=2, alpha=2, targets="attention", name="a")
    inject_lora(net, rank=3, alpha=1, targets="attention+ffn", name="b")
    _randomize(net)
    both = net(*batch)
    set_lora_enabled(net, False, "b")
    only_a = net(*batch)
    set_lora_enabled(net, True, "b")
    set_lora_enabled(net, False, "a")
    only_b = net(*batch)
    set_lora_enabled(net, True, "a")
    # the deltas of independent adapters add up in the weights; the block output is not linear, so
    # compare against merging: merged a+b must equal both unmerged
    merge_lora(net, "a")
    torch.testing.assert_close(net(*batch), both, atol=1e-5, rtol=0)
    set_lora_enabled(net, False, "b")
    torch.testing.assert_close(net(*batch), only_a, atol=1e-5, rtol=0)
    set_lora_enabled(net, True, "b")
    with pytest.raises(ValueError, match="is merged"):
        set_lora_enabled(net, False, "a")
    assert remove_lora(net, "a") == 2
    torch.testing.assert_close(net(*batch), only_b, atol=1e-5, rtol=0)
    assert remove_lora(net, "b") == 4
    assert type(net.down_blocks[0][0].channelwise[0]) is nn.Linear
    assert set(net.state_dict()) == base_keys
    torch.testing.assert_close(net(*batch), base, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        merge_lora(net, "a")


def test_only_adapters_get_gradients(net, batch):
    inject_lora(net, rank=4, alpha=4, targets="all-linear", dropout=0.1)
    net.train()
    _randomize(net)
    net(*batch).square().mean().backward()
    adapter_ids = {id(p) for p in lora_parameters(net)}
    for name, p in net.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_state_dict_round_trip(net, batch):
    inject_lora(net, rank=4, alpha=2, targets="attention+ffn")
    _randomize(net)
    expected = net(*batch)
    sd = lora_state_dict(net)
    assert sd[f"{ATTN}.in_proj.lora_up.weight"].shape == (48, 4)
    assert float(sd[f"{ATTN}.in_proj.alpha"]) == 2.0
    other = TinyNet().eval()
    other.load_state_dict({k: v for k, v in net.state_dict().items() if ".lora_" not in k}, strict=False)
    targets = load_lora_state_dict(other, sd)
    assert len(targets) == 4
    torch.testing.assert_close(other(*batch), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="already exists"):
        load_lora_state_dict(other, sd)


def test_bad_arguments(net):
    with pytest.raises(ValueError, match="rank"):
        LoRAAdapter(4, 4, 0, 1.0)
    with pytest.raises(ValueError, match="dropout"):
        LoRAAdapter(4, 4, 2, 1.0, dropout=1.0)
    inject_lora(net, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already exists"):
        inject_lora(net, rank=2, alpha=2)
