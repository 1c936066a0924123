"""Stage A (VQGAN): every golden output of the tiny config, the real key layout, VQ gradients."""

from __future__ import annotations

import json

import pytest
import torch

from cascade_core.models.stage_a import StageA, VectorQuantizer, pad_to_multiple


@pytest.fixture(scope="module")
def golden(golden_files):
    return golden_files.load("stage_a_tiny.safetensors")


@pytest.fixture(scope="module")
def tiny(golden, golden_files):
    model = StageA(
        levels=2, bottleneck_blocks=2, c_hidden=32, c_latent=4, codebook_size=64, scale_factor=0.43
    )
    model.load_state_dict(golden_files.weights(golden), strict=True)
    return model.eval()


def test_golden_config_is_the_one_built(golden_files):
    config = golden_files.config("stage_a_tiny.safetensors")
    assert config == {
        "levels": 2,
        "bottleneck_blocks": 2,
        "c_hidden": 32,
        "c_latent": 4,
        "codebook_size": 64,
        "scale_factor": 0.43,
    }


def test_golden_encode_decode(golden, tiny):
    images = golden["input.images"]
    close = dict(rtol=0, atol=1e-5)
    with torch.no_grad():
        plain = tiny.encode(images)
        assert plain.unquantized is None and plain.indices is None and plain.loss is None
        torch.testing.assert_close(plain.latent, golden["output.latent"], **close)
        q = tiny.encode(images, quantize=True)
        torch.testing.assert_close(q.latent, golden["output.q_latent"], **close)
        torch.testing.assert_close(q.unquantized, golden["output.q_unquantized"], **close)
        assert q.indices.dtype == torch.int64
        assert torch.equal(q.indices, golden["output.q_indices"])
        torch.testing.assert_close(q.loss.reshape(1), golden["output.q_loss"], **close)
        torch.testing.assert_close(tiny.decode(golden["output.latent"]), golden["output.decoded"], **close)
        decoded, loss = tiny(images, quantize=True)
        torch.testing.assert_close(decoded, golden["output.forward_decoded"], **close)
        torch.testing.assert_close(loss.reshape(1), golden["output.forward_loss"], **close)


def test_keys_match_manifest(manifest_dir):
    manifest = json.loads((manifest_dir / "original" / "stage_a.json").read_text())
    with torch.device("meta"):
        model = StageA(**manifest["official_constructor_kwargs"])
    state = model.state_dict()
    assert list(state) == list(manifest["keys"])
    assert {k: list(v.shape) for k, v in state.items()} == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert sum(b.numel() for b in model.buffers()) == manifest["num_buffer_elements"]


def test_quantizer_picks_nearest_code_with_straight_through_gradient():
    vq = VectorQuantizer(c_latent=2, codebook_size=3)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.5]]))
    x = torch.tensor([[0.9, 1.2], [-1.5, 0.4], [0.1, -0.2]]).T.reshape(1, 2, 1, 3).requires_grad_(True)
    out = vq(x)
    assert out.indices.tolist() == [[[1, 2, 0]]]
    expected = torch.tensor([[1.0, 1.0], [-2.0, 0.5], [0.0, 0.0]]).T.reshape(1, 2, 1, 3)
    torch.testing.assert_close(out.quantized, expected, rtol=0, atol=0)
    # losses: both are the MSE between codes and inputs; the gradient goes straight through to x
    mse = (expected - x.detach()).pow(2).mean()
    torch.testing.assert_close(out.vq_loss, mse)
    torch.testing.assert_close(out.commit_loss, mse)
    (out.quantized * torch.arange(6.0).reshape(1, 2, 1, 3)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(6.0).reshape(1, 2, 1, 3))


def test_sizes_and_errors():
    with torch.device("meta"):
        model = StageA()
        assert model.decode(torch.zeros(1, 4, 24, 32)).shape == (1, 3, 96, 128)
        assert model.encode(torch.zeros(1, 3, 96, 128)).latent.shape == (1, 4, 24, 32)
        with pytest.raises(ValueError, match="divisible by 4"):
            model.encode(torch.zeros(1, 3, 30, 32))
        with pytest.raises(ValueError, match=r"\[B,4,h,w\]"):
            model.decode(torch.zeros(1, 16, 8, 8))


def test_pad_to_multiple_replicates_edges():
    images = torch.arange(6.0).reshape(1, 1, 2, 3)
    padded = pad_to_multiple(images, 4)
    assert padded.shape == (1, 1, 4, 4)
    assert padded[0, 0].tolist() == [[0, 1, 2, 2], [3, 4, 5, 5], [3, 4, 5, 5], [3, 4, 5, 5]]
    assert pad_to_multiple(padded, 4) is padded
