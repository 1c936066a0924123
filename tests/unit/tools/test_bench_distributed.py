"""tools/bench_distributed.py --resume-check: how the resumed run's losses are compared with the
uninterrupted run's (the GPU runs themselves need two GPUs and real-size weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def write_metrics(out: Path, losses: dict[int, float]) -> Path:
    out.mkdir(parents=True)
    rows = [json.dumps({"step": step, "loss": loss}) for step, loss in losses.items()]
    (out / "metrics.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def test_resume_check_lines_up_the_steps_after_the_checkpoint(tmp_path, tools):
    bench = tools("bench_distributed")
    straight = write_metrics(tmp_path / "a", {1: 1.0, 2: 0.5, 3: 0.25, 4: 2.0})
    resumed = write_metrics(tmp_path / "b", {3: 0.25, 4: 2.0002})
    result = bench.compare_losses(straight, resumed, from_step=2)
    assert result["steps"] == [3, 4]
    assert result["loss_uninterrupted"] == [0.25, 2.0] and result["loss_resumed"] == [0.25, 2.0002]
    assert result["first_resumed_step_equal"] is True
    assert result["max_relative_difference"] == pytest.approx(1e-4)


def test_resume_check_refuses_a_run_that_started_over(tmp_path, tools):
    bench = tools("bench_distributed")
    straight = write_metrics(tmp_path / "a", {1: 1.0, 2: 0.5, 3: 0.25, 4: 2.0})
    restarted = write_metrics(tmp_path / "b", {1: 1.0, 2: 0.5, 3: 0.25, 4: 2.0})
    with pytest.raises(SystemExit, match="did not continue from step 2"):
        bench.compare_losses(straight, restarted, from_step=2)
