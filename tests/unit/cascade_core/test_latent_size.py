"""Image <-> latent size convention: official examples, agreement with the real encoder, inverse."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_core.models.effnet import EfficientNetEncoder
from cascade_core.models.latent_size import (
    effnet_output_size,
    encoder_pixel_size,
    pixel_size_for_latent,
    stage_b_latent_size,
    stage_c_latent_size,
)

SIZES = [(1024, 1024), (1000, 1024), (768, 1344), (1536, 640), (512, 512), (43, 1), (1, 2048), (777, 333)]


def test_official_examples():
    # FACTS_official section 1: 1024 px -> 24x24 Stage C latent (via a 768 px encoder input),
    # 4x256x256 Stage B latent; calculate_latent_sizes = ceil(H / 42.67)
    assert stage_c_latent_size(1024, 1024) == (24, 24)
    assert encoder_pixel_size(1024, 1024) == (768, 768)
    assert stage_b_latent_size(1024, 1024) == (256, 256)
    assert pixel_size_for_latent(24, 24) == (1024, 1024)
    for h, w in SIZES:
        assert stage_c_latent_size(h, w) == (math.ceil(h / 42.67), math.ceil(w / 42.67))


@pytest.mark.parametrize("height,width", SIZES)
def test_encoder_input_gives_the_stage_c_latent_size(height, width):
    with torch.device("meta"):
        encoder = EfficientNetEncoder()
        ph, pw = encoder_pixel_size(height, width)
        latent = encoder(torch.empty(1, 3, ph, pw))
    assert tuple(latent.shape[-2:]) == stage_c_latent_size(height, width)
    assert ph % 32 == 0 and pw % 32 == 0
    # 0.75 of the image, rounded up to whole 32 px cells
    assert 0.75 * height <= ph < 0.75 * height + 32 and 0.75 * width <= pw < 0.75 * width + 32


@pytest.mark.parametrize("height,width", [(256, 256), (100, 70), (33, 31)])
def test_effnet_output_size_matches_the_network(height, width):
    with torch.device("meta"):
        latent = EfficientNetEncoder()(torch.empty(1, 3, height, width))
    assert tuple(latent.shape[-2:]) == effnet_output_size(height, width)


def test_pixel_size_for_latent_is_the_largest_multiple_of_4_inverse():
    for cells in range(1, 160):
        pixels, _ = pixel_size_for_latent(cells, 1)
        assert pixels % 4 == 0
        assert stage_c_latent_size(pixels, 1)[0] == cells
        assert stage_c_latent_size(pixels + 4, 1)[0] == cells + 1


@pytest.mark.parametrize(
    "fn",
    [stage_c_latent_size, encoder_pixel_size, effnet_output_size, stage_b_latent_size, pixel_size_for_latent],
)
@pytest.mark.parametrize("bad", [0, -8, 10.5, True])
def test_rejects_non_positive_or_non_integer(fn, bad):
    with pytest.raises(ValueError, match="positive integer"):
        fn(bad, 64)
