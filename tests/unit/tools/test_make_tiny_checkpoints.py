"""tools/make_tiny_checkpoints.py: hub-like layout, every file loads with our loaders, widths agree,
deterministic, skips complete folders, refuses foreign ones without --force."""

from __future__ import annotations

import json

import torch
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from cascade_core.decoder_io import load_effnet, load_previewer, load_stage_a, load_stage_b
from cascade_core.models.text import encode_text
from cascade_core.stage_c_io import load_stage_c

ROOT_FILES = [
    "stage_c.safetensors",
    "stage_c_lite.safetensors",
    "stage_b.safetensors",
    "stage_b_lite.safetensors",
    "stage_a.safetensors",
    "effnet_encoder.safetensors",
    "previewer.safetensors",
]
DIFFUSERS_FOLDERS = ["prior", "prior_lite", "decoder", "decoder_lite", "vqgan"]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_layout_and_manifest(tiny_checkpoints):
    for name in ROOT_FILES:
        assert (tiny_checkpoints / name).is_file(), name
    for name in DIFFUSERS_FOLDERS:
        assert (tiny_checkpoints / name / "config.json").is_file(), name
        assert (tiny_checkpoints / name / "diffusion_pytorch_model.safetensors").is_file(), name
    assert (tiny_checkpoints / "text_encoder" / "config.json").is_file()
    assert (tiny_checkpoints / "tokenizer" / "vocab.json").is_file()
    assert "NOT Stable Cascade" in (tiny_checkpoints / "README.txt").read_text()
    manifest = json.loads((tiny_checkpoints / "manifest.json").read_text())
    assert "NOT Stable Cascade" in manifest["warning"] and manifest["seed"] == 0
    assert set(ROOT_FILES) <= set(manifest["files"])
    total = sum(p.stat().st_size for p in tiny_checkpoints.rglob("*") if p.is_file())
    assert total < 60e6  # the fp16 EfficientNet is ~41 MB, everything else is small


def test_stage_c_single_files_and_folders_load(tiny_checkpoints):
    full = load_stage_c(tiny_checkpoints / "stage_c.safetensors")
    lite = load_stage_c(tiny_checkpoints / "stage_c_lite.safetensors")
    assert full.config == load_stage_c(tiny_checkpoints, subfolder="prior").config
    assert _same_weights(full, load_stage_c(tiny_checkpoints, subfolder="prior"))
    assert _same_weights(lite, load_stage_c(tiny_checkpoints, subfolder="prior_lite"))
    # the real rule (clip_txt_mapper rows: 2048 full, 1536 lite) has a tiny counterpart: 32 vs 64
    assert full.clip_txt_mapper.weight.shape[0] == 32 and lite.clip_txt_mapper.weight.shape[0] == 64
    assert full.config.c_hidden != lite.config.c_hidden and full.config.blocks != lite.config.blocks


def test_decoder_side_files_load(tiny_checkpoints):
    b = load_stage_b(tiny_checkpoints / "stage_b.safetensors")
    b_lite = load_stage_b(tiny_checkpoints / "stage_b_lite.safetensors")
    assert _same_weights(b, load_stage_b(tiny_checkpoints, subfolder="decoder"))
    assert _same_weights(b_lite, load_stage_b(tiny_checkpoints, subfolder="decoder_lite"))
    assert b.config.c_hidden != b_lite.config.c_hidden
    a = load_stage_a(tiny_checkpoints / "stage_a.safetensors")
    vqgan = load_stage_a(tiny_checkpoints, subfolder="vqgan")
    assert _same_weights(a, vqgan)
    assert (a.scale_factor, vqgan.scale_factor) == (0.43, 0.3764)  # as the hub's two Stage A copies
    previewer = load_previewer(tiny_checkpoints / "previewer.safetensors")
    assert previewer(torch.randn(1, 16, 3, 2)).shape == (1, 3, 24, 16)
    effnet = load_effnet(tiny_checkpoints / "effnet_encoder.safetensors")
    assert next(effnet.parameters()).dtype == torch.float16
    latent = load_effnet(tiny_checkpoints / "effnet_encoder.safetensors", dtype=torch.float32)(
        torch.rand(1, 3, 64, 96)
    )
    assert latent.shape == (1, 16, 2, 3) and latent.isfinite().all()


def test_text_encoder_widths_fit_the_priors_and_decoders(tiny_checkpoints):
    text = CLIPTextModelWithProjection.from_pretrained(tiny_checkpoints / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(tiny_checkpoints / "tokenizer")
    for name in ("stage_c.safetensors", "stage_c_lite.safetensors"):
        stage_c = load_stage_c(tiny_checkpoints / name)
        cond = encode_text(text, tok, ["a red cat", ""], clip_img_dim=stage_c.config.c_clip_img)
        assert cond.clip_text.shape == (2, 77, stage_c.config.c_clip_text)
        out = stage_c(torch.randn(2, 16, 3, 3), torch.full((2,), 0.5), **cond.as_dict())
        assert out.shape == (2, 16, 3, 3) and out.isfinite().all()
        assert not torch.equal(out[0], out[1])  # the random weights do react to the text
    for name in ("stage_b.safetensors", "stage_b_lite.safetensors"):
        stage_b = load_stage_b(tiny_checkpoints / name)
        out = stage_b(
            torch.randn(2, 4, 16, 16), torch.full((2,), 0.5), torch.randn(2, 16, 2, 2), cond.clip_text_pooled
        )
        assert out.shape == (2, 4, 16, 16) and out.isfinite().all()


def test_complete_folder_is_skipped(tiny_checkpoints, tiny_checkpoints_tool):
    stamp = (tiny_checkpoints / "stage_c.safetensors").stat().st_mtime_ns
    assert tiny_checkpoints_tool.main([str(tiny_checkpoints)]) == 0
    assert (tiny_checkpoints / "stage_c.safetensors").stat().st_mtime_ns == stamp


def test_foreign_folder_needs_force_and_output_is_deterministic(
    tmp_path, tiny_checkpoints, tiny_checkpoints_tool, capsys
):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert tiny_checkpoints_tool.main([str(folder)]) == 2
    assert "--force" in capsys.readouterr().err
    assert not (folder / "stage_c.safetensors").exists()
    assert tiny_checkpoints_tool.main([str(folder), "--force"]) == 0
    assert (folder / "notes.txt").read_text() == "keep me"
    made = json.loads((folder / "manifest.json").read_text())["files"]
    reference = json.loads((tiny_checkpoints / "manifest.json").read_text())["files"]
    assert made == reference  # same seed -> byte-identical files
    assert tiny_checkpoints_tool.is_complete(folder, 0) and not tiny_checkpoints_tool.is_complete(folder, 1)


def test_damaged_folder_is_not_complete(tmp_path, tiny_checkpoints, tiny_checkpoints_tool):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoints, copy)
    with open(copy / "stage_b.safetensors", "r+b") as f:
        f.truncate(1000)
    assert not tiny_checkpoints_tool.is_complete(copy, 0)
    assert tiny_checkpoints_tool.is_ours(copy)  # so a re-run rewrites it without --force


def test_refuses_a_file_path(tmp_path, tiny_checkpoints_tool, capsys):
    target = tmp_path / "file.bin"
    target.write_bytes(b"x")
    assert tiny_checkpoints_tool.main([str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
