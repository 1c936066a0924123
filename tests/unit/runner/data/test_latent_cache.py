"""Latent cache keys and get-or-encode on a hand-made batch."""

from __future__ import annotations

from pathlib import Path

import torch

from runner.data.latent_cache import IMAGENET_MEAN, IMAGENET_STD, LatentCache, imagenet_normalize


def test_keys_separate_sample_bucket_crop_encoder(tmp_path: Path):
    c = LatentCache(tmp_path, "effnet:1")
    base = c.key("src", "a.jpg", (24, 24), (1365, 1024, 0, 170))
    variants = [
        c.key("src", "b.jpg", (24, 24), (1365, 1024, 0, 170)),
        c.key("src", "a.jpg", (18, 32), (1365, 1024, 0, 170)),
        c.key("src", "a.jpg", (24, 24), (1365, 1024, 0, 171)),
        c.key("other", "a.jpg", (24, 24), (1365, 1024, 0, 170)),
        LatentCache(tmp_path, "effnet:2").key("src", "a.jpg", (24, 24), (1365, 1024, 0, 170)),
    ]
    assert len({base, *variants}) == 6


def test_normalize_matches_imagenet_stats():
    x = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(imagenet_normalize(x), torch.zeros(1, 3, 2, 2))
    one = imagenet_normalize(torch.ones(1, 3, 1, 1)).flatten()
    assert torch.allclose(
        one, torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    )


def test_complete_mixes_hits_and_misses(tmp_path: Path):
    cache = LatentCache(tmp_path, "effnet:1", dtype=torch.float32)
    seen = []

    def encode(x: torch.Tensor) -> torch.Tensor:  # [m,3,64,64] -> [m,16,2,2]
        seen.append(x.shape[0])
        return x.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 16, 2, 2)

    stored = torch.full((16, 2, 2), 5.0)
    cache.complete(
        {
            "cached_latents": [None],
            "images": torch.zeros(1, 3, 64, 64),
            "image_index": [0],
            "latent_keys": ["k-hit"],
        },
        lambda x: stored.unsqueeze(0),
    )
    hit = cache.load("k-hit")
    images = torch.stack([torch.full((3, 64, 64), v) for v in (0.2, 0.4, 0.6)])
    batch = {
        "cached_latents": [None, hit, None, None],
        "images": images,
        "image_index": [0, 2, 3],
        "latent_keys": ["k0", "k-hit", "k2", "k3"],
    }
    cache.hits = cache.misses = 0
    lat = cache.complete(batch, encode, batch_size=2)
    assert (cache.hits, cache.misses) == (1, 3) and seen == [2, 1]
    assert torch.equal(lat[1], stored)
    expected = imagenet_normalize(images).mean(dim=(1, 2, 3))
    assert torch.allclose(lat[[0, 2, 3], 0, 0, 0], expected)
    assert torch.equal(cache.load("k2"), lat[2])
