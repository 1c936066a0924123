"""Stage C against the official outputs (golden/stage_c_tiny) and the real key manifests."""

from __future__ import annotations

import json

import pytest
import torch

from cascade_core import StageC, StageCConfig, load_stage_c
from cascade_core.models.stage_c import STAGE_C_PRESETS, stage_c_config_from_shapes

ATOL = 1e-5


@pytest.fixture(scope="module")
def golden(golden_files):
    return golden_files.load("stage_c_tiny.safetensors")


@pytest.fixture(scope="module")
def tiny_model(golden_dir):
    # The golden file keeps weights under `model.`; the loader finds them by the anchor key.
    return load_stage_c(golden_dir / "stage_c_tiny.safetensors")


def _inputs(g):
    return g["input.x"], g["input.r"], g["input.clip_text"], g["input.clip_text_pooled"], g["input.clip_img"]


def test_golden_config_is_the_tiny_preset(golden_files, tiny_model):
    official = golden_files.config("stage_c_tiny.safetensors")
    assert StageCConfig.from_dict(official) == StageCConfig.preset("tiny")
    assert tiny_model.config == StageCConfig.preset("tiny")


def test_golden_outputs(golden, tiny_model):
    with torch.no_grad():
        out = tiny_model(*_inputs(golden))
        out_sca_crp = tiny_model(*_inputs(golden), sca=golden["input.sca"], crp=golden["input.crp"])
    torch.testing.assert_close(out, golden["output.out"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_sca_crp, golden["output.out_sca_crp"], atol=ATOL, rtol=0)
    assert (out - out_sca_crp).abs().max() > 1e-3  # sca/crp really reach the model


def test_golden_intermediates(golden, tiny_model):
    g = golden
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_model.embed_r(g["input.r"]), g["intermediate.r_embed"], atol=ATOL, rtol=0
        )
        torch.testing.assert_close(
            tiny_model.embed_r(g["input.r"], sca=g["input.sca"], crp=g["input.crp"]),
            g["intermediate.r_embed_sca_crp"],
            atol=ATOL,
            rtol=0,
        )
        clip = tiny_model.embed_clip(g["input.clip_text"], g["input.clip_text_pooled"], g["input.clip_img"])
        torch.testing.assert_close(clip, g["intermediate.clip_tokens"], atol=ATOL, rtol=0)
        torch.testing.assert_close(
            tiny_model.embedding(g["input.x"]), g["intermediate.embedding"], atol=ATOL, rtol=0
        )


def test_2d_pooled_and_image_embeddings_are_accepted(golden, tiny_model):
    g = golden
    with torch.no_grad():
        a = tiny_model.embed_clip(g["input.clip_text"], g["input.clip_text_pooled"], g["input.clip_img"])
        b = tiny_model.embed_clip(
            g["input.clip_text"], g["input.clip_text_pooled"][:, 0], g["input.clip_img"][:, 0]
        )
    assert torch.equal(a, b)


@pytest.mark.parametrize("preset,manifest", [("stage-c", "stage_c"), ("stage-c-lite", "stage_c_lite")])
def test_real_presets_on_meta_match_manifest(preset, manifest, manifest_dir):
    m = json.loads((manifest_dir / "original" / f"{manifest}.json").read_text())
    assert StageCConfig.from_dict(m["official_constructor_kwargs"]) == StageCConfig.preset(preset)
    model = StageC(StageCConfig.preset(preset), device="meta")
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(m["keys"])  # same keys in the same order
    assert got == m["keys"]
    assert sum(p.numel() for p in model.parameters()) == m["num_parameters"]


def test_gradient_checkpointing_gives_the_same_gradients(golden):
    cfg = StageCConfig.preset("tiny", dropout=(0.0, 0.0))
    torch.manual_seed(0)
    plain = StageC(cfg)
    ckpt = StageC(cfg)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_gradient_checkpointing(True)
    grads = []
    for model in (plain, ckpt):
        model.train()
        model(*_inputs(golden)).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_config_flag_enables_checkpointing():
    assert StageC(
        StageCConfig.preset("tiny", gradient_checkpointing=True), device="meta"
    ).gradient_checkpointing


def test_bf16_model_runs_with_fp32_conditioning(golden):
    model = StageC(StageCConfig.preset("tiny"), dtype=torch.bfloat16).eval()
    x, r, *clip = _inputs(golden)
    with torch.no_grad():
        out = model(x.bfloat16(), r, *clip)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_bad_inputs_and_configs_give_clear_errors(golden):
    model = StageC(StageCConfig.preset("tiny")).eval()
    x, r, *clip = _inputs(golden)
    with pytest.raises(ValueError, match=r"x of shape \[B, 16, H, W\]"):
        model(x[:, :4], r, *clip)
    with pytest.raises(ValueError, match="r of shape"):
        model(x, r[:1], *clip)
    with pytest.raises(ValueError, match="nhead has 1 entries"):
        StageCConfig(nhead=(32,))
    with pytest.raises(ValueError, match="unknown StageCConfig keys"):
        StageCConfig.from_dict({"c_hiden": [1]})
    with pytest.raises(ValueError, match="unknown Stage C preset"):
        StageCConfig.preset("stage-c-huge")


def test_presets_are_recovered_from_shapes(manifest_dir):
    for name in ("stage-c", "stage-c-lite", "tiny"):
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in StageC(STAGE_C_PRESETS[name]).state_dict().items()}
        assert stage_c_config_from_shapes(shapes) == (STAGE_C_PRESETS[name], name)


def test_custom_variant_is_inferred_with_heads_from_width():
    variant = StageCConfig(
        c_cond=128,
        c_hidden=(128, 192),
        nhead=(2, 3),
        blocks=((1, 3), (2, 1)),
        block_repeat=((1, 2), (1, 1)),
        c_clip_text=32,
        c_clip_text_pooled=32,
        c_clip_img=16,
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in StageC(variant).state_dict().items()}
    cfg, flavour = stage_c_config_from_shapes(shapes)
    assert flavour == "custom"
    assert cfg == StageCConfig.preset("stage-c", **{**variant.__dict__, "nhead": (2, 3)})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["stage-c-lite", "stage-c"])
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_real_preset_forward_backward_on_gpu(preset, layout):
    """Full-size weights synthesized on the GPU in each key layout, loaded, then one bf16 training step."""
    from cascade_core.stage_c_io import stage_c_state_dict

    with torch.device("meta"):
        shapes = stage_c_state_dict(StageC(StageCConfig.preset(preset)), layout)
    gen = torch.Generator("cuda").manual_seed(0)
    state = {
        k: torch.randn(shapes[k].shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        for k in shapes
    }
    model = load_stage_c(state, device="cuda", dtype=torch.bfloat16).train()
    del state
    assert model.config == StageCConfig.preset(preset)
    model.set_gradient_checkpointing(True)
    b = 4
    x = torch.randn(b, 16, 24, 24, device="cuda", dtype=torch.bfloat16)
    out = model(
        x,
        torch.rand(b, device="cuda"),
        torch.randn(b, 77, 1280, device="cuda"),
        torch.randn(b, 1, 1280, device="cuda"),
        torch.zeros(b, 1, 768, device="cuda"),
    )
    out.float().square().mean().backward()
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
