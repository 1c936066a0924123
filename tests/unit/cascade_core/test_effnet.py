"""EfficientNet latent encoder: golden parity (real config), checkpoint key layout, eval-only behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from cascade_core.models.effnet import EfficientNetEncoder, encode_stage_c_latents, imagenet_normalize
from cascade_core.models.latent_size import encoder_pixel_size, stage_c_latent_size


def test_golden_latent(golden_files):
    golden = golden_files.load("effnet.safetensors")
    model = EfficientNetEncoder()
    model.load_state_dict(golden_files.weights(golden, as_float32=True), strict=True)
    normalized = imagenet_normalize(golden["input.image_01"])
    torch.testing.assert_close(normalized, golden["input.image_normalized"], rtol=0, atol=1e-6)
    with torch.no_grad():
        latent = model(golden["input.image_normalized"])
    assert latent.shape == (1, 16, 8, 8)
    torch.testing.assert_close(latent, golden["output.latent"], rtol=0, atol=1e-4)


def test_keys_match_manifest(manifest_dir):
    manifest = json.loads((manifest_dir / "original" / "effnet_encoder.json").read_text())
    with torch.device("meta"):
        model = EfficientNetEncoder(**manifest["official_constructor_kwargs"])
    state = model.state_dict()
    assert list(state) == list(manifest["keys"])
    assert {k: list(v.shape) for k, v in state.items()} == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert sum(b.numel() for b in model.buffers()) == manifest["num_buffer_elements"]


def test_stays_in_eval_mode_and_keeps_running_stats():
    model = EfficientNetEncoder()
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    before = model.mapper[1].running_mean.clone()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(model.mapper[1].running_mean, before, rtol=0, atol=0)


def test_rejects_wrong_input_shape():
    with torch.device("meta"):
        model = EfficientNetEncoder()
    with pytest.raises(ValueError, match="imagenet_normalize"):
        model(torch.zeros(1, 4, 64, 64, device="meta"))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        imagenet_normalize(torch.zeros(3, 8, 8))


@pytest.mark.parametrize("height,width", [(128, 128), (100, 150)])
def test_encode_stage_c_latents_resizes_to_the_latent_convention(height, width):
    encoder = EfficientNetEncoder()
    images = torch.rand(1, 3, height, width)
    with torch.no_grad():
        latent = encode_stage_c_latents(encoder, images)
        assert tuple(latent.shape) == (1, 16, *stage_c_latent_size(height, width))
        # the same as resizing by hand to encoder_pixel_size, normalising and encoding
        resized = torch.nn.functional.interpolate(
            images, size=encoder_pixel_size(height, width), mode="bilinear", antialias=True
        )
        torch.testing.assert_close(latent, encoder(imagenet_normalize(resized)), rtol=0, atol=0)
