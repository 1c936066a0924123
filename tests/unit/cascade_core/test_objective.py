"""Noising, undiffuse, P2 / adaptive loss weights (golden/gdf.*) and the Diff2Flow identity (issue 11)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cascade_core.diffusion.objective import (
    AdaptiveLossWeight,
    diff2flow_loss,
    diff2flow_weight,
    diffuse,
    epsilon_target,
    p2_loss_weight,
    per_sample_mse,
    undiffuse,
)
from cascade_core.diffusion.schedule import logsnr_from_t, vp_scale


@pytest.fixture(scope="module")
def g(golden_dir) -> dict[str, torch.Tensor]:
    return load_file(golden_dir / "gdf.safetensors")


@pytest.fixture(scope="module")
def alw(golden_dir) -> dict:
    return json.loads((golden_dir / "gdf.json").read_text())["adaptive_loss_weight"]


def test_diffuse_matches_golden(g):
    x0, eps = g["diffuse.x0"], g["diffuse.epsilon"]
    logsnr = logsnr_from_t(g["diffuse.t"])
    torch.testing.assert_close(diffuse(x0, eps, logsnr), g["diffuse.noised"], rtol=0, atol=1e-6)
    assert torch.equal(epsilon_target(x0, eps), g["diffuse.target"])
    torch.testing.assert_close(p2_loss_weight(logsnr), g["diffuse.loss_weight_p2"], rtol=0, atol=1e-7)


def test_diffuse_shift2_matches_golden(g):
    logsnr = logsnr_from_t(g["diffuse.t"], 2.0)
    noised = diffuse(g["diffuse.x0"], g["diffuse.epsilon"], logsnr)
    torch.testing.assert_close(noised, g["diffuse_shift2.noised"], rtol=0, atol=1e-6)
    # GDF evaluates the weight at logSNR + 2 ln(loss_shift); loss_shift = shift gives the unshifted weight
    torch.testing.assert_close(
        p2_loss_weight(logsnr, loss_shift=2.0), g["diffuse_shift2.loss_weight_p2"], rtol=0, atol=1e-7
    )


def test_undiffuse_matches_golden(g):
    x0, eps = undiffuse(g["diffuse.noised"], g["diffuse.logSNR"], g["undiffuse.pred"])
    torch.testing.assert_close(x0, g["undiffuse.x0"], rtol=0, atol=1e-6)
    assert torch.equal(eps, g["undiffuse.epsilon"])


def test_p2_weight_is_b_squared():
    logsnr = logsnr_from_t(torch.linspace(0, 1, 11, dtype=torch.float64))
    _, b = vp_scale(logsnr)
    torch.testing.assert_close(p2_loss_weight(logsnr), b**2)


def test_adaptive_weight_matches_golden(alw):
    w = AdaptiveLossWeight(
        tuple(alw["logsnr_range"]), alw["buckets"], tuple(alw["weight_range"]), alw["beta"]
    )
    assert w.bucket_ranges.numel() == alw["n_edges"]
    assert w.bucket_ranges[:5].tolist() == alw["bucket_edges_first5"]
    probe = torch.tensor(alw["probe_logSNR"])
    assert w.bucket_index(probe).tolist() == alw["probe_bucket_index"]
    assert w(probe).tolist() == alw["probe_weight_initial"]
    w.update(torch.tensor(alw["update_logSNR"]), torch.tensor(alw["update_loss"]))
    torch.testing.assert_close(w(probe), torch.tensor(alw["probe_weight_after_update"]), rtol=0, atol=1e-7)
    # last write wins: bucket 149 saw losses 2.0 then 4.0 -> 0.99 + 0.01 * 4.0
    assert w.bucket_losses[149].item() == pytest.approx(0.99 + 0.01 * 4.0, abs=1e-7)


def test_adaptive_state_round_trips(tmp_path):
    w = AdaptiveLossWeight()
    updated = torch.tensor([-3.0, 0.5, 7.0])
    w.update(updated, torch.tensor([0.3, 2.0, 0.01]))
    save_file(w.state_dict(), tmp_path / "alw.safetensors")
    restored = AdaptiveLossWeight()
    restored.load_state_dict(load_file(tmp_path / "alw.safetensors"))
    probe = torch.cat([torch.linspace(-11, 11, 40), updated])
    assert torch.equal(restored(probe), w(probe))
    assert not torch.equal(AdaptiveLossWeight()(probe), w(probe))


def test_adaptive_update_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        AdaptiveLossWeight().update(torch.zeros(3), torch.zeros(2))


def test_diff2flow_equals_reweighted_epsilon_loss():
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 4, 5, 5, generator=gen, dtype=torch.float64)
    eps = torch.randn(6, 4, 5, 5, generator=gen, dtype=torch.float64)
    pred = eps + 0.3 * torch.randn(6, 4, 5, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.001, 0.1, 0.4, 0.7, 0.95, 1.0], dtype=torch.float64)
    logsnr = logsnr_from_t(t)
    x_t = diffuse(x0, eps, logsnr)
    d2f = diff2flow_loss(pred, x_t, x0, eps, logsnr)
    reweighted = per_sample_mse(pred, eps) * diff2flow_weight(logsnr)
    torch.testing.assert_close(d2f, reweighted, rtol=1e-6, atol=1e-6)
    # the weight is (1 + b/a)^2, derived by hand at t = 0.5 from the golden a, b of FACTS §8
    assert diff2flow_weight(logsnr_from_t(torch.tensor([0.5])))[0].item() == pytest.approx(
        (1 + 0.71145 / 0.70274) ** 2, rel=1e-4
    )


def test_diff2flow_trains_a_tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(4, 4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        x0 = torch.randn(8, 4, 4, 4, generator=gen) * 0.5
        eps = torch.randn(8, 4, 4, 4, generator=gen)
        logsnr = logsnr_from_t(torch.rand(8, generator=gen) * 0.8 + 0.1)
        x_t = diffuse(x0, eps, logsnr)
        loss = diff2flow_loss(model(x_t), x_t, x0, eps, logsnr).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
