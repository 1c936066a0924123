"""EMA: values derived by hand (decay 3/4 keeps every number a short binary fraction: equality is exact)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from runner.ema import EMA
from runner.errors import UserError


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2, bias=True), nn.Linear(2, 1, bias=False)).to(dtype)
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    model[1].weight.requires_grad_(False)  # frozen: must not be averaged
    return model


def test_update_values_follow_the_recurrence():
    model = _model()
    ema = EMA(model, decay=0.75)
    assert sorted(ema.shadow) == ["0.bias", "0.weight"]
    w = model[0].weight
    with torch.no_grad():
        w.fill_(1.0)
    assert ema.update(1)
    assert torch.equal(ema.shadow["0.weight"], torch.full((2, 2), 0.25))  # 0.75*0 + 0.25*1
    assert ema.update(2)
    assert torch.equal(ema.shadow["0.weight"], torch.full((2, 2), 0.4375))  # 0.75*0.25 + 0.25*1
    with torch.no_grad():
        w.fill_(-1.0)
    ema.update(3)
    assert torch.equal(ema.shadow["0.weight"], torch.full((2, 2), 0.078125))  # 0.75*0.4375 - 0.25
    assert torch.equal(ema.shadow["0.bias"], torch.zeros(2)) and ema.num_updates == 3


def test_update_interval_skips_other_steps():
    model = _model()
    ema = EMA(model, decay=0.5, update_interval=3)
    with torch.no_grad():
        model[0].bias.fill_(2.0)
    assert [ema.update(s) for s in (1, 2, 3, 4, 5, 6)] == [False, False, True, False, False, True]
    assert torch.equal(ema.shadow["0.bias"], torch.full((2,), 1.5))  # 0 -> 1 -> 1.5
    assert ema.num_updates == 2


def test_updates_before_start_step_are_copies():
    model = _model()
    ema = EMA(model, decay=0.5, start_step=3)
    for step, value in ((1, 4.0), (2, 8.0), (3, 0.0), (4, 0.0)):
        with torch.no_grad():
            model[0].bias.fill_(value)
        ema.update(step)
        if step == 2:
            assert torch.equal(ema.shadow["0.bias"], torch.full((2,), 8.0))  # copied, not averaged
    assert torch.equal(ema.shadow["0.bias"], torch.full((2,), 2.0))  # 8 -> 4 (step 3) -> 2 (step 4)


def test_shadow_is_fp32_on_the_requested_device_for_bf16_weights():
    model = _model(torch.bfloat16)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema = EMA(model, decay=0.999, device="cpu")
    assert ema.shadow["0.weight"].dtype == torch.float32 and ema.shadow["0.weight"].device.type == "cpu"
    for step in range(1, 11):
        with torch.no_grad():
            model[0].weight.fill_(2.0)
        ema.update(step)
    # constant target 2 from start 1: 2 - 0.999**10; bf16 storage could not hold this value
    assert ema.shadow["0.weight"][0, 0].item() == pytest.approx(2 - 0.999**10, abs=1e-6)


def test_state_dict_round_trip_and_mismatch():
    model = _model()
    ema = EMA(model, decay=0.75)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema.update(1)
    other = EMA(_model(), decay=0.75)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["0.weight"], torch.full((2, 2), 0.25)) and other.num_updates == 1
    assert other.shadow["0.weight"] is not ema.shadow["0.weight"]
    wrong = EMA(nn.Linear(3, 2), decay=0.75)
    expected = "missing \\['bias', 'weight'\\], unexpected \\['0.bias', '0.weight'\\]"
    with pytest.raises(UserError, match=expected):
        wrong.load_state_dict(ema.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_into_uses_ema_weights_and_restores(dtype):
    model = _model(dtype)
    ema = EMA(model, decay=0.75)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    ema.update(1)
    trained = model[0].weight.detach().clone()
    x = torch.ones(1, 2, dtype=dtype)
    with ema.swap_into(model) as swapped:
        assert swapped is model
        assert torch.equal(model[0].weight, torch.tensor([[0.25, 0.5], [0.75, 1.0]], dtype=dtype))
        assert torch.equal(model[0](x), torch.tensor([[0.75, 1.75]], dtype=dtype))
    assert torch.equal(model[0].weight, trained)
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swap_into(model):
            raise RuntimeError("boom")
    assert torch.equal(model[0].weight, trained)


def test_bad_settings_are_named():
    with pytest.raises(UserError, match="EMA decay must be in \\[0, 1\\)"):
        EMA(_model(), decay=1.0)
    with pytest.raises(UserError, match="update interval"):
        EMA(_model(), decay=0.9, update_interval=0)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        EMA(frozen, decay=0.9)
