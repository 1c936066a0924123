"""Stage C's image <-> latent size convention, in one place for training, caching and sampling.

Facts (FACTS_official section 1 and 10): the EfficientNet encoder has stride 32, Stage C was trained on
768 px crops (24x24 latents), and at inference a 24x24 Stage C latent is decoded to 1024 px; the official
pipelines size the latent as ceil(H / 42.67) x ceil(W / 42.67) (42.67 ~ 1024 / 24 = 32 / 0.75).

Our rule, for an image (training resolution or requested output) of H x W pixels:
* Stage C latent: (ceil(H / 42.67), ceil(W / 42.67)), exactly the official/diffusers sampling formula, so a
  LoRA trained at 1024 px is trained on the latent size it is sampled at (1024 -> 24, 1536x1024 -> 36x24).
* Encoder input: the image is resized to 32 x (latent size) pixels before the EfficientNet, i.e. 0.75 of
  H x W rounded up to whole 32-px encoder cells (1024 -> 768 exactly; 1000 -> 768 instead of 750). Every
  latent cell then sees a full 32-px patch of real image, as in the official trainers (whose buckets are
  multiples of 32), and the latent grid spans the whole image, which is how Stage B reads it back (it
  stretches the latent over its full output). The aspect ratio changes by less than one 32-px cell.
* Stage B latent (and Stage A): (ceil(H / 4), ceil(W / 4)); Stage A decodes that to 4x as many pixels,
  which callers crop to H x W.
"""

from __future__ import annotations

import math

STAGE_C_COMPRESSION = 42.67  # official `resolution_multiple`; a float, kept as the pipelines use it
EFFNET_STRIDE = 32
STAGE_B_COMPRESSION = 4


def _check(height: int, width: int, what: str) -> None:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{what}: {name} must be a positive integer number of pixels/cells, got {v!r}")


def stage_c_latent_size(height: int, width: int) -> tuple[int, int]:
    """Image H x W (pixels) -> Stage C latent h x w (1024x1024 -> 24x24; 768x1344 -> 18x32)."""
    _check(height, width, "stage_c_latent_size")
    return math.ceil(height / STAGE_C_COMPRESSION), math.ceil(width / STAGE_C_COMPRESSION)


def encoder_pixel_size(height: int, width: int) -> tuple[int, int]:
    """Image H x W -> the size the image is resized to before the EfficientNet (1024x1024 -> 768x768).

    The encoder's output for this size is exactly `stage_c_latent_size(height, width)`.
    """
    lat_h, lat_w = stage_c_latent_size(height, width)
    return lat_h * EFFNET_STRIDE, lat_w * EFFNET_STRIDE


def effnet_output_size(height: int, width: int) -> tuple[int, int]:
    """What the EfficientNet itself returns for an input of H x W pixels (every stride-2 conv rounds up)."""
    _check(height, width, "effnet_output_size")
    return math.ceil(height / EFFNET_STRIDE), math.ceil(width / EFFNET_STRIDE)


def stage_b_latent_size(height: int, width: int) -> tuple[int, int]:
    """Image H x W -> Stage B / Stage A latent h x w (1024x1024 -> 256x256)."""
    _check(height, width, "stage_b_latent_size")
    return math.ceil(height / STAGE_B_COMPRESSION), math.ceil(width / STAGE_B_COMPRESSION)


def _pixels_for_cells(cells: int) -> int:
    # Largest multiple of 4 (Stage A's factor) whose Stage C latent is still `cells` long.
    pixels = math.floor(cells * STAGE_C_COMPRESSION) // STAGE_B_COMPRESSION * STAGE_B_COMPRESSION
    while math.ceil(pixels / STAGE_C_COMPRESSION) > cells:
        pixels -= STAGE_B_COMPRESSION
    return pixels


def pixel_size_for_latent(lat_h: int, lat_w: int) -> tuple[int, int]:
    """Stage C latent h x w -> the image size it stands for (24x24 -> 1024x1024; 25 -> 1064).

    The inverse of `stage_c_latent_size`: the largest multiple of 4 pixels mapping back to the same
    latent size, so Stage B / Stage A decode it without cropping.
    """
    _check(lat_h, lat_w, "pixel_size_for_latent")
    return _pixels_for_cells(lat_h), _pixels_for_cells(lat_w)
