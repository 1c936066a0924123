"""SimpleTuner config.json -> recipe: the Conversion record, the value rules shared with the backend
mapping (numbers, pixel sizes, files named in the config), and the key-by-key mapping of config.json.

Every key is mapped, mapped with a note (lossy), or added to `Conversion.skipped` with the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import UserError

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
IGNORED = "SimpleTuner-specific; cascade-runner has no equivalent"


@dataclass
class Conversion:
    """The recipe as plain data, comments for lossy mappings (by YAML path), and keys not imported."""

    recipe: dict[str, Any]
    notes: dict[tuple[str | int, ...], str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def note(self, path: tuple[str | int, ...], text: str) -> None:
        self.notes[path] = f"{self.notes[path]}\n{text}" if path in self.notes else text


def read_json(path: Path, what: str) -> Any:
    """A JSON file named by the user; a missing or unreadable one is a UserError naming `what` it is."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None


def number(value: Any, key: str) -> float:
    """SimpleTuner stores numbers as JSON numbers or strings; either becomes a float, else a UserError."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"SimpleTuner key {key} = {value!r} is not a number; fix it in the config") from None


def pixels(value: Any, key: str, conv: Conversion, path: tuple[str | int, ...]) -> int:
    """Pixels from a SimpleTuner size (megapixels when <= 10, as its pixel_area rule), multiple of 128."""
    v = number(value, key)
    px = math.sqrt(v * 1e6) if v <= 10 else v
    out = max(128, int(round(px / 128)) * 128)
    if out != v:
        conv.note(
            path, f"SimpleTuner {key}: {value} -> {out} px (whole Stage C latent cells: multiples of 128)"
        )
    return out


def find_file(name: str, config_dir: Path) -> Path:
    """A file named in the config: as given (from the current directory), else beside the config."""
    given = Path(name).expanduser()
    return given if given.exists() or given.is_absolute() else config_dir / given


def _validation_resolution(value: Any, conv: Conversion) -> None:
    first = str(value).split(",")[0].strip()
    w, _, h = first.partition("x")
    width, height = (number(w, "validation_resolution"), number(h or w, "validation_resolution"))
    v = conv.recipe["validation"]
    v["width"], v["height"] = (max(128, int(round(x / 128)) * 128) for x in (width, height))
    if "," in str(value) or (v["width"], v["height"]) != (width, height):
        conv.note(
            ("validation", "width"),
            f"SimpleTuner validation_resolution {value!r} -> "
            f"{v['width']}x{v['height']} (one size, multiples of 128)",
        )


def _prompt_library(value: Any, key: str, config_dir: Path, conv: Conversion) -> None:
    path = find_file(str(value), config_dir) if isinstance(value, str) else None
    if path is None or path.suffix != ".json" or not path.is_file():
        conv.skipped.append(
            (
                key,
                f"{value!r} selects SimpleTuner's built-in prompt library, which is not shipped "
                "here; give a JSON file (name -> prompt) instead",
            )
        )
        return
    library = read_json(path, "prompt library")
    if not isinstance(library, dict):
        raise UserError(f"prompt library {path} must map names to prompts")
    prompts = conv.recipe["validation"].setdefault("prompts", [])
    prompts.extend(str(p) for p in library.values())
    conv.note(
        ("validation", "prompts"),
        f"prompts from SimpleTuner {key} {path} (names dropped: " + ", ".join(map(str, library)) + ")",
    )


def map_config(cfg: dict[str, Any], config_dir: Path, conv: Conversion) -> None:
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
            v.setdefault("prior_guidance", number(value, key))
            v.setdefault("decoder_guidance", number(value, key))
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
            v["prior_guidance"] = number(value, key)
        elif key == "stable_cascade_validation_decoder_guidance_scale":
            v["decoder_guidance"] = number(value, key)
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
            t["learning_rate"] = number(value, key)
        elif key == "lora_alpha":
            lora["alpha"] = number(value, key)
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
            t["ema"]["decay"] = number(value, key)
        elif key == "caption_dropout_probability":
            t["caption_dropout"] = number(value, key)
        elif key == "max_grad_norm":
            t["max_grad_norm"] = number(value, key) if number(value, key) > 0 else None
        elif key in ("validation_steps", "validation_step_interval"):
            v["every_n_steps"] = int(value)
        elif key == "validation_seed":
            v["seeds"] = [int(value)]
        elif key == "data_backend_config":
            continue
        else:
            conv.skipped.append((key, IGNORED))
