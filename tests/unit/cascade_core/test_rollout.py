"""Scheduled sampling (issue 11): probability ramp, offset draws, p = 0 / p = 1 oracle, cost, training."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_core.diffusion.objective import diffuse, per_sample_mse
from cascade_core.diffusion.rollout import draw_offsets, offset_distribution, rollout, rollout_probability
from cascade_core.diffusion.schedule import logsnr_from_t


def oracle(x: torch.Tensor, r: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """Returns the true epsilon (carried in cond, so it is indexed with the rolled-out subset)."""
    return cond["eps"]


def _batch(n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 3, 3, generator=gen)
    eps = torch.randn(n, 4, 3, 3, generator=gen)
    t = torch.linspace(0.05, 0.97, n)
    return x0, eps, t


@pytest.mark.parametrize(
    ("step", "shape", "expected"),
    [
        (0, "constant", 0.4),
        (500, "constant", 0.4),
        (50, "linear", 0.1),  # before start_step: p_start
        (100, "linear", 0.1),
        (150, "linear", 0.1 + 0.3 * 0.25),
        (200, "linear", 0.25),
        (300, "linear", 0.4),
        (999, "linear", 0.4),
        (150, "cosine", 0.1 + 0.3 * (1 - math.cos(math.pi * 0.25)) / 2),
        (200, "cosine", 0.25),
        (300, "cosine", 0.4),
    ],
)
def test_probability_ramp_values(step, shape, expected):
    p = rollout_probability(step, shape=shape, p_start=0.1, p_end=0.4, ramp_steps=200, start_step=100)
    assert p == pytest.approx(expected, abs=1e-12)


def test_probability_ramp_rejects_bad_values():
    with pytest.raises(ValueError, match="shape"):
        rollout_probability(0, shape="exp", p_start=0, p_end=1, ramp_steps=1, start_step=0)
    with pytest.raises(ValueError, match="p_end"):
        rollout_probability(0, shape="linear", p_start=0, p_end=1.5, ramp_steps=1, start_step=0)


def test_offset_distributions():
    torch.testing.assert_close(offset_distribution(4, "uniform"), torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(
        offset_distribution(4, "biased_early"), torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64) / 10
    )
    torch.testing.assert_close(
        offset_distribution(4, "biased_late"), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64) / 10
    )
    k = draw_offsets(4000, 4, "biased_late", generator=torch.Generator().manual_seed(0))
    assert k.min() == 1 and k.max() == 4
    freq = torch.bincount(k, minlength=5)[1:].double() / k.numel()
    torch.testing.assert_close(freq, offset_distribution(4, "biased_late"), rtol=0, atol=0.03)
    with pytest.raises(ValueError, match="strategy"):
        offset_distribution(3, "middle")


def test_p_zero_is_plain_training_and_draws_nothing():
    x0, eps, t = _batch()
    gen = torch.Generator().manual_seed(11)
    calls = []
    out = rollout(
        lambda x, r, c: calls.append(1) or c["eps"],
        x0,
        eps,
        t,
        {"eps": eps},
        p=0.0,
        max_offset=3,
        strategy="uniform",
        step_dt=0.05,
        sampler="ddpm",
        generator=gen,
    )
    assert torch.equal(out.x_t, diffuse(x0, eps, logsnr_from_t(t)))
    assert not out.rolled.any() and out.model_calls == 0 and out.sample_forwards == 0 and not calls
    assert torch.equal(
        torch.randn(4, generator=gen), torch.randn(4, generator=torch.Generator().manual_seed(11))
    )


@pytest.mark.parametrize("strategy", ["uniform", "biased_early", "biased_late"])
def test_p_one_ddim_oracle_recovers_direct_noising(strategy):
    x0, eps, t = _batch(seed=1)
    out = rollout(
        oracle,
        x0,
        eps,
        t,
        {"eps": eps},
        p=1.0,
        max_offset=4,
        strategy=strategy,
        step_dt=0.05,
        sampler="ddim",
        generator=torch.Generator().manual_seed(2),
    )
    assert out.rolled.all()
    assert ((out.offsets >= 1) & (out.offsets <= 4)).all()
    torch.testing.assert_close(out.t_src, (t + out.offsets * 0.05).clamp(max=1.0))
    torch.testing.assert_close(out.x_t, diffuse(x0, eps, logsnr_from_t(t)), rtol=0, atol=1e-5)


def test_extra_forward_passes_are_counted_and_carry_no_grad():
    x0, eps, t = _batch(n=5, seed=3)
    net = torch.nn.Conv2d(4, 4, 1)
    batch_sizes = []

    def model(x, r, cond):
        batch_sizes.append(x.shape[0])
        return net(x)

    out = rollout(
        model,
        x0,
        eps,
        t,
        None,
        p=0.5,
        max_offset=3,
        strategy="uniform",
        step_dt=0.1,
        sampler="ddpm",
        generator=torch.Generator().manual_seed(2),
    )
    assert out.rolled.any() and not out.rolled.all()  # this seed mixes rolled and plain samples
    k = out.offsets[out.rolled]
    assert k.unique().numel() > 1  # and different k, so later calls see a shrinking subset
    assert out.model_calls == len(batch_sizes) == int(k.max())
    assert out.sample_forwards == sum(batch_sizes) == int(k.sum())
    assert torch.equal(out.offsets[~out.rolled], torch.zeros_like(out.offsets[~out.rolled]))
    assert torch.equal(out.x_t[~out.rolled], diffuse(x0, eps, logsnr_from_t(t))[~out.rolled])
    assert not out.x_t.requires_grad


def test_training_with_rollout_has_no_nans_and_loss_falls():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 4, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen, roll_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    losses = []
    for _ in range(60):
        x0 = torch.randn(8, 4, 4, 4, generator=gen) * 0.5
        eps = torch.randn(8, 4, 4, 4, generator=gen)
        t = torch.rand(8, generator=gen) * 0.8 + 0.1
        out = rollout(
            lambda x, r, c: net(x),
            x0,
            eps,
            t,
            None,
            p=0.5,
            max_offset=2,
            strategy="uniform",
            step_dt=0.05,
            sampler="ddim",
            generator=roll_gen,
        )
        loss = per_sample_mse(net(out.x_t), eps).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rollout_on_cuda_with_a_cpu_generator():
    x0, eps, t = (v.cuda() for v in _batch(seed=5))
    out = rollout(
        oracle,
        x0,
        eps,
        t,
        {"eps": eps},
        p=1.0,
        max_offset=3,
        strategy="biased_late",
        step_dt=0.05,
        sampler="ddim",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.x_t.is_cuda and out.rolled.is_cuda
    torch.testing.assert_close(out.x_t, diffuse(x0, eps, logsnr_from_t(t)), rtol=0, atol=1e-5)
