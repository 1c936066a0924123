"""Every sampler run of golden/gdf.safetensors, step by step, with the toy model of gdf.json."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cascade_core.diffusion.sampling import cfg_combine, iterate_sampler, sample, sampling_grid

# gdf.json "toy_model": pred = 0.1*x + 0.3*c*(1 + r); cond c = [[0.5], [-0.3]], uncond c = 0
TOY_COND = torch.tensor([[0.5], [-0.3]])
RUNS = ["c_infer", "c_trainval", "b_infer", "nocfg", "img2img", "ddim"]


def toy_model(x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 0.1 * x + 0.3 * c.view(-1, 1, 1, 1) * (1 + r).view(-1, 1, 1, 1)


def toy_model_dict(x: torch.Tensor, r: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    return toy_model(x, r, cond["c"])


@pytest.fixture(scope="module")
def g(golden_dir) -> dict[str, torch.Tensor]:
    return load_file(golden_dir / "gdf.safetensors")


@pytest.fixture(scope="module")
def runs(golden_dir) -> dict:
    return json.loads((golden_dir / "gdf.json").read_text())["sampler_runs"]


def _settings(run: dict) -> dict:
    return dict(
        sampler=run["sampler"].lower(),
        steps=run["timesteps"],
        shift=run["shift"],
        cfg=None if run["cfg"] in (None, "None") else run["cfg"],
        cfg_rho=run["cfg_rho"],
        t_start=run["t_start"],
    )


def _recorded_noise(g: dict, name: str):
    return lambda i, like: g[f"sample.{name}.step{i:02d}.ddpm_noise"]


@pytest.mark.parametrize("name", RUNS)
def test_grid_matches_golden(runs, name):
    run = runs[name]
    t, logsnr = sampling_grid(run["timesteps"], run["t_start"], run["shift"])
    assert t.tolist() == run["r_range"]
    assert logsnr.tolist() == run["logSNR_range"]


@pytest.mark.parametrize("name", RUNS)
def test_sampler_run_matches_golden_step_by_step(g, runs, name):
    run = runs[name]
    steps = list(
        iterate_sampler(
            toy_model,
            g[f"sample.{name}.x_init"],
            TOY_COND,
            noise_fn=_recorded_noise(g, name),
            **_settings(run),
        )
    )
    assert len(steps) == run["timesteps"] == run["n_noise_draws"]
    for s in steps:
        key = f"sample.{name}.step{s.index:02d}"
        for field in ("model_r", "pred", "x0", "x"):
            torch.testing.assert_close(
                getattr(s, field), g[f"{key}.{field}"], rtol=0, atol=2e-4, msg=f"{key}.{field}"
            )
    torch.testing.assert_close(steps[-1].x0, g[f"sample.{name}.final_x0"], rtol=0, atol=2e-4)


def test_sample_returns_final_x0_and_calls_back(g, runs):
    name = "c_infer"
    seen = []
    cond = {"c": TOY_COND}
    uncond = {"c": torch.zeros_like(TOY_COND)}
    out = sample(
        toy_model_dict,
        g[f"sample.{name}.x_init"],
        cond,
        uncond=uncond,
        noise_fn=_recorded_noise(g, name),
        callback=lambda s: seen.append(s.index),
        **_settings(runs[name]),
    )
    torch.testing.assert_close(out, g[f"sample.{name}.final_x0"], rtol=0, atol=2e-4)
    assert seen == list(range(runs[name]["timesteps"]))


def test_generator_makes_runs_reproducible_and_ddim_still_draws():
    x = torch.randn(2, 16, 4, 4)
    kw = dict(sampler="ddpm", steps=4, shift=2.0, cfg=4.0)
    a = sample(toy_model, x, TOY_COND, generator=torch.Generator().manual_seed(5), **kw)
    b = sample(toy_model, x, TOY_COND, generator=torch.Generator().manual_seed(5), **kw)
    c = sample(toy_model, x, TOY_COND, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = torch.Generator().manual_seed(7)
    sample(toy_model, x, TOY_COND, generator=gen, **{**kw, "sampler": "ddim"})
    fresh = torch.Generator().manual_seed(7)
    for _ in range(4):  # DDIM draws one (unused) noise tensor per step, as the official sampler does
        torch.randn(x.shape, generator=fresh)
    assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=fresh))


def test_cfg_one_without_rescale_is_the_conditional_prediction():
    cond, uncond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(cfg_combine(cond, uncond, 1.0, 0.0), cond)
    # the rescale makes std(pred) a rho-blend towards std(cond): rho 1 gives std(cond) exactly
    out = cfg_combine(cond, uncond, 4.0, 1.0)
    torch.testing.assert_close(out.std(), cond.std())


def test_bad_settings_are_rejected():
    x = torch.randn(1, 2, 2, 2)
    c = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(toy_model, x, c, sampler="euler", steps=2, shift=1.0, cfg=None)
    with pytest.raises(ValueError, match="at least 1 step"):
        sample(toy_model, x, c, sampler="ddpm", steps=0, shift=1.0, cfg=None)
    with pytest.raises(ValueError, match="t_start"):
        sample(toy_model, x, c, sampler="ddpm", steps=2, shift=1.0, cfg=None, t_start=1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_runs_on_cuda_match_golden(g, runs, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cuda = {k: v.cuda() for k, v in g.items() if k.startswith("sample.")}
    for name in RUNS:
        out = sample(
            toy_model,
            cuda[f"sample.{name}.x_init"],
            TOY_COND.cuda(),
            noise_fn=_recorded_noise(cuda, name),
            **_settings(runs[name]),
        )
        assert out.is_cuda
        torch.testing.assert_close(out.cpu(), g[f"sample.{name}.final_x0"], rtol=0, atol=2e-4)
