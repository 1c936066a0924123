"""runner/build.py: recipe names -> objects (custom LoRA targets, shared bucket settings)."""
from __future__ import annotations

import pytest

from cascade_core.models.stage_c import StageC, StageCConfig
from runner.build import custom_lora_targets
from runner.errors import UserError


@pytest.fixture(scope="module")
def tiny_prior():
    return StageC(StageCConfig.preset("tiny"), device="meta")


def test_custom_targets_are_whole_name_regexes(tiny_prior):
    names = custom_lora_targets(tiny_prior, (r"down_blocks\.1\..*attention\.attn\.(in_proj|out_proj)",))
    # the tiny preset has two attention blocks on down level 1 (blocks 2 and 5)
    assert names == ["down_blocks.1.2.attention.attn.in_proj", "down_blocks.1.2.attention.attn.out_proj",
                     "down_blocks.1.5.attention.attn.in_proj", "down_blocks.1.5.attention.attn.out_proj"]
    assert custom_lora_targets(tiny_prior, (r"clf\.1",)) == ["clf.1"]


def test_a_partial_match_is_not_enough(tiny_prior):
    with pytest.raises(UserError, match="match no LoRA-capable module"):
        custom_lora_targets(tiny_prior, (r"attention",))
