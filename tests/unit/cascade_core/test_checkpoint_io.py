"""Loading and saving Stage C in every layout, through the public loader, plus the generic readers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cascade_core import StageC, StageCConfig, load_stage_c, save_stage_c
from cascade_core.checkpoint_io import (
    CheckpointError,
    materialize_module,
    read_safetensors_state_dict,
    resolve_checkpoint_files,
    write_safetensors,
)
from cascade_core.stage_c_io import detect_stage_c_checkpoint, stage_c_state_dict

NON_WEIGHTS = ("input.", "output.", "intermediate.")


@pytest.fixture(scope="module")
def diffusers_golden(golden_files):
    return golden_files.load("diffusers_prior_tiny.safetensors")


@pytest.fixture(scope="module")
def original_golden(golden_files):
    return golden_files.load("original_prior_tiny.safetensors")


def _weights(tensors):
    return {k: v for k, v in tensors.items() if not k.startswith(NON_WEIGHTS)}


def _inputs(d, dtype=torch.float32):
    names = (
        "input.sample",
        "input.timestep_ratio",
        "input.clip_text",
        "input.clip_text_pooled",
        "input.clip_img",
    )
    return [d[n].to(dtype) for n in names]


@pytest.fixture
def diffusers_folder(tmp_path, golden_dir, diffusers_golden):
    folder = tmp_path / "repo" / "prior"
    folder.mkdir(parents=True)
    save_file(_weights(diffusers_golden), folder / "diffusion_pytorch_model.safetensors")
    shutil.copy(golden_dir / "diffusers_prior_tiny.config.json", folder / "config.json")
    return folder


@pytest.fixture
def original_file(tmp_path, original_golden):
    path = tmp_path / "stage_c_tiny.safetensors"
    save_file(_weights(original_golden), path)
    return path


def _check_golden(model, d, o):
    with torch.no_grad():
        out = model(*_inputs(d))
        b1 = model(*[t[:1] for t in _inputs(d)], sca=d["input.b1.sca"], crp=d["input.b1.crp"])
    torch.testing.assert_close(out, d["output.sample"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out, o["output.official.sample"], atol=1e-5, rtol=0)
    torch.testing.assert_close(b1, d["output.b1_sca_crp.sample"], atol=1e-5, rtol=0)
    torch.testing.assert_close(b1, o["output.official.b1_sca_crp.sample"], atol=1e-5, rtol=0)


def test_golden_diffusers_folder(diffusers_folder, diffusers_golden, original_golden):
    model = load_stage_c(diffusers_folder.parent, subfolder="prior")
    assert model.config == StageCConfig.preset("tiny") and not model.training
    _check_golden(model, diffusers_golden, original_golden)
    model64 = load_stage_c(diffusers_folder, dtype=torch.float64)
    with torch.no_grad():
        out = model64(*_inputs(diffusers_golden, torch.float64))
    torch.testing.assert_close(out, diffusers_golden["output.sample_fp64"].double(), atol=1e-10, rtol=0)


def test_golden_original_file(original_file, diffusers_golden, original_golden):
    found = detect_stage_c_checkpoint(original_file)
    assert (found.layout, found.flavour) == ("original", "tiny")
    _check_golden(load_stage_c(original_file), diffusers_golden, original_golden)
    model64 = load_stage_c(original_file, dtype=torch.float64)
    with torch.no_grad():
        out = model64(*_inputs(diffusers_golden, torch.float64))
    torch.testing.assert_close(out, diffusers_golden["output.sample_fp64"].double(), atol=1e-10, rtol=0)


def test_sharded_diffusers_folder(tmp_path, diffusers_golden, original_golden):
    weights = _weights(diffusers_golden)
    keys = sorted(weights)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, part in shards.items():
        save_file({k: weights[k] for k in part}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert len(resolve_checkpoint_files(tmp_path).files) == 2
    _check_golden(load_stage_c(tmp_path, flavour="tiny"), diffusers_golden, original_golden)
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard"):
        load_stage_c(tmp_path)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_save_load_round_trip(tmp_path, original_file, layout):
    model = load_stage_c(original_file)
    target = tmp_path / ("out.safetensors" if layout == "original" else "prior")
    written = save_stage_c(model, target, layout=layout)
    raw = load_file(written)  # readable by the reference safetensors library
    assert detect_stage_c_checkpoint(target).layout == layout
    again = load_stage_c(target)
    assert again.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    if layout == "diffusers":
        assert "down_blocks.0.2.attention.to_q.weight" in raw
        cfg = json.loads((target / "config.json").read_text())
        assert cfg["num_attention_heads"] == [2, 4]
    half = save_stage_c(
        model,
        tmp_path / f"half_{layout}.safetensors" if layout == "original" else tmp_path / "h",
        layout=layout,
        dtype=torch.bfloat16,
    )
    assert {t.dtype for t in load_file(half).values()} == {torch.bfloat16}
    assert load_stage_c(half.parent if layout == "diffusers" else half).clf[1].weight.dtype == torch.bfloat16


def test_custom_variant_takes_heads_from_config_json(tmp_path):
    cfg = StageCConfig.preset("tiny", nhead=(4, 6), blocks=((1, 1), (1, 1)))
    save_stage_c(StageC(cfg), tmp_path / "prior", layout="diffusers")
    found = detect_stage_c_checkpoint(tmp_path / "prior")
    assert (found.flavour, found.config) == ("custom", cfg)


@pytest.mark.parametrize(
    "preset,original,diffusers",
    [("stage-c", "stage_c", "prior"), ("stage-c-lite", "stage_c_lite", "prior_lite")],
)
def test_real_manifests_round_trip_on_meta(manifest_dir, preset, original, diffusers):
    orig = json.loads((manifest_dir / "original" / f"{original}.json").read_text())["keys"]
    diff = json.loads((manifest_dir / "diffusers" / f"{diffusers}.json").read_text())
    for manifest, layout in ((orig, "original"), (diff, "diffusers")):
        state = {k: torch.empty(v, device="meta") for k, v in manifest.items()}
        found = detect_stage_c_checkpoint(state)
        assert (found.layout, found.flavour) == (layout, preset)
        model = load_stage_c(state, device="meta")
        for out_layout, expected in (("original", orig), ("diffusers", diff)):
            saved = stage_c_state_dict(model, out_layout)
            assert {k: list(saved[k].shape) for k in saved} == expected
            assert load_stage_c(saved, device="meta").config == StageCConfig.preset(preset)


def test_truncated_file(tmp_path, original_file):
    data = original_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated.*re-download"):
        load_stage_c(cut)
    cut.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_stage_c(cut)


def test_stage_b_file_is_rejected(golden_dir):
    with pytest.raises(CheckpointError, match=r"Stage B \(decoder\) checkpoint.*not a Stage C prior"):
        load_stage_c(golden_dir / "stage_b_tiny.safetensors")


def test_missing_and_misshaped_keys_are_listed(tmp_path, original_golden):
    weights = _weights(original_golden)
    del weights["up_blocks.1.0.channelwise.2.gamma"]
    path = tmp_path / "missing.safetensors"
    save_file(weights, path)
    with pytest.raises(CheckpointError) as err:
        load_stage_c(path)
    msg = str(err.value)
    assert "missing 1 key(s): up_blocks.1.0.channelwise.2.gamma" in msg
    assert "original layout, Stage C flavour tiny" in msg and str(path) in msg
    weights["extra.weight"] = torch.zeros(1)
    save_file(weights, path)
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): extra.weight"):
        load_stage_c(path)
    with pytest.raises(
        CheckpointError, match=r"mis-shaped \d+ key\(s\): clip_txt_mapper.weight \(checkpoint \[32, 24\]"
    ):
        load_stage_c(path, flavour="stage-c-lite", device="meta")


def test_source_errors(tmp_path, original_file):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_stage_c(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no subfolder 'prior'"):
        load_stage_c(tmp_path, subfolder="prior")
    shutil.copy(original_file, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="cannot tell which weights"):
        load_stage_c(tmp_path)
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        load_stage_c(tmp_path / "model.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_stage_c(tmp_path / "junk.safetensors")
    save_file({"text_model.weight": torch.zeros(2)}, tmp_path / "clip.safetensors")
    with pytest.raises(CheckpointError, match="no Stage C prior weights"):
        load_stage_c(tmp_path / "clip.safetensors")


def test_materialize_generic_module_keeps_integer_buffers(tmp_path):
    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    source[1].running_mean.normal_()
    write_safetensors(tmp_path / "m.safetensors", source.state_dict(), {"format": "pt"})
    with torch.device("meta"):
        target = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    state = read_safetensors_state_dict(tmp_path / "m.safetensors")
    materialize_module(target, state, dtype=torch.float16)
    assert target[0].weight.dtype == torch.float16 and target[0].weight.requires_grad
    assert target[1].num_batches_tracked.dtype == torch.int64
    assert torch.equal(target[1].running_mean, source[1].running_mean.half())
