"""Bucket maths in latent cells, size rules and crop geometry."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
from PIL import Image

from runner.data.buckets import (
    Bucket,
    SizeRules,
    cells_to_pixels,
    closest_bucket,
    default_buckets,
    parse_buckets,
    plan_crop,
    render_crop,
)


@pytest.mark.parametrize("cells", [1, 3, 18, 24, 25, 32, 36])
def test_cells_to_pixels(cells):
    # one cell = 32 encoder px (effnet stride); the training size samples back to exactly `cells` cells
    from cascade_core.models.latent_size import stage_c_latent_size

    training, encoder = cells_to_pixels(cells)
    assert encoder == 32 * cells
    assert stage_c_latent_size(training, training) == (cells, cells)
    assert stage_c_latent_size(training + 4, training + 4) != (cells, cells)  # the largest such size
    assert abs(training - Fraction(128 * cells, 3)) < 4


def test_reference_sizes():
    assert cells_to_pixels(24) == (1024, 768)  # FACTS_official §1: 768 px effnet -> 24x24 latents
    assert Bucket(18, 32).pixel_size == (768, 1364)  # largest multiple of 4 with ceil(px / 42.67) == 32
    assert Bucket(18, 32).encoder_size == (576, 1024)
    with pytest.raises(ValueError, match="at least 1 latent cell"):
        cells_to_pixels(0)


def test_default_buckets_1024():
    buckets = default_buckets(1024)
    assert buckets[0] == Bucket(24, 24)
    assert len(set(buckets)) == len(buckets)
    for b in buckets:
        assert Bucket(b.w, b.h) in buckets  # landscape and portrait
        assert abs(b.h * b.w / 576 - 1) < 0.05  # about the area of 24x24 cells
    assert Bucket(18, 32) in buckets  # 9:16 -> sqrt(576*9/16) = 18, sqrt(576*16/9) = 32


def test_parse_buckets():
    assert parse_buckets(["24x24", [18, 32]], 1024) == [Bucket(24, 24), Bucket(18, 32)]
    assert parse_buckets(None, 768)[0] == Bucket(18, 18)
    with pytest.raises(ValueError, match="latent cells"):
        parse_buckets(["1024 by 1024"], 1024)
    with pytest.raises(ValueError, match="listed twice"):
        parse_buckets(["24x24", "24X24"], 1024)


def test_closest_bucket():
    buckets = default_buckets(1024)
    assert closest_bucket(1920, 1080, buckets) == Bucket(18, 32)
    assert closest_bucket(1080, 1920, buckets) == Bucket(32, 18)
    assert closest_bucket(500, 510, buckets) == Bucket(24, 24)


def test_size_rules():
    rules = SizeRules(minimum_image_size=100)
    assert rules.too_small(99, 100) and not rules.too_small(50, 200)  # compared by area: 100^2
    with pytest.raises(ValueError, match="together"):
        SizeRules(maximum_image_size=2048)
    with pytest.raises(ValueError, match="must not exceed"):
        SizeRules(maximum_image_size=512, target_downsample_size=1024)
    down = SizeRules(maximum_image_size=2048, target_downsample_size=1200)
    assert down.downsample_size(2048, 2048) is None  # not larger than the maximum
    w, h = down.downsample_size(4000, 3000)
    assert abs(w * h / 1200**2 - 1) < 2e-3 and abs(w / h - 4 / 3) < 2e-3


def test_plan_crop_cover_and_styles():
    b = Bucket(3, 3)  # 128 x 128 training px
    # 300x200 -> scale max(128/300, 128/200) = 0.64 -> 192 x 128
    center = plan_crop(300, 200, b, SizeRules(), "center", random.Random(0))
    assert (center.resize_w, center.resize_h, center.top, center.left) == (192, 128, 0, 32)
    corner = plan_crop(300, 200, b, SizeRules(), "corner", random.Random(0))
    assert (corner.top, corner.left) == (0, 0)
    # a small image is enlarged to cover: 50x100 -> scale 128/50 -> 128 x 256
    small = plan_crop(50, 100, b, SizeRules(), "center", random.Random(0))
    assert (small.resize_w, small.resize_h, small.top) == (128, 256, 64)
    with pytest.raises(ValueError, match="crop_style"):
        plan_crop(300, 200, b, SizeRules(), "face", random.Random(0))


def test_random_crop_range_and_seed():
    b = Bucket(3, 3)
    offsets = [plan_crop(300, 200, b, SizeRules(), "random", random.Random(s)).left for s in range(200)]
    assert min(offsets) >= 0 and max(offsets) <= 64 and len(set(offsets)) > 20
    again = [plan_crop(300, 200, b, SizeRules(), "random", random.Random(s)).left for s in range(200)]
    assert offsets == again


def test_downsample_before_crop():
    b = Bucket(24, 24)
    full = plan_crop(4000, 3000, b, SizeRules(), "center", random.Random(0))
    assert (full.resize_w, full.resize_h) == (1365, 1024)  # 4000 * 1024/3000 = 1365.3
    rules = SizeRules(maximum_image_size=2048, target_downsample_size=1200)
    down = plan_crop(4000, 3000, b, rules, "center", random.Random(0))
    assert (down.resize_w, down.resize_h) == rules.downsample_size(4000, 3000)
    assert down.resize_h > 1024  # keeps more than the cover size: the crop sees a smaller part
    # a target that would not cover the bucket is lifted to cover it
    low = SizeRules(maximum_image_size=2048, target_downsample_size=600)
    lifted = plan_crop(4000, 3000, b, low, "center", random.Random(0))
    assert (lifted.resize_w, lifted.resize_h) == (1365, 1024)


def test_render_crop_content_and_size():
    b = Bucket(3, 3)  # 128 px crop -> 96 px encoder input
    im = Image.new("RGB", (256, 128), (255, 0, 0))
    im.paste((0, 0, 255), (128, 0, 256, 128))  # left half red, right half blue
    corner = render_crop(im, plan_crop(256, 128, b, SizeRules(), "corner", random.Random(0)), b)
    assert corner.size == (96, 96)
    assert corner.getpixel((88, 50)) == (255, 0, 0)  # edge pixels see the neighbours, as resize-then-crop
    center = render_crop(im, plan_crop(256, 128, b, SizeRules(), "center", random.Random(0)), b)
    assert center.getpixel((10, 50)) == (255, 0, 0) and center.getpixel((85, 50)) == (0, 0, 255)
    assert math.isclose(sum(center.getpixel((x, 5))[2] > 128 for x in range(96)) / 96, 0.5, abs_tol=0.03)
