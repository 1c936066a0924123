"""`runner import simpletuner CONFIG_JSON [--backend MULTIDATABACKEND_JSON] [-o RECIPE.yaml]`.

Maps a SimpleTuner Stable Cascade Stage C set-up (config.json + multidatabackend.json) to a recipe. Every
key is either mapped, mapped with a comment saying what changed (lossy), or reported by name with the
reason it is not imported; nothing is dropped silently. The written recipe is validated before returning.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from runner.errors import UserError
from runner.importers.commented_yaml import render
from runner.importers.simpletuner_backend import map_backend_entry
from runner.importers.simpletuner_config import Conversion, find_file, map_config, read_json

PRIOR_REPO, DECODER_REPO = "stabilityai/stable-cascade-prior", "stabilityai/stable-cascade"


def _skeleton() -> dict[str, Any]:
    source = {"path": DECODER_REPO}
    return {
        "output": {"dir": "output/models"},
        "model": {
            "family": "stable_cascade",
            "flavour": "stage-c",
            "prior": {"path": PRIOR_REPO, "subfolder": "prior"},
            "text_encoder": {"path": PRIOR_REPO, "subfolder": "text_encoder"},
            "tokenizer": {"path": PRIOR_REPO, "subfolder": "tokenizer"},
            "effnet": dict(source, filename="effnet_encoder.safetensors"),
            "previewer": dict(source, filename="previewer.safetensors"),
            "decoder": {
                "flavour": "decoder",
                "source": dict(source, subfolder="decoder"),
                "stage_a": dict(source, subfolder="vqgan"),
            },
        },
        "training": {
            "mode": "lora",
            "lora": {},
            "precision": {},
            "scheduler": {},
            "optimizer": {},
            "ema": {},
        },
        "data": {"sources": [], "cache": {}},
        "validation": {},
        "checkpoints": {},
        "logging": {},
        "hub": {},
    }


def convert(config: dict[str, Any], backend: list[dict[str, Any]], config_dir: Path) -> Conversion:
    """Map a SimpleTuner config and its backend list to a recipe (named files are found from `config_dir`)."""
    conv = Conversion(_skeleton())
    map_config(config, config_dir, conv)
    for i, entry in enumerate(backend):
        if not isinstance(entry, dict):
            raise UserError(f"backend entry {i} is not a JSON object")
        map_backend_entry(entry, i, conv)
    r, t = conv.recipe, conv.recipe["training"]
    if t["mode"] == "full":
        del t["lora"]
    if "max_steps" in t and "num_epochs" in t:
        del t["num_epochs"]
        conv.note(("training", "max_steps"), "SimpleTuner stops at max_train_steps; num_train_epochs dropped")
    if "max_steps" not in t and "num_epochs" not in t:
        t["num_epochs"] = 1
        conv.note(
            ("training", "num_epochs"),
            "neither max_train_steps nor num_train_epochs given: SimpleTuner's default of one epoch",
        )
    if not r["validation"].get("prompts"):
        r["validation"] = {"enabled": False}
        conv.note(("validation",), "no validation_prompt or prompt library: validation off")
    if r["validation"].get("use_decoder") is False or not r["validation"].get("enabled", True):
        del r["model"]["decoder"]
    if t["precision"].get("mixed_precision") != "bf16" and "bf16_mode" in t["precision"]:
        del t["precision"]["bf16_mode"]
    for section in ("lora", "precision", "scheduler", "optimizer", "ema"):
        if section in t and not t[section]:
            del t[section]
    for section in ("validation", "checkpoints", "logging", "hub"):
        if not r[section]:
            del r[section]
    if not r["data"]["cache"]:
        del r["data"]["cache"]
    return conv


def import_simpletuner(
    config: str, *, backend: str | None = None, output: str | None = None, force: bool = False
) -> int:
    """`runner import simpletuner`: convert, validate, write (or print); returns the exit status."""
    from runner.recipe import RecipeError, read_recipe

    config_path = Path(config)
    cfg = read_json(config_path, "SimpleTuner config")
    if not isinstance(cfg, dict):
        raise UserError(f"{config_path} must hold a JSON object of SimpleTuner options")
    out_path = Path(output) if output else None
    if out_path is not None and out_path.exists() and not force:
        raise UserError(f"{out_path} already exists; choose another -o or add --force to overwrite it")
    named_backend = next((str(v) for k, v in cfg.items() if k.lstrip("-") == "data_backend_config"), None)
    if backend:
        backend_file: Path | None = Path(backend)
    else:
        backend_file = find_file(named_backend, config_path.parent) if named_backend else None
    if backend_file is None:
        raise UserError(
            "no data backend: pass --backend multidatabackend.json (the config has no data_backend_config)"
        )
    entries = read_json(backend_file, "SimpleTuner data backend file")
    if not isinstance(entries, list):
        raise UserError(f"{backend_file} must hold a JSON list of data backends")
    conv = convert(cfg, entries, config_path.parent)
    if not conv.recipe["data"]["sources"]:
        raise UserError(f"{backend_file} has no usable image dataset (type local, dataset_type image)")
    command = f"runner {out_path}" if out_path else "runner RECIPE.yaml"
    header = [
        command,
        "",
        f"Imported from SimpleTuner {config_path} + {backend_file} by `runner import simpletuner`.",
        "Comments mark values that changed on the way; every other key and default: "
        "schemas/recipe.schema.json.",
    ]
    header += ["", "Not imported:"] + [f"  {k}: {why}" for k, why in conv.skipped] if conv.skipped else []
    text = render(conv.recipe, conv.notes, "\n".join(header))
    with tempfile.TemporaryDirectory() as tmp:
        check = Path(tmp, out_path.name if out_path else "recipe.yaml")
        check.write_text(text, encoding="utf-8")
        try:
            read_recipe(check, paths="warn")
            problems = None
        except RecipeError as e:
            problems = e
    if out_path is not None:
        out_path.write_text(text, encoding="utf-8")
        print(f"wrote {out_path}", file=sys.stderr)
    else:
        print(text, end="")
    for key, why in conv.skipped:
        print(f"not imported: {key}: {why}", file=sys.stderr)
    if problems is not None:
        print(f"the imported recipe needs fixing before it runs:\n{problems}", file=sys.stderr)
        return 2
    return 0
