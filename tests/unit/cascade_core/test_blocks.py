"""Shared blocks against their definitions in FACTS_official.md section 3.4 (written out in torch here)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cascade_core.models.blocks import (
    AttnBlock,
    GlobalResponseNorm,
    LayerNorm2d,
    MultiheadAttention,
    ResBlock,
    TimestepBlock,
    UpDownBlock2d,
    r_embedding,
)


def test_layernorm2d_normalises_channels_without_weights():
    x = torch.randn(2, 5, 3, 4)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (5,), eps=1e-6).permute(0, 3, 1, 2)
    norm = LayerNorm2d(5)
    assert torch.allclose(norm(x), ref, atol=1e-6)
    assert len(norm.state_dict()) == 0


def test_grn_matches_formula_and_is_identity_at_init():
    x = torch.randn(2, 3, 4, 6)
    grn = GlobalResponseNorm(6)
    assert torch.equal(grn(x), x)  # gamma = beta = 0 -> out = x
    grn.gamma.data.normal_()
    grn.beta.data.normal_()
    g = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
    assert torch.allclose(grn(x), grn.gamma * (x * n) + grn.beta + x, atol=1e-6)


def test_resblock_keys_and_skip_width():
    blk = ResBlock(8, c_skip=8)
    shapes = {k: tuple(v.shape) for k, v in blk.state_dict().items()}
    assert shapes["depthwise.weight"] == (8, 1, 3, 3)
    assert shapes["channelwise.0.weight"] == (32, 16)
    assert shapes["channelwise.2.gamma"] == (1, 1, 1, 32)
    assert shapes["channelwise.4.weight"] == (8, 32)
    x, skip = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    assert blk(x, skip).shape == x.shape


def test_timestep_block_sums_mappers_per_chunk():
    blk = TimestepBlock(4, 6, conds=("sca", "crp"))
    for p in blk.parameters():
        p.data.normal_()
    x, t = torch.randn(2, 4, 3, 3), torch.randn(2, 18)
    ab = blk.mapper(t[:, :6]) + blk.mapper_sca(t[:, 6:12]) + blk.mapper_crp(t[:, 12:])
    a, b = ab[:, :4, None, None], ab[:, 4:, None, None]
    assert torch.allclose(blk(x, t), x * (1 + a) + b, atol=1e-6)


def test_attention_equals_torch_multihead_attention():
    """Same parameters as nn.MultiheadAttention (batch_first), keys/values = [x ; context]."""
    torch.manual_seed(1)
    ours = MultiheadAttention(16, 4).eval()
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    ours.load_state_dict(ref.state_dict())
    x, ctx = torch.randn(2, 9, 16), torch.randn(2, 5, 16)
    kv = torch.cat([x, ctx], dim=1)
    with torch.no_grad():
        expected = ref(x, kv, kv, need_weights=False)[0]
        assert torch.allclose(ours(x, ctx), expected, atol=1e-5)
        expected_cross = ref(x, ctx, ctx, need_weights=False)[0]
        assert torch.allclose(ours(x, ctx, self_attn=False), expected_cross, atol=1e-5)


def test_attention_adapters_add_to_fused_projection():
    attn = MultiheadAttention(8, 2)
    tokens = torch.randn(1, 3, 8)
    base = attn.project_in(tokens)
    attn.in_proj_adapters["delta"] = torch.nn.Linear(8, 24, bias=False)
    assert torch.allclose(attn.project_in(tokens), base + attn.in_proj_adapters["delta"](tokens))
    assert set(MultiheadAttention(8, 2).state_dict()) == {
        "in_proj_weight",
        "in_proj_bias",
        "out_proj.weight",
        "out_proj.bias",
    }


def test_attnblock_key_names():
    keys = set(AttnBlock(16, 12, 2).state_dict())
    assert keys == {
        "attention.attn.in_proj_weight",
        "attention.attn.in_proj_bias",
        "attention.attn.out_proj.weight",
        "attention.attn.out_proj.bias",
        "kv_mapper.1.weight",
        "kv_mapper.1.bias",
    }


def test_updown_disabled_is_a_1x1_conv():
    blk = UpDownBlock2d(4, 6, mode="down", enabled=False)
    x = torch.randn(1, 4, 5, 5)
    assert torch.allclose(blk(x), blk.blocks[0](x))
    assert UpDownBlock2d(4, 6, mode="up").forward(x).shape == (1, 6, 10, 10)
    with pytest.raises(ValueError, match="mode"):
        UpDownBlock2d(4, 6, mode="sideways")


def test_r_embedding_formula():
    r = torch.tensor([0.0, 0.25])
    emb = r_embedding(r, 8)
    freqs = torch.tensor([math.exp(-k * math.log(10000) / 3) for k in range(4)])
    arg = r[:, None] * 10000 * freqs
    assert torch.allclose(emb, torch.cat([arg.sin(), arg.cos()], dim=1), atol=1e-4)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # embedding of 0: zeros then ones
