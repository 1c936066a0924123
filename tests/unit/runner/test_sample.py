"""`runner sample` on the tiny checkpoints: sizes in both decoding modes, settings sidecar, LoRA files,
and clear exit-2 errors for bad LoRA files and unreachable model sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from PIL import Image

from cascade_core.checkpoint_io import write_safetensors
from cascade_core.peft.formats import convert_from_native
from cascade_core.peft.lora import inject_lora, iter_lora_adapters, lora_state_dict
from cascade_core.stage_c_io import load_stage_c
from runner.cli import main
from runner.errors import UserError
from runner.sample import parse_lora, parse_size

FAST = ["--steps", "2", "--decoder-steps", "2"]


def sample(model: Path, out: Path, *extra: str) -> int:
    return main(["sample", "--model", str(model), "--prompt", "a red cat", "--out", str(out), *FAST, *extra])


def _sizes(folder: Path) -> list[tuple[int, int]]:
    sizes = []
    for path in sorted(folder.glob("0*.png")):
        with Image.open(path) as im:
            sizes.append(im.size)
    return sizes


def _pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.tobytes()


def _lora_file(path: Path, prior: Path, fmt: str = "kohya") -> Path:
    """A rank-2 attention LoRA with non-zero weights for the prior at `prior`, in layout `fmt`."""
    model = load_stage_c(prior)
    inject_lora(model, rank=2, alpha=2.0, targets="attention")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, adapter in iter_lora_adapters(model):
            adapter.lora_up.copy_(torch.randn(adapter.lora_up.shape, generator=g) * 0.5)
    tensors, metadata = convert_from_native(lora_state_dict(model), fmt)
    write_safetensors(path, tensors, metadata)
    return path


@pytest.mark.parametrize("size", ["64x64", "96x64"])
@pytest.mark.parametrize("mode", [[], ["--preview-only"]])
def test_writes_images_of_the_requested_size(tiny_checkpoints, tmp_path, size, mode):
    out = tmp_path / "out"
    assert sample(tiny_checkpoints, out, "--size", size, "--num-images", "2", "--seed", "11", *mode) == 0
    width, height = (int(v) for v in size.split("x"))
    assert _sizes(out) == [(width, height)] * 2
    record = json.loads((out / "settings.json").read_text())
    assert [e["seed"] for e in record["images"]] == [11, 12]
    settings = record["settings"]
    assert settings["preview_only"] == bool(mode) and settings["model"] == str(tiny_checkpoints)
    assert settings["prior"]["guidance"] == 4.0 and settings["prior"]["shift"] == 2.0
    assert Path(settings["files"]["prior"]).name == "stage_c.safetensors"
    assert settings["dtype"] == "float32" and settings["device"] == "cpu"
    assert (out / "grid.png").is_file()


def test_lite_models_and_negative_prompt(tiny_checkpoints, tmp_path):
    out = tmp_path / "lite"
    args = ["--size", "64x64", "--prior", "prior_lite", "--decoder", "stage_b_lite.safetensors"]
    assert sample(tiny_checkpoints, out, *args, "--negative-prompt", "dog", "--seed", "1") == 0
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert Path(settings["files"]["prior"]).name == "prior_lite"
    assert Path(settings["files"]["decoder"]).name == "stage_b_lite.safetensors"
    assert settings["negative_prompt"] == "dog"


def test_lora_changes_the_image_and_strength_zero_does_not(tiny_checkpoints, tmp_path):
    lora = _lora_file(tmp_path / "style.safetensors", tiny_checkpoints / "stage_c.safetensors")
    common = ["--size", "64x64", "--seed", "5", "--preview-only"]
    assert sample(tiny_checkpoints, tmp_path / "base", *common) == 0
    assert sample(tiny_checkpoints, tmp_path / "zero", *common, "--lora", f"{lora}:0") == 0
    assert sample(tiny_checkpoints, tmp_path / "lora", *common, "--lora", str(lora)) == 0
    base = _pixels(tmp_path / "base" / "000_seed5.png")
    assert _pixels(tmp_path / "zero" / "000_seed5.png") == base
    assert _pixels(tmp_path / "lora" / "000_seed5.png") != base
    loras = json.loads((tmp_path / "lora" / "settings.json").read_text())["settings"]["loras"]
    assert loras == [{"file": str(lora), "strength": 1.0, "format": "kohya"}]


def test_bad_lora_files_fail_clearly(tiny_checkpoints, tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert sample(tiny_checkpoints, tmp_path / "o", "--lora", str(missing)) == 2
    assert "no such file" in capsys.readouterr().err
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a LoRA")
    assert sample(tiny_checkpoints, tmp_path / "o", "--lora", f"{text}:0.5") == 2
    assert f"--lora {text}" in capsys.readouterr().err
    foreign = tmp_path / "foreign.safetensors"
    write_safetensors(foreign, {"some.weight": torch.zeros(2, 2)})
    assert sample(tiny_checkpoints, tmp_path / "o", "--lora", str(foreign)) == 2
    assert "unrecognised LoRA key layout" in capsys.readouterr().err
    lite = _lora_file(tmp_path / "lite.safetensors", tiny_checkpoints / "stage_c_lite.safetensors", "peft")
    assert sample(tiny_checkpoints, tmp_path / "o", "--lora", str(lite), "--size", "64x64") == 2
    err = capsys.readouterr().err
    assert f"error: --lora {lite}" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_unreachable_model_source_fails_clearly(tmp_path, monkeypatch, capsys):
    assert sample(tmp_path / "nowhere", tmp_path / "o") == 2
    assert "no such folder" in capsys.readouterr().err
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert (
        main(["sample", "--model", "someone/no-such-cascade", "--prompt", "x", "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert "someone/no-such-cascade" in err and "offline" in err and "Traceback" not in err


def test_missing_component_and_bad_options(tiny_checkpoints, tmp_path, capsys):
    assert sample(tiny_checkpoints, tmp_path / "o", "--prior", "prior_huge") == 2
    assert "no Stage C prior found (looked for prior_huge)" in capsys.readouterr().err
    assert sample(tiny_checkpoints, tmp_path / "o", "--size", "big") == 2
    assert "--size 'big'" in capsys.readouterr().err
    assert sample(tiny_checkpoints, tmp_path / "o", "--guidance", "-1") == 2
    assert "guidance must be >= 0" in capsys.readouterr().err


def test_parsers(tmp_path):
    assert parse_size("1536x1024") == (1024, 1536) and parse_size("512") == (512, 512)
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"")
    assert parse_lora(f"{f}:0.7") == (f, 0.7) and parse_lora(str(f)) == (f, 1.0)
    with pytest.raises(UserError, match="WIDTHxHEIGHT"):
        parse_size("0x5")
