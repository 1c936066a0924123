"""Checkpoints: exact resume (bit for bit on CPU), atomic under a crash, pruning, resume resolution, guard."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import runner.checkpoint as ckpt_mod
from runner.checkpoint import (
    capture_rng_state,
    find_latest,
    load_checkpoint,
    prepare_output_dir,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from runner.ema import EMA
from runner.errors import UserError
from runner.optim import build_optimizer, build_scheduler


def _draws() -> tuple:
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randn(2).tolist())


def test_rng_round_trip_matches_uninterrupted_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    save_checkpoint(tmp_path, 1, trainable={"w": torch.zeros(1)}, optimizer_state={}, scheduler_state={},
                    data_cursor={}, recipe_text="")
    uninterrupted = [_draws() for _ in range(3)]
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    load_checkpoint(find_latest(tmp_path))
    assert [_draws() for _ in range(3)] == uninterrupted
    state = capture_rng_state()
    first = _draws()
    restore_rng_state(state)
    assert _draws() == first


class _Run:
    """A tiny LoRA-like run: model, AdamW + cosine warmup, EMA, data drawn from the global RNG."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
        self.model[2].weight.requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = build_optimizer("adamw", params, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
        self.sched = build_scheduler("cosine", self.opt, warmup_steps=2, total_steps=12)
        self.ema = EMA(self.model, decay=0.9, update_interval=2)
        self.loss_weight = {"ema_loss": torch.zeros(())}

    def step(self, step: int) -> None:
        x = torch.randn(5, 4)
        loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(step)
        self.loss_weight["ema_loss"] = 0.9 * self.loss_weight["ema_loss"] + 0.1 * loss.detach()

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self, out, step: int, **kw):
        return save_checkpoint(out, step, trainable=self.trainable(), optimizer_state=self.opt.state_dict(),
                               scheduler_state=self.sched.state_dict(), ema_state=self.ema.state_dict(),
                               loss_weight_state=self.loss_weight, data_cursor={"seen": step * 5},
                               recipe_text="seed: 0\n", **kw)


def test_k_steps_save_resume_equals_n_steps_straight(tmp_path):
    straight = _Run()
    for s in range(1, 11):
        straight.step(s)

    first = _Run()
    for s in range(1, 5):
        first.step(s)
    first.save(tmp_path, 4)
    torch.manual_seed(1234)  # a restarted process has other RNG state

    resumed = _Run()  # built exactly as in a fresh process (draws init randomness), then loaded
    ck = load_checkpoint(resolve_resume(tmp_path, "latest"))
    with torch.no_grad():
        for name, tensor in ck.trainable.items():
            resumed.model.get_parameter(name).copy_(tensor)
    resumed.opt.load_state_dict(ck.optimizer)
    resumed.sched.load_state_dict(ck.scheduler)
    resumed.ema.load_state_dict(ck.ema)
    resumed.loss_weight = ck.loss_weight
    assert (ck.step, ck.data_cursor, ck.recipe_text) == (4, {"seen": 20}, "seed: 0\n")
    assert "torch" in ck.versions and "python" in ck.versions
    for s in range(ck.step + 1, 11):
        resumed.step(s)

    for (name, a), b in zip(straight.trainable().items(), resumed.trainable().values(), strict=True):
        assert torch.equal(a, b), name
    for name in straight.ema.shadow:
        assert torch.equal(straight.ema.shadow[name], resumed.ema.shadow[name]), name
    assert torch.equal(straight.loss_weight["ema_loss"], resumed.loss_weight["ema_loss"])
    assert straight.opt.param_groups[0]["lr"] == resumed.opt.param_groups[0]["lr"]


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = _Run()
    run.step(1)
    good = run.save(tmp_path, 1)
    run.step(2)
    real_write = ckpt_mod._write_text
    written = []

    def dying_write(path, text):
        if path.name == "recipe.yaml":  # weights, optimizer and training state are already on disk
            written.extend(p.name for p in path.parent.iterdir())
            raise KeyboardInterrupt("killed mid-save")
        real_write(path, text)

    monkeypatch.setattr(ckpt_mod, "_write_text", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run.save(tmp_path, 2)
    assert {"trainable.safetensors", "optimizer.pt", "training_state.pt"} <= set(written)
    monkeypatch.setattr(ckpt_mod, "_write_text", real_write)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
    assert find_latest(tmp_path) == good
    assert load_checkpoint(good, restore_rng=False).step == 1

    # A hard kill leaves a hidden temp folder: it is never taken as a checkpoint and the next save removes it.
    leftover = root / ".tmp-step_000003-1"
    leftover.mkdir()
    (leftover / "trainable.safetensors").write_bytes(b"partial")
    assert find_latest(tmp_path) == good
    run.save(tmp_path, 3)
    assert not leftover.exists() and find_latest(tmp_path).name == "step_000003"


def test_keep_last_prunes_oldest_and_latest_pointer(tmp_path):
    run = _Run()
    for s in range(1, 6):
        run.save(tmp_path, s, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000005"]
    assert (root / "latest").read_text() == "step_000005\n"
    run.save(tmp_path, 5, keep_last=1)  # the same step again replaces it in place
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000005"]
    (root / "latest").unlink()  # a lost pointer falls back to the highest complete step
    assert find_latest(tmp_path) == root / "step_000005"
    meta = json.loads((root / "step_000005" / "meta.json").read_text())
    assert meta["step"] == 5 and "ema.safetensors" in meta["files"]
    with pytest.raises(UserError, match="keep_last must be >= 1"):
        run.save(tmp_path, 6, keep_last=0)


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "latest") is None  # nothing yet: fresh start
    path = _Run().save(tmp_path, 7)
    assert resolve_resume(tmp_path, "latest") == path
    assert resolve_resume(tmp_path, str(path)) == path
    with pytest.raises(UserError, match="output folder; use `checkpoints.resume: latest`"):
        resolve_resume(tmp_path, str(tmp_path))
    with pytest.raises(UserError, match="not a checkpoint folder"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "nope")


def test_output_guard(tmp_path):
    fresh = tmp_path / "new" / "run"
    assert prepare_output_dir(fresh, resuming=False, overwrite=False).is_dir()
    prepare_output_dir(fresh, resuming=False, overwrite=False)  # still empty: fine
    _Run().save(fresh, 1)
    (fresh / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="checkpoints.resume: latest.*output.overwrite: true"):
        prepare_output_dir(fresh, resuming=False, overwrite=False)
    prepare_output_dir(fresh, resuming=True, overwrite=False)
    assert find_latest(fresh) is not None
    with pytest.raises(UserError, match="choose one"):
        prepare_output_dir(fresh, resuming=True, overwrite=True)
    prepare_output_dir(fresh, resuming=False, overwrite=True)
    assert find_latest(fresh) is None and not (fresh / "checkpoints").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        prepare_output_dir(tmp_path / "file", resuming=False, overwrite=False)
