"""Two processes over gloo (CPU): same result as one process, exact resume, world-size guard, dead rank,
FSDP2 with sharded checkpoints.

Runs go through `python -m torch.distributed.run` (torchrun) or plain subprocesses with torchrun's
environment, exactly as users launch them. Test-only behaviour (per-sample noise, a rank that dies) is
injected by a wrapper script written into tmp that monkeypatches runner.train before calling the CLI, so
the product has no test hooks.
"""
from __future__ import annotations

import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import runner.train as train_module
from cascade_core.stage_c_io import load_stage_c, stage_c_state_dict
from runner.checkpoint import find_latest
from runner.checkpoint_shards import checkpoint_weights
from runner.cli import main
from runner.distributed import Launch, read_launch
from runner.errors import UserError
from runner.recipe import read_recipe
from runner.train import train

pytestmark = pytest.mark.slow

# what follows conftest.TINY_HEAD (the tiny models) in this file's recipe
RECIPE = """training:
  mode: lora
  lora: {{rank: 4, alpha: 4}}
  batch_size: 1
  max_steps: 4
  learning_rate: 3e-3
  loss_weighting: none
  caption_dropout: 0.0
  seed: 7
data:
  sources:
    - {{name: tiny, type: local, path: {data}, caption_strategy: textfile, resolution: 128}}
  cache: {{text_embeddings_dir: {cache}/text, latents_dir: {cache}/latents}}
  workers: 0
validation: {{enabled: false}}
checkpoints: {{every_n_steps: 2}}
export: {{lora_formats: [native]}}
logging: {{report_to: jsonl, progress_bar: false}}
distributed: {{timeout_s: 10}}
"""

# argv: MODE RECIPE [overrides...]; MODE "noise": each sample's t and noise come from (its key, step),
# so a sample draws the same numbers whichever rank or batch it lands in; MODE "die": rank 1 exits
# abruptly in its third step.
WRAPPER = r'''
import os, sys, zlib
import torch
import runner.train as T
from cascade_core.models.text import TextConditioning
from runner.cli import main

real_latents, real_loss, now = T._latents, T.stage_c_loss, {}

def latents(batch, *args, **kwargs):
    now["keys"] = list(batch["keys"])
    return real_latents(batch, *args, **kwargs)

def per_sample_loss(model, x, cond, training, *, step, **kwargs):
    results = []
    for i, key in enumerate(now["keys"]):
        torch.manual_seed(zlib.crc32(f"{key}:{step}".encode()))
        c = TextConditioning(*(v[i : i + 1] for v in cond.as_dict().values()))
        results.append(real_loss(model, x[i : i + 1], c, training, step=step, **kwargs))
    out = results[0]
    out.loss = torch.stack([r.loss for r in results]).mean()
    out.raw = torch.cat([r.raw for r in results])
    out.logsnr = torch.cat([r.logsnr for r in results])
    return out

def die_on_rank1(model, x, cond, training, *, step, **kwargs):
    if os.environ.get("RANK") == "1" and step == 2:
        os._exit(1)
    return real_loss(model, x, cond, training, step=step, **kwargs)

if __name__ == "__main__":
    mode = sys.argv.pop(1)
    if mode == "noise":
        T._latents, T.stage_c_loss = latents, per_sample_loss
    elif mode == "die":
        T.stage_c_loss = die_on_rank1
    sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, gradient_squares) -> Path:
    """Two same-size pictures: one bucket, so a global batch of 2 is the whole epoch in every layout."""
    return gradient_squares(tmp_path_factory.mktemp("images2"), [("red", (128, 128)), ("green", (128, 128))])


@pytest.fixture
def setup(tmp_path, write_tiny_recipe, dataset) -> tuple[Path, Path]:
    recipe = write_tiny_recipe(RECIPE, dataset, "recipe.yaml")
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    return recipe, wrapper


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return env


def torchrun(nproc: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--monitor-interval=0.2", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def runner_cmd(*args: str) -> list[str]:
    return ["-m", "runner", *args]


def train_one_process(wrapper: Path, recipe: Path, monkeypatch, *overrides: str) -> None:
    """The single-process baseline in this process, with the wrapper's per-sample noise."""
    patches = runpy.run_path(str(wrapper), run_name="patches")
    monkeypatch.setattr(train_module, "_latents", patches["latents"])
    monkeypatch.setattr(train_module, "stage_c_loss", patches["per_sample_loss"])
    train(read_recipe(recipe, list(overrides)))
    monkeypatch.undo()


def lora(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"checkpoints/step_{step:06d}/trainable.safetensors"))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_read_launch():
    assert read_launch({}) == Launch()
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert read_launch(env) == Launch(1, 2, 1)
    with pytest.raises(UserError, match="MASTER_ADDR"):
        read_launch({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="outside"):
        read_launch({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


def test_two_ranks_equal_one_process_with_the_same_global_batch(setup, tmp_path, monkeypatch):
    """2 ranks x batch 1 == 1 process x batch 2 (LoRA over DDP, 4 steps, AdamW)."""
    recipe, wrapper = setup
    train_one_process(wrapper, recipe, monkeypatch, "training.batch_size=2", f"output.dir={tmp_path / 'one'}")
    two = torchrun(2, str(wrapper), "noise", str(recipe), f"output.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = lora(tmp_path / "one", 4), lora(tmp_path / "two", 4)
    assert a.keys() == b.keys() and a
    # Same samples, same noise, same mean gradient: only float summation order differs (the batch-2
    # forward vs two batch-1 forwards, and gloo's all-reduce of the two halves), ~1e-7 relative.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert any(a[k].abs().max() > 0 for k in a if "up" in k)  # the adapters moved (lora_up starts at 0)
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    assert (tmp_path / "two/export/lora_native.safetensors").is_file()
    assert json.loads((tmp_path / "two/metrics.jsonl").read_text().splitlines()[-1])["samples"] == 8


def test_resume_at_the_same_world_size_is_exact_and_a_different_one_is_refused(setup, tmp_path):
    recipe, _ = setup
    noisy = ("training.caption_dropout=0.5",)  # per-rank RNG now matters for the result
    straight = torchrun(2, *runner_cmd(str(recipe), *noisy, f"output.dir={tmp_path / 'straight'}"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    # "crash" after the step-2 checkpoint: a copy of the run rewound to it
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed)
    shutil.rmtree(resumed / "checkpoints/step_000004")
    shutil.rmtree(resumed / "export")
    (resumed / "checkpoints/latest").write_text("step_000002\n")

    with pytest.raises(UserError, match="written by 2 process"):
        train(read_recipe(recipe, [*noisy, f"output.dir={resumed}", "checkpoints.resume=latest"]))

    again = torchrun(2, *runner_cmd(str(recipe), *noisy, f"output.dir={resumed}",
                                    "checkpoints.resume=latest"))
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = lora(tmp_path / "straight", 4), lora(resumed, 4)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(tmp_path / "straight") == losses(resumed)


def test_a_dead_rank_stops_the_run_under_torchrun(setup, tmp_path):
    recipe, wrapper = setup
    started = time.monotonic()
    done = torchrun(2, str(wrapper), "die", str(recipe), "training.max_steps=50", timeout=60)
    assert done.returncode != 0
    assert time.monotonic() - started < 45
    assert "rank      : 1" in done.stderr and "exitcode  : 1" in done.stderr, done.stderr[-3000:]


def test_a_dead_peer_gives_a_clear_error_without_torchrun_supervision(setup, tmp_path):
    """What a rank on another node sees: no agent kills it; the failed collective must end it."""
    recipe, wrapper = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = _env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, str(wrapper), "die", str(recipe), "training.max_steps=50"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    started = time.monotonic()
    _, err0 = procs[0].communicate(timeout=60)
    procs[1].communicate(timeout=10)
    assert procs[1].returncode == 1
    assert procs[0].returncode == 2, err0[-3000:]
    assert "rank 0 of 2: a collective with the other ranks failed" in err0
    assert time.monotonic() - started < 40  # distributed.timeout_s is 10


def _unsharded_copy(run: Path, to: Path) -> Path:
    """The run with its step-2 checkpoint rewritten as earlier versions wrote FSDP checkpoints: the full
    weights and the full optimizer state keyed by parameter name, gathered on rank 0."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "export")
    step = to / "checkpoints/step_000002"
    dcp_to_torch_save(step / "sharded", to / "full.pt")
    full = torch.load(to / "full.pt", weights_only=True)
    save_file(full["model"], str(step / "trainable.safetensors"))
    torch.save(full["optim"], step / "optimizer.pt")
    shutil.rmtree(step / "sharded")
    meta = json.loads((step / "meta.json").read_text())
    del meta["sharded"]
    (step / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    return to


def test_fsdp2_full_fine_tune_matches_one_process_resumes_sharded_and_exports(setup, tmp_path, monkeypatch):
    """FSDP2 (fp32 params and reduce) over 2 ranks == a plain full fine-tune with the global batch, also
    after a resume from its sharded checkpoint (each rank wrote and reads back only its shards); that
    checkpoint refuses another world size, survives a crashed save, and exports offline as one file.
    An unsharded FSDP checkpoint of earlier versions still resumes."""
    lora_recipe, wrapper = setup
    recipe = tmp_path / "full.yaml"
    text = lora_recipe.read_text().replace("mode: lora\n  lora: {rank: 4, alpha: 4}", "mode: full")
    recipe.write_text(text)
    # eps 1e-2: AdamW's update is then ~linear in tiny gradients instead of ~their sign, so float
    # summation noise in a near-zero gradient element cannot flip a whole lr-sized step
    full = ("training.learning_rate=1e-4", "training.optimizer.eps=1e-2", "export.full_formats=[original]")
    train_one_process(wrapper, recipe, monkeypatch, *full, "training.max_steps=3", "training.batch_size=2",
                      f"output.dir={tmp_path / 'one'}")
    two = tmp_path / "two"
    fsdp = ("distributed.strategy=fsdp", "distributed.fsdp_param_dtype=fp32",
            "distributed.fsdp_reduce_dtype=fp32", f"output.dir={two}")
    done = torchrun(2, str(wrapper), "noise", str(recipe), *full, *fsdp, "training.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    step2 = two / "checkpoints/step_000002"
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} == {p.name for p in (step2 / "sharded").iterdir()}
    assert not (step2 / "trainable.safetensors").exists() and not (step2 / "optimizer.pt").exists()
    assert json.loads((step2 / "meta.json").read_text())["sharded"]["world_size"] == 2
    saved = dcp.FileSystemReader(step2 / "sharded").read_metadata().state_dict_metadata
    names = set(lora(tmp_path / "one", 2))
    assert {k for k in saved if k.startswith("model.")} == {f"model.{n}" for n in names}
    assert {f"optim.state.{n}.exp_avg_sq" for n in names} <= set(saved)  # sharded optimizer state too

    with pytest.raises(UserError, match="sharded by FSDP over 2 processes but this run is one process"):
        train(read_recipe(recipe, [*full, *fsdp, "checkpoints.resume=latest"]))
    legacy = _unsharded_copy(two, tmp_path / "legacy")
    crashed = two / "checkpoints/.tmp-step_000003"  # a save of step 3 killed after the shards were written
    (crashed / "sharded").mkdir(parents=True)
    (crashed / "sharded/__0_0.distcp").write_bytes(b"partial")
    assert find_latest(two) == step2
    more = torchrun(2, str(wrapper), "noise", str(recipe), *full, *fsdp, "training.max_steps=3",
                    "checkpoints.resume=latest")
    assert more.returncode == 0, more.stderr[-3000:]
    assert find_latest(two).name == "step_000003" and not crashed.exists()
    old = torchrun(2, str(wrapper), "noise", str(recipe), *full, *fsdp, f"output.dir={legacy}",
                   "training.max_steps=3", "checkpoints.resume=latest")
    assert old.returncode == 0, old.stderr[-3000:]
    for out, step in ((two, 2), (two, 3), (legacy, 3)):
        a, b = lora(tmp_path / "one", step), checkpoint_weights(out / f"checkpoints/step_{step:06d}")
        assert a.keys() == b.keys() and len(a) > 10
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{out} {step}: {key}")

    gathered = load_file(str(two / "export/stage_c.safetensors"))  # rank 0's end-of-training export
    out = str(tmp_path / "c.safetensors")
    assert main(["export", "--checkpoint", str(two), "--to", "original", "-o", out]) == 0  # its latest
    assert main(["export", "--checkpoint", str(two / "checkpoints/step_000003"), "--to", "diffusers",
                 "-o", str(tmp_path / "prior")]) == 0
    original = load_file(out)
    diffusers = stage_c_state_dict(load_stage_c(tmp_path / "prior"), "original")
    assert original.keys() == diffusers.keys() == gathered.keys()
    for key in gathered:
        assert torch.equal(original[key], gathered[key]) and torch.equal(diffusers[key], gathered[key]), key


def test_fsdp2_with_activation_checkpointing_and_adamw_bf16(setup, tmp_path, monkeypatch):
    """The real full recipe's path: per-block recompute under FSDP2 and our AdamW on sharded (DTensor)
    parameters. fp32 weights keep adamw_bf16 exact (no stochastic rounding), so 2 ranks must again
    equal one process with the global batch."""
    lora_recipe, wrapper = setup
    recipe = tmp_path / "full.yaml"
    text = lora_recipe.read_text().replace("mode: lora\n  lora: {rank: 4, alpha: 4}", "mode: full")
    recipe.write_text(text)
    full = ("training.learning_rate=1e-4", "training.optimizer.eps=1e-2",
            "training.optimizer.name=adamw_bf16", "training.gradient_checkpointing=true",
            "export.full_formats=[original]", "training.max_steps=2")
    train_one_process(wrapper, recipe, monkeypatch, *full, "training.batch_size=2",
                      f"output.dir={tmp_path / 'one'}")
    two = torchrun(2, str(wrapper), "noise", str(recipe), *full, "distributed.strategy=fsdp",
                   "distributed.fsdp_param_dtype=fp32", "distributed.fsdp_reduce_dtype=fp32",
                   f"output.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = lora(tmp_path / "one", 2), checkpoint_weights(tmp_path / "two/checkpoints/step_000002")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
