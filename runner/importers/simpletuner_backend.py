"""SimpleTuner multidatabackend.json -> recipe data sources and caches, one backend entry at a time."""

from __future__ import annotations

import math
import re
from typing import Any

from runner.importers.simpletuner_config import IGNORED, Conversion, number, pixels

_CROP = {"random": "random", "center": "center", "centre": "center", "corner": "corner"}
_CAPTIONS = {"filename": "filename", "textfile": "textfile", "instanceprompt": "instanceprompt"}


def _source_name(raw: Any, index: int) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(raw or f"source-{index}")).strip("-.")
    return name or f"source-{index}"


def map_backend_entry(entry: dict[str, Any], i: int, conv: Conversion) -> None:
    """Map backend entry `i`: a local image dataset becomes a source, a text_embeds entry sets the cache."""
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
            conv.skipped.append((f"{where}.{key}", IGNORED))
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
                value = math.sqrt(number(w, key) * number(h, key))
            src["resolution"] = pixels(value, "resolution", conv, at + ("resolution",))
        elif key == "bucket_resolutions":
            buckets = []
            for b in value:
                w, h = b.split("x") if isinstance(b, str) else b
                buckets.append([int(round(number(h, key) * 3 / 128)), int(round(number(w, key) * 3 / 128))])
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
            unset = 0 if key == "minimum_image_size" else None
            src[key] = pixels(value, key, conv, at + (key,)) if value else unset
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
            src["probability"] = number(value, key)
        elif key == "cache_dir_vae":
            conv.recipe["data"]["cache"].update(latents=True, latents_dir=value)
            conv.note(
                ("data", "cache", "latents_dir"), "from cache_dir_vae (one latent cache for all sources)"
            )
        elif key == "default":
            continue
        else:
            conv.skipped.append((f"{where}.{key}", IGNORED))
    sources.append(src)
