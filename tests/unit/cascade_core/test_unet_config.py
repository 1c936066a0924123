"""The checks and conversions Stage C and Stage B configs share (cascade_core/models/unet_config.py)."""
from __future__ import annotations

import pytest

from cascade_core.models.stage_b import StageBConfig
from cascade_core.models.stage_c import StageCConfig


@pytest.mark.parametrize("cls, preset", [(StageCConfig, "stage-c-lite"), (StageBConfig, "decoder_lite")])
def test_round_trip_through_official_kwargs(cls, preset):
    config = cls.preset(preset)
    kwargs = config.to_dict()
    assert "gradient_checkpointing" not in kwargs  # a runtime switch, not a constructor argument
    assert isinstance(kwargs["blocks"][0], list)
    assert cls.from_dict(kwargs) == config


@pytest.mark.parametrize("cls, preset", [(StageCConfig, "tiny"), (StageBConfig, "tiny")])
def test_every_problem_is_reported_at_once(cls, preset):
    with pytest.raises(ValueError) as err:
        cls.preset(preset, nhead=(3,), level_config=("CTX",) * len(cls.preset(preset).c_hidden),
                   block_repeat=((0,) * len(cls.preset(preset).c_hidden),) * 2)
    message = str(err.value)
    assert message.startswith(f"invalid {cls.__name__}: ")
    assert "nhead has 1 entries" in message
    assert "block_repeat entries must be >= 1" in message
    assert "may only use the letters C, T, A, F" in message


def test_stage_c_checks_its_level_switches():
    with pytest.raises(ValueError, match="switch_level needs 1 entries"):
        StageCConfig.preset("tiny", switch_level=(False, False))
