"""LoRA file formats: golden files through the real Stage C, conversions, detection, wrong flavour."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cascade_core.models.stage_c import StageC, StageCConfig
from cascade_core.peft.formats import (
    LoRAFormatError,
    LoRAMismatchError,
    convert_from_native,
    convert_to_native,
    detect_lora_format,
    official_embeddings,
)
from cascade_core.peft.lora import load_lora_state_dict, lora_target_shapes, merge_lora
from cascade_core.peft.native import split_native, targets_from_checkpoint_shapes

GOLDEN_LORAS = {
    "tiny_lora_official_stability": "official",
    "tiny_lora_diffusers_peft": "peft",
    "tiny_lora_diffusers_alpha_folded": "peft-folded",
    "tiny_lora_kohya_comfy": "kohya",
}


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _group(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _deltas(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """target -> (alpha / rank) * up @ down: what every format must preserve."""
    return {
        t: (a / d.shape[0]) * (u.flatten(1) @ d.flatten(1)) for t, (d, u, a) in split_native(native).items()
    }


def _assert_same_deltas(a: dict, b: dict, atol: float = 1e-6) -> None:
    da, db = _deltas(a), _deltas(b)
    assert set(da) == set(db)
    for t in da:
        torch.testing.assert_close(da[t], db[t], atol=atol, rtol=0, msg=t)


@pytest.fixture(scope="module")
def prior_tiny(golden_dir):
    """The diffusers_prior_tiny weights in original keys, its inputs and the expected LoRA output."""
    weights, _ = _read(golden_dir / "original_prior_tiny.safetensors")
    inputs, _ = _read(golden_dir / "diffusers_prior_tiny.safetensors")
    expected, _ = _read(golden_dir / "lora" / "tiny_lora_expected_output.safetensors")
    base = {k: v for k, v in weights.items() if not k.startswith("output.")}
    return base, _group(inputs, "input."), expected["output.sample_with_lora"]


def _model(base: dict[str, torch.Tensor]) -> StageC:
    model = StageC(StageCConfig.preset("tiny")).eval()
    model.load_state_dict(base, strict=True)
    return model


def _run_prior(model: StageC, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(
            inputs["sample"],
            inputs["timestep_ratio"],
            inputs["clip_text"],
            inputs["clip_text_pooled"],
            inputs["clip_img"],
        )


@pytest.mark.parametrize("name", sorted(GOLDEN_LORAS))
def test_golden_lora_files_give_expected_output(golden_dir, prior_tiny, name):
    base, inputs, expected = prior_tiny
    sd, meta = _read(golden_dir / "lora" / f"{name}.safetensors")
    assert detect_lora_format(sd, meta) == GOLDEN_LORAS[name]
    model = _model(base)
    assert (_run_prior(model, inputs) - expected).abs().max() > 1e-2  # the LoRA visibly changes the output
    native = convert_to_native(sd, meta, lora_target_shapes(model))
    assert len(split_native(native)) == 12  # 6 attention blocks x (in_proj, out_proj): q/k/v fused back
    load_lora_state_dict(model, native)
    torch.testing.assert_close(_run_prior(model, inputs), expected, atol=1e-5, rtol=0)
    merge_lora(model)
    torch.testing.assert_close(_run_prior(model, inputs), expected, atol=1e-5, rtol=0)


def test_golden_stage_c_tiny_lora(golden_dir):
    tensors, meta = _read(golden_dir / "stage_c_tiny_lora.safetensors")
    model = StageC(StageCConfig.from_dict(json.loads(meta["config"]))).eval()
    model.load_state_dict(_group(tensors, "model."), strict=True)
    inputs = _group(tensors, "input.")
    official = _group(tensors, "lora.")
    native = convert_to_native(official, None, lora_target_shapes(model))
    index = json.loads(meta["lora_index_to_wrapped_parameter"])
    for i, wrapped in index.items():  # positional index -> wrapped parameter, as the header records it
        target = wrapped.replace(".in_proj_weight", ".in_proj").removesuffix(".weight")
        assert torch.equal(native[f"{target}.lora_down.weight"], official[f"weights.{i}.lora_down"])
        assert float(native[f"{target}.alpha"]) == 1.0  # official scale = 1 / rank
    args = (inputs["x"], inputs["r"], inputs["clip_text"], inputs["clip_text_pooled"], inputs["clip_img"])
    with torch.no_grad():
        assert (model(*args) - tensors["output.out"]).abs().max() > 0.5  # golden: up to 1.14 without LoRA
    load_lora_state_dict(model, native)
    with torch.no_grad():
        out = model(
            inputs["x"], inputs["r"], inputs["clip_text"], inputs["clip_text_pooled"], inputs["clip_img"]
        )
    torch.testing.assert_close(out, tensors["output.out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(GOLDEN_LORAS))
def test_export_reproduces_golden_files(golden_dir, prior_tiny, name):
    """official -> native -> each format gives the golden file's tensors (they are exact conversions)."""
    base, _, _ = prior_tiny
    shapes = targets_from_checkpoint_shapes({k: v.shape for k, v in base.items()})
    official, _ = _read(golden_dir / "lora" / "tiny_lora_official_stability.safetensors")
    native = convert_to_native(official, None, shapes)
    golden, golden_meta = _read(golden_dir / "lora" / f"{name}.safetensors")
    written, meta = convert_from_native(native, GOLDEN_LORAS[name], shapes)
    assert set(written) == set(golden)
    for key in golden:
        torch.testing.assert_close(written[key], golden[key], atol=1e-7, rtol=0, msg=key)
    if name == "tiny_lora_diffusers_peft":
        ours, theirs = (
            json.loads(meta["lora_adapter_metadata"]),
            json.loads(golden_meta["lora_adapter_metadata"]),
        )
        assert (ours["prior.r"], ours["prior.lora_alpha"]) == (theirs["prior.r"], theirs["prior.lora_alpha"])
    if name == "tiny_lora_kohya_comfy":
        for key in ("ss_network_dim", "ss_network_module", "ss_base_model_version", "modelspec.architecture"):
            assert meta[key] == golden_meta[key]


def _random_native(shapes: dict, targets: list[str], rank: int, alpha: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    native = {}
    for t in targets:
        out, inp, *tail = shapes[t]
        native[f"{t}.lora_down.weight"] = torch.randn(rank, inp, *tail, generator=g)
        native[f"{t}.lora_up.weight"] = torch.randn(out, rank, *tail, generator=g)
        native[f"{t}.alpha"] = torch.tensor(alpha)
    return native


@pytest.fixture(scope="module")
def tiny_shapes(prior_tiny) -> dict:
    return targets_from_checkpoint_shapes({k: v.shape for k, v in prior_tiny[0].items()})


@pytest.mark.parametrize("fmt", ["native", "kohya", "peft", "peft-folded"])
def test_round_trip_all_linear_targets(tiny_shapes, fmt):
    """Attention, linears and 1x1 convs (embedding.1, clf.1) survive every format that can hold them."""
    native = _random_native(tiny_shapes, list(tiny_shapes), rank=3, alpha=1.5)
    sd, meta = convert_from_native(native, fmt)
    assert detect_lora_format(sd, meta) == fmt
    back = convert_to_native(sd, meta, tiny_shapes)
    _assert_same_deltas(native, back)
    if fmt in ("native", "kohya", "peft"):
        assert set(back) == set(native) and all(torch.equal(back[k], native[k]) for k in native)


def test_round_trip_official_and_chain(tiny_shapes):
    attention = [t for t in tiny_shapes if t.endswith((".attn.in_proj", ".attn.out_proj"))]
    native = _random_native(tiny_shapes, attention, rank=2, alpha=3.0)
    current = native
    for fmt in ("official", "kohya", "peft-folded", "peft", "official", "native"):
        sd, meta = convert_from_native(current, fmt, tiny_shapes)
        current = convert_to_native(sd, meta, tiny_shapes)
    _assert_same_deltas(native, current, atol=1e-5)
    with pytest.raises(LoRAFormatError, match="official Stability layout"):
        convert_from_native(_random_native(tiny_shapes, list(tiny_shapes), 2, 1.0), "official", tiny_shapes)


def test_split_qkv_with_independent_factors_fuses_exactly(tiny_shapes):
    """kohya q/k/v LoRAs with their own down factors and alphas fuse to one stacked in_proj LoRA."""
    g = torch.Generator().manual_seed(4)
    blk = "down_blocks.1.2.attention.attn"
    sd, split = {}, {}
    for part, alpha in (("q", 1.0), ("v", 4.0)):  # k left out on purpose
        down, up = torch.randn(2, 48, generator=g), torch.randn(48, 2, generator=g)
        key = f"lora_unet_down_blocks_1_2_attention_attn_to_{part}"
        sd.update(
            {
                f"{key}.lora_down.weight": down,
                f"{key}.lora_up.weight": up,
                f"{key}.alpha": torch.tensor(alpha),
            }
        )
        split[part] = (alpha / 2) * up @ down
    native = convert_to_native(sd, {}, tiny_shapes)
    (delta,) = _deltas(native).values()
    expected = torch.cat([split["q"], torch.zeros(48, 48), split["v"]])
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=0)
    assert native[f"{blk}.in_proj.lora_down.weight"].shape == (4, 48)


def test_detection_and_bad_files(tiny_shapes):
    with pytest.raises(LoRAFormatError, match="unrecognised"):
        detect_lora_format({"foo.bar": torch.zeros(1)})
    with pytest.raises(LoRAFormatError, match="text-encoder"):
        convert_to_native(
            {"lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}, {}, tiny_shapes
        )
    with pytest.raises(LoRAFormatError, match="lacks"):
        convert_to_native({"clf.1.lora_down.weight": torch.zeros(2, 32, 1, 1)}, {}, tiny_shapes)
    sd = {"weights.0.lora_down": torch.zeros(1, 4), "embeddings.indices": torch.tensor([49408])}
    assert detect_lora_format(sd) == "official" and set(official_embeddings(sd)) == {"embeddings.indices"}


def _manifest_targets(manifest_dir, name: str) -> dict:
    keys = json.loads((manifest_dir / "original" / f"{name}.json").read_text())["keys"]
    return targets_from_checkpoint_shapes(keys)


def test_official_index_order_matches_manifest(manifest_dir):
    """Positional index i of the 3.6B official file wraps the parameter the manifest lists."""
    shapes = _manifest_targets(manifest_dir, "stage_c")
    layout = json.loads((manifest_dir / "original" / "lora_stage_c_rank4_attn.json").read_text())
    index = layout["lora_index_to_wrapped_parameter"]
    official = {}
    for i, wrapped in index.items():
        out, inp = shapes[wrapped.replace(".in_proj_weight", ".in_proj").removesuffix(".weight")]
        official[f"weights.{i}.lora_down"] = torch.full((1, inp), float(i))
        official[f"weights.{i}.lora_up"] = torch.zeros(out, 1)
    native = convert_to_native(official, None, shapes)
    for i, wrapped in index.items():
        target = wrapped.replace(".in_proj_weight", ".in_proj").removesuffix(".weight")
        assert native[f"{target}.lora_down.weight"][0, 0] == float(i)
    assert len(index) == layout["num_lora_modules"] == 128


def test_wrong_flavour_refused(manifest_dir):
    full, lite = _manifest_targets(manifest_dir, "stage_c"), _manifest_targets(manifest_dir, "stage_c_lite")
    attention = [t for t in full if t.endswith((".attn.in_proj", ".attn.out_proj"))]
    native = _random_native(full, attention, rank=1, alpha=1.0)
    for fmt in ("native", "kohya", "peft", "official"):
        sd, meta = convert_from_native(native, fmt, full)
        with pytest.raises(LoRAMismatchError, match=r"made for Stage C \(3\.6B.*model is Stage C lite \(1B"):
            convert_to_native(sd, meta, lite)
    lite_native = _random_native(lite, [t for t in lite if t.endswith(".attn.in_proj")], rank=1, alpha=1.0)
    with pytest.raises(LoRAMismatchError, match=r"made for Stage C lite.*model is Stage C \(3\.6B"):
        convert_to_native(lite_native, {}, full)


def test_wrong_flavour_refused_by_model_loader(golden_dir, prior_tiny):
    """load_lora_state_dict checks shapes itself (a LoRA for another width never half-loads)."""
    model = _model(prior_tiny[0])
    shapes = lora_target_shapes(model)
    other = {t: (s[0] * 2, s[1] * 2, *s[2:]) for t, s in shapes.items()}
    native = _random_native(other, [t for t in other if t.endswith(".attn.out_proj")], 1, 1.0)
    with pytest.raises(LoRAMismatchError, match="other shapes"):
        load_lora_state_dict(model, native)
    assert not any(".lora_" in k for k in model.state_dict())
