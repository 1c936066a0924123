"""LoRA files -> adapters: argument parsing, file errors, golden files, wrong flavour, continuing training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cascade_core.checkpoint_io import write_safetensors
from cascade_core.models.stage_c import StageC, StageCConfig
from cascade_core.peft.formats import convert_from_native
from cascade_core.peft.lora import inject_lora, iter_lora_adapters, lora_state_dict, lora_target_shapes
from runner.errors import UserError
from runner.lora_files import load_lora_into, parse_lora_arg, read_lora_file

GOLDEN_LORAS = {
    "tiny_lora_official_stability": "official",
    "tiny_lora_diffusers_peft": "peft",
    "tiny_lora_diffusers_alpha_folded": "peft-folded",
    "tiny_lora_kohya_comfy": "kohya",
}


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def golden(golden_dir):
    """Base weights (original keys), inputs, and the expected output with the golden LoRA."""
    base = {
        k: v
        for k, v in _read(golden_dir / "original_prior_tiny.safetensors").items()
        if not k.startswith("output.")
    }
    inputs = {
        k[len("input.") :]: v
        for k, v in _read(golden_dir / "diffusers_prior_tiny.safetensors").items()
        if k.startswith("input.")
    }
    expected = _read(golden_dir / "lora" / "tiny_lora_expected_output.safetensors")["output.sample_with_lora"]
    return base, inputs, expected


def _model(base) -> StageC:
    model = StageC(StageCConfig.preset("tiny")).eval()
    model.load_state_dict(base, strict=True)
    return model


def _run(model, i) -> torch.Tensor:
    with torch.no_grad():
        return model(i["sample"], i["timestep_ratio"], i["clip_text"], i["clip_text_pooled"], i["clip_img"])


@pytest.mark.parametrize(
    ("arg", "path", "strength"),
    [
        ("lora.safetensors", "lora.safetensors", 1.0),
        ("lora.safetensors:0.8", "lora.safetensors", 0.8),
        ("dir/lora.safetensors:-1.5e-1", "dir/lora.safetensors", -0.15),
        ("C:\\loras\\x.safetensors", "C:\\loras\\x.safetensors", 1.0),
        ("C:\\loras\\x.safetensors:.5", "C:\\loras\\x.safetensors", 0.5),
        ("my:lora.safetensors", "my:lora.safetensors", 1.0),
        ("lora.safetensors:nan", "lora.safetensors:nan", 1.0),
    ],
)
def test_parse_lora_arg(arg, path, strength):
    assert parse_lora_arg(arg) == (Path(path), strength)


def test_parse_lora_arg_prefers_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("x:2").write_bytes(b"")
    assert parse_lora_arg("x:2") == (Path("x:2"), 1.0)
    with pytest.raises(UserError, match="--lora needs a file"):
        parse_lora_arg("")


def test_read_lora_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_lora_file(tmp_path / "nope.safetensors")
    (tmp_path / "l.ckpt").write_bytes(b"PK\x03\x04")
    with pytest.raises(UserError, match="pickled"):
        read_lora_file(tmp_path / "l.ckpt")
    (tmp_path / "text.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(UserError, match="not a safetensors file"):
        read_lora_file(tmp_path / "text.safetensors")
    good = write_safetensors(
        tmp_path / "good.safetensors", {"a.lora_down.weight": torch.ones(4, 64)}, {"k": "v"}
    )
    tensors, meta = read_lora_file(good)
    assert list(tensors) == ["a.lora_down.weight"] and meta["k"] == "v"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        read_lora_file(cut)
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="folder without pytorch_lora_weights"):
        read_lora_file(tmp_path / "folder")


@pytest.mark.parametrize("name", sorted(GOLDEN_LORAS))
def test_golden_files_load_with_expected_output(golden_dir, golden, name):
    base, inputs, expected = golden
    model = _model(base)
    assert load_lora_into(model, golden_dir / "lora" / f"{name}.safetensors") == GOLDEN_LORAS[name]
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-5, rtol=0)


def test_strength_scales_and_zero_is_base(golden_dir, golden):
    base, inputs, expected = golden
    plain = _run(_model(base), inputs)
    model = _model(base)
    load_lora_into(
        model, golden_dir / "lora" / "tiny_lora_kohya_comfy.safetensors", name="style", strength=0.0
    )
    torch.testing.assert_close(_run(model, inputs), plain, atol=1e-6, rtol=0)
    half = _model(base)
    load_lora_into(half, golden_dir / "lora" / "tiny_lora_kohya_comfy.safetensors", strength=0.5)
    assert (_run(half, inputs) - plain).abs().max() > 1e-3
    assert (_run(half, inputs) - expected).abs().max() > 1e-3


def test_wrong_flavour_refused(tmp_path):
    """A LoRA trained on Stage C lite, loaded onto the 3.6B Stage C (both on meta: shapes only)."""
    lite = StageC(StageCConfig.preset("stage-c-lite"), device="meta")
    full = StageC(StageCConfig.preset("stage-c"), device="meta")
    shapes = lora_target_shapes(lite)
    native = {}
    for target in (t for t in shapes if t.endswith((".attn.in_proj", ".attn.out_proj"))):
        out, inp = shapes[target]
        native[f"{target}.lora_down.weight"] = torch.randn(1, inp)
        native[f"{target}.lora_up.weight"] = torch.randn(out, 1)
        native[f"{target}.alpha"] = torch.tensor(1.0)
    for fmt in ("native", "kohya", "official"):
        tensors, meta = convert_from_native(native, fmt, shapes)
        path = write_safetensors(tmp_path / f"lite_{fmt}.safetensors", tensors, meta)
        with pytest.raises(UserError, match=r"lite_.*made for Stage C lite \(1B.*model is Stage C \(3\.6B"):
            load_lora_into(full, path)
    assert not list(iter_lora_adapters(full))


def test_continue_training_fills_the_recipe_adapters(golden_dir, golden):
    """training.lora.init_weights: the injected adapters keep their alpha; lora_up absorbs the difference."""
    base, inputs, expected = golden
    model = _model(base)
    inject_lora(model, rank=2, alpha=8.0, targets="attention", dtype=torch.float32)
    load_lora_into(model, golden_dir / "lora" / "tiny_lora_official_stability.safetensors")
    assert {a.alpha for _, _, a in iter_lora_adapters(model)} == {8.0}
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-5, rtol=0)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert len(lora_state_dict(model)) == 36  # 12 targets x (down, up, alpha): nothing added twice

    wrong_rank = _model(base)
    inject_lora(wrong_rank, rank=4, alpha=4.0, targets="attention")
    with pytest.raises(UserError, match="training.lora.rank: 2"):
        load_lora_into(wrong_rank, golden_dir / "lora" / "tiny_lora_kohya_comfy.safetensors")
    wrong_targets = _model(base)
    inject_lora(wrong_targets, rank=2, alpha=2.0, targets="attention+ffn")
    with pytest.raises(UserError, match="training.lora.targets"):
        load_lora_into(wrong_targets, golden_dir / "lora" / "tiny_lora_kohya_comfy.safetensors")
