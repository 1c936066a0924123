"""Progress bar, metrics.jsonl, TensorBoard / W&B, the loss-curve PNG and the end-of-run summary.

Named run_log, not logging, so that no path setup can ever shadow the standard library's `logging`
(which tqdm, transformers and torch import). Only the main rank writes or prints anything.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from runner.errors import UserError

TRACKERS = ("none", "jsonl", "tensorboard", "wandb")
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
SUMMARY_FILE = "summary.json"
_WANDB_ID_FILE = ".wandb_run_id"
RAW_COLOR = (170, 195, 235)
SMOOTH_COLOR = (20, 60, 170)


def peak_memory_gib(device: torch.device | str | None = None) -> float:
    """Peak accelerator memory allocated by torch on a CUDA device, else the process's peak RSS (Linux)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf; the loop counts skipped steps separately
    return value


class MetricsWriter:
    """One JSON object per line, flushed each time; on resume, rows after the checkpoint are dropped."""

    def __init__(self, path: str | Path, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the crash we resume from
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= resume_step:
                    self.rows.append(row)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")
            os.replace(tmp, self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if resume_step is not None else "w", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": step, **{k: _json_value(v) for k, v in metrics.items()}}
        self.rows.append(row)
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _TensorBoard:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UserError("logging.report_to: tensorboard needs the tensorboard package: "
                            "pip install tensorboard (or choose report_to: jsonl)") from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in metrics.items():
            value = _json_value(value)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, output_dir: Path, project: str, run_name: str, config: Mapping[str, Any] | None,
                 resuming: bool) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise UserError("logging.report_to: wandb needs the wandb package: pip install wandb "
                            "(then `wandb login`, or WANDB_MODE=offline), or choose report_to: jsonl"
                            ) from exc
        id_file = output_dir / _WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resuming and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")  # a resumed run continues the same W&B curve
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=str(output_dir),
                              config=dict(config or {}))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.run.log({k: _json_value(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


# ---- loss curve ----

def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential smoothing: s_i = EMA_i / (1 - weight**(i+1))."""
    out, acc = [], 0.0
    for i, value in enumerate(values):
        acc = weight * acc + (1.0 - weight) * value
        out.append(acc / (1.0 - weight ** (i + 1)) if weight > 0 else value)
    return out


def draw_loss_curve(steps: list[int], losses: list[float], path: str | Path, *, smoothing: float = 0.9,
                    size: tuple[int, int] = (800, 480)) -> Path:
    """Raw loss (light) and its smoothed curve (dark) on labelled axes, with Pillow only."""
    points = [(s, v) for s, v in zip(steps, losses, strict=True) if v is not None and math.isfinite(v)]
    if not points:
        raise ValueError("no finite loss values to draw")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    width, height = size
    left, right, top, bottom = 72, 20, 30, 44
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.05 if hi > lo else max(abs(hi), 1.0) * 0.05
    y0, y1 = lo - pad, hi + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                top + (y1 - y) / (y1 - y0) * (height - top - bottom))

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 8), "training loss (light: raw, dark: smoothed)", fill="black", font=font)
    for i in range(5):  # ticks and grid
        yv = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, yv)
        draw.line([(left, py), (width - right, py)], fill=(230, 230, 230))
        draw.text((4, py - 6), f"{yv:.4g}", fill="black", font=font)
        xv = x0 + (x1 - x0) * i / 4
        px, _ = to_px(xv, y0)
        draw.line([(px, height - bottom), (px, height - bottom + 4)], fill="black")
        draw.text((px - 10, height - bottom + 8), f"{xv:.0f}", fill="black", font=font)
    draw.text((width // 2 - 12, height - 16), "step", fill="black", font=font)
    raw = [to_px(x, y) for x, y in points]
    smoothed = [to_px(x, y) for x, y in zip(xs, smooth(ys, smoothing), strict=True)]
    if len(raw) > 1:
        draw.line(raw, fill=RAW_COLOR, width=1)
        draw.line(smoothed, fill=SMOOTH_COLOR, width=2)
    else:
        px, py = raw[0]
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=SMOOTH_COLOR)
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black", width=1)
    out = Path(path)
    img.save(out, format="PNG")
    return out


# ---- summary ----

def summarize(*, steps: int, start_step: int, wall_time_s: float, peak_memory: float,
              files: list[str], samples: int | None = None, skipped_steps: int = 0) -> dict[str, Any]:
    """The numbers a user wants at the end: what ran, how fast, how much memory, what was written."""
    done = steps - start_step
    return {
        "steps": steps, "steps_this_session": done, "skipped_steps": skipped_steps,
        "wall_time_s": round(wall_time_s, 3),
        "steps_per_s": round(done / wall_time_s, 4) if wall_time_s > 0 else None,
        "samples_per_s": round(samples / wall_time_s, 3) if samples is not None and wall_time_s > 0 else None,
        "peak_memory_gib": round(peak_memory, 3), "files": sorted(files),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    lines = [f"steps: {summary['steps']} ({summary['steps_this_session']} this session, "
             f"{summary['skipped_steps']} skipped for NaN/inf)",
             f"wall time: {summary['wall_time_s']:.1f} s, {summary['steps_per_s']} steps/s"
             + (f", {summary['samples_per_s']} samples/s" if summary["samples_per_s"] is not None else ""),
             f"peak memory: {summary['peak_memory_gib']:.2f} GiB", "files written:"]
    return "\n".join(lines + [f"  {f}" for f in summary["files"]])


def note(text: str) -> None:
    """One line for the person at the terminal (stderr, without breaking the progress bar)."""
    tqdm.write(text, file=sys.stderr)


class RunLogger:
    """Everything a run reports, on the main rank only (other ranks get a silent instance)."""

    def __init__(self, output_dir: str | Path, *, report_to: str, total_steps: int, start_step: int = 0,
                 is_main: bool = True, progress_bar: bool = True, run_name: str | None = None,
                 wandb_project: str = "cascade-runner", config: Mapping[str, Any] | None = None,
                 device: torch.device | str | None = None) -> None:
        if report_to not in TRACKERS:
            raise UserError(f"logging.report_to: unknown {report_to!r}; choose one of: {', '.join(TRACKERS)}")
        self.output_dir = Path(output_dir)
        self.is_main, self.start_step, self.device = is_main, start_step, device
        self.files: set[str] = set()
        self.history: list[tuple[int, float]] = []
        self._start = time.perf_counter()
        self._metrics: MetricsWriter | None = None
        self._tracker: _TensorBoard | _WandB | None = None
        resume_step = start_step if start_step > 0 else None
        if is_main and report_to != "none":
            self._metrics = MetricsWriter(self.output_dir / METRICS_FILE, resume_step=resume_step)
            self.history = [(r["step"], r["loss"]) for r in self._metrics.rows if r.get("loss") is not None]
            self.files.add(METRICS_FILE)
        name = run_name or self.output_dir.resolve().name
        if is_main and report_to == "tensorboard":
            self._tracker = _TensorBoard(self.output_dir / "tensorboard")
            self.files.add("tensorboard/")
        elif is_main and report_to == "wandb":
            self._tracker = _WandB(self.output_dir, wandb_project, name, config, resume_step is not None)
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         disable=not (is_main and progress_bar), file=sys.stderr)

    def add_file(self, path: str | Path) -> None:
        """Record a file or folder the run wrote (checkpoints, exports, images) for the summary."""
        p = Path(path)
        self.files.add(str(p.relative_to(self.output_dir)) if p.is_relative_to(self.output_dir) else str(p))

    def progress(self, step: int, *, loss: float, lr: float) -> None:
        """Advance the bar to `step` showing loss, lr and memory; tqdm adds it/s and ETA."""
        if self._bar.disable:
            return
        mem = peak_memory_gib(self.device)
        self._bar.set_postfix_str(f"loss={loss:.4f} lr={lr:.2e} mem={mem:.1f}GiB", refresh=False)
        self._bar.update(step - self._bar.n)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Send one step's metrics to metrics.jsonl and the chosen tracker; keep the loss for the curve."""
        if not self.is_main:
            return
        loss = _json_value(metrics.get("loss"))
        if isinstance(loss, int | float):
            self.history.append((step, float(loss)))
        if self._metrics is not None:
            self._metrics.write(step, metrics)
        if self._tracker is not None:
            self._tracker.log(step, metrics)

    def finish(self, *, step: int, samples: int | None = None, skipped_steps: int = 0) -> dict[str, Any]:
        """Close the sinks, draw loss_curve.png, write summary.json, print the summary; return it."""
        self._bar.close()
        if not self.is_main:
            return {}
        if self._metrics is not None:
            self._metrics.close()
        if self._tracker is not None:
            self._tracker.close()
        if self.history:
            steps, losses = zip(*self.history, strict=True)
            draw_loss_curve(list(steps), list(losses), self.output_dir / LOSS_CURVE_FILE)
            self.files.add(LOSS_CURVE_FILE)
        self.files.add(SUMMARY_FILE)
        elapsed = time.perf_counter() - self._start
        summary = summarize(steps=step, start_step=self.start_step, wall_time_s=elapsed,
                            peak_memory=peak_memory_gib(self.device), files=sorted(self.files),
                            samples=samples, skipped_steps=skipped_steps)
        (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        tqdm.write(format_summary(summary), file=sys.stderr)
        return summary
