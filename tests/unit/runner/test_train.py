"""The training loop on the tiny checkpoints: loss falls, exact resume, NaN handling, seeded repeatability."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import runner.train as train_module
from runner.errors import UserError
from runner.recipe import read_recipe
from runner.train import NonFiniteLossError, train

# what follows conftest.TINY_HEAD (the tiny models) in this file's recipe
RECIPE = """{decoder}training:
  mode: lora
  lora: {{rank: 4, alpha: 4}}
  batch_size: 2
  max_steps: 6
  learning_rate: 3e-3
  loss_weighting: none
  caption_dropout: 0.25
  seed: 7
data:
  sources:
    - {{name: tiny, type: local, path: {data}, caption_strategy: textfile, resolution: 128}}
  cache: {{text_embeddings_dir: {cache}/text, latents_dir: {cache}/latents}}
  workers: 0
validation:
  enabled: false
  every_n_steps: 6
  prompts: [a red square]
  width: 128
  height: 128
  prior_steps: 2
  decoder_steps: 2
checkpoints: {{every_n_steps: 3, keep_last: 2}}
export: {{lora_formats: [native]}}
logging: {{report_to: jsonl, progress_bar: false}}
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, gradient_squares) -> Path:
    """Four small pictures with captions: flat colours with a gradient, different aspect ratios."""
    squares = [("red", (160, 128)), ("green", (128, 128)), ("blue", (128, 170)), ("grey", (150, 150))]
    return gradient_squares(tmp_path_factory.mktemp("images"), squares)


@pytest.fixture
def recipe_path(write_tiny_recipe, dataset) -> Path:
    return write_tiny_recipe(RECIPE, dataset, "run.yaml")


def run(recipe: Path, *overrides: str) -> dict:
    return train(read_recipe(recipe, list(overrides)))


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def test_same_seed_same_losses_and_files(tmp_path, recipe_path):
    summary = run(recipe_path, "training.max_steps=3", "checkpoints.every_n_steps=3")
    again = f"output.dir={tmp_path / 'again'}"
    run(recipe_path, "training.max_steps=3", "checkpoints.every_n_steps=3", again)
    first, second = losses(tmp_path / "run"), losses(tmp_path / "again")
    assert len(first) == 3 and first == second
    assert summary["skipped_steps"] == 0
    for name in ("metrics.jsonl", "loss_curve.png", "summary.json", "export/lora_native.safetensors",
                 "checkpoints/step_000003/trainable.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
    exported = load_file(str(tmp_path / "run" / "export/lora_native.safetensors"))
    assert exported and all(torch.isfinite(t).all() for t in exported.values())


def test_existing_output_is_never_overwritten(tmp_path, recipe_path):
    run(recipe_path, "training.max_steps=1", "checkpoints.every_n_steps=1")
    with pytest.raises(UserError, match="not empty"):
        run(recipe_path, "training.max_steps=1")


def test_resume_is_exact(tmp_path, recipe_path, monkeypatch):
    """6 straight steps == 3 steps, a crash, and a resume for the other 3 (bit for bit on CPU)."""
    run(recipe_path, f"output.dir={tmp_path / 'straight'}")

    real_loss = train_module.stage_c_loss
    calls = {"n": 0}

    def crash_on_fourth_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash after the step-3 checkpoint")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "stage_c_loss", crash_on_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        run(recipe_path, f"output.dir={tmp_path / 'resumed'}")
    monkeypatch.setattr(train_module, "stage_c_loss", real_loss)
    assert (tmp_path / "resumed/checkpoints/latest").read_text().strip() == "step_000003"
    run(recipe_path, f"output.dir={tmp_path / 'resumed'}", "checkpoints.resume=latest")

    straight = load_file(str(tmp_path / "straight/checkpoints/step_000006/trainable.safetensors"))
    resumed = load_file(str(tmp_path / "resumed/checkpoints/step_000006/trainable.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    # a checkpoint folder named explicitly continues into a new, not yet existing output folder
    branch = tmp_path / "branch"
    summary = run(recipe_path, f"output.dir={branch}",
                  f"checkpoints.resume={tmp_path / 'straight/checkpoints/step_000003'}")
    assert summary["steps_this_session"] == 3
    assert losses(branch) == losses(tmp_path / "straight")[3:]


def test_a_nan_step_is_skipped_and_counted(tmp_path, recipe_path, monkeypatch):
    real_loss = train_module.stage_c_loss
    calls = {"n": 0}

    def nan_on_second(*args, **kwargs):
        calls["n"] += 1
        result = real_loss(*args, **kwargs)
        if calls["n"] == 2:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(train_module, "stage_c_loss", nan_on_second)
    summary = run(recipe_path, "training.max_steps=4", "checkpoints.every_n_steps=4")
    assert summary["skipped_steps"] == 1
    weights = load_file(str(tmp_path / "run/checkpoints/step_000004/trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[1]["loss"] is None and rows[1]["skipped_nonfinite"] == 1


def test_nan_every_step_stops_with_a_checkpoint(tmp_path, recipe_path, monkeypatch):
    real_loss = train_module.stage_c_loss

    def always_nan(*args, **kwargs):
        result = real_loss(*args, **kwargs)
        result.loss = result.loss * float("inf")
        return result

    monkeypatch.setattr(train_module, "stage_c_loss", always_nan)
    with pytest.raises(NonFiniteLossError, match="training.precision"):
        run(recipe_path, "training.max_steps=40", "checkpoints.every_n_steps=40")
    assert (tmp_path / "run/checkpoints/latest").is_file()


def test_loss_falls_on_a_tiny_overfit_set(tmp_path, recipe_path):
    """The trained LoRA lowers the loss on the training latents with the same t and noise."""
    from runner.build import build_effnet, build_loader, build_prior, build_text_encoder
    from runner.lora_files import load_lora_into
    from runner.step import stage_c_loss

    overrides = ["training.max_steps=40", "checkpoints.every_n_steps=40", "training.caption_dropout=0",
                 "training.learning_rate=1e-2", "training.lora.rank=8", "training.lora.alpha=8"]
    run(recipe_path, *overrides)
    recipe = read_recipe(recipe_path, overrides).spec
    device = torch.device("cpu")
    text = build_text_encoder(recipe, device)
    effnet, _ = build_effnet(recipe, device)
    base = build_prior(recipe, device).eval()
    text.clip_img_dim = base.config.c_clip_img
    loader, _ = build_loader(recipe)

    def probe(prior) -> float:
        total = 0.0
        for i, batch in enumerate(loader.plan()):
            from runner.data.loader import make_batch

            b = make_batch(loader.index, loader.cfg, 0, batch, None)
            with torch.no_grad():
                from cascade_core.models.effnet import imagenet_normalize

                latents = effnet(imagenet_normalize(b["images"]))
                cond = text.encode(b["captions"])
                torch.manual_seed(100 + i)
                total += float(stage_c_loss(prior, latents, cond, recipe.training, step=0,
                                            autocast_dtype=None, adaptive=None).loss)
        return total

    before = probe(base)
    load_lora_into(base, tmp_path / "run/export/lora_native.safetensors", name="default")
    after = probe(base)
    assert after < 0.8 * before, (before, after)


def _probe_loss(recipe_path: Path, overrides: list[str], lora: Path | None) -> float:
    """Plain epsilon loss of the base (+ LoRA) on every training batch with fixed t and noise."""
    from cascade_core.models.effnet import imagenet_normalize
    from runner.build import build_effnet, build_loader, build_prior, build_text_encoder
    from runner.data.loader import make_batch
    from runner.lora_files import load_lora_into
    from runner.step import stage_c_loss

    recipe = read_recipe(recipe_path, overrides).spec
    plain = read_recipe(recipe_path, [o for o in overrides if "diff2flow" not in o
                                      and "scheduled_sampling" not in o]).spec.training
    device = torch.device("cpu")
    text = build_text_encoder(recipe, device)
    effnet, _ = build_effnet(recipe, device)
    prior = build_prior(recipe, device).eval()
    text.clip_img_dim = prior.config.c_clip_img
    if lora is not None:
        load_lora_into(prior, lora, name="default")
    loader, _ = build_loader(recipe)
    total = 0.0
    for i, planned in enumerate(loader.plan()):
        batch = make_batch(loader.index, loader.cfg, 0, planned, None)
        with torch.no_grad():
            latents = effnet(imagenet_normalize(batch["images"]))
            torch.manual_seed(100 + i)
            total += float(stage_c_loss(prior, latents, text.encode(batch["captions"]), plain, step=0,
                                        autocast_dtype=None, adaptive=None).loss)
    return total


@pytest.mark.parametrize("option, objective", [
    (["training.diff2flow.enabled=true"], "diff2flow"),
    (["training.scheduled_sampling.enabled=true", "training.scheduled_sampling.probability=1.0",
      "training.scheduled_sampling.max_offset=2"], "eps_mse+rollout"),
])
def test_experimental_objectives_train_and_lower_the_loss(tmp_path, recipe_path, option, objective):
    overrides = ["training.max_steps=30", "checkpoints.every_n_steps=30", "training.caption_dropout=0",
                 "training.learning_rate=1e-2", "training.lora.rank=8", "training.lora.alpha=8", *option]
    run(recipe_path, *overrides)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(r["objective"] == objective and r["loss"] is not None for r in rows)
    if "rollout" in objective:
        assert sum(r["rollout_forwards"] for r in rows) > 0  # the extra forward passes are reported
    before = _probe_loss(recipe_path, overrides, None)
    after = _probe_loss(recipe_path, overrides, tmp_path / "run/export/lora_native.safetensors")
    assert after < 0.9 * before, (before, after)
