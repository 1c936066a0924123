"""`runner plan RECIPE`: what a run would do, found without downloading or loading any weights.

The user learns before spending GPU time what will be fetched (and what is already in the Hugging Face
cache), how many samples each source yields and why others were skipped, the bucket table, the step
count, how much of the text/latent caches is already filled, and whether the run fits the GPU.
Hub access is only `try_to_load_from_cache` and a look into the local cache folder; data sources are
indexed from headers (images and tar members), never decoded; Stage C is built on the meta device.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from runner.errors import UserError
from runner.recipe import LoadedRecipe
from runner.spec import Recipe, SourceSpec, WeightsSourceSpec

UNKNOWN_IDENTITY = "unknown until downloaded"


# ---------------------------------------------------------------- model sources
def _hub_snapshot(repo: str, revision: str | None) -> Path | None:
    """The local snapshot folder of repo@revision in the HF cache, if any (no network)."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    rev = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        commit = rev
    else:
        ref = folder / "refs" / rev
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snap = folder / "snapshots" / commit
    return snap if snap.is_dir() else None


def _pattern_status(repo: str, revision: str | None, snap: Path | None, pattern: str) -> list[str]:
    """Cached files matching one allow-pattern (exact names through try_to_load_from_cache)."""
    if not any(c in pattern for c in "*?["):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, pattern, revision=revision)
        return [pattern] if isinstance(found, str) else []
    if snap is None:
        return []
    return sorted(p.relative_to(snap).as_posix() for p in snap.glob(pattern) if p.is_file())


def describe_source(spec: SourceSpec | WeightsSourceSpec, role: str) -> dict[str, Any]:
    """Where one model comes from, and the local path build.resolve_source would return (or None)."""
    from runner.hub import folder_is_present, folder_kind, looks_like_repo_id, model_file_patterns

    sub, name = spec.subfolder or None, spec.filename
    if not looks_like_repo_id(spec.path):
        root = Path(spec.path).expanduser().absolute()
        local = (root / sub / name if sub else root / name) if name else root
        return {"role": role, "kind": "local", "path": str(local), "exists": local.exists(), "local": local}
    patterns = model_file_patterns(sub, name, None)
    snap = _hub_snapshot(spec.path, spec.revision)
    files = [{"pattern": p, "cached": _pattern_status(spec.path, spec.revision, snap, p)} for p in patterns]
    local = None
    if snap is not None:  # the same "present" rule as runner.hub.download_model_files
        target = snap / sub if sub else snap
        target = target / name if name else target
        present = target.is_file() if name else folder_is_present(target, folder_kind(sub))
        local = (target if name else snap) if present else None
    return {
        "role": role,
        "kind": "hub",
        "repo": spec.path,
        "revision": spec.revision or "main",
        "files": files,
        "cached": local is not None,
        "local": local,
    }


def model_sources(recipe: Recipe) -> list[dict[str, Any]]:
    """Every model the run loads, in build order (decoders only when validation uses them)."""
    m, v = recipe.model, recipe.validation
    out = [
        describe_source(m.prior, "model.prior"),
        describe_source(m.text_encoder, "model.text_encoder"),
        describe_source(m.tokenizer, "model.tokenizer"),
        describe_source(m.effnet, "model.effnet"),
    ]
    if v.enabled and m.previewer is not None:
        out.append(describe_source(m.previewer, "model.previewer"))
    if v.enabled and v.use_decoder and m.decoder is not None:
        out.append(describe_source(m.decoder.source, "model.decoder.source"))
        out.append(describe_source(m.decoder.stage_a, "model.decoder.stage_a"))
    return out


def _weights_path(src: dict[str, Any], spec: SourceSpec | WeightsSourceSpec, subfolder: bool) -> Path | None:
    """The folder/file build.py hashes or loads: resolve_source's path (+ subfolder for transformers)."""
    local = src["local"]
    if local is None or not local.exists():
        return None
    return local / spec.subfolder if subfolder and not spec.filename and spec.subfolder else local


def encoder_identities(recipe: Recipe, sources: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    """(text, effnet) cache identities exactly as runner.build computes them, or None when not local."""
    from runner.build import weights_identity

    by_role = {s["role"]: s for s in sources}
    text_dir = _weights_path(by_role["model.text_encoder"], recipe.model.text_encoder, subfolder=True)
    effnet = _weights_path(by_role["model.effnet"], recipe.model.effnet, subfolder=False)
    return (
        ("clip:" + weights_identity(text_dir)) if text_dir else None,
        ("effnet:" + weights_identity(effnet)) if effnet else None,
    )


# ---------------------------------------------------------------- data
def _reason(text: str) -> str:
    """A skip reason without its per-file details, so reasons can be counted."""
    text = text.split(":")[0]
    text = re.sub(r"^\d+x\d+ ", "", text)
    return re.sub(r" \S+\.(txt|json)$", "", text)


def _summary(items: list[tuple[str, str]]) -> dict[str, Any]:
    counts = Counter(_reason(why) for _, why in items)
    return {"count": len(items), "reasons": dict(counts.most_common()), "examples": items[:3]}


def index_data(recipe: Recipe):
    """(index, loader config, per-source rows): every local source indexed; a missing or remote one is
    reported, not fatal (the plan still shows the rest)."""
    import webdataset as wds

    from runner.build import data_sources, loader_settings
    from runner.data.buckets import closest_bucket, parse_buckets
    from runner.data.loader import DataIndex, Entry, LoaderConfig
    from runner.data.sources import IndexReport, index_source

    cfg = LoaderConfig(
        batch_size=recipe.training.batch_size,
        seed=recipe.training.seed,
        workers=recipe.data.workers,
        **loader_settings(recipe),
    )
    buckets = parse_buckets(list(cfg.buckets), cfg.resolution)
    shard_cache = str(Path(recipe.data.cache.latents_dir).parent / "shards")
    specs = data_sources(recipe)
    entries, reports, filtered, rows = [], [], [], []
    for s, (spec, rs) in enumerate(zip(specs, recipe.data.sources, strict=True)):
        row: dict[str, Any] = {
            "name": rs.name,
            "type": rs.type,
            "path": rs.path,
            "repeats": rs.repeats,
            "probability": rs.probability,
        }
        remote = spec.type == "webdataset" and any(
            "://" in u or u.startswith("pipe:") for u in wds.shardlists.expand_urls(rs.path)
        )
        report, dropped = IndexReport(), []
        if remote:
            row["error"] = "remote shards: not indexed (counting them would download them)"
        else:
            try:
                report = index_source(spec, shard_cache)
            except (ValueError, OSError) as err:
                row["error"] = f"not indexed: {err}"
        for ref in report.samples:
            if cfg.size_rules.too_small(ref.width, ref.height):
                dropped.append((ref.uid, f"{ref.width}x{ref.height} below minimum_image_size"))
            else:
                entries.append(Entry(s, ref, closest_bucket(ref.width, ref.height, buckets)))
        row.update(
            samples=len(report.samples) - len(dropped),
            skipped=_summary(report.skipped),
            filtered=_summary(dropped),
        )
        reports.append(report)
        filtered.append(dropped)
        rows.append(row)
    return DataIndex(specs, entries, reports, filtered), cfg, rows


def planned_latent_keys(index, cfg, latent_cache, epoch: int = 0) -> list[str]:
    """The latent-cache key of every crop of one epoch (crops depend on seed and sample, not the epoch)."""
    import random

    from runner.data.buckets import plan_crop
    from runner.data.loader import plan_epoch

    keys = []
    for pb in plan_epoch(index, cfg, epoch):
        for i, rep in pb.items:
            e = index.entries[i]
            rng = random.Random(f"crop:{cfg.seed}:{e.source}:{e.ref.uid}:{rep}")
            p = plan_crop(e.ref.width, e.ref.height, pb.bucket, cfg.size_rules, cfg.crop_style, rng)
            keys.append(
                latent_cache.key(
                    index.sources[e.source].identity,
                    e.ref.uid,
                    (pb.bucket.h, pb.bucket.w),
                    (p.resize_w, p.resize_h, p.top, p.left),
                )
            )
    return keys


def all_captions(index) -> list[str]:
    """Every distinct caption of every usable sample (a sample may have several; one is drawn per use)."""
    return list(dict.fromkeys(c for e in index.entries for c in e.ref.captions))


def cache_status(recipe: Recipe, index, cfg, text_id: str | None, effnet_id: str | None) -> dict[str, Any]:
    from runner.data.latent_cache import LatentCache
    from runner.data.text_cache import TextCache

    cache = recipe.data.cache
    captions = all_captions(index)
    text: dict[str, Any] = {
        "enabled": cache.text_embeddings,
        "dir": cache.text_embeddings_dir,
        "captions": len(captions),
        "encoder": text_id or UNKNOWN_IDENTITY,
    }
    if text_id:
        tc = TextCache(cache.text_embeddings_dir, text_id)
        text["cached"] = sum(tc.contains(c) for c in captions)
    latents: dict[str, Any] = {
        "enabled": cache.latents,
        "dir": cache.latents_dir,
        "encoder": effnet_id or UNKNOWN_IDENTITY,
    }
    if cache.latents and index.entries:
        lc = LatentCache(cache.latents_dir, effnet_id or "unknown")
        keys = planned_latent_keys(index, cfg, lc)
        latents["crops_per_epoch"] = len(keys)
        if effnet_id:
            latents["cached"] = sum(lc.contains(k) for k in keys)
    return {"text_embeddings": text, "latents": latents}


# ---------------------------------------------------------------- the plan
def _helper_params(recipe: Recipe, sources: list[dict[str, Any]]) -> dict[str, int]:
    """Frozen fp32 models on the training device: header counts when local, else the manifests' counts."""
    from runner.memory_estimate import KNOWN_PARAMS, safetensors_params

    m = recipe.model
    roles = {
        "model.text_encoder": ("text_encoder", m.text_encoder, True),
        "model.effnet": ("effnet", m.effnet, False),
        "model.previewer": ("previewer", m.previewer, False),
        "model.decoder.source": (
            m.decoder.flavour if m.decoder else "",
            m.decoder and m.decoder.source,
            True,
        ),
        "model.decoder.stage_a": ("stage_a", m.decoder and m.decoder.stage_a, True),
    }
    out = {}
    for src in sources:
        if src["role"] not in roles:
            continue
        name, spec, sub = roles[src["role"]]
        path = _weights_path(src, spec, subfolder=sub)
        count = safetensors_params(path) if path is not None else None
        if count is None:
            count = KNOWN_PARAMS.get(name)
        if count is not None:
            out[src["role"].removeprefix("model.")] = count
    return out


def make_plan(loaded: LoadedRecipe) -> dict[str, Any]:
    """Everything `runner plan` reports, as plain data (the --json output minus the recipe)."""
    from runner.data.buckets import parse_buckets
    from runner.data.loader import StageCLoader
    from runner.memory_estimate import INT8_QUALITY, estimate_memory, prior_sizes, rollout_cost

    recipe = loaded.spec
    sources = model_sources(recipe)
    text_id, effnet_id = encoder_identities(recipe, sources)
    index, cfg, data_rows = index_data(recipe)
    loader = StageCLoader(index, cfg)
    table = loader.bucket_table() if index.entries else []
    spe = loader.steps_per_epoch() if index.entries else None
    accum = recipe.training.gradient_accumulation_steps
    steps = recipe.training.max_steps
    if steps is None and spe is not None:
        steps = max(1, recipe.training.num_epochs * math.ceil(spe / accum))
    if table:  # the peak comes from the largest bucket the data uses
        latent_hw = max(((r["cells"][0], r["cells"][1]) for r in table), key=lambda hw: hw[0] * hw[1])
    else:  # no data indexed yet: the squarest bucket of the recipe's resolution (24x24 at 1024 px)
        b = min(parse_buckets(list(cfg.buckets), cfg.resolution), key=lambda b: (abs(b.h - b.w), -b.h * b.w))
        latent_hw = (b.h, b.w)
    sizes = prior_sizes(recipe)
    helpers = _helper_params(recipe, sources)
    base = recipe.training.precision.base_weights
    return {
        "models": {
            "flavour": recipe.model.flavour,
            "prior_params": sizes.params,
            "lora_params": sizes.lora_params,
            "helper_params": helpers,
        },
        "sources": [{k: (str(v) if isinstance(v, Path) else v) for k, v in s.items()} for s in sources],
        "data": data_rows,
        "buckets": [{**r, "source": data_rows[r["source"]]["name"]} for r in table],
        "steps": {
            "per_epoch": spe,
            "total": steps,
            "batch_size": recipe.training.batch_size,
            "gradient_accumulation": accum,
            "epochs": round(steps * accum / spe, 2) if spe and steps else None,
        },
        "cache": cache_status(recipe, index, cfg, text_id, effnet_id),
        "memory": {
            "latent_cells": list(latent_hw),
            "latent_from": "largest bucket" if table else "square bucket",
            **estimate_memory(recipe, sizes, latent_hw, helpers),
        },
        "int8_quality": None if base == "no_change" else {"backend": base, **INT8_QUALITY},
        "scheduled_sampling": rollout_cost(recipe, steps),
        "hub": hub_plan(recipe),
    }


def hub_plan(recipe: Recipe) -> dict[str, Any] | None:
    """What the run would upload and whether a token is there (read locally; the hub is not asked)."""
    hub = recipe.hub
    if not (hub.push or hub.push_checkpoints):
        return None
    from huggingface_hub import get_token

    return {"repo": hub.model_id, "private": hub.private, "at_end": hub.push,
            "checkpoints": hub.push_checkpoints, "token_found": get_token() is not None}


def run_plan(recipe_path: str, overrides: list[str], as_json: bool) -> int:
    """The `runner plan` command: the resolved recipe (YAML), then the plan as `#` comment lines, so the
    whole output still loads as the resolved recipe; or one JSON object with --json."""
    import json

    from runner.cli import dump_yaml
    from runner.plan_render import render_plan
    from runner.recipe import read_recipe
    from runner.spec import spec_to_dict

    loaded = read_recipe(recipe_path, overrides, paths="warn")
    try:
        plan = make_plan(loaded)
    except ValueError as err:
        raise UserError(f"plan: {err}") from None
    warnings = [w.render() for w in loaded.warnings]
    if as_json:
        print(
            json.dumps(
                {"recipe": spec_to_dict(loaded.spec), "warnings": warnings, **plan}, indent=1, default=str
            )
        )
        return 0
    print(f"# {recipe_path}: the resolved recipe, with every default filled in")
    for warning in warnings:
        print(f"# warning: {warning}")
    print(dump_yaml(spec_to_dict(loaded.spec)), end="")
    print("\n".join("# " + line if line else "#" for line in render_plan(plan)))
    return 0
