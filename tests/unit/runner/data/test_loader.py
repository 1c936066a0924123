"""Loader: exactly-once epochs across ranks and workers, bucket shapes, seeds, resume, caches."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from runner.data.buckets import Bucket
from runner.data.latent_cache import LatentCache
from runner.data.loader import LoaderConfig, StageCLoader, build_index, plan_epoch
from runner.data.sources import SourceSpec

BUCKETS = ("3x3", "2x4", "4x2")  # 128x128, 85x171, 171x85 training px


def sources(shard_dir: Path, image_folder: Path) -> list[SourceSpec]:
    return [
        SourceSpec(type="webdataset", urls=(str(shard_dir / "shard-{000000..000004}.tar"),)),
        SourceSpec(type="local", path=str(image_folder), repeats=1, probability=2.0),
    ]


def cfg(**kw) -> LoaderConfig:
    base = dict(batch_size=4, seed=7, resolution=128, buckets=BUCKETS, crop_style="random")
    return LoaderConfig(**{**base, **kw})


@pytest.fixture
def both(shard_dir: Path, image_folder: Path) -> list[SourceSpec]:
    return sources(shard_dir, image_folder)


def epoch_keys(srcs, **kw) -> tuple[list[list[str]], list[dict]]:
    index = build_index(srcs, cfg(**kw))
    loader = StageCLoader(index, cfg(**kw))
    batches = list(loader)
    return [b["keys"] for b in batches], batches


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 0), (2, 2), (3, 2)])
def test_each_sample_once_per_epoch(both, world, workers):
    # 24 shard samples once + 24 local samples twice (repeats=1) = 72 per epoch
    index = build_index(both, cfg())
    expected = Counter()
    for e in index.entries:
        expected[f"{e.source}/{e.ref.uid}"] += both[e.source].repeats + 1
    assert sum(expected.values()) == 24 + 2 * 24
    seen, steps = Counter(), []
    for rank in range(world):
        keys, batches = epoch_keys(both, rank=rank, world_size=world, workers=workers)
        steps.append(len(batches))
        for b in batches:
            assert len(b["keys"]) <= 4 and b["skipped"] == []
            h, w = b["bucket"]
            assert tuple(b["images"].shape) == (len(b["keys"]), 3, 32 * h, 32 * w)
            assert len({k.split("/")[0] for k in b["keys"]}) == 1  # one source per batch
        seen.update(k for ks in keys for k in ks)
    assert seen == expected
    assert len(set(steps)) == 1  # every rank runs the same number of steps


def test_bucket_assignment_and_crops(both):
    index = build_index(both, cfg())
    for e in index.entries:
        if e.ref.width == 2 * e.ref.height:
            assert e.bucket == Bucket(2, 4)
        if e.ref.height == e.ref.width:
            assert e.bucket == Bucket(3, 3)
    _, batches = epoch_keys(both, crop_style="random")
    for b in batches:
        ph, pw = Bucket(*b["bucket"]).pixel_size
        for (top, left), (w, h) in zip(b["crops"], b["original_sizes"], strict=True):
            s = max(pw / w, ph / h)
            assert 0 <= top <= max(ph, round(h * s)) - ph and 0 <= left <= max(pw, round(w * s)) - pw
    _, centered = epoch_keys(both, crop_style="corner")
    assert all(c == (0, 0) for b in centered for c in b["crops"])


def test_seeded_order(both):
    a, _ = epoch_keys(both, seed=1)
    b, _ = epoch_keys(both, seed=1)
    c, _ = epoch_keys(both, seed=2)
    assert a == b and a != c
    index = build_index(both, cfg())
    assert plan_epoch(index, cfg(), 0) != plan_epoch(index, cfg(), 1)  # a new shuffle each epoch


def test_probability_orders_sources(both):
    heavy = [both[0], SourceSpec(type="local", path=both[1].path, probability=1e9)]
    index = build_index(heavy, cfg())
    plan = plan_epoch(index, cfg(), 0)
    n_local = sum(pb.source == 1 for pb in plan)
    assert [pb.source for pb in plan[:n_local]] == [1] * n_local  # the 1e9-weight source is drawn first


def test_drop_last_and_too_few_samples(both):
    index = build_index(both, cfg(drop_last=True, world_size=3))
    plan = plan_epoch(index, cfg(drop_last=True, world_size=3), 0)
    assert all(len(pb.items) == 4 for pb in plan) and len(plan) % 3 == 0
    tiny = build_index(both[:1], cfg(buckets=("3x3",)))
    tiny.entries = tiny.entries[:2]
    with pytest.raises(ValueError, match="fewer ranks"):
        plan_epoch(tiny, cfg(world_size=3), 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch(both, workers):
    c = cfg(rank=1, world_size=2, workers=workers)
    index = build_index(both, c)
    full = [b["keys"] for b in StageCLoader(index, c)]
    first = StageCLoader(index, c)
    it = iter(first)
    done = [next(it)["keys"] for _ in range(3)]
    state = first.state_dict()
    assert state["cursor"] == 3 and state["epoch"] == 0
    resumed = StageCLoader(build_index(both, c), c)
    resumed.load_state_dict(state)
    rest = [b["keys"] for b in resumed]
    assert done + rest == full  # exactly the unseen batches, in order
    assert resumed.state_dict()["epoch"] == 1 and resumed.cursor == 0
    other = StageCLoader(index, cfg(rank=1, world_size=2, batch_size=3))
    with pytest.raises(ValueError, match="different data"):
        other.load_state_dict(state)


def test_undecodable_image_reported(image_folder: Path):
    buf = io.BytesIO()
    Image.effect_noise((96, 96), 64).convert("RGB").save(buf, "JPEG")
    (image_folder / "cut.jpg").write_bytes(
        buf.getvalue()[: len(buf.getvalue()) // 2]
    )  # header fine, data cut
    (image_folder / "cut.txt").write_text("cut")
    c = cfg(batch_size=64, buckets=("3x3",))
    batches = list(StageCLoader(build_index([SourceSpec(type="local", path=str(image_folder))], c), c))
    skipped = [s for b in batches for s in b["skipped"]]
    assert [s[0] for s in skipped] == ["cut.jpg"] and "undecodable" in skipped[0][1]
    assert sum(len(b["keys"]) for b in batches) == 24


def fake_effnet(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> [B,16,H/32,W/32]: a fixed linear map of 32x32 averages (stride 32 like the effnet)."""
    pooled = F.avg_pool2d(x, 32)
    return torch.cat([pooled * (k + 1) for k in range(16)], dim=1)[:, :16]


def test_latent_cache_through_loader(both, tmp_path: Path):
    c = cfg(workers=0)
    index = build_index(both, c)
    cache = LatentCache(tmp_path / "latents", "fake-effnet")
    loader = StageCLoader(index, c, latent_cache=cache)
    first = {}
    for b in loader:
        lat = cache.complete(b, fake_effnet, batch_size=3)
        h, w = b["bucket"]
        assert tuple(lat.shape) == (len(b["keys"]), 16, h, w) and lat.dtype == torch.bfloat16
        first.update({(k, cr): t for k, cr, t in zip(b["keys"], b["crops"], lat, strict=True)})
    # one file per distinct (sample, crop); a repeat with the same crop in the same batch is a second miss
    assert len(list((tmp_path / "latents").rglob("*.safetensors"))) == len(first)
    assert cache.hits + cache.misses == 72 and cache.misses >= len(first) > 24
    cache.hits = cache.misses = 0
    for b in loader:  # epoch 1: new order, same crops -> every latent comes from the cache
        assert b["images"].shape[0] == 0
        lat = cache.complete(b, fake_effnet)
        for k, cr, t in zip(b["keys"], b["crops"], lat, strict=True):
            assert torch.equal(t, first[(k, cr)])
    assert (cache.hits, cache.misses) == (72, 0)
