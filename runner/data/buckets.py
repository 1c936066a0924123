"""Aspect buckets in Stage C latent cells, size rules and crops.

A bucket is a Stage C latent grid (h x w cells). Everything else is derived from the cells:
the EfficientNet sees the image at 0.75 of the training resolution and has stride 32, so one
cell is 32 encoder pixels and about 42.67 training pixels (24 cells -> 768 encoder px -> 1024 px);
`cells_to_pixels` applies the shared rule of cascade_core/models/latent_size.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction

from PIL import Image

from cascade_core.models.latent_size import encoder_pixel_size, pixel_size_for_latent

EFFNET_STRIDE = 32  # encoder pixels per latent cell
ENCODER_SCALE = Fraction(3, 4)  # encoder pixels / training pixels

# Official Stable Cascade ratios (h/w for portrait; their inverses are added).
OFFICIAL_RATIOS: tuple[Fraction, ...] = tuple(
    Fraction(s) for s in ("1", "1/2", "1/3", "2/3", "3/4", "1/5", "2/5", "3/5", "4/5", "1/6", "5/6", "9/16")
)
CROP_STYLES = ("random", "center", "corner")


def cells_to_pixels(cells: int) -> tuple[int, int]:
    """(training px, encoder px) of one edge of `cells` latent cells, by Stage C's one size rule
    (`cascade_core.models.latent_size`).

    Encoder px = cells * 32 exactly, so the latent grid is always exact. Training px is the image size
    the sampler maps back to exactly `cells` cells (ceil(px / 42.67) == cells; 24 -> 1024, 32 -> 1364),
    so a LoRA trained in this bucket is sampled at the latent size it was trained on.
    """
    if cells < 1:
        raise ValueError(f"bucket edge must be at least 1 latent cell, got {cells}")
    training = pixel_size_for_latent(cells, cells)[0]
    return training, encoder_pixel_size(training, training)[0]


@dataclass(frozen=True)
class Bucket:
    """One aspect bucket; `h`, `w` are Stage C latent cells."""

    h: int
    w: int

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(height, width) in training pixels (the crop size)."""
        return cells_to_pixels(self.h)[0], cells_to_pixels(self.w)[0]

    @property
    def encoder_size(self) -> tuple[int, int]:
        """(height, width) of the EfficientNet input."""
        return cells_to_pixels(self.h)[1], cells_to_pixels(self.w)[1]

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.w / self.h

    @property
    def name(self) -> str:
        """Height x width, in cells and in training pixels."""
        ph, pw = self.pixel_size
        return f"{self.h}x{self.w} cells = {ph}x{pw} px"


def default_buckets(resolution: int) -> list[Bucket]:
    """Buckets of about resolution^2 pixels for the official ratios, square first.

    Base area in cells is (resolution * 3/128)^2; each ratio gets h = round(sqrt(A/r)),
    w = round(sqrt(A*r)) cells. 1024 px -> 24x24, 9:16 -> 32x18, 3:4 -> 28x21, ...
    """
    if resolution < 43:
        raise ValueError(f"resolution must be at least 43 px (one latent cell), got {resolution}")
    area = (resolution * 3 / 128) ** 2
    out: list[Bucket] = []
    for ratio in OFFICIAL_RATIOS:  # ratio = w/h for the landscape side
        for r in (float(ratio), 1 / float(ratio)):
            b = Bucket(h=max(1, round(math.sqrt(area * r))), w=max(1, round(math.sqrt(area / r))))
            if b not in out:
                out.append(b)
    return out


def parse_buckets(spec: list[str] | list[list[int]] | None, resolution: int) -> list[Bucket]:
    """Buckets from a recipe: None -> defaults; "HxW" strings or [h, w] pairs in latent cells."""
    if not spec:
        return default_buckets(resolution)
    out: list[Bucket] = []
    for item in spec:
        try:
            h, w = (int(v) for v in (item.lower().split("x") if isinstance(item, str) else item))
        except (ValueError, TypeError, AttributeError):
            raise ValueError(
                f"bucket {item!r} is not 'HxW' or [h, w] in Stage C latent cells (e.g. '24x24' for 1024 px)"
            ) from None
        if h < 1 or w < 1:
            raise ValueError(f"bucket {item!r} must be at least 1x1 latent cells")
        if Bucket(h, w) in out:
            raise ValueError(f"bucket {h}x{w} is listed twice; remove the duplicate")
        out.append(Bucket(h, w))
    return out


def closest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect is nearest the image's in log space (first one on ties)."""
    a = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b.aspect) - a))


@dataclass(frozen=True)
class SizeRules:
    """Recipe size knobs, in pixels, compared by area (pixel_area semantics).

    minimum_image_size: images with width*height < min^2 are excluded.
    maximum_image_size + target_downsample_size: images with width*height > max^2 are first resized
    (aspect kept) to about target^2 pixels, but never below covering the bucket, then cropped; so the
    crop shows more of the picture than a crop of the full-resolution image would.
    """

    minimum_image_size: int | None = None
    maximum_image_size: int | None = None
    target_downsample_size: int | None = None

    def __post_init__(self) -> None:
        if (self.maximum_image_size is None) != (self.target_downsample_size is None):
            raise ValueError(
                "maximum_image_size and target_downsample_size must be given together (or neither)"
            )
        for name in ("minimum_image_size", "maximum_image_size", "target_downsample_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive number of pixels, got {v}")
        if self.maximum_image_size is not None and self.target_downsample_size > self.maximum_image_size:
            raise ValueError(
                f"target_downsample_size ({self.target_downsample_size}) must not exceed "
                f"maximum_image_size ({self.maximum_image_size})"
            )

    def too_small(self, width: int, height: int) -> bool:
        return self.minimum_image_size is not None and width * height < self.minimum_image_size**2

    def downsample_size(self, width: int, height: int) -> tuple[int, int] | None:
        """(w, h) to pre-resize to when the image is larger than maximum_image_size, else None."""
        if self.maximum_image_size is None or width * height <= self.maximum_image_size**2:
            return None
        s = math.sqrt(self.target_downsample_size**2 / (width * height))
        return max(1, round(width * s)), max(1, round(height * s))


@dataclass(frozen=True)
class CropPlan:
    """Resize the original to (resize_w, resize_h), then take the bucket's pixel box at (top, left)."""

    resize_w: int
    resize_h: int
    top: int
    left: int


def plan_crop(
    width: int, height: int, bucket: Bucket, rules: SizeRules, crop_style: str, rng: random.Random
) -> CropPlan:
    """Resize to cover the bucket (after the optional downsample), then place the crop window."""
    if crop_style not in CROP_STYLES:
        raise ValueError(f"crop_style {crop_style!r} is not one of {', '.join(CROP_STYLES)}")
    ph, pw = bucket.pixel_size
    w, h = rules.downsample_size(width, height) or (width, height)
    if w < pw or h < ph or rules.downsample_size(width, height) is None:
        s = max(pw / w, ph / h)  # cover: both edges >= the bucket, one edge equal
        w, h = max(pw, round(w * s)), max(ph, round(h * s))
    if crop_style == "center":
        top, left = (h - ph) // 2, (w - pw) // 2
    elif crop_style == "corner":
        top, left = 0, 0
    else:
        top, left = rng.randint(0, h - ph), rng.randint(0, w - pw)
    return CropPlan(resize_w=w, resize_h=h, top=top, left=left)


def render_crop(image: Image.Image, plan: CropPlan, bucket: Bucket) -> Image.Image:
    """The encoder-input image: the crop box resampled once, straight to the encoder size."""
    ph, pw = bucket.pixel_size
    eh, ew = bucket.encoder_size
    sx, sy = image.width / plan.resize_w, image.height / plan.resize_h
    box = (plan.left * sx, plan.top * sy, (plan.left + pw) * sx, (plan.top + ph) * sy)
    return image.resize((ew, eh), Image.Resampling.BICUBIC, box=box, reducing_gap=None)
