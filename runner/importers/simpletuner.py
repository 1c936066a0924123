"""`runner import simpletuner CONFIG_JSON [--backend MULTIDATABACKEND_JSON] [-o RECIPE.yaml]`.

Maps a SimpleTuner Stable Cascade Stage C set-up (config.json + multidatabackend.json) to a recipe. Every
key is either mapped, mapped with a comment saying what changed (lossy), or reported by name with the
reason it is not imported; nothing is dropped silently. The written recipe is validated before returning.
"""

from __future__ import annotations

import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import UserError
from runner.importers.commented_yaml import render

PRIOR_REPO, DECODER_REPO = "stabilityai/stable-cascade-prior", "stabilityai/stable-cascade"
_FLAVOUR_SUBFOLDER = {"stage-c": "prior", "stage-c-lite": "prior_lite"}
_MIXED = {"no": "no", "bf16": "bf16", "fp16": "fp16"}
_BASE = {
    "no_change": ("no_change", None),
    "int8-torchao": ("int8-torchao", None),
    "int8-quanto": ("int8", "int8-quanto -> int8 (our pure-PyTorch weight-only int8; quanto is not used)"),
    "int8-bnb": ("int8-bnb", None),
}
_SCHEDULERS = {
    "constant": "constant",
    "constant_with_warmup": "constant",
    "linear": "linear",
    "cosine": "cosine",
    "cosine_with_restarts": "cosine_with_restarts",
    "polynomial": "polynomial",
}
_OPTIMIZERS = {
    "adamw": "adamw",
    "adamw_torch": "adamw",
    "optimi-adamw": "adamw",
    "adamw_bf16": "adamw_bf16",
    "bnb-adamw8bit": "adamw8bit",
    "adamw8bit": "adamw8bit",
    "adafactor": "adafactor",
}
_REPORT = {"none": "none", "tensorboard": "tensorboard", "wandb": "wandb"}
_CROP = {"random": "random", "center": "center", "centre": "center", "corner": "corner"}
_CAPTIONS = {"filename": "filename", "textfile": "textfile", "instanceprompt": "instanceprompt"}
_IGNORED = "SimpleTuner-specific; cascade-runner has no equivalent"


@dataclass
class Conversion:
    """The recipe as plain data, comments for lossy mappings (by YAML path), and keys not imported."""

    recipe: dict[str, Any]
    notes: dict[tuple[str | int, ...], str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def note(self, path: tuple[str | int, ...], text: str) -> None:
        self.notes[path] = f"{self.notes[path]}\n{text}" if path in self.notes else text


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None


def _number(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"SimpleTuner key {key} = {value!r} is not a number; fix it in the config") from None


def _px(value: Any, key: str, conv: Conversion, path: tuple[str | int, ...]) -> int:
    """Pixels from a SimpleTuner size (megapixels when <= 10, as its pixel_area rule), multiple of 128."""
    v = _number(value, key)
    px = math.sqrt(v * 1e6) if v <= 10 else v
    out = max(128, int(round(px / 128)) * 128)
    if out != v:
        conv.note(
            path, f"SimpleTuner {key}: {value} -> {out} px (whole Stage C latent cells: multiples of 128)"
        )
    return out


def _find(name: str, config_dir: Path) -> Path:
    """A file named in the config: as given (from the current directory), else beside the config."""
    given = Path(name).expanduser()
    return given if given.exists() or given.is_absolute() else config_dir / given


def _validation_resolution(value: Any, conv: Conversion) -> None:
    first = str(value).split(",")[0].strip()
    w, _, h = first.partition("x")
    width, height = (_number(w, "validation_resolution"), _number(h or w, "validation_resolution"))
    v = conv.recipe["validation"]
    v["width"], v["height"] = (max(128, int(round(x / 128)) * 128) for x in (width, height))
    if "," in str(value) or (v["width"], v["height"]) != (width, height):
        conv.note(
            ("validation", "width"),
            f"SimpleTuner validation_resolution {value!r} -> "
            f"{v['width']}x{v['height']} (one size, multiples of 128)",
        )


def _prompt_library(value: Any, key: str, config_dir: Path, conv: Conversion) -> None:
    path = _find(str(value), config_dir) if isinstance(value, str) else None
    if path is None or path.suffix != ".json" or not path.is_file():
        conv.skipped.append(
            (
                key,
                f"{value!r} selects SimpleTuner's built-in prompt library, which is not shipped "
                "here; give a JSON file (name -> prompt) instead",
            )
        )
        return
    library = _read_json(path, "prompt library")
    if not isinstance(library, dict):
        raise UserError(f"prompt library {path} must map names to prompts")
    prompts = conv.recipe["validation"].setdefault("prompts", [])
    prompts.extend(str(p) for p in library.values())
    conv.note(
        ("validation", "prompts"),
        f"prompts from SimpleTuner {key} {path} (names dropped: " + ", ".join(map(str, library)) + ")",
    )


def _config(cfg: dict[str, Any], config_dir: Path, conv: Conversion) -> None:
    """Map config.json into `conv` (data_backend_config is read by the caller)."""
    r = conv.recipe
    model, t, v = r["model"], r["training"], r["validation"]
    prec, lora, dec = t["precision"], t["lora"], model["decoder"]
    for raw_key, value in cfg.items():
        key = raw_key.lstrip("-")
        if key == "model_family":
            if value != "stable_cascade":
                raise UserError(f"model_family is {value!r}: only stable_cascade configs can be imported")
            model["family"] = "stable_cascade"
        elif key == "model_flavour":
            if value not in _FLAVOUR_SUBFOLDER:
                raise UserError(f"model_flavour {value!r} is not a Stage C flavour (stage-c or stage-c-lite)")
            model["flavour"], model["prior"]["subfolder"] = value, _FLAVOUR_SUBFOLDER[value]
        elif key == "pretrained_model_name_or_path":
            model["prior"]["path"] = model["text_encoder"]["path"] = model["tokenizer"]["path"] = value
        elif key == "model_type":
            if value not in ("lora", "full"):
                raise UserError(f"model_type {value!r} must be lora or full")
            t["mode"] = value
        elif key == "mixed_precision":
            if value not in _MIXED:
                conv.skipped.append((key, f"{value!r} is not supported for Stage C (use no or bf16)"))
            else:
                prec["mixed_precision"] = _MIXED[value]
        elif key == "i_know_what_i_am_doing":
            prec["i_know_what_i_am_doing"] = bool(value)
        elif key == "gradient_checkpointing":
            t["gradient_checkpointing"] = bool(value)
        elif key == "vae_batch_size":
            r["data"]["cache"]["encoder_batch_size"] = int(value)
        elif key == "validation_resolution":
            _validation_resolution(value, conv)
        elif key == "validation_prompt":
            v.setdefault("prompts", []).insert(0, str(value))
        elif key == "validation_negative_prompt":
            v["negative_prompt"] = str(value)
        elif key == "validation_guidance":
            v.setdefault("prior_guidance", _number(value, key))
            v.setdefault("decoder_guidance", _number(value, key))
            conv.note(
                ("validation", "prior_guidance"),
                "SimpleTuner uses validation_guidance for the prior and "
                "the decoder unless stable_cascade_validation_*_guidance_scale is set",
            )
        elif key == "validation_num_inference_steps":
            v["decoder_steps"] = int(value)
            conv.note(
                ("validation", "decoder_steps"),
                "from validation_num_inference_steps (SimpleTuner's decoder steps)",
            )
        elif key in ("validation_prompt_library", "user_prompt_library"):
            if value not in (False, None, "", "false"):
                _prompt_library(value, key, config_dir, conv)
        elif key == "stable_cascade_use_decoder_for_validation":
            v["use_decoder"] = bool(value)
        elif key == "stable_cascade_decoder_model_name_or_path":
            dec["source"]["path"] = dec["stage_a"]["path"] = value
        elif key == "stable_cascade_decoder_subfolder":
            dec["source"]["subfolder"] = value or "decoder"
            dec["flavour"] = "decoder_lite" if "lite" in str(value) else "decoder"
            if not value:
                conv.note(
                    ("model", "decoder", "source", "subfolder"),
                    "SimpleTuner's empty subfolder = the decoder pipeline's Stage B, which lives in decoder/",
                )
        elif key == "stable_cascade_validation_prior_num_inference_steps":
            v["prior_steps"] = int(value)
        elif key == "stable_cascade_validation_prior_guidance_scale":
            v["prior_guidance"] = _number(value, key)
        elif key == "stable_cascade_validation_decoder_guidance_scale":
            v["decoder_guidance"] = _number(value, key)
        elif key == "base_model_precision":
            if value not in _BASE:
                conv.skipped.append((key, f"{value!r} is not supported (int8 only); the base stays as it is"))
            else:
                prec["base_weights"], lossy = _BASE[value]
                if lossy:
                    conv.note(("training", "precision", "base_weights"), lossy)
        elif key in ("checkpoint_step_interval", "checkpointing_steps"):
            r["checkpoints"]["every_n_steps"] = int(value)
        elif key == "checkpoints_total_limit":
            r["checkpoints"]["keep_last"] = int(value)
        elif key == "gradient_accumulation_steps":
            t["gradient_accumulation_steps"] = int(value)
        elif key == "hub_model_id":
            r["hub"]["model_id"] = value
        elif key == "push_to_hub":
            r["hub"]["push"] = bool(value)
        elif key == "learning_rate":
            t["learning_rate"] = _number(value, key)
        elif key == "lora_alpha":
            lora["alpha"] = _number(value, key)
        elif key == "lora_rank":
            lora["rank"] = int(value)
        elif key == "lora_type":
            if str(value).lower() != "standard":
                conv.skipped.append(
                    (
                        key,
                        f"{value!r}: LyCORIS adapters are not implemented; a standard LoRA of "
                        "the same rank is written instead",
                    )
                )
        elif key == "lr_scheduler":
            if value not in _SCHEDULERS:
                conv.skipped.append((key, f"{value!r} has no equivalent; constant is used"))
            else:
                t["scheduler"]["name"] = _SCHEDULERS[value]
        elif key == "lr_warmup_steps":
            t["scheduler"]["warmup_steps"] = int(value)
        elif key == "max_train_steps":
            if int(value) > 0:
                t["max_steps"] = int(value)
        elif key == "num_train_epochs":
            if int(value) > 0:
                t["num_epochs"] = int(value)
        elif key == "optimizer":
            if value not in _OPTIMIZERS:
                conv.skipped.append((key, f"{value!r} is not available; adamw is used"))
            else:
                t["optimizer"]["name"] = _OPTIMIZERS[value]
        elif key == "output_dir":
            r["output"]["dir"] = value
        elif key == "report_to":
            if value == "simpletuner":
                r["logging"]["report_to"] = "jsonl"
                conv.note(("logging", "report_to"), "SimpleTuner's local tracker -> OUTPUT/metrics.jsonl")
            elif value not in _REPORT:
                conv.skipped.append((key, f"{value!r} is not supported (none, jsonl, tensorboard, wandb)"))
            else:
                r["logging"]["report_to"] = _REPORT[value]
        elif key == "seed":
            t["seed"] = int(value)
        elif key == "train_batch_size":
            t["batch_size"] = int(value)
        elif key == "use_ema":
            t["ema"]["enabled"] = bool(value)
        elif key == "ema_decay":
            t["ema"]["decay"] = _number(value, key)
        elif key == "caption_dropout_probability":
            t["caption_dropout"] = _number(value, key)
        elif key == "max_grad_norm":
            t["max_grad_norm"] = _number(value, key) if _number(value, key) > 0 else None
        elif key in ("validation_steps", "validation_step_interval"):
            v["every_n_steps"] = int(value)
        elif key == "validation_seed":
            v["seeds"] = [int(value)]
        elif key == "data_backend_config":
            continue
        else:
            conv.skipped.append((key, _IGNORED))


def _source_name(raw: Any, index: int) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(raw or f"source-{index}")).strip("-.")
    return name or f"source-{index}"


def _backend_entry(entry: dict[str, Any], i: int, conv: Conversion) -> None:
    where = f"backend[{i}] ({entry.get('id', 'no id')})"
    kind = entry.get("dataset_type", "image")
    if entry.get("disabled") or entry.get("disable"):
        conv.skipped.append((where, "disabled in SimpleTuner"))
        return
    if kind == "text_embeds":
        cache = conv.recipe["data"]["cache"]
        if entry.get("cache_dir") and (entry.get("default") or "text_embeddings_dir" not in cache):
            cache["text_embeddings_dir"] = entry["cache_dir"]
        for key in entry.keys() - {"id", "dataset_type", "type", "cache_dir", "default", "disabled"}:
            conv.skipped.append((f"{where}.{key}", _IGNORED))
        if entry.get("type", "local") != "local":
            conv.skipped.append(
                (f"{where}.type", f"{entry['type']!r} storage is not supported; a local cache folder is used")
            )
        return
    if kind not in ("image", "images"):
        conv.skipped.append((where, f"dataset_type {kind!r} is not used by Stage C training here"))
        return
    if entry.get("type", "local") != "local":
        conv.skipped.append(
            (
                where,
                f"type {entry.get('type')!r} is not supported; use local folders or make "
                "shards with tools/shard_dataset.py",
            )
        )
        return
    sources = conv.recipe["data"]["sources"]
    at = ("data", "sources", len(sources))
    src: dict[str, Any] = {
        "name": _source_name(entry.get("id"), i),
        "type": "local",
        "path": str(entry.get("instance_data_dir", "")),
    }
    if kind == "images":
        conv.note(at, 'dataset_type "images" read as "image" (SimpleTuner itself rejects "images")')
    for key, value in entry.items():
        if key in ("id", "type", "dataset_type", "instance_data_dir", "disabled"):
            continue
        if key == "resolution":
            if isinstance(value, str) and "x" in value:
                w, _, h = value.partition("x")
                value = math.sqrt(_number(w, key) * _number(h, key))
            src["resolution"] = _px(value, "resolution", conv, at + ("resolution",))
        elif key == "bucket_resolutions":
            buckets = []
            for b in value:
                w, h = b.split("x") if isinstance(b, str) else b
                buckets.append([int(round(_number(h, key) * 3 / 128)), int(round(_number(w, key) * 3 / 128))])
            src["buckets"] = buckets
            conv.note(
                at + ("buckets",),
                "from bucket_resolutions (W x H px -> [height, width] latent cells); "
                "SimpleTuner never reads this key, here it defines the buckets",
            )
        elif key == "crop":
            src["crop"] = bool(value)
        elif key == "crop_style":
            src["crop_style"] = _CROP.get(value, "random")
            if value not in _CROP:
                conv.note(at + ("crop_style",), f"crop_style {value!r} is not available; random is used")
        elif key in ("minimum_image_size", "maximum_image_size", "target_downsample_size"):
            src[key] = (
                _px(value, key, conv, at + (key,)) if value else (0 if key == "minimum_image_size" else None)
            )
            if key != "minimum_image_size":
                conv.note(
                    at + (key,),
                    f"{key}: longer edge in px here; SimpleTuner resizes every image whose size "
                    "differs from the target",
                )
        elif key == "caption_strategy":
            src["caption_strategy"] = _CAPTIONS.get(value, "textfile")
            if value not in _CAPTIONS:
                conv.note(
                    at + ("caption_strategy",),
                    f"caption_strategy {value!r} is not available; textfile "
                    "(a .txt beside each image) is used",
                )
        elif key == "prepend_instance_prompt":
            src["prepend_instance_prompt"] = bool(value)
        elif key == "instance_prompt":
            src["instance_prompt"] = value[0] if isinstance(value, list) else value
            if isinstance(value, list):
                conv.note(
                    at + ("instance_prompt",), "SimpleTuner's list of instance prompts -> its first one"
                )
        elif key == "repeats":
            src["repeats"] = int(value)
        elif key == "probability":
            src["probability"] = _number(value, key)
        elif key == "cache_dir_vae":
            conv.recipe["data"]["cache"].update(latents=True, latents_dir=value)
            conv.note(
                ("data", "cache", "latents_dir"), "from cache_dir_vae (one latent cache for all sources)"
            )
        elif key == "default":
            continue
        else:
            conv.skipped.append((f"{where}.{key}", _IGNORED))
    sources.append(src)


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
    _config(config, config_dir, conv)
    for i, entry in enumerate(backend):
        if not isinstance(entry, dict):
            raise UserError(f"backend entry {i} is not a JSON object")
        _backend_entry(entry, i, conv)
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
    cfg = _read_json(config_path, "SimpleTuner config")
    if not isinstance(cfg, dict):
        raise UserError(f"{config_path} must hold a JSON object of SimpleTuner options")
    out_path = Path(output) if output else None
    if out_path is not None and out_path.exists() and not force:
        raise UserError(f"{out_path} already exists; choose another -o or add --force to overwrite it")
    named_backend = next((str(v) for k, v in cfg.items() if k.lstrip("-") == "data_backend_config"), None)
    backend_file = (
        Path(backend) if backend else (_find(named_backend, config_path.parent) if named_backend else None)
    )
    if backend_file is None:
        raise UserError(
            "no data backend: pass --backend multidatabackend.json (the config has no data_backend_config)"
        )
    entries = _read_json(backend_file, "SimpleTuner data backend file")
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
