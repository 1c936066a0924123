"""Loaders for effnet / Previewer / Stage A / Stage B: golden files, real manifests in both layouts,
round trips of tiny synthesized checkpoints through both layouts, prefixes, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cascade_core.checkpoint_io import CheckpointError, write_safetensors
from cascade_core.decoder_io import (
    load_effnet,
    load_previewer,
    load_stage_a,
    load_stage_b,
    save_effnet,
    save_previewer,
    save_stage_a,
    save_stage_b,
)
from cascade_core.formats import DIFFUSERS, converted_shapes, diffusers_config_to_original
from cascade_core.formats_vqgan import convert_vqgan_state_dict, paella_config_to_stage_a
from cascade_core.models.effnet import EfficientNetEncoder
from cascade_core.models.previewer import Previewer
from cascade_core.models.stage_a import StageA
from cascade_core.models.stage_b import StageB, StageBConfig, stage_b_config_from_shapes

EXACT = dict(rtol=0, atol=0)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (zero-initialised gammas/GRN included) so a dropped key changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        torch.testing.assert_close(sa[k], sb[k], **EXACT)


# ---------------------------------------------------------------- golden files through the loaders
# (the golden files keep weights under `model.` and their constructor kwargs in the header, so they load
# like a prefixed, self-describing checkpoint)


def test_previewer_golden_through_loader(golden_dir):
    golden = load_file(golden_dir / "previewer.safetensors")
    model = load_previewer(golden_dir / "previewer.safetensors", dtype=torch.float32)
    assert not model.training and model.blocks[2].num_batches_tracked.dtype == torch.int64
    with torch.no_grad():
        torch.testing.assert_close(model(golden["input.latent"]), golden["output.image"], rtol=0, atol=1e-4)


def test_stage_a_golden_through_loader(golden_dir):
    golden = load_file(golden_dir / "stage_a_tiny.safetensors")
    model = load_stage_a(golden_dir / "stage_a_tiny.safetensors")
    assert model.scale_factor == 0.43
    with torch.no_grad():
        q = model.encode(golden["input.images"], quantize=True)
        assert torch.equal(q.indices, golden["output.q_indices"])
        torch.testing.assert_close(
            model.decode(golden["output.latent"]), golden["output.decoded"], rtol=0, atol=1e-5
        )


def test_stage_b_golden_through_loader(golden_dir):
    golden = load_file(golden_dir / "stage_b_tiny.safetensors")
    model = load_stage_b(golden_dir / "stage_b_tiny.safetensors")
    assert model.config == StageBConfig.preset("tiny")
    g = golden
    with torch.no_grad():
        out = model(
            g["input.b_x"],
            g["input.b_r"],
            effnet=g["input.b_effnet"],
            clip=g["input.b_clip"],
            pixels=g["input.b_pixels"],
            sca=g["input.b_sca"],
        )
    torch.testing.assert_close(out, g["output.b_out"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- real checkpoints: manifests


@pytest.mark.parametrize("preset,name", [("decoder", "decoder"), ("decoder_lite", "decoder_lite")])
def test_stage_b_presets_match_diffusers_manifests(manifest_dir, preset, name):
    diff_shapes = json.loads((manifest_dir / "diffusers" / f"{name}.json").read_text())
    diff_config = json.loads((manifest_dir / "diffusers" / f"{name}.config.json").read_text())
    model = StageB(StageBConfig.preset(preset), device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert converted_shapes(ours, DIFFUSERS) == {k: tuple(v) for k, v in diff_shapes.items()}
    assert StageBConfig.from_dict(diffusers_config_to_original(diff_config)) == StageBConfig.preset(preset)
    # what load_stage_b infers from a diffusers folder's shapes (+ its config.json), and from shapes alone
    back = converted_shapes(diff_shapes, "original")
    assert stage_b_config_from_shapes(back, diffusers_config=diff_config) == (
        StageBConfig.preset(preset),
        preset,
    )
    assert stage_b_config_from_shapes(ours) == (StageBConfig.preset(preset), preset)


def test_vqgan_manifest_and_config(manifest_dir):
    original = json.loads((manifest_dir / "original" / "stage_a.json").read_text())
    diff_shapes = json.loads((manifest_dir / "diffusers" / "vqgan.json").read_text())
    diff_config = json.loads((manifest_dir / "diffusers" / "vqgan.config.json").read_text())
    assert dict(convert_vqgan_state_dict(original["keys"], DIFFUSERS)) == diff_shapes
    kwargs = paella_config_to_stage_a(diff_config)
    assert kwargs == {**original["official_constructor_kwargs"], "scale_factor": 0.3764}
    with torch.device("meta"):
        model = StageA(**kwargs)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == dict(
        convert_vqgan_state_dict(diff_shapes, "original")
    )


# ---------------------------------------------------------------- round trips of tiny checkpoints


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_stage_b_round_trip(tmp_path, layout, golden_dir):
    model = _randomize(StageB(StageBConfig.preset("tiny")), seed=1)
    path = save_stage_b(
        model, tmp_path / ("stage_b.safetensors" if layout == "original" else "decoder"), layout
    )
    source = path if layout == "original" else path.parent
    loaded = load_stage_b(source)
    assert loaded.config == model.config and not loaded.training
    _same_state(model, loaded)
    g = load_file(golden_dir / "stage_b_tiny.safetensors")
    with torch.no_grad():
        args = (g["input.a_x"], g["input.a_r"], g["input.a_effnet"], g["input.a_clip"])
        torch.testing.assert_close(loaded(*args), model(*args), **EXACT)
    if layout == "diffusers":
        keys = set(load_file(path))
        assert "clip_txt_pooled_mapper.weight" in keys and "up_blocks.0.2.attention.to_q.weight" in keys
        assert json.loads((path.parent / "config.json").read_text())["_class_name"] == "StableCascadeUNet"
        (path.parent / "config.json").unlink()  # the shapes alone still identify the preset
        assert load_stage_b(source).config == model.config


def test_stage_b_custom_architecture_needs_its_config(tmp_path):
    # widths that are no preset's and not multiples of 64: heads come only from config.json
    config = StageBConfig.preset("tiny", c_hidden=(16, 24, 40, 40), nhead=(-1, -1, 4, 8))
    model = _randomize(StageB(config), seed=9)
    path = save_stage_b(model, tmp_path / "decoder", "diffusers")
    assert load_stage_b(path.parent).config == config
    (path.parent / "config.json").unlink()
    with pytest.raises(CheckpointError, match="cannot infer attention heads for widths \\[40, 40\\]"):
        load_stage_b(path.parent)
    assert load_stage_b(path.parent, config=config.to_dict()).config == config


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_stage_a_round_trip(tmp_path, layout):
    model = _randomize(
        StageA(levels=2, bottleneck_blocks=1, c_hidden=16, c_latent=4, codebook_size=32, scale_factor=0.3764),
        seed=2,
    )
    path = save_stage_a(
        model, tmp_path / ("stage_a.safetensors" if layout == "original" else "vqgan"), layout
    )
    source = path if layout == "original" else path.parent
    loaded = load_stage_a(source)
    assert loaded.scale_factor == 0.3764
    _same_state(model, loaded)
    images = torch.rand(1, 3, 16, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, quantize=True)[0], model(images, quantize=True)[0], **EXACT)
    codebook = "vquantizer.embedding.weight" if layout == "diffusers" else "vquantizer.codebook.weight"
    assert codebook in load_file(path)
    assert load_stage_a(source, scale_factor=0.43).scale_factor == 0.43


def test_stage_a_single_file_without_config_uses_official_scale(tmp_path):
    model = _randomize(
        StageA(levels=2, bottleneck_blocks=2, c_hidden=16, c_latent=4, codebook_size=8), seed=3
    )
    save_file(model.state_dict(), tmp_path / "stage_a.safetensors")  # bare, like stage_a.safetensors
    loaded = load_stage_a(tmp_path / "stage_a.safetensors")
    assert loaded.scale_factor == 0.43 and len(loaded.up_blocks) == 1 + 2 + 1 + 1
    _same_state(model, loaded)


def test_previewer_round_trip_and_dtype(tmp_path):
    model = _randomize(Previewer(c_in=16, c_hidden=16, c_out=3), seed=4)
    path = save_previewer(model, tmp_path / "previewer.safetensors", dtype=torch.bfloat16)
    loaded = load_previewer(path)
    assert loaded.blocks[0].weight.dtype == torch.bfloat16
    assert loaded.blocks[2].num_batches_tracked.dtype == torch.int64
    torch.testing.assert_close(
        loaded.blocks[0].weight.float(), model.blocks[0].weight.bfloat16().float(), **EXACT
    )
    assert load_previewer(path, dtype=torch.float32).blocks[0].weight.dtype == torch.float32


def test_effnet_round_trip_under_a_prefix(tmp_path):
    model = _randomize(EfficientNetEncoder(c_latent=8), seed=5)
    path = save_effnet(model, tmp_path / "effnet_encoder.safetensors", dtype=torch.float16)
    assert load_effnet(path).mapper[0].weight.shape == (8, 1280, 1, 1)
    # a ComfyUI-style all-in-one file: the encoder under `vae.` beside other weights
    state = {f"vae.{k}": v for k, v in load_file(path).items()}
    state["model.diffusion_model.something"] = torch.zeros(1)
    write_safetensors(tmp_path / "all_in_one.safetensors", state)
    loaded = load_effnet(tmp_path / "all_in_one.safetensors", dtype=torch.float32)
    assert not loaded.training
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, state[f"vae.{k}"].to(v.dtype), **EXACT)


def test_stage_b_and_stage_a_from_one_prefixed_file(tmp_path):
    stage_b = _randomize(StageB(StageBConfig.preset("tiny")), seed=6)
    stage_a = _randomize(
        StageA(levels=2, bottleneck_blocks=1, c_hidden=16, c_latent=4, codebook_size=8), seed=7
    )
    state = {f"model.diffusion_model.{k}": v for k, v in stage_b.state_dict().items()}
    state.update({f"vae.{k}": v for k, v in stage_a.state_dict().items()})
    write_safetensors(tmp_path / "comfy_b.safetensors", state)
    _same_state(stage_b, load_stage_b(tmp_path / "comfy_b.safetensors", flavour="tiny"))
    _same_state(stage_a, load_stage_a(tmp_path / "comfy_b.safetensors"))


def test_clear_errors(tmp_path, golden_dir):
    with pytest.raises(CheckpointError, match="no Stage A"):
        load_stage_a(golden_dir / "stage_b_tiny.safetensors")
    with pytest.raises(CheckpointError, match="no Stage B decoder"):
        load_stage_b(golden_dir / "stage_a_tiny.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_previewer(tmp_path / "missing.safetensors")
    model = _randomize(StageB(StageBConfig.preset("tiny")), seed=8)
    path = save_stage_b(model, tmp_path / "stage_b.safetensors")
    with pytest.raises(CheckpointError, match="does not fit StageB"):
        load_stage_b(path, flavour="decoder_lite")
    with pytest.raises(CheckpointError, match="unknown Stage B preset"):
        load_stage_b(path, flavour="large")
    with pytest.raises(ValueError, match="single .safetensors file"):
        save_stage_b(model, tmp_path / "decoder", "original")
