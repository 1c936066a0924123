"""Key layouts: original <-> diffusers for the prior and the decoder, against the real manifests."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cascade_core import formats as F

PAIRS = [
    ("stage_c", "prior", 16),
    ("stage_c_lite", "prior_lite", 16),
    ("stage_b", "decoder", 4),
    ("stage_b_lite", "decoder_lite", 4),
]


def _manifests(manifest_dir, original, diffusers):
    orig = json.loads((manifest_dir / "original" / f"{original}.json").read_text())
    diff = json.loads((manifest_dir / "diffusers" / f"{diffusers}.json").read_text())
    config = json.loads((manifest_dir / "diffusers" / f"{diffusers}.config.json").read_text())
    config.pop("_note", None)
    return (
        orig,
        {k: tuple(v) for k, v in orig["keys"].items()},
        {k: tuple(v) for k, v in diff.items()},
        config,
    )


@pytest.mark.parametrize("original,diffusers,c_in", PAIRS)
def test_manifest_conversion_both_ways(manifest_dir, original, diffusers, c_in):
    _, orig, diff, _ = _manifests(manifest_dir, original, diffusers)
    assert F.detect_layout(orig) == F.ORIGINAL and F.detect_layout(diff) == F.DIFFUSERS
    assert F.converted_shapes(orig, F.DIFFUSERS) == diff
    assert F.converted_shapes(diff, F.ORIGINAL) == orig
    kind = "stage_c" if original.startswith("stage_c") else "stage_b"
    assert F.detect_unet_kind(orig) == kind and F.detect_unet_kind(diff) == kind


@pytest.mark.parametrize("original,diffusers,c_in", PAIRS)
def test_architecture_inferred_from_shapes(manifest_dir, original, diffusers, c_in):
    meta, orig, diff, _ = _manifests(manifest_dir, original, diffusers)
    inferred = F.infer_unet_hparams(orig, c_in=c_in)
    official = meta["official_constructor_kwargs"]
    assert {k: official[k] for k in inferred} == inferred
    # not observable from shapes: heads, dropout, self_attn
    assert {"nhead", "dropout", "self_attn"}.isdisjoint(inferred)
    assert F.infer_unet_hparams(F.converted_shapes(diff, F.ORIGINAL), c_in=c_in) == inferred


@pytest.mark.parametrize("original,diffusers,c_in", PAIRS)
def test_diffusers_config_round_trip(manifest_dir, original, diffusers, c_in):
    meta, _, _, config = _manifests(manifest_dir, original, diffusers)
    official = meta["official_constructor_kwargs"]
    assert F.original_to_diffusers_config(official) == config
    back = F.diffusers_config_to_original(config)
    assert {k: back[k] for k in official} == official


def test_golden_weights_convert_bit_exactly(golden_dir):
    diff = load_file(golden_dir / "diffusers_prior_tiny.safetensors")
    orig = load_file(golden_dir / "original_prior_tiny.safetensors")
    diff = {k: v for k, v in diff.items() if not k.startswith(("input.", "output.", "intermediate."))}
    orig = {k: v for k, v in orig.items() if not k.startswith("output.")}
    to_orig = F.convert_state_dict(diff, F.ORIGINAL)
    to_diff = F.convert_state_dict(orig, F.DIFFUSERS)
    assert set(to_orig) == set(orig) and set(to_diff) == set(diff)
    assert all(torch.equal(to_orig[k], orig[k]) for k in orig)
    assert all(torch.equal(to_diff[k], diff[k]) for k in diff)
    assert all(to_orig.shape_of(k) == tuple(orig[k].shape) for k in orig)


def test_stage_b_pooled_mapper_is_renamed():
    orig = {"clip_mapper.weight": (8, 4), "effnet_mapper.0.weight": (4, 2, 1, 1)}
    diff = F.converted_shapes(orig, F.DIFFUSERS)
    assert "clip_txt_pooled_mapper.weight" in diff
    assert F.converted_shapes(diff, F.ORIGINAL) == orig
    # Stage C keeps its own clip_txt_pooled_mapper name in both layouts.
    prior = {"clip_txt_mapper.weight": (8, 4), "clip_txt_pooled_mapper.weight": (8, 4)}
    assert F.converted_shapes(prior, F.ORIGINAL) == prior


def test_incomplete_qkv_triple_stays_visible():
    keys = {"down_blocks.0.2.attention.to_q.weight": (4, 4), "down_blocks.0.2.attention.to_k.weight": (4, 4)}
    assert set(F.converted_shapes(keys, F.ORIGINAL)) == set(keys)


def test_find_key_prefix():
    keys = ["model.diffusion_model.clip_txt_mapper.weight", "text_encoder.x", "vae.y"]
    assert F.find_key_prefix(keys, [F.STAGE_C_ANCHOR]) == "model.diffusion_model."
    assert F.find_key_prefix(["clip_txt_mapper.weight"], [F.STAGE_C_ANCHOR]) == ""
    assert F.find_key_prefix(["xclip_txt_mapper.weight"], [F.STAGE_C_ANCHOR]) is None


def test_inference_errors_name_the_problem(manifest_dir):
    _, orig, _, _ = _manifests(manifest_dir, "stage_c_lite", "prior_lite")
    gap = {k: v for k, v in orig.items() if not k.startswith("down_blocks.1.4.")}
    with pytest.raises(ValueError, match=r"down_blocks.1 has no keys for block indices \[4\]"):
        F.infer_unet_hparams(gap, c_in=16)
    with pytest.raises(ValueError, match="not 3 x patch_size"):
        F.infer_unet_hparams(orig, c_in=3)
    with pytest.raises(ValueError, match="not a Stable Cascade UNet"):
        F.infer_unet_hparams({"foo.weight": (1,)}, c_in=16)
    with pytest.raises(ValueError, match="layout must be one of"):
        F.conversion_plan(orig, "comfy")
