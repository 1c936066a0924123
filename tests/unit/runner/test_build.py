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


def test_data_sources_carry_every_source_setting_of_the_recipe():
    from pathlib import Path

    from runner.build import data_sources
    from runner.recipe import read_recipe

    recipe = Path(__file__).resolve().parents[3] / "recipes" / "quickstart.yaml"
    overrides = ["data.sources.0.caption_strategy=json", "data.sources.0.caption_field=meta.text",
                 "data.sources.0.repeats=2"]
    loaded = read_recipe(recipe, overrides, paths="warn")
    (source,) = data_sources(loaded.spec)
    assert (source.caption_strategy, source.caption_field, source.repeats) == ("json", "meta.text", 2)


def test_batches_are_pinned_only_for_a_cuda_device_and_when_the_recipe_asks(tmp_path, gradient_squares,
                                                                           monkeypatch):
    """performance.pin_memory reaches the DataLoader; a CPU run never pins (torch would warn)."""
    from pathlib import Path

    import torch

    import runner.data.loader as loader_module
    from runner.build import build_loader
    from runner.recipe import read_recipe

    data = gradient_squares(tmp_path, [("red", (128, 128)), ("blue", (128, 128))])
    recipe = Path(__file__).resolve().parents[3] / "recipes" / "quickstart.yaml"

    def loader_for(device: str, *overrides: str):
        settings = ["data.sources.0.type=local", f"data.sources.0.path={data}",
                    "data.sources.0.resolution=128", "data.workers=0", "training.batch_size=1",
                    f"data.cache.latents_dir={tmp_path / 'latents'}"]
        spec = read_recipe(recipe, [*settings, *overrides], paths="warn").spec
        return build_loader(spec, device=torch.device(device))[0]

    assert loader_for("cuda").cfg.pin_memory is True
    assert loader_for("cuda", "performance.pin_memory=false").cfg.pin_memory is False
    assert loader_for("cpu").cfg.pin_memory is False
    seen = {}

    class Spy(loader_module.DataLoader):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **{**kwargs, "pin_memory": False})  # no CUDA here to pin with

    monkeypatch.setattr(loader_module, "DataLoader", Spy)
    next(iter(loader_for("cuda")))
    assert seen["pin_memory"] is True
