"""Bucketed, exactly-once-per-epoch batches for Stage C, with a resumable cursor.

An epoch is planned up front and identically on every rank from (seed, epoch): each source's
samples (x (1 + repeats)) are grouped by bucket, shuffled, cut into batches, the sources are
interleaved by `probability`, and the batch count is made a multiple of the world size by
splitting the largest batches (never by duplicating or dropping samples, unless drop_last).
Rank r takes batches r, r+W, ...; DataLoader worker k of a rank takes every num_workers-th of
those, and the DataLoader hands them back in plan order. The cursor (batches this rank has
consumed) is the whole resume state: a restart re-plans the same epoch and skips them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from runner.data.buckets import Bucket, SizeRules, closest_bucket, parse_buckets, plan_crop, render_crop
from runner.data.latent_cache import LatentCache
from runner.data.sources import IndexReport, SampleRef, SourceSpec, index_source, load_image


@dataclass(frozen=True)
class LoaderConfig:
    """Data knobs the loader needs (recipe names); rank/world come from the launcher."""

    batch_size: int
    seed: int = 0
    resolution: int = 1024
    buckets: tuple = ()  # "HxW" or (h, w) in latent cells; empty = defaults for `resolution`
    crop: bool = True
    crop_style: str = "random"
    minimum_image_size: int | None = None
    maximum_image_size: int | None = None
    target_downsample_size: int | None = None
    drop_last: bool = False
    workers: int = 0
    rank: int = 0
    world_size: int = 1
    pin_memory: bool = False  # page-locked batches, so the copy to the GPU can overlap compute

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")

    @property
    def size_rules(self) -> SizeRules:
        # crop off: always resize to cover, then trim; the max/target pre-downsample needs crop on.
        on = self.crop
        return SizeRules(
            self.minimum_image_size,
            self.maximum_image_size if on else None,
            self.target_downsample_size if on else None,
        )


@dataclass(frozen=True)
class Entry:
    """One sample of the flat table: which source, where it lives, its bucket."""

    source: int
    ref: SampleRef
    bucket: Bucket


@dataclass(frozen=True)
class PlannedBatch:
    source: int
    bucket: Bucket
    items: tuple[tuple[int, int], ...]  # (entry index, repeat number)


@dataclass
class DataIndex:
    """Every usable sample of every source, bucketed, plus what was skipped or filtered."""

    sources: list[SourceSpec]
    entries: list[Entry]
    reports: list[IndexReport]
    filtered: list[list[tuple[str, str]]] = field(default_factory=list)  # per source: (uid, why)


def build_index(
    sources: list[SourceSpec], cfg: LoaderConfig, shard_cache_dir: str | None = None
) -> DataIndex:
    """Index sources, drop images below minimum_image_size, assign each to its closest bucket."""
    if not sources:
        raise ValueError("data.sources is empty; list at least one local folder or webdataset source")
    buckets = parse_buckets(list(cfg.buckets), cfg.resolution)
    rules = cfg.size_rules
    entries, reports, filtered = [], [], []
    for s, spec in enumerate(sources):
        report = index_source(spec, shard_cache_dir)
        reports.append(report)
        dropped = []
        for ref in report.samples:
            if rules.too_small(ref.width, ref.height):
                dropped.append((ref.uid, f"{ref.width}x{ref.height} below minimum_image_size"))
                continue
            entries.append(Entry(s, ref, closest_bucket(ref.width, ref.height, buckets)))
        filtered.append(dropped)
    return DataIndex(list(sources), entries, reports, filtered)


def _split_to_multiple(batches: list[PlannedBatch], world: int) -> list[PlannedBatch]:
    """Split the largest batches in two until the count is a multiple of world (no sample lost)."""
    while len(batches) % world:
        i = max(range(len(batches)), key=lambda k: (len(batches[k].items), -k))
        b = batches[i]
        if len(b.items) < 2:
            raise ValueError(
                f"cannot give all {world} ranks the same number of batches: only "
                f"{sum(len(x.items) for x in batches)} samples; add data or use fewer ranks"
            )
        half = (len(b.items) + 1) // 2
        batches[i : i + 1] = [
            PlannedBatch(b.source, b.bucket, b.items[:half]),
            PlannedBatch(b.source, b.bucket, b.items[half:]),
        ]
    return batches


def plan_epoch(index: DataIndex, cfg: LoaderConfig, epoch: int) -> list[PlannedBatch]:
    """The global batch list of one epoch; identical on every rank for the same seed and epoch."""
    rng = random.Random(f"plan:{cfg.seed}:{epoch}")
    per_source: list[list[PlannedBatch]] = [[] for _ in index.sources]
    groups: dict[tuple[int, Bucket], list[tuple[int, int]]] = {}
    for i, e in enumerate(index.entries):
        for rep in range(index.sources[e.source].repeats + 1):
            groups.setdefault((e.source, e.bucket), []).append((i, rep))
    for (s, bucket), items in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1].h, kv[0][1].w)):
        rng.shuffle(items)
        for k in range(0, len(items), cfg.batch_size):
            chunk = tuple(items[k : k + cfg.batch_size])
            if len(chunk) == cfg.batch_size or not cfg.drop_last:
                per_source[s].append(PlannedBatch(s, bucket, chunk))
    for batches in per_source:
        rng.shuffle(batches)
    plan: list[PlannedBatch] = []
    cursors = [0] * len(per_source)
    while True:  # interleave: the next batch's source is drawn by probability among non-empty ones
        live = [s for s, b in enumerate(per_source) if cursors[s] < len(b)]
        if not live:
            break
        s = rng.choices(live, weights=[index.sources[k].probability for k in live])[0]
        plan.append(per_source[s][cursors[s]])
        cursors[s] += 1
    if cfg.drop_last:
        return plan[: len(plan) - len(plan) % cfg.world_size]
    if not plan:
        return plan
    return _split_to_multiple(plan, cfg.world_size)


def _identity(x):
    return x


class _RankBatches(IterableDataset):
    """Decodes this rank's remaining planned batches; worker k takes every num_workers-th one."""

    def __init__(
        self,
        index: DataIndex,
        cfg: LoaderConfig,
        epoch: int,
        batches: list[PlannedBatch],
        latent_cache: LatentCache | None,
    ):
        self.index, self.cfg, self.epoch, self.batches, self.latent_cache = (
            index,
            cfg,
            epoch,
            batches,
            latent_cache,
        )

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for b in self.batches[wid::nw]:
            yield make_batch(self.index, self.cfg, self.epoch, b, self.latent_cache)


def make_batch(
    index: DataIndex, cfg: LoaderConfig, epoch: int, pb: PlannedBatch, latent_cache: LatentCache | None
) -> dict:
    """Decode, crop and size one planned batch. An undecodable image is left out and reported."""
    rules = cfg.size_rules
    eh, ew = pb.bucket.encoder_size
    out: dict = {
        "bucket": (pb.bucket.h, pb.bucket.w),
        "keys": [],
        "captions": [],
        "crops": [],
        "original_sizes": [],
        "latent_keys": [],
        "cached_latents": [],
        "image_index": [],
        "skipped": [],
    }
    images = []
    for i, rep in pb.items:
        e = index.entries[i]
        spec = index.sources[e.source]
        crop_rng = random.Random(f"crop:{cfg.seed}:{e.source}:{e.ref.uid}:{rep}")
        plan = plan_crop(e.ref.width, e.ref.height, pb.bucket, rules, cfg.crop_style, crop_rng)
        lkey = cached = None
        if latent_cache is not None:
            lkey = latent_cache.key(
                spec.identity, e.ref.uid, out["bucket"], (plan.resize_w, plan.resize_h, plan.top, plan.left)
            )
            cached = latent_cache.load(lkey)
        if cached is None:
            try:
                img = render_crop(load_image(e.ref), plan, pb.bucket)
            except (OSError, SyntaxError, ValueError) as err:
                out["skipped"].append((e.ref.uid, f"undecodable image: {err}"))
                continue
            # (H, W, 3) uint8 -> (3, H, W) float in [0, 1]
            images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(eh, ew, 3))
            out["image_index"].append(len(out["keys"]))
        cap_rng = random.Random(f"caption:{cfg.seed}:{epoch}:{e.source}:{e.ref.uid}:{rep}")
        out["captions"].append(cap_rng.choice(e.ref.captions))
        out["keys"].append(f"{e.source}/{e.ref.uid}")
        out["crops"].append((plan.top, plan.left))
        out["original_sizes"].append((e.ref.width, e.ref.height))
        out["latent_keys"].append(lkey)
        out["cached_latents"].append(cached)
    stacked = torch.stack(images) if images else torch.zeros(0, eh, ew, 3, dtype=torch.uint8)
    out["images"] = stacked.permute(0, 3, 1, 2).float().div_(255)  # [M,3,eh,ew]
    return out


class StageCLoader:
    """Iterates one epoch at a time from the saved cursor; `state_dict` goes into checkpoints."""

    def __init__(self, index: DataIndex, cfg: LoaderConfig, latent_cache: LatentCache | None = None):
        self.index, self.cfg, self.latent_cache = index, cfg, latent_cache
        self.epoch, self.cursor = 0, 0
        self._plan_epoch, self._plan = -1, []

    def plan(self, epoch: int | None = None) -> list[PlannedBatch]:
        epoch = self.epoch if epoch is None else epoch
        if epoch != self._plan_epoch:
            self._plan, self._plan_epoch = plan_epoch(self.index, self.cfg, epoch), epoch
        return self._plan

    def rank_batches(self, epoch: int | None = None) -> list[PlannedBatch]:
        return self.plan(epoch)[self.cfg.rank :: self.cfg.world_size]

    def steps_per_epoch(self) -> int:
        return len(self.rank_batches())

    def fingerprint(self) -> str:
        """Changes when the data, bucketing or splitting would change the plan."""
        h = hashlib.sha256()
        for e in self.index.entries:
            h.update(f"{e.source}/{e.ref.uid}/{e.bucket.h}x{e.bucket.w}\n".encode())
        c = self.cfg
        h.update(
            repr(
                (
                    c.batch_size,
                    c.seed,
                    c.drop_last,
                    c.world_size,
                    [s.repeats for s in self.index.sources],
                    [s.probability for s in self.index.sources],
                )
            ).encode()
        )
        return h.hexdigest()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint():
            raise ValueError(
                "data cursor in the checkpoint was made for different data, buckets, batch size, seed or "
                "world size; resume with the same data settings or start a new run"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def __iter__(self):
        """Yield the rest of the current epoch; the cursor advances as each batch is handed out."""
        remaining = self.rank_batches()[self.cursor :]
        ds = _RankBatches(self.index, self.cfg, self.epoch, remaining, self.latent_cache)
        # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run
        # (which creates one mid-epoch) would diverge from an uninterrupted one.
        generator = torch.Generator().manual_seed(self.cfg.seed + self.epoch)
        loader = DataLoader(ds, batch_size=None, num_workers=self.cfg.workers, collate_fn=_identity,
                            generator=generator, pin_memory=self.cfg.pin_memory)
        for batch in loader:
            self.cursor += 1
            yield batch
        self.epoch, self.cursor = self.epoch + 1, 0

    def bucket_table(self) -> list[dict]:
        """Per source and bucket: cells, pixel and encoder sizes, samples per epoch (for `runner plan`)."""
        counts: dict[tuple[int, Bucket], int] = {}
        for pb in self.plan():
            counts[(pb.source, pb.bucket)] = counts.get((pb.source, pb.bucket), 0) + len(pb.items)
        return [
            {
                "source": s,
                "cells": (b.h, b.w),
                "pixels": b.pixel_size,
                "encoder": b.encoder_size,
                "samples": n,
            }
            for (s, b), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1]))
        ]
