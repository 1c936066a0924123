"""Hub upload (recipe `hub:` and `runner push`) against a stand-in for `huggingface_hub.HfApi`.

FakeHub accepts only calls that bind to the real HfApi method's signature and real CommitOperationAdd
objects, and lands every commit in a local folder per repo, so the tests read back what a repo would
hold. The network itself is never reached (CI has none).
"""
from __future__ import annotations

import inspect
import json
import shutil
from concurrent.futures import Future
from pathlib import Path

import pytest
import yaml
from huggingface_hub import CommitOperationAdd, HfApi

import runner.hub_push as hub_push
from runner.cli import main as cli_main
from runner.errors import UserError
from runner.recipe import read_recipe
from runner.train import train

BODY = """{decoder}training:
  mode: lora
  lora: {{rank: 4, alpha: 4}}
  batch_size: 2
  max_steps: 4
  learning_rate: 3e-3
  seed: 7
data:
  sources:
    - {{name: tiny, type: local, path: {data}, caption_strategy: textfile, resolution: 128}}
  workers: 0
validation:
  every_n_steps: 4
  prompts: [a red square]
  width: 128
  height: 128
  prior_steps: 2
  decoder_steps: 2
checkpoints: {{every_n_steps: 2, keep_last: 1}}
export: {{lora_formats: [native, comfyui], trigger_words: [sqr]}}
logging: {{report_to: jsonl, progress_bar: false}}
hub: {{model_id: someone/tiny-squares, push: true, push_checkpoints: true}}
"""


class FakeHub:
    """HfApi's create_repo / create_commit / upload_folder, writing into root/<owner>/<name>/."""

    def __init__(self, root: Path, token: str | None = "hf_test", fail: tuple[str, ...] = ()) -> None:
        self.root, self.token, self.fail = root, token, set(fail)
        self.calls: list[tuple[str, dict]] = []

    def _called(self, name: str, args: tuple, kwargs: dict) -> None:
        inspect.signature(getattr(HfApi, name)).bind(self, *args, **kwargs)  # TypeError if not HfApi's
        self.calls.append((name, kwargs))
        if name in self.fail:
            raise RuntimeError(f"403 Forbidden: {name} (test)")

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    def create_repo(self, *args, **kwargs):
        self._called("create_repo", args, kwargs)
        self.repo(args[0]).mkdir(parents=True, exist_ok=True)

    def create_commit(self, *args, **kwargs):
        self._called("create_commit", args, kwargs)
        for op in kwargs["operations"]:
            assert isinstance(op, CommitOperationAdd)
            target = self.repo(kwargs["repo_id"]) / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            source = op.path_or_fileobj
            target.write_bytes(source if isinstance(source, bytes) else Path(source).read_bytes())
        return type("CommitInfo", (), {"commit_url": f"https://hub.test/{kwargs['repo_id']}/commit/1"})()

    def upload_folder(self, *args, **kwargs):
        self._called("upload_folder", args, kwargs)

        def upload() -> None:
            shutil.copytree(kwargs["folder_path"], self.repo(kwargs["repo_id"]) / kwargs["path_in_repo"],
                            dirs_exist_ok=True)

        if not kwargs.get("run_as_future"):
            return upload()
        return LateUpload(upload)


class LateUpload(Future):
    """A background upload that has not started yet: it runs when someone waits for it, so a caller
    that prunes (or never waits) before waiting loses the upload, as with a slow real one."""

    def __init__(self, work) -> None:
        super().__init__()
        self.work = work

    def result(self, timeout=None):
        if not self.done():
            try:
                self.set_result(self.work())
            except Exception as err:  # handed to the waiter, as a real future does
                self.set_exception(err)
        return super().result(timeout)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(hub_push, "_api", lambda: fake)
    return fake


@pytest.fixture
def recipe(write_tiny_recipe, tmp_path, gradient_squares) -> Path:
    data = tmp_path / "images"
    data.mkdir()
    gradient_squares(data, [("red", (128, 128)), ("green", (128, 128))])
    return write_tiny_recipe(BODY, data, "run.yaml")


def test_a_run_with_hub_push_uploads_checkpoints_exports_card_and_images(recipe, tmp_path, hub):
    train(read_recipe(recipe, []))
    repo = hub.repo("someone/tiny-squares")
    names = [name for name, _ in hub.calls]
    assert names[0] == "create_repo" and hub.calls[0][1] == {"private": True, "exist_ok": True}
    # each checkpoint went up as it was written, before keep_last=1 pruned it on disk
    assert [kw["path_in_repo"] for name, kw in hub.calls if name == "upload_folder"] == [
        "checkpoints/step_000002", "checkpoints/step_000004"]
    assert (repo / "checkpoints/step_000002/meta.json").is_file()
    assert not (tmp_path / "run/checkpoints/step_000002").exists()
    assert names[-1] == "create_commit"  # the run itself: one commit at the end
    out = tmp_path / "run"
    for name in ("lora_native.safetensors", "lora_comfyui.safetensors"):
        assert (repo / name).read_bytes() == (out / "export" / name).read_bytes()
    assert (repo / "validation/grid.png").is_file() and (repo / "validation/settings.json").is_file()
    pushed_recipe = yaml.safe_load((repo / "training/recipe.yaml").read_text())
    assert pushed_recipe["hub"]["model_id"] == "someone/tiny-squares"
    assert json.loads((repo / "training/summary.json").read_text())["steps"] == 4
    card = (repo / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["instance_prompt"] == "sqr" and "lora" in meta["tags"]
    assert "base_model" not in meta and "license" not in meta  # a local folder: nothing to link or inherit
    image = json.loads((out / "validation/step_000004/settings.json").read_text())["images"][0]
    assert meta["widget"] == [{"text": "a red square", "output": {"url": f"validation/{image['file']}"}}]
    assert "LoRA (rank 4, alpha 4)" in body and "for 4 steps" in body
    assert "lora_comfyui.safetensors" in body and "loads in:" in body  # export/README.txt, embedded
    assert (out / hub_push.RECIPE_FILE).is_file()


@pytest.mark.parametrize(("setup", "message"), [
    ("no_token", "needs a Hugging Face token"),
    ("offline", "HF_HUB_OFFLINE is set"),
    ("refused", "cannot create or open the model repo someone/tiny-squares: RuntimeError: 403"),
])
def test_a_run_that_cannot_push_stops_before_training(setup, message, recipe, tmp_path, hub, monkeypatch):
    import huggingface_hub

    if setup == "no_token":
        hub.token = None
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    elif setup == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        hub.fail.add("create_repo")
    with pytest.raises(UserError, match=message):
        train(read_recipe(recipe, []))
    assert not (tmp_path / "run/checkpoints").exists() and not (tmp_path / "run/metrics.jsonl").exists()


def finished_run(out: Path, hub_section: dict | None = None) -> Path:
    """What a finished LoRA run leaves in output.dir, written by hand (no training)."""
    (out / "export").mkdir(parents=True)
    (out / "export/lora_native.safetensors").write_bytes(b"weights")
    (out / "export/prior").mkdir()  # a diffusers-layout export is a folder
    (out / "export/prior/config.json").write_text("{}")
    (out / "export/README.txt").write_text("lora_native.safetensors\n  loads in: cascade-runner\n")
    for step in ("step_000002", "step_000004"):
        shown = out / "validation" / step
        shown.mkdir(parents=True)
        (shown / "grid.png").write_bytes(step.encode())
        (shown / "settings.json").write_text(json.dumps({"images": []}))
    (out / "checkpoints/step_000004").mkdir(parents=True)
    (out / "checkpoints/step_000004/meta.json").write_text("{}")
    (out / "summary.json").write_text(json.dumps({"steps": 4}))
    recipe = {"model": {"flavour": "stage-c", "prior": {"path": "stabilityai/stable-cascade-prior",
                                                        "subfolder": "prior"}},
              "training": {"mode": "full"}, "hub": hub_section or {}}
    (out / hub_push.RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    return out


def test_a_failed_upload_at_the_end_keeps_the_files_and_names_the_retry(tmp_path, hub):
    out = finished_run(tmp_path / "run")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    hub.fail.add("create_commit")
    pusher = hub_push.HubPusher(hub, "someone/x", checkpoints=False, final=True, note=print)
    with pytest.raises(UserError, match=rf"files are in {out}.*403.*`runner push {out}`"):
        pusher.finish(out, yaml.safe_load((out / hub_push.RECIPE_FILE).read_text()))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_failed_checkpoint_upload_is_reported_and_training_goes_on(tmp_path, hub):
    notes: list[str] = []
    pusher = hub_push.HubPusher(hub, "someone/x", checkpoints=True, final=False, note=notes.append)
    broken: Future = Future()
    broken.set_exception(RuntimeError("connection reset"))
    hub.upload_folder = lambda **kwargs: broken
    pusher.checkpoint_written(tmp_path / "step_000002")
    pusher.wait()
    assert pusher.failed == ["step_000002"]
    assert "step_000002" in notes[0] and "connection reset" in notes[0] and "runner push" in notes[0]


def test_runner_push_uploads_a_finished_run(tmp_path, hub, capsys):
    out = finished_run(tmp_path / "run", {"model_id": "someone/full-ft", "private": False})
    assert cli_main(["push", str(out), "--checkpoints"]) == 0
    repo = hub.repo("someone/full-ft")
    assert hub.calls[0] == ("create_repo", {"private": False, "exist_ok": True})
    assert (repo / "checkpoints/step_000004/meta.json").is_file()
    assert (repo / "lora_native.safetensors").read_bytes() == b"weights"
    assert (repo / "prior/config.json").read_text() == "{}"  # where stabilityai/stable-cascade-prior has it
    assert not (repo / "README.txt").exists()  # its text is in README.md
    assert (repo / "validation/grid.png").read_bytes() == b"step_000004"  # the last validation only
    assert (repo / "training/recipe.yaml").is_file()
    card = (repo / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "stabilityai/stable-cascade-prior" and "full-fine-tune" in meta["tags"]
    assert (meta["license"], meta["license_name"]) == ("other", "stable-cascade-nc-community")
    assert "## Training" in card and "| mode | full |" in card
    assert "pushed" in capsys.readouterr().out


def test_runner_push_refuses_what_it_cannot_upload(tmp_path, hub, capsys):
    assert cli_main(["push", str(tmp_path / "nothing")]) == 2
    assert "give the output.dir of a cascade-runner run" in capsys.readouterr().err
    out = finished_run(tmp_path / "run")
    assert cli_main(["push", str(out)]) == 2
    assert "give --repo owner/name" in capsys.readouterr().err
    shutil.rmtree(out / "export")
    assert cli_main(["push", str(out), "--repo", "someone/x"]) == 2
    assert "holds no exports" in capsys.readouterr().err
    assert hub.calls == []  # nothing reached the hub
