"""Hugging Face Hub upload: the recipe's `hub:` section and `runner push OUTPUT_DIR`.

* Start of a run with `hub.push` or `hub.push_checkpoints`: rank 0 checks for a token and creates (or
  finds) the repo, so a missing login or a repo it cannot write fails in seconds, not after the training.
* `hub.push_checkpoints`: each checkpoint folder goes up in the background as `checkpoints/step_NNNNNN/`,
  one at a time. Writing the next checkpoint first waits for the previous upload, because that save may
  prune the folder being uploaded (`checkpoints.keep_last`). A failed checkpoint upload is reported and
  training goes on: the checkpoint is still on disk.
* `hub.push`, at the end: one commit with the exports at the repo root (so `prior/` and
  `stage_c.safetensors` sit where the Stability repos keep them), a model card (`README.md`), the last
  validation images under `validation/` and the run's record under `training/` (resolved recipe,
  summary, metrics, loss curve).
* A failed upload loses nothing: the files stay in output.dir and `runner push OUTPUT_DIR` sends them
  again (also for a run trained without `hub.push`).
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import yaml

from runner.errors import UserError

__all__ = ["RECIPE_FILE", "HubPusher", "open_repo", "run_files", "model_card", "push_run",
           "add_push_arguments", "run_push"]

RECIPE_FILE = "recipe.resolved.yaml"  # output.dir: the latest session's recipe, defaults and overrides in
CARD_NAME = "README.md"
STABILITY_REPOS = "stabilityai/stable-cascade"  # -prior too
STABILITY_LICENSE = "https://huggingface.co/stabilityai/stable-cascade/blob/main/LICENSE"
TRAINING_RECORD = {  # output.dir name -> name under training/ in the repo
    RECIPE_FILE: "recipe.yaml", "summary.json": "summary.json", "metrics.jsonl": "metrics.jsonl",
    "loss_curve.png": "loss_curve.png"}
NO_PUSH = "set hub.push=false and hub.push_checkpoints=false (upload later with `runner push OUTPUT_DIR`)"


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi()


def _upload_checkpoint(api: Any, repo_id: str, folder: Path, *, background: bool = False) -> Any:
    """A checkpoint folder to `checkpoints/<its name>/` in the repo (a Future when `background`)."""
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                             path_in_repo=f"checkpoints/{folder.name}",
                             commit_message=f"cascade-runner: checkpoint {folder.name}",
                             run_as_future=background)


def _failure(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip() or 'no message'}"


def open_repo(repo_id: str, *, private: bool, api: Any = None) -> Any:
    """The API object to upload with, after checking the token and creating the repo if it is new."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise UserError(f"hub: uploading to {repo_id} needs the network, but HF_HUB_OFFLINE is set; unset "
                        f"it, or {NO_PUSH}")
    api = api if api is not None else _api()
    if (getattr(api, "token", None) or get_token()) is None:
        raise UserError(f"hub: uploading to {repo_id} needs a Hugging Face token with write access: run "
                        f"`hf auth login` or set HF_TOKEN, or {NO_PUSH}")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except Exception as err:  # the hub's HTTP and connection errors alike: report, do not train for nothing
        raise UserError(f"hub: cannot create or open the model repo {repo_id}: {_failure(err)}. Check that "
                        "the token may write there (a write token; for an organisation, membership) and "
                        "that hub.model_id is owner/name") from None
    return api


# ---------------------------------------------------------------- what goes up at the end
def _last_validation(out_dir: Path) -> Path | None:
    steps = [p for p in (out_dir / "validation").glob("step_*")
             if p.name[5:].isdigit() and (p / "settings.json").is_file()]
    return max(steps, key=lambda p: int(p.name[5:])) if steps else None


def run_files(out_dir: Path) -> list[tuple[str, Path]]:
    """(path in the repo, local file) for everything `push_run` uploads besides the model card."""
    export = out_dir / "export"
    if not export.is_dir() or not any(export.iterdir()):
        raise UserError(f"{export} holds no exports; finish the run first (its last step exports), or for a "
                        "full fine-tune's checkpoint run `runner export --checkpoint ...`")
    files = [(p.relative_to(export).as_posix(), p) for p in sorted(export.rglob("*"))
             if p.is_file() and p.name != "README.txt"]  # README.txt's text goes into the model card
    shown = _last_validation(out_dir)
    if shown is not None:
        files += [(f"validation/{p.name}", p) for p in sorted(shown.iterdir()) if p.is_file()]
    files += [(f"training/{name}", out_dir / local) for local, name in TRAINING_RECORD.items()
              if (out_dir / local).is_file()]
    return files


def _base_model(recipe: dict[str, Any]) -> str | None:
    from runner.hub import looks_like_repo_id

    path = str(((recipe.get("model") or {}).get("prior") or {}).get("path") or "")
    return path if looks_like_repo_id(path) else None


def model_card(recipe: dict[str, Any], out_dir: Path, repo_id: str) -> str:
    """README.md for the repo: hub metadata (base model, tags, trigger words, widget images), what was
    trained and how, each file and where it loads (export/README.txt), and the last validation images."""
    training, model = recipe.get("training") or {}, recipe.get("model") or {}
    mode, flavour = training.get("mode", "lora"), model.get("flavour", "stage-c")
    trigger = list((recipe.get("export") or {}).get("trigger_words") or [])
    shown = _last_validation(out_dir)
    images = json.loads((shown / "settings.json").read_text(encoding="utf-8"))["images"] if shown else []
    meta: dict[str, Any] = {"pipeline_tag": "text-to-image"}
    base = _base_model(recipe)
    if base:
        meta["base_model"] = base
    if base and base.startswith(STABILITY_REPOS):  # a fine-tune carries its base's licence
        meta.update(license="other", license_name="stable-cascade-nc-community",
                    license_link=STABILITY_LICENSE)
    meta["tags"] = ["stable-cascade", "text-to-image", "lora" if mode == "lora" else "full-fine-tune",
                    "cascade-runner"]
    if trigger:
        meta["instance_prompt"] = ", ".join(trigger)
    if images:
        meta["widget"] = [{"text": im["prompt"], "output": {"url": f"validation/{im['file']}"}}
                          for im in images]
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    steps = summary.get("steps", training.get("max_steps"))

    what = "LoRA" if mode == "lora" else "Full fine-tune"
    if mode == "lora":
        lora = training.get("lora") or {}
        what += f" (rank {lora.get('rank')}, alpha {lora.get('alpha')})"
    prior = model.get("prior") or {}
    source = prior.get("path", "?") + (f" (`{prior['subfolder']}`)" if prior.get("subfolder") else "")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {repo_id.split('/')[-1]}", "",
             f"{what} of the Stable Cascade Stage C prior (`{flavour}`, from {source}), trained with "
             f"cascade-runner for {steps} steps.", ""]
    if trigger:
        lines += [f"Trigger words: {', '.join(f'`{w}`' for w in trigger)}", ""]
    readme = out_dir / "export" / "README.txt"
    if readme.is_file():
        lines += ["## Files", "", "```text", readme.read_text(encoding="utf-8").rstrip(), "```", ""]
    if images:
        lines += [f"## Validation images (step {int(shown.name.split('_')[-1])})", "",
                  "![grid](validation/grid.png)", "", "| image | prompt | seed |", "| --- | --- | --- |"]
        lines += [f"| `{im['file']}` | {im['prompt']} | {im['seed']} |" for im in images]
        lines.append("")
    scheduler, optimizer = training.get("scheduler") or {}, training.get("optimizer") or {}
    precision = training.get("precision") or {}
    sizes = sorted({s.get("resolution") for s in (recipe.get("data") or {}).get("sources") or []} - {None})
    rows = [("mode", mode), ("steps", steps), ("batch size", training.get("batch_size")),
            ("gradient accumulation", training.get("gradient_accumulation_steps")),
            ("learning rate", f"{training.get('learning_rate')} ({scheduler.get('name')}, "
                              f"warmup {scheduler.get('warmup_steps')})"),
            ("optimizer", optimizer.get("name")),
            ("mixed precision", precision.get("mixed_precision")),
            ("base weights", precision.get("base_weights")),
            ("resolution", ", ".join(str(s) for s in sizes)),
            ("loss weighting", training.get("loss_weighting")), ("seed", training.get("seed"))]
    lines += ["## Training", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows if value is not None]
    lines += ["", "The whole recipe, defaults filled in, is `training/recipe.yaml`: point its model and data "
              "paths at your files and `runner training/recipe.yaml` trains it again.", "",
              "The base model's licence applies to these weights.", ""]
    return "\n".join(lines)


def push_run(api: Any, repo_id: str, out_dir: Path, recipe: dict[str, Any]) -> str:
    """One commit: the exports, README.md, the last validation images and training/; returns its URL."""
    from huggingface_hub import CommitOperationAdd

    card = model_card(recipe, out_dir, repo_id).encode("utf-8")
    operations = [CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card)]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                   for name, path in run_files(out_dir)]
    info = api.create_commit(repo_id=repo_id, operations=operations,
                             commit_message=f"cascade-runner: {out_dir.resolve().name}")
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")


# ---------------------------------------------------------------- during training
class HubPusher:
    """Rank 0's uploads of one run: checkpoints as they come (in the background), the run at the end."""

    def __init__(self, api: Any, repo_id: str, *, checkpoints: bool, final: bool, note: Any) -> None:
        self.api, self.repo_id, self.note = api, repo_id, note
        self.checkpoints, self.final = checkpoints, final
        self._pending: tuple[str, Future] | None = None
        self.failed: list[str] = []

    @classmethod
    def open(cls, hub: Any, note: Any) -> HubPusher | None:
        """None when the recipe uploads nothing; `note(text)` reports a failed checkpoint upload."""
        if not (hub.push or hub.push_checkpoints):
            return None
        return cls(open_repo(hub.model_id, private=hub.private), hub.model_id,
                   checkpoints=hub.push_checkpoints, final=hub.push, note=note)

    def wait(self) -> None:
        """Finish the checkpoint upload in flight, if any (before a save that may prune its folder)."""
        if self._pending is None:
            return
        name, future = self._pending
        self._pending = None
        try:
            future.result()
        except Exception as err:  # the checkpoint is still on disk: report and keep training
            self.failed.append(name)
            self.note(f"hub: uploading checkpoint {name} to {self.repo_id} failed ({_failure(err)}); it "
                      "stays in output.dir (`runner push OUTPUT_DIR --checkpoints` uploads it later)")

    def checkpoint_written(self, folder: Path) -> None:
        if not self.checkpoints:
            return
        self.wait()
        self._pending = (folder.name, _upload_checkpoint(self.api, self.repo_id, folder, background=True))

    def finish(self, out_dir: Path, recipe: dict[str, Any]) -> str | None:
        """Wait for the checkpoint uploads, then push the run (hub.push); the commit URL or None."""
        self.wait()
        if not self.final:
            return None
        try:
            return push_run(self.api, self.repo_id, out_dir, recipe)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"training finished and its files are in {out_dir}, but uploading them to "
                            f"{self.repo_id} failed: {_failure(err)}. Send them again with "
                            f"`runner push {out_dir}`") from None


# ---------------------------------------------------------------- runner push
def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", type=Path, help="a run's output.dir (with export/ written)")
    parser.add_argument("--repo", help="owner/name (default: the run's hub.model_id)")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=None,
                            help="create the repo as private (default: the run's hub.private)")
    visibility.add_argument("--public", dest="private", action="store_false", help="create it as public")
    parser.add_argument("--checkpoints", action="store_true",
                        help="also upload every checkpoint folder under checkpoints/")


def run_push(args: argparse.Namespace) -> int:
    """`runner push OUTPUT_DIR`: upload a finished run (again), as `hub.push` does at the end of training."""
    out = Path(args.output_dir)
    recipe_path = out / RECIPE_FILE
    if not recipe_path.is_file():
        raise UserError(f"{recipe_path} not found: give the output.dir of a cascade-runner run")
    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}
    hub = recipe.get("hub") or {}
    repo_id = args.repo or hub.get("model_id")
    if not repo_id:
        raise UserError("no repo to push to: give --repo owner/name (the run's hub.model_id is not set)")
    from runner.hub import looks_like_repo_id

    if not looks_like_repo_id(repo_id):
        raise UserError(f"--repo {repo_id!r} is not a hub repo id; use owner/name")
    run_files(out)  # before any network call: the exports must be there
    private = hub.get("private", True) if args.private is None else args.private
    api = open_repo(repo_id, private=private)
    try:
        if args.checkpoints:
            for folder in sorted((out / "checkpoints").glob("step_*")):
                _upload_checkpoint(api, repo_id, folder)
                print(f"uploaded checkpoints/{folder.name}")
        url = push_run(api, repo_id, out, recipe)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"uploading {out} to {repo_id} failed: {_failure(err)}; the files are unchanged, "
                        "run the command again") from None
    print(f"pushed {out} to {url}")
    return 0
