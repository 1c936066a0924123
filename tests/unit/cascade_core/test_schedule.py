"""Cosine schedule, shift, noise conditioning and VP scaler against golden/gdf.json (official GDF)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from cascade_core.diffusion.schedule import (
    _s_and_min_var,
    logsnr_from_t,
    logsnr_limits,
    noise_cond,
    sample_training_t,
    vp_scale,
)


@pytest.fixture(scope="module")
def gdf(golden_dir) -> dict:
    return json.loads((golden_dir / "gdf.json").read_text())


def test_constants_match_golden(gdf):
    c = gdf["constants"]
    _, min_var = _s_and_min_var(torch.device("cpu"))
    assert float(min_var) == c["min_var"]
    assert list(logsnr_limits()) == c["schedule_limits_logSNR_at_t1_t0"]


@pytest.mark.parametrize("shift", [1, 2, 4])
def test_tables_match_golden(gdf, shift):
    table = gdf[f"shift_{shift}"]
    t = torch.tensor(gdf["t_grid"], dtype=torch.float32)
    logsnr = logsnr_from_t(t, shift)
    a, b = vp_scale(logsnr)
    ours = {
        "logSNR": logsnr,
        "alpha_cumprod_sigmoid_logSNR": logsnr.sigmoid(),
        "a": a,
        "b": b,
        "noise_cond_r": noise_cond(logsnr),
    }
    for name, value in ours.items():
        # bit-exact here; 1 ulp (6e-8) differences appear between CPU vector paths
        torch.testing.assert_close(value, torch.tensor(table[name]), rtol=0, atol=1e-6, msg=name)


def test_diffuse_inputs_logsnr_and_r_are_bit_exact(golden_dir):
    g = load_file(golden_dir / "gdf.safetensors")
    for prefix, shift in (("diffuse", 1), ("diffuse_shift2", 2)):
        logsnr = logsnr_from_t(g["diffuse.t"], shift)
        assert torch.equal(logsnr, g[f"{prefix}.logSNR"])
        assert torch.equal(noise_cond(logsnr), g[f"{prefix}.noise_cond"])


def test_shift_is_reclamped_to_unshifted_limits():
    lo, hi = logsnr_limits()
    t = torch.tensor([0.0, 1.0])
    for shift in (2.0, 4.0):
        out = logsnr_from_t(t, shift)
        assert out[1].item() == lo  # t = 1 stays at -9.21 for any shift >= 1
        assert out[0].item() == pytest.approx(hi - 2 * math.log(shift), abs=1e-5)


def test_noise_cond_inverts_schedule_where_unclamped():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(noise_cond(logsnr_from_t(t)), t, rtol=0, atol=1e-6)
    # saturation at the clamp: t = 0 and the training minimum 0.001 give r = 0.0022568
    sat = noise_cond(logsnr_from_t(torch.tensor([0.0, 0.001, 1.0])))
    torch.testing.assert_close(sat, torch.tensor([0.0022568, 0.0022568, 0.9935832]), rtol=0, atol=1e-6)


def test_training_t_range_and_reproducibility():
    t = sample_training_t(10_000, generator=torch.Generator().manual_seed(1))
    assert t.min() >= 0.001 and t.max() <= 1.0
    again = sample_training_t(10_000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t, again)


def test_bad_shift_and_integer_t_are_rejected():
    with pytest.raises(ValueError, match="shift"):
        logsnr_from_t(torch.tensor([0.5]), 0.0)
    with pytest.raises(TypeError, match="floating"):
        logsnr_from_t(torch.tensor([0, 1]))
