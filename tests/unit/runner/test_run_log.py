"""metrics.jsonl, trackers (fakes stand in for the optional packages), loss curve, summary, progress."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from PIL import Image

from runner.errors import UserError
from runner.run_log import (
    RAW_COLOR,
    SMOOTH_COLOR,
    MetricsWriter,
    RunLogger,
    draw_loss_curve,
    format_summary,
    smooth,
)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_is_strict_json_flushed_and_truncated_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    for step in range(1, 6):
        writer.write(step, {"loss": torch.tensor(0.5 * step), "lr": 1e-4, "grad_norm": float("nan")})
    assert _rows(path)[0] == {"step": 1, "loss": 0.5, "lr": 1e-4, "grad_norm": None}  # before close
    writer.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # the crash cut this line short
    resumed = MetricsWriter(path, resume_step=3)
    assert [r["step"] for r in resumed.rows] == [1, 2, 3]
    resumed.write(4, {"loss": 9.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in _rows(path)] == [(1, 0.5), (2, 1.0), (3, 1.5), (4, 9.0)]


def test_smooth_is_debiased_ema():
    # weight 1/2: acc = 1, 2.5 -> 1 / (1 - 1/2) = 2, 2.5 / (1 - 1/4) = 10/3
    assert smooth([2.0, 4.0], 0.5) == pytest.approx([2.0, 10 / 3])
    assert smooth([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])  # debiasing: no pull to 0
    assert smooth([1.0, 5.0], 0.0) == [1.0, 5.0]


def test_loss_curve_png_draws_a_falling_curve_on_axes(tmp_path):
    steps = list(range(1, 201))
    losses = [1.0 / s + (0.05 if s % 2 else -0.05) for s in steps]
    losses[50] = float("nan")  # skipped, not drawn
    out = draw_loss_curve(steps, losses, tmp_path / "curve.png", size=(640, 400))
    img = Image.open(out).convert("RGB")
    assert img.size == (640, 400)
    px = img.load()
    dark = [(x, y) for x in range(640) for y in range(400) if px[x, y] == SMOOTH_COLOR]
    light = [(x, y) for x in range(640) for y in range(400) if px[x, y] == RAW_COLOR]
    assert len(dark) > 300 and len(light) > 100
    early = [y for x, y in dark if x < 150]
    late = [y for x, y in dark if x > 500]
    assert max(late) < 400 and min(early) < min(late)  # image y grows downwards: early loss is higher
    assert all(px[72, y] == (0, 0, 0) for y in range(40, 340))  # the y axis
    with pytest.raises(ValueError, match="no finite loss"):
        draw_loss_curve([1], [float("inf")], tmp_path / "x.png")


def test_run_logger_jsonl_end_to_end(tmp_path, capsys):
    log = RunLogger(tmp_path, report_to="jsonl", total_steps=4)
    for step in range(1, 5):
        log.log(step, {"loss": 1.0 / step, "lr": 1e-4})
        log.progress(step, loss=1.0 / step, lr=1e-4)
    (tmp_path / "checkpoints" / "step_000004").mkdir(parents=True)
    log.add_file(tmp_path / "checkpoints" / "step_000004")
    summary = log.finish(step=4, samples=16, skipped_steps=1)
    err = capsys.readouterr().err
    assert "loss=0.2500" in err and "lr=1.00e-04" in err and "GiB" in err and "4/4" in err
    assert "steps: 4 (4 this session, 1 skipped" in err
    assert summary["files"] == ["checkpoints/step_000004", "loss_curve.png", "metrics.jsonl", "summary.json"]
    assert summary["steps_per_s"] > 0 and summary["samples_per_s"] > 0 and summary["peak_memory_gib"] > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "loss_curve.png").is_file() and len(_rows(tmp_path / "metrics.jsonl")) == 4
    assert "files written:\n  checkpoints/step_000004" in format_summary(summary)


def test_resumed_logger_keeps_earlier_history_and_other_ranks_write_nothing(tmp_path):
    first = RunLogger(tmp_path, report_to="jsonl", total_steps=6, progress_bar=False)
    for step in range(1, 5):
        first.log(step, {"loss": float(step)})
    first.finish(step=4)
    again = RunLogger(tmp_path, report_to="jsonl", total_steps=6, start_step=2, progress_bar=False)
    assert again.history == [(1, 1.0), (2, 2.0)]
    again.log(3, {"loss": 30.0})
    assert again.finish(step=3)["steps_this_session"] == 1
    other = tmp_path / "rank1"
    silent = RunLogger(other, report_to="wandb", total_steps=3, is_main=False)
    silent.log(1, {"loss": 1.0})
    assert silent.finish(step=1) == {} and not other.exists()


def test_missing_tracker_packages_name_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match="pip install tensorboard"):
        RunLogger(tmp_path, report_to="tensorboard", total_steps=1)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match="pip install wandb"):
        RunLogger(tmp_path, report_to="wandb", total_steps=1)
    with pytest.raises(UserError, match="unknown 'mlflow'; choose one of: none, jsonl, tensorboard, wandb"):
        RunLogger(tmp_path, report_to="mlflow", total_steps=1)


def test_trackers_receive_the_metrics(tmp_path, monkeypatch):
    calls: list = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("tb_dir", log_dir))

        def add_scalar(self, key, value, step):
            calls.append((key, value, step))

        def close(self):
            calls.append("tb_close")

    fake_tb = types.SimpleNamespace(SummaryWriter=FakeWriter)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_tb)
    tb = RunLogger(tmp_path / "tb", report_to="tensorboard", total_steps=2, progress_bar=False)
    tb.log(1, {"loss": 0.5, "note": "text"})
    tb.finish(step=1)
    assert calls == [("tb_dir", str(tmp_path / "tb" / "tensorboard")), ("loss", 0.5, 1), "tb_close"]

    inits: list = []

    class FakeRun:
        def log(self, metrics, step):
            calls.append(("wandb", metrics, step))

        def finish(self):
            calls.append("wandb_finish")

    def init(**kwargs):
        inits.append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    out = tmp_path / "wb"
    wb = RunLogger(out, report_to="wandb", total_steps=2, progress_bar=False, config={"seed": 0})
    wb.log(1, {"loss": 0.25})
    wb.finish(step=1)
    assert ("wandb", {"loss": 0.25}, 1) in calls and calls[-1] == "wandb_finish"
    first = inits[0]
    assert (first["project"], first["name"], first["config"]) == ("cascade-runner", "wb", {"seed": 0})
    RunLogger(out, report_to="wandb", total_steps=2, start_step=1, progress_bar=False)
    assert inits[1]["id"] == inits[0]["id"]  # a resumed run continues the same W&B run
