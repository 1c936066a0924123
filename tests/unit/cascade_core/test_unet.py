"""The shared UNet pieces: the level lists register in the checkpoints' key order; resize works in fp32."""

from __future__ import annotations

import torch
from torch import nn

from cascade_core.models.stage_c import StageCConfig
from cascade_core.models.unet import build_levels, resize

LEVEL_LISTS = ["down_blocks", "down_downscalers", "down_repeat_mappers", "up_blocks", "up_upscalers",
               "up_repeat_mappers"]


def test_levels_register_in_key_order_with_skips_on_the_first_up_resblock():
    cfg = StageCConfig.preset("tiny")
    unet = nn.Module()
    build_levels(unet, cfg, cfg.c_cond, {}, downscaler=lambda i: nn.Conv2d(1, 1, 1),
                 upscaler=lambda i: nn.Conv2d(1, 1, 1))
    assert list(unet._modules) == LEVEL_LISTS
    n = len(cfg.c_hidden)
    assert isinstance(unet.down_downscalers[0], nn.Identity)
    assert isinstance(unet.up_upscalers[-1], nn.Identity)
    per_level = [cfg.blocks[0][i] * len(cfg.level_config[i]) for i in range(n)]
    assert [len(b) for b in unet.down_blocks] == per_level
    first_up = [level[0] for level in unet.up_blocks]  # deepest level first
    assert first_up[0].depthwise.in_channels == cfg.c_hidden[-1]  # no long skip at the deepest level
    assert first_up[-1].channelwise[0].in_features == cfg.c_hidden[0] * 2  # x and its skip, concatenated


def test_resize_interpolates_in_float32_and_casts_back():
    x = torch.arange(16.0).view(1, 1, 4, 4).to(torch.bfloat16)
    out = resize(x, (3, 3), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 1, 3, 3)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, -1, -1] == 15  # align_corners keeps the corners
