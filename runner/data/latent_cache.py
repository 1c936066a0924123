"""Latent cache: EfficientNet outputs keyed by (source, sample, bucket, crop, encoder identity).

A random crop is drawn from (seed, sample, repeat), so it is the same in every epoch and its
latents can be reused; changing the seed, bucket or crop style changes the key. Workers look
entries up before decoding an image; the training process encodes the misses and stores them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from runner.data.store import entry_path, load_entry, save_entry

EncodeImages = Callable[[torch.Tensor], torch.Tensor]  # [B,3,H,W] ImageNet-normalised -> [B,16,H/32,W/32]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> EfficientNet input (ImageNet mean/std)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


class LatentCache:
    """Get-or-encode for Stage C latents of planned crops; counts hits and misses."""

    def __init__(self, cache_dir: str | Path, encoder_identity: str, dtype: torch.dtype = torch.bfloat16):
        if not encoder_identity:
            raise ValueError("encoder_identity must name the image encoder (e.g. its weights' hash)")
        self.root = Path(cache_dir)
        self.encoder_identity = encoder_identity
        self.dtype = dtype
        self.hits = 0
        self.misses = 0

    def key(self, source: str, uid: str, bucket: tuple[int, int], crop: tuple[int, int, int, int]) -> str:
        """crop = (resize_w, resize_h, top, left) of the plan that produced the encoder input."""
        text = "\0".join([self.encoder_identity, source, uid, f"{bucket[0]}x{bucket[1]}", repr(tuple(crop))])
        return hashlib.sha256(text.encode()).hexdigest()

    def load(self, key: str) -> torch.Tensor | None:
        entry = load_entry(entry_path(self.root, key))
        return None if entry is None else entry["latent"]

    def contains(self, key: str) -> bool:
        return entry_path(self.root, key).is_file()

    def complete(self, batch: dict, encode_images: EncodeImages, batch_size: int = 8) -> torch.Tensor:
        """Latents [B,16,h,w] for a loader batch: cached ones as found, the rest encoded and stored."""
        cached: list[torch.Tensor | None] = list(batch["cached_latents"])
        images: torch.Tensor = batch["images"]  # [M,3,H,W] in [0,1], the misses only
        miss_pos: list[int] = list(batch["image_index"])
        self.hits += len(cached) - len(miss_pos)
        self.misses += len(miss_pos)
        for i in range(0, len(miss_pos), batch_size):
            with torch.no_grad():
                lat = encode_images(imagenet_normalize(images[i : i + batch_size]))  # [m,16,h,w]
            for j, pos in enumerate(miss_pos[i : i + batch_size]):
                cached[pos] = lat[j].to(self.dtype).cpu()
                save_entry(
                    entry_path(self.root, batch["latent_keys"][pos]),
                    {"latent": cached[pos]},
                    {"encoder": self.encoder_identity},
                )
        if not cached:
            return torch.zeros(0)
        return torch.stack([t.to(self.dtype) for t in cached])  # [B,16,h,w]
