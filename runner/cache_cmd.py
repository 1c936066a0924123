"""`runner cache RECIPE`: fill the text-embedding (and latent) caches before training.

Encoding every caption with CLIP-G (and every crop with the EfficientNet) once, up front, takes the
encoders off the training step's critical path and lets a run on a busy GPU start at full speed. The
caches are keyed exactly as training keys them (encoder identity from `runner.build`, crops from the
loader's plan), entries are written atomically, and existing entries are skipped, so an interrupted run
loses at most the batch in flight and a re-run continues where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from runner.errors import UserError
from runner.recipe import read_recipe
from runner.spec import Recipe

CHUNK_BATCHES = 8  # encoder batches per progress-bar update


def _bar(total: int, unit: str, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, dynamic_ncols=True)


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f}" if seconds > 0 and n else "0"


def cache_text(recipe: Recipe, captions: list[str], device: torch.device, progress: bool = True) -> dict:
    """Encode every caption not cached yet for this text encoder; returns counts and throughput."""
    from runner.build import build_text_encoder
    from runner.data.text_cache import TextCache

    text = build_text_encoder(recipe, device)
    cache = TextCache(recipe.data.cache.text_embeddings_dir, text.identity)
    todo = [c for c in captions if not cache.contains(c)]
    batch = recipe.data.cache.text_batch_size

    def encode(chunk: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cond = text.encode(chunk)  # the same pair training stores (runner.train._text_pair)
        return cond.clip_text, cond.clip_text_pooled

    started = time.perf_counter()
    with _bar(len(todo), "prompt", "text embeddings", progress) as bar:
        step = batch * CHUNK_BATCHES
        for i in range(0, len(todo), step):
            chunk = todo[i : i + step]
            cache.precompute(chunk, encode, batch)
            bar.update(len(chunk))
    seconds = time.perf_counter() - started
    return {
        "encoder": text.identity,
        "captions": len(captions),
        "hits": len(captions) - len(todo),
        "misses": len(todo),
        "seconds": round(seconds, 2),
        "prompts_per_s": _rate(len(todo), seconds),
    }


def _epoch_batches(loader) -> Iterable[dict]:
    """One epoch of the loader from its start (crops are fixed per seed and sample, so one epoch covers
    every crop training will ever ask for)."""
    loader.epoch, loader.cursor = 0, 0
    return iter(loader)


def cache_latents(recipe: Recipe, device: torch.device, progress: bool = True) -> dict:
    """Encode every planned crop of one epoch whose latent is not cached yet."""
    from runner.build import build_effnet, build_loader
    from runner.data.latent_cache import LatentCache

    effnet, identity = build_effnet(recipe, device)
    cache = LatentCache(recipe.data.cache.latents_dir, identity)
    loader, _ = build_loader(recipe, latent_cache=cache, device=device)
    total = sum(len(pb.items) for pb in loader.rank_batches())

    def encode(images: torch.Tensor) -> torch.Tensor:
        return effnet(images.to(device, non_blocking=True))

    skipped: list[tuple[str, str]] = []
    started = time.perf_counter()
    with _bar(total, "img", "latents", progress) as bar:
        for batch in _epoch_batches(loader):
            skipped += batch["skipped"]
            if batch["keys"]:
                cache.complete(batch, encode, recipe.data.cache.encoder_batch_size)
            bar.update(len(batch["keys"]) + len(batch["skipped"]))
    seconds = time.perf_counter() - started
    return {
        "encoder": identity,
        "crops": total,
        "hits": cache.hits,
        "misses": cache.misses,
        "undecodable": len(skipped),
        "seconds": round(seconds, 2),
        "images_per_s": _rate(cache.misses, seconds),
    }


def run_cache(recipe_path: str, overrides: list[str], progress: bool | None = None) -> int:
    """The `runner cache` command: caption embeddings of every source, then latents when enabled."""
    from runner.build import pick_device
    from runner.plan import all_captions, index_data

    loaded = read_recipe(recipe_path, overrides, paths="error")
    recipe = loaded.spec
    cache = recipe.data.cache
    if not cache.text_embeddings and not cache.latents:
        raise UserError(
            "data.cache.text_embeddings and data.cache.latents are both off, so training would "
            "not read a cache; turn one on (e.g. data.cache.text_embeddings=true)"
        )
    progress = recipe.logging.progress_bar if progress is None else progress
    device = pick_device(recipe.device)
    index, _, rows = index_data(recipe)
    for row in rows:
        if "error" in row:
            raise UserError(f"data source {row['name']}: {row['error']}")
        print(
            f"{row['name']}: {row['samples']} samples, {row['skipped']['count']} skipped, "
            f"{row['filtered']['count']} filtered (see `runner plan` for the reasons)"
        )
    if not index.entries:
        raise UserError("data: no usable samples in any source; run `runner plan` on the recipe to see why")
    try:
        if cache.text_embeddings:
            t = cache_text(recipe, all_captions(index), device, progress)
            print(
                f"text embeddings ({cache.text_embeddings_dir}, encoder {t['encoder']}): {t['captions']} "
                f"captions, {t['hits']} hits, {t['misses']} misses encoded in {t['seconds']} s "
                f"({t['prompts_per_s']} prompts/s)"
            )
        else:
            print("text embeddings: data.cache.text_embeddings is off (training encodes captions each step)")
        if cache.latents:
            lat = cache_latents(recipe, device, progress)
            print(
                f"latents ({cache.latents_dir}, encoder {lat['encoder']}): {lat['crops']} crops, "
                f"{lat['hits']} hits, {lat['misses']} misses encoded in {lat['seconds']} s "
                f"({lat['images_per_s']} images/s)"
                + (f", {lat['undecodable']} undecodable images left out" if lat["undecodable"] else "")
            )
        else:
            print("latents: data.cache.latents is off (turn it on to cache EfficientNet latents too)")
    except KeyboardInterrupt:
        print("interrupted: everything encoded so far is saved; run the same command again to continue")
        return 130
    return 0
