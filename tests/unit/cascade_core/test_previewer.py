"""Previewer: golden parity (real config) and checkpoint key layout."""

from __future__ import annotations

import json

import pytest
import torch

from cascade_core.models.previewer import Previewer


def test_golden_image(golden_files):
    golden = golden_files.load("previewer.safetensors")
    weights = golden_files.weights(golden, as_float32=True)
    model = Previewer(c_in=16, c_hidden=512, c_out=3).eval()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        image = model(golden["input.latent"])
    assert image.shape == (1, 3, 192, 192)
    torch.testing.assert_close(image, golden["output.image"], rtol=0, atol=1e-4)


def test_keys_match_manifest(manifest_dir):
    manifest = json.loads((manifest_dir / "original" / "previewer.json").read_text())
    with torch.device("meta"):
        model = Previewer(**manifest["official_constructor_kwargs"])
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == manifest["keys"]
    assert list(state) == list(manifest["keys"])
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert sum(b.numel() for b in model.buffers()) == manifest["num_buffer_elements"]


def test_non_square_latent_gives_8x_image():
    with torch.device("meta"):
        model = Previewer()
        assert model(torch.zeros(2, 16, 18, 32)).shape == (2, 3, 144, 256)


def test_rejects_wrong_channels():
    with torch.device("meta"):
        model = Previewer()
    with pytest.raises(ValueError, match=r"\[B,16,h,w\]"):
        model(torch.zeros(1, 4, 24, 24, device="meta"))
