"""performance.cuda_graphs: where it is refused (CPU), and on a GPU that a replayed graph computes exactly
what the eager loss + backward computes, draws the same noise, accumulates and serves several shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cascade_core.models.stage_c import StageC, StageCConfig
from cascade_core.models.text import TextConditioning
from cascade_core.peft.lora import inject_lora, lora_parameters
from runner.errors import UserError
from runner.graphed_step import GraphedLoss, graph_support_problem
from runner.recipe import RecipeError, read_recipe
from runner.step import stage_c_loss

RECIPE = """\
output: {{dir: {out}}}
model:
  flavour: tiny
  prior: {{path: {out}, subfolder: prior}}
  text_encoder: {{path: {out}, subfolder: text_encoder}}
  tokenizer: {{path: {out}, subfolder: tokenizer}}
  effnet: {{path: {out}, filename: effnet_encoder.safetensors}}
training:
  max_steps: 4
  loss_weighting: {weighting}
data:
  sources:
    - {{name: a, type: local, path: {out}}}
validation: {{enabled: false}}
performance:
  cuda_graphs: true
"""


def _recipe(tmp_path: Path, weighting: str = "p2", overrides: tuple[str, ...] = ()):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(out=tmp_path, weighting=weighting))
    return read_recipe(path, overrides, paths="warn").spec


def test_support_is_refused_with_reasons(tmp_path):
    cuda = torch.device("cuda")
    assert graph_support_problem(cuda, 1) is None
    assert "needs a CUDA GPU" in graph_support_problem(torch.device("cpu"), 1)
    assert "one process only" in graph_support_problem(cuda, 2)
    with pytest.raises(RecipeError, match="cannot capture scheduled sampling"):
        _recipe(tmp_path, overrides=("training.scheduled_sampling.enabled=true",))
    with pytest.raises(RecipeError, match="do not support fp16 loss scaling"):
        _recipe(tmp_path, overrides=("training.precision.mixed_precision=fp16",
                                     "training.precision.i_know_what_i_am_doing=true"))


# ---- GPU: graph replay == eager
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _prior(device: torch.device, checkpointing: bool = False) -> tuple[StageC, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    prior = StageC(StageCConfig.preset("tiny")).to(device).eval()
    for p in prior.parameters():
        p.requires_grad_(False)
    inject_lora(prior, rank=2, alpha=2, targets="attention")
    with torch.no_grad():
        for p in lora_parameters(prior):
            p.normal_(0, 0.1)  # a non-zero product, so every adapter weight gets a gradient
    prior.set_gradient_checkpointing(checkpointing)
    return prior, list(lora_parameters(prior))


def _batch(b: int, seed: int, device: torch.device, size: int = 4) -> tuple[torch.Tensor, TextConditioning]:
    g = torch.Generator().manual_seed(seed)
    cfg = StageCConfig.preset("tiny")
    latents = torch.randn(b, 16, size, size, generator=g)
    cond = TextConditioning(torch.randn(b, 5, cfg.c_clip_text, generator=g),
                            torch.randn(b, 1, cfg.c_clip_text_pooled, generator=g),
                            torch.randn(b, 1, cfg.c_clip_img, generator=g))
    return latents.to(device), cond.to(device)


def _eager(prior, params, training, batch, autocast_dtype, accum: int):
    result = stage_c_loss(prior, *batch, training, step=0, autocast_dtype=autocast_dtype, adaptive=None)
    (result.loss / accum).backward()
    return result


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", ["fp32", "bf16-autocast", "checkpointing"])
def test_replay_equals_eager_and_draws_the_same_noise(tmp_path, variant):
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    training = _recipe(tmp_path).training
    autocast_dtype = torch.bfloat16 if variant == "bf16-autocast" else None
    accum = 2
    # shape A twice (capture, then replay with new data), shape B once, shape A again
    batches = [_batch(2, 1, device), _batch(2, 2, device), _batch(3, 3, device, size=6), _batch(2, 4, device)]

    prior, params = _prior(device, checkpointing=variant == "checkpointing")
    torch.cuda.manual_seed(7)
    eager_losses, eager_grads, eager_rng = [], [], []
    for batch in batches:
        eager_losses.append(_eager(prior, params, training, batch, autocast_dtype, accum).loss.detach())
        eager_grads.append([p.grad.clone() for p in params])  # running sums: accumulation
        eager_rng.append(torch.cuda.get_rng_state())

    prior, params = _prior(device, checkpointing=variant == "checkpointing")
    graphed = GraphedLoss(prior, params, training, autocast_dtype=autocast_dtype, adaptive=None,
                          accumulation_steps=accum)
    torch.cuda.manual_seed(7)
    tol = {"rtol": 1e-5, "atol": 1e-6} if autocast_dtype is None else {"rtol": 1e-2, "atol": 1e-3}
    for i, batch in enumerate(batches):
        result = graphed(*batch)
        assert torch.equal(torch.cuda.get_rng_state(), eager_rng[i]), f"micro-batch {i}: RNG position"
        torch.testing.assert_close(result.loss, eager_losses[i], **tol, msg=f"micro-batch {i}: loss")
        for p, expected in zip(params, eager_grads[i], strict=True):
            torch.testing.assert_close(p.grad, expected, **tol)
    assert graphed.captures == 2


@pytest.mark.gpu
@needs_cuda
def test_zeroing_in_place_starts_a_fresh_accumulation(tmp_path):
    device = torch.device("cuda")
    training = _recipe(tmp_path).training
    prior, params = _prior(device)
    graphed = GraphedLoss(prior, params, training, autocast_dtype=None, adaptive=None, accumulation_steps=1)
    batch = _batch(2, 1, device)
    torch.cuda.manual_seed(3)
    graphed(*batch)
    first = [p.grad.clone() for p in params]
    grads = [p.grad for p in params]
    for p in params:
        p.grad.zero_()
    torch.cuda.manual_seed(3)
    graphed(*batch)
    assert all(p.grad is g for p, g in zip(params, grads, strict=True)), "the .grad tensors must be kept"
    for p, expected in zip(params, first, strict=True):
        torch.testing.assert_close(p.grad, expected)


@pytest.mark.gpu
@needs_cuda
def test_a_step_that_cannot_be_captured_names_the_switch(tmp_path, monkeypatch):
    device = torch.device("cuda")
    training = _recipe(tmp_path).training
    prior, params = _prior(device)
    real_forward = prior.forward

    def syncing_forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out.sum().item()  # a host sync: legal eagerly, not inside a capture
        return out

    monkeypatch.setattr(prior, "forward", syncing_forward)
    graphed = GraphedLoss(prior, params, training, autocast_dtype=None, adaptive=None, accumulation_steps=1)
    with pytest.raises(UserError, match="performance.cuda_graphs: false"):
        graphed(*_batch(2, 1, device))
