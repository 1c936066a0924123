"""cascade_core.pipeline on the tiny checkpoints: sizes, seeding, negative prompts, Stage B conditioning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cascade_core.models.text import encode_text
from cascade_core.pipeline import (
    DECODER_DEFAULTS,
    PRIOR_DEFAULTS,
    CascadeModels,
    SamplerSettings,
    expand_prompts,
    generate,
)

FAST_PRIOR = SamplerSettings(steps=3, guidance=4.0, shift=2.0)
FAST_DECODER = SamplerSettings(steps=2, guidance=1.1, shift=1.0)


class Spy(nn.Module):
    """Wraps a model and records the keyword/positional inputs of every call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.calls: list[dict] = []

    def forward(self, x, r, **kwargs):
        self.calls.append({"x": x, "r": r, **kwargs})
        return self.model(x, r, **kwargs)


@pytest.fixture(scope="module")
def models(tiny_cascade_models) -> CascadeModels:
    return tiny_cascade_models


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def run(models, prompts, seeds, **kw):
    kw.setdefault("prior", FAST_PRIOR)
    kw.setdefault("decoder", FAST_DECODER)
    return generate(models, prompts, generators=gens(*seeds), **kw)


def test_official_defaults():
    assert (PRIOR_DEFAULTS.steps, PRIOR_DEFAULTS.guidance, PRIOR_DEFAULTS.shift) == (20, 4.0, 2.0)
    assert (DECODER_DEFAULTS.steps, DECODER_DEFAULTS.guidance, DECODER_DEFAULTS.shift) == (10, 1.1, 1.0)
    assert PRIOR_DEFAULTS.sampler == DECODER_DEFAULTS.sampler == "ddpm"
    assert PRIOR_DEFAULTS.cfg_rho == 0.7
    assert SamplerSettings(steps=1, guidance=0.0, shift=1.0).cfg is None  # 0 = no CFG


@pytest.mark.parametrize("preview_only", [True, False])
@pytest.mark.parametrize(
    ("height", "width", "latent"), [(128, 128, (3, 3)), (100, 150, (3, 4)), (96, 64, (3, 2))]
)
def test_any_size(models, preview_only, height, width, latent):
    out = run(models, ["a red cat", "dog"], (1, 2), height=height, width=width, preview_only=preview_only)
    assert out.images.shape == (2, 3, height, width) and out.images.dtype == torch.float32
    assert out.latents.shape == (2, 16, *latent)
    assert out.images.min() >= 0 and out.images.max() <= 1


def test_1024_gives_24x24_prior_latents(models):
    out = run(models, ["dog"], (0,), preview_only=True, prior=SamplerSettings(1, 4.0, 2.0))
    assert out.latents.shape == (1, 16, 24, 24) and out.images.shape == (1, 3, 1024, 1024)


def test_each_image_noise_comes_from_its_own_generator(models):
    # Without the CFG rescale (whose std is taken over the whole batch, as in the official sampler) an
    # image does not depend on its batch companions.
    per_sample = {
        "prior": SamplerSettings(3, 4.0, 2.0, cfg_rho=0.0),
        "decoder": SamplerSettings(2, 1.1, 1.0, cfg_rho=0.0),
    }
    batch = run(models, ["a red cat", "dog"], (5, 6), height=64, width=64, **per_sample)
    one = run(models, ["dog"], (6,), height=64, width=64, **per_sample)
    torch.testing.assert_close(batch.latents[1:], one.latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch.images[1:], one.images, atol=1e-4, rtol=1e-4)
    one = run(models, ["dog"], (6,), height=64, width=64)
    again = run(models, ["dog"], (6,), height=64, width=64)
    assert torch.equal(again.latents, one.latents)
    other = run(models, ["dog"], (7,), height=64, width=64)
    assert not torch.allclose(other.latents, one.latents)


def test_negative_prompt_feeds_the_unconditional_branch(models):
    spy = Spy(models.stage_c)
    spied = CascadeModels(spy, models.text_model, models.tokenizer, previewer=models.previewer)
    run(spied, ["a red cat"], (1,), height=64, width=64, negative_prompts="dog", preview_only=True)
    expected = encode_text(models.text_model, models.tokenizer, ["a red cat", "dog"], clip_img_dim=20)
    first = spy.calls[0]
    assert len(spy.calls) == FAST_PRIOR.steps and first["x"].shape[0] == 2  # [cond; uncond]
    torch.testing.assert_close(first["clip_text"], expected.clip_text)
    torch.testing.assert_close(first["clip_text_pooled"], expected.clip_text_pooled)
    assert first["clip_img"].shape == (2, 1, 20) and not first["clip_img"].any()
    with_neg = run(
        models, ["a red cat"], (1,), height=64, width=64, negative_prompts="dog", preview_only=True
    )
    without = run(models, ["a red cat"], (1,), height=64, width=64, preview_only=True)
    assert not torch.allclose(with_neg.latents, without.latents)


def test_guidance_zero_runs_only_the_conditional_branch(models):
    spy = Spy(models.stage_c)
    spied = CascadeModels(spy, models.text_model, models.tokenizer, previewer=models.previewer)
    no_cfg = SamplerSettings(steps=2, guidance=0.0, shift=2.0)
    a = run(
        spied, ["cat"], (1,), height=64, width=64, preview_only=True, prior=no_cfg, negative_prompts="dog"
    )
    assert all(c["x"].shape[0] == 1 for c in spy.calls)
    b = run(models, ["cat"], (1,), height=64, width=64, preview_only=True, prior=no_cfg)
    assert torch.equal(a.latents, b.latents)  # the negative prompt is unused without CFG


def test_stage_b_is_conditioned_on_the_prior_latent_and_pooled_text(models):
    spy = Spy(models.stage_b)
    spied = CascadeModels(models.stage_c, models.text_model, models.tokenizer, None, spy, models.stage_a)
    out = run(spied, ["a red cat"], (3,), height=100, width=150, negative_prompts="dog")
    pooled = encode_text(models.text_model, models.tokenizer, ["a red cat", "dog"]).clip_text_pooled
    first = spy.calls[0]
    assert len(spy.calls) == FAST_DECODER.steps
    assert first["x"].shape == (2, 4, 26, 38)  # ceil(100/4)=25 -> 26 (patch 2), ceil(150/4)=38
    torch.testing.assert_close(first["effnet"][:1], out.latents)
    assert not first["effnet"][1:].any()  # unconditional effnet = zeros
    torch.testing.assert_close(first["clip"], pooled)  # [cond; negative prompt]
    assert "pixels" not in first  # Stage B's default zeros


def test_decoder_guidance_zero_and_size_limits(models):
    spy = Spy(models.stage_b)
    spied = CascadeModels(models.stage_c, models.text_model, models.tokenizer, None, spy, models.stage_a)
    run(spied, ["cat"], (1,), height=64, width=64, decoder=SamplerSettings(2, 0.0, 1.0))
    assert all(c["x"].shape[0] == 1 for c in spy.calls)
    with pytest.raises(ValueError, match="too small for Stage B"):
        run(models, ["cat"], (1,), height=32, width=64)


def test_bad_inputs_are_named(models):
    with pytest.raises(ValueError, match="one torch.Generator per image"):
        generate(models, ["a", "b"], generators=gens(1), height=64, width=64)
    with pytest.raises(ValueError, match="needs a previewer"):
        generate(
            CascadeModels(models.stage_c, models.text_model, models.tokenizer),
            ["a"],
            generators=gens(1),
            preview_only=True,
        )
    with pytest.raises(ValueError, match="Stage B and Stage A"):
        generate(
            CascadeModels(models.stage_c, models.text_model, models.tokenizer), ["a"], generators=gens(1)
        )
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        SamplerSettings(steps=2, guidance=-1.0, shift=1.0)
    with pytest.raises(ValueError, match="steps must be an integer"):
        SamplerSettings(steps=0, guidance=1.0, shift=1.0)
    with pytest.raises(ValueError, match="2 strings"):
        expand_prompts(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="wrap a single prompt"):
        expand_prompts("a cat", None)
    assert expand_prompts(["a", "b"], "x") == (["a", "b"], ["x", "x"])
    assert expand_prompts(["a"], None) == (["a"], [""])
