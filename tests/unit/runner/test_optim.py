"""Optimizers, schedules, clipping and the NaN guard; references are torch's own classes or closed forms."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from runner.errors import UserError
from runner.optim import (
    AdamWBF16,
    all_finite,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    optimizer_from_spec,
    stochastic_round_to_bf16,
)

ADAM = dict(lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)


def test_adamw_bf16_on_fp32_params_is_torch_adamw():
    w = torch.randn(7, 5)
    ours, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    o_ours = AdamWBF16([ours], lr=1e-2, weight_decay=0.1)
    o_ref = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(5):
        g = torch.randn(7, 5)
        ours.grad, ref.grad = g.clone(), g.clone()
        o_ours.step()
        o_ref.step()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    ulp = 2.0**-7  # bf16 spacing in [1, 2): 7 explicit mantissa bits
    for x in (1.0 + ulp / 4, -(1.0 + 3 * ulp / 4)):
        n = 200_000
        out = stochastic_round_to_bf16(torch.full((n,), x)).float()
        lo, hi = math.floor(abs(x) / ulp) * ulp, math.ceil(abs(x) / ulp) * ulp
        assert set(out.abs().unique().tolist()) == {lo, hi}
        frac = (abs(x) - lo) / ulp
        se = ulp * math.sqrt(frac * (1 - frac) / n)  # std error of a Bernoulli mean scaled by ulp
        assert abs(out.mean().item() - x) < 5 * se
    exact = torch.tensor([1.0, -2.5, 0.0, 3.0e-3]).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)


def test_adamw_bf16_tracks_fp32_adamw_much_better_than_round_to_nearest():
    """Weights in [0.25, 0.5) have bf16 spacing 2**-9 ~ 2e-3; updates ~lr = 1e-4 are below half of it,
    so round-to-nearest never moves. Stochastic rounding is a random walk around the reference with
    per-step variance <= ulp * lr, hence RMS error <= sqrt(T * ulp * lr) and mean error ~0 within
    that over sqrt(n)."""
    n, steps, lr, ulp = 4096, 1000, 1e-4, 2.0**-9
    w0 = (0.25 + 0.25 * torch.rand(n)).to(torch.bfloat16)
    direction = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    ref = torch.nn.Parameter(w0.float())
    sr, rtn = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opts = [(ref, torch.optim.AdamW([ref], lr=lr, weight_decay=0.0)),
            (sr, AdamWBF16([sr], lr=lr, weight_decay=0.0)),
            (rtn, AdamWBF16([rtn], lr=lr, weight_decay=0.0, stochastic_rounding=False))]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grad = direction + 0.5 * torch.randn(n, generator=gen)
        for p, opt in opts:
            p.grad = grad.to(p.dtype)
            opt.step()
    assert sr.dtype == rtn.dtype == torch.bfloat16
    drift = ref.detach() - w0.float()
    walk = math.sqrt(steps * ulp * lr)
    err_sr, err_rtn = sr.detach().float() - ref.detach(), rtn.detach().float() - ref.detach()
    rms_sr, rms_rtn = err_sr.pow(2).mean().sqrt().item(), err_rtn.pow(2).mean().sqrt().item()
    assert rms_rtn > 0.9 * drift.abs().mean().item()  # round-to-nearest stayed put
    assert rms_sr < 1.5 * walk
    assert rms_sr < rms_rtn / 3
    bias_sr = (err_sr * drift.sign()).mean().item()  # error along the direction of travel
    assert abs(bias_sr) < 4 * walk / math.sqrt(n)
    assert (err_rtn * drift.sign()).mean().item() < -0.9 * drift.abs().mean().item()


def test_build_optimizer_adamw_and_errors(monkeypatch):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer("adamw", [p], **ADAM)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    hyper = (group["lr"], group["weight_decay"], group["betas"], group["eps"])
    assert hyper == (1e-3, 0.01, (0.9, 0.999), 1e-8)
    assert isinstance(build_optimizer("adamw_bf16", [p], **ADAM), AdamWBF16)
    with pytest.raises(UserError, match="unknown optimizer 'adam'.*adamw, adamw_bf16, adamw8bit, adafactor"):
        build_optimizer("adam", [p], **ADAM)
    with pytest.raises(UserError, match="'adamw' does not take \\['momentum'\\]"):
        build_optimizer("adamw", [p], momentum=0.9, **ADAM)
    with pytest.raises(UserError, match="no parameters to train"):
        build_optimizer("adamw", iter([]), **ADAM)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        build_optimizer("adamw8bit", [p], **ADAM)


def test_adafactor_builds_or_names_the_fix(monkeypatch):
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = build_optimizer("adafactor", [p], lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-3,
                          beta2_decay=-0.5)
    group = opt.param_groups[0]
    assert type(opt).__name__ == "Adafactor" and group["eps"] == (None, 1e-3) and group["beta2_decay"] == -0.5
    monkeypatch.delattr(torch.optim, "Adafactor")
    with pytest.raises(UserError, match="torch.optim.Adafactor"):
        build_optimizer("adafactor", [p], **ADAM)


def test_every_optimizer_key_of_the_recipe_reaches_the_optimizer():
    from runner.spec import OptimizerSpec

    p = torch.nn.Parameter(torch.zeros(4, 4))
    spec = OptimizerSpec(name="adafactor", betas=(0.9, 0.999), eps=1e-3, weight_decay=0.01,
                         adafactor_beta2_decay=-0.6, adafactor_clip_threshold=1.5)
    group = optimizer_from_spec(spec, [p], lr=2e-3).param_groups[0]
    assert (group["lr"], group["eps"], group["weight_decay"]) == (2e-3, (None, 1e-3), 0.01)
    assert (group["beta2_decay"], group["d"]) == (-0.6, 1.5)
    adamw = OptimizerSpec(name="adamw", betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1,
                          adafactor_beta2_decay=-0.6, adafactor_clip_threshold=0.5)
    group = optimizer_from_spec(adamw, [p], lr=1e-4).param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-7, 0.1)


def _lrs(name: str, steps: int, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(name, opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# warmup 10, total 110: decay progress = (step - 10) / 100; steps 35, 60, 85 are progress 1/4, 1/2, 3/4.
@pytest.mark.parametrize("name, kw, expected", [
    ("constant", {}, {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 150: 1.0}),
    ("linear", {}, {5: 0.5, 10: 1.0, 60: 0.5, 110: 0.0, 150: 0.0}),
    ("linear", {"min_lr_ratio": 0.1}, {60: 0.1 + 0.9 * 0.5, 110: 0.1, 150: 0.1}),
    ("cosine", {}, {5: 0.5, 35: 0.5 + math.sqrt(2) / 4, 60: 0.5, 85: 0.5 - math.sqrt(2) / 4, 110: 0.0}),
    ("cosine", {"min_lr_ratio": 0.2}, {60: 0.2 + 0.8 * 0.5, 110: 0.2}),
    ("cosine_with_restarts", {"num_cycles": 2}, {35: 0.5, 59: 0.5 * (1 + math.cos(math.pi * 0.98)),
                                                 60: 1.0, 85: 0.5, 110: 0.0}),
    ("polynomial", {"power": 2.0}, {35: 0.75**2, 60: 0.25, 110: 0.0}),
    ("polynomial", {"power": 2.0, "min_lr_ratio": 0.1}, {60: 0.1 + 0.9 * 0.25, 150: 0.1}),
])
def test_schedule_closed_forms(name, kw, expected):
    lrs = _lrs(name, 151, warmup_steps=10, total_steps=110, **kw)
    for step, value in expected.items():
        assert lrs[step] == pytest.approx(value, abs=1e-12), (name, step)


@pytest.mark.parametrize("name, make_ref", [
    ("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50)),
    ("polynomial", lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=50, power=3.0)),
    ("linear", lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.0, total_iters=50)),
])
def test_schedules_without_warmup_match_torch(name, make_ref):
    """Over [0, total]; past it CosineAnnealingLR climbs again while ours holds min_lr_ratio."""
    ours = _lrs(name, 51, warmup_steps=0, total_steps=50, power=3.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref_sched, ref = make_ref(opt), []
    for _ in range(51):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        ref_sched.step()
    assert ours == pytest.approx(ref, abs=1e-9)


def test_scheduler_state_round_trip_and_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler("cosine", opt, warmup_steps=3, total_steps=20)
    for _ in range(7):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler("cosine", opt2, warmup_steps=3, total_steps=20)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(5):
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
    with pytest.raises(UserError, match="unknown lr scheduler 'cos'"):
        build_scheduler("cos", opt, warmup_steps=0, total_steps=10)
    with pytest.raises(UserError, match="warmup steps \\(20\\) exceed total steps \\(10\\).*min_lr_ratio"):
        build_scheduler("linear", opt, warmup_steps=20, total_steps=10, min_lr_ratio=2.0)


def test_clip_gradients_returns_norm_and_scales():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
    assert clip_gradients([a, b], None).item() == pytest.approx(5.0)
    assert a.grad.item() == 3.0  # measuring does not clip
    assert clip_gradients(iter([a, b]), 1.0).item() == pytest.approx(5.0)
    assert (a.grad.item(), b.grad.item()) == pytest.approx((0.6, 0.8), rel=1e-5)
    with pytest.raises(UserError, match="max_norm must be > 0"):
        clip_gradients([a], 0.0)


def test_all_finite_catches_nan_loss_and_nan_grads():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 2.0])
    loss = torch.tensor(0.5)
    assert all_finite(loss, clip_gradients([p], None)) is True
    assert all_finite(torch.tensor(float("nan"))) is False
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert all_finite(loss, clip_gradients([p], 1.0)) is False
    p.grad = torch.tensor([float("nan"), 0.0, 0.0])
    assert all_finite(loss, clip_gradients([p], None)) is False
