"""Exports: every LoRA format round-trips through load_lora_into, merged/full weights reload equal, the
read-back check fails loudly, and `runner export` converts and merges the golden LoRA files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cascade_core.checkpoint_io import write_safetensors
from cascade_core.models.stage_c import StageC, StageCConfig
from cascade_core.peft.formats import convert_to_native, detect_lora_format
from cascade_core.peft.lora import (
    inject_lora,
    iter_lora_adapters,
    lora_state_dict,
    lora_target_shapes,
    merge_lora,
)
from cascade_core.stage_c_io import load_stage_c, save_stage_c
from runner.cli import main
from runner.ema import EMA
from runner.errors import UserError
from runner.export import export_training_result
from runner.export_io import ExportCheckError, compare_lora, lora_deltas, write_lora
from runner.lora_files import load_lora_into
from runner.recipe import read_recipe

REPO = Path(__file__).resolve().parents[3]
FORMATS = ("native", "comfyui", "peft", "official")
GOLDEN = (
    "tiny_lora_official_stability",
    "tiny_lora_diffusers_peft",
    "tiny_lora_diffusers_alpha_folded",
    "tiny_lora_kohya_comfy",
)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


@pytest.fixture(scope="module")
def golden(golden_dir):
    weights, _ = _read(golden_dir / "original_prior_tiny.safetensors")
    inputs, _ = _read(golden_dir / "diffusers_prior_tiny.safetensors")
    base = {k: v for k, v in weights.items() if not k.startswith("output.")}
    return base, {k[len("input.") :]: v for k, v in inputs.items() if k.startswith("input.")}


@pytest.fixture(scope="module")
def base_file(golden, tmp_path_factory) -> Path:
    """The golden tiny prior as a plain original-layout checkpoint (what a recipe's model.prior points at)."""
    return write_safetensors(tmp_path_factory.mktemp("base") / "stage_c_tiny.safetensors", golden[0])


def _model(golden) -> StageC:
    model = StageC(StageCConfig.preset("tiny")).eval()
    model.load_state_dict(golden[0], strict=True)
    return model


def _run(model, i) -> torch.Tensor:
    with torch.no_grad():
        return model(i["sample"], i["timestep_ratio"], i["clip_text"], i["clip_text_pooled"], i["clip_img"])


def _lora_model(golden, targets="attention") -> StageC:
    """Tiny prior with a rank-3, alpha-5 LoRA whose factors are random and non-zero."""
    model = _model(golden)
    inject_lora(model, rank=3, alpha=5.0, targets=targets, dtype=torch.float32)
    with torch.no_grad():
        for _, _, adapter in iter_lora_adapters(model):
            adapter.lora_down.normal_()
            adapter.lora_up.normal_(std=0.05)
    return model


def _recipe(base_file: Path, **export):
    spec = read_recipe(REPO / "recipes" / "quickstart.yaml", paths="warn").spec
    prior = dataclasses.replace(spec.model.prior, path=str(base_file), subfolder="", filename=None)
    return dataclasses.replace(
        spec,
        model=dataclasses.replace(spec.model, prior=prior),
        export=dataclasses.replace(spec.export, **export),
    )


def test_every_lora_format_round_trips(golden, base_file, tmp_path):
    model = _lora_model(golden)
    recipe = _recipe(base_file, lora_formats=FORMATS, trigger_words=("sks",))
    paths = export_training_result(recipe, model, None, tmp_path)
    assert [p.name for p in paths] == [f"lora_{f}.safetensors" for f in FORMATS] + ["README.txt"]
    expected = _run(model, golden[1])
    for fmt, path in zip(FORMATS, paths, strict=False):
        fresh = _model(golden)
        assert (_run(fresh, golden[1]) - expected).abs().max() > 1e-3  # the LoRA matters
        load_lora_into(fresh, path)
        torch.testing.assert_close(_run(fresh, golden[1]), expected, atol=1e-5, rtol=0, msg=fmt)
    _, meta = _read(paths[0])
    assert meta["cascade_runner.rank"] == "3" and meta["cascade_runner.alpha"] == "5.0"
    assert meta["cascade_runner.base_flavour"] == "tiny"
    assert json.loads(meta["cascade_runner.trigger_words"]) == ["sks"]
    assert meta["cascade_runner.base_fingerprint"].startswith("sha256-head-tail:")
    assert json.loads(meta["cascade_runner.recipe"])["training"]["lora"]["rank"] == 4  # the resolved recipe
    assert len(json.loads(meta["cascade_runner.targets"])) == 12
    _, peft_meta = _read(paths[2])
    assert json.loads(peft_meta["lora_adapter_metadata"])["prior.lora_alpha"] == 5.0
    readme = paths[-1].read_text()
    assert "ComfyUI" in readme and "lora_official.safetensors" in readme and "relative" in readme
    assert not (tmp_path / "export" / ".export_partial").exists()


def test_bf16_export_within_bf16_bound(golden, base_file, tmp_path):
    model = _lora_model(golden)
    live = lora_state_dict(model)
    recipe = _recipe(base_file, lora_formats=("comfyui",), dtype="bf16")
    paths = export_training_result(recipe, model, None, tmp_path)
    tensors, meta = _read(paths[0])
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    fresh = _model(golden)
    load_lora_into(fresh, paths[0])
    back = {k: v.float() for k, v in lora_state_dict(fresh).items()}
    compare_lora(live, back, torch.bfloat16, "bf16")
    with pytest.raises(ExportCheckError):  # and it really is bf16: the fp32 bound does not hold
        compare_lora(live, back, torch.float32, "bf16 against the fp32 bound")


def test_exports_use_ema_weights(golden, base_file, tmp_path):
    model = _lora_model(golden)
    ema = EMA(model, decay=0.5)  # shadow = the current adapters
    at_ema = _run(model, golden[1])
    with torch.no_grad():
        for _, _, adapter in iter_lora_adapters(model):
            adapter.lora_up.mul_(3.0)
    live = _run(model, golden[1])
    paths = export_training_result(_recipe(base_file, lora_formats=("native",)), model, ema, tmp_path)
    fresh = _model(golden)
    load_lora_into(fresh, paths[0])
    torch.testing.assert_close(_run(fresh, golden[1]), at_ema, atol=1e-5, rtol=0)
    torch.testing.assert_close(_run(model, golden[1]), live)  # the training weights are back


def test_merge_and_unexpressible_format(golden, base_file, tmp_path):
    model = _lora_model(golden, targets="attention+ffn")
    recipe = _recipe(base_file, lora_formats=("native", "official"), merge=True)
    with pytest.raises(UserError, match="official.*attention"):
        export_training_result(recipe, model, None, tmp_path)
    assert not list((tmp_path / "export").glob("*.safetensors"))  # refused before writing anything
    recipe = _recipe(base_file, lora_formats=("native",), merge=True)
    paths = export_training_result(recipe, model, None, tmp_path)
    assert paths[1].name == "stage_c_merged.safetensors"
    expected = _run(model, golden[1])
    merged = load_stage_c(paths[1], device="cpu")
    torch.testing.assert_close(_run(merged, golden[1]), expected, atol=1e-5, rtol=0)
    merge_lora(model)
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], atol=1e-6, rtol=0, msg=key)


def test_full_mode_writes_both_layouts(golden, base_file, tmp_path):
    model = _model(golden)
    recipe = _recipe(base_file, dtype="bf16")
    recipe = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, mode="full"))
    paths = export_training_result(recipe, model, None, tmp_path)
    assert [p.name for p in paths] == ["stage_c.safetensors", "prior", "README.txt"]
    assert (paths[1] / "config.json").is_file()
    for path in paths[:2]:
        loaded = load_stage_c(path, device="cpu")
        for key, value in model.state_dict().items():
            want = value.to(torch.bfloat16) if value.is_floating_point() else value
            assert torch.equal(loaded.state_dict()[key], want), key


def test_read_back_check_fails_loudly(golden, tmp_path, monkeypatch):
    """A file that does not read back equal raises and is not left under its final name."""
    import cascade_core.peft.formats as formats

    model = _lora_model(golden)
    native, shapes = lora_state_dict(model), lora_target_shapes(model)
    real = formats.convert_to_native

    def corrupted(*args, **kwargs):
        out = real(*args, **kwargs)
        key = next(k for k in out if k.endswith(".lora_up.weight"))
        out[key] = out[key] * 1.001
        return out

    monkeypatch.setattr(formats, "convert_to_native", corrupted)
    final = tmp_path / "lora_comfyui.safetensors"
    with pytest.raises(ExportCheckError, match="relative"):
        write_lora(final, native, "comfyui", shapes, torch.float32, {})
    assert not final.exists() and not list(tmp_path.rglob("*.safetensors"))


def _cli(*args: object) -> int:
    return main(["export", *(str(a) for a in args)])


def _golden_native(golden_dir, name, shapes):
    tensors, meta = _read(golden_dir / "lora" / f"{name}.safetensors")
    return convert_to_native(tensors, meta, shapes)


@pytest.mark.parametrize("name", GOLDEN)
def test_cli_converts_golden_files(golden_dir, golden, base_file, tmp_path, name, capsys):
    shapes = lora_target_shapes(_model(golden))
    reference = lora_deltas(_golden_native(golden_dir, name, shapes))
    for fmt in FORMATS:
        out = tmp_path / f"{fmt}.safetensors"
        lora = golden_dir / "lora" / f"{name}.safetensors"
        assert _cli("--model", base_file, "--lora", lora, "--to", fmt, "-o", out) == 0
        tensors, meta = _read(out)
        assert detect_lora_format(tensors, meta) == {"comfyui": "kohya"}.get(fmt, fmt)
        got = lora_deltas(convert_to_native(tensors, meta, shapes))
        assert set(got) == set(reference)
        for target, (delta, _) in reference.items():
            torch.testing.assert_close(got[target][0], delta, atol=1e-6, rtol=0, msg=f"{fmt} {target}")
    assert "check:" in capsys.readouterr().out


def test_cli_merge_and_force(golden_dir, golden, base_file, tmp_path, capsys):
    expected = _read(golden_dir / "lora" / "tiny_lora_expected_output.safetensors")[0]
    expected = expected["output.sample_with_lora"]
    out = tmp_path / "merged.safetensors"
    lora = str(golden_dir / "lora" / "tiny_lora_kohya_comfy.safetensors")
    assert _cli("--model", base_file, "--lora", lora, "--merge", "-o", out) == 0
    merged = load_stage_c(out, device="cpu")
    torch.testing.assert_close(_run(merged, golden[1]), expected, atol=1e-5, rtol=0)
    shapes = lora_target_shapes(merged)
    deltas = lora_deltas(_golden_native(golden_dir, "tiny_lora_kohya_comfy", shapes))
    for target, (delta, _) in deltas.items():
        key = target + "_weight" if target.endswith(".in_proj") else target + ".weight"
        torch.testing.assert_close(merged.state_dict()[key], golden[0][key] + delta, atol=1e-6, rtol=0)

    before = out.read_bytes()
    assert _cli("--model", base_file, "--lora", lora, "--to", "peft", "-o", out) == 2
    assert "already exists; pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert _cli("--model", base_file, "--lora", lora, "--to", "peft", "-o", out, "--force") == 0
    assert detect_lora_format(*_read(out)) == "peft"

    half = tmp_path / "half.safetensors"
    assert _cli("--model", base_file, "--lora", lora + ":0.5", "--to", "native", "-o", half) == 0
    full_delta = lora_deltas(convert_to_native(*_read(out), shapes))
    half_delta = lora_deltas(convert_to_native(*_read(half), shapes))
    for target, (delta, _) in full_delta.items():
        torch.testing.assert_close(half_delta[target][0], 0.5 * delta, atol=1e-6, rtol=0)


def test_cli_reads_diffusers_folder_on_meta(golden, tmp_path, golden_dir):
    """A diffusers-layout base works too; conversion only needs its shapes."""
    save_stage_c(_model(golden), tmp_path / "repo" / "prior", "diffusers")
    out = tmp_path / "x.safetensors"
    lora = str(golden_dir / "lora" / "tiny_lora_official_stability.safetensors")
    repo = tmp_path / "repo"
    assert _cli("--model", repo, "--subfolder", "prior", "--lora", lora, "--to", "comfyui", "-o", out) == 0
    missing = tmp_path / "nothing"
    assert _cli("--model", missing, "--lora", lora, "--to", "peft", "-o", tmp_path / "y.safetensors") == 2


def test_cli_exports_a_full_checkpoint_and_explains_wrong_arguments(golden, base_file, tmp_path, capsys):
    """`--checkpoint` on an unsharded full fine-tune checkpoint (sharded ones: test_distributed.py);
    the architecture comes from the tensor shapes, no --model needed."""
    from runner.checkpoint import save_checkpoint
    from runner.export import LORA_FORMATS
    from runner.export_io import LORA_FILE_FORMATS

    assert LORA_FORMATS == tuple(LORA_FILE_FORMATS)  # the CLI's --to choices name every LoRA format
    weights = {k: v + 0.5 for k, v in golden[0].items()}  # "trained": differs from the base everywhere
    ckpt = save_checkpoint(tmp_path / "run", 4, trainable=weights, optimizer_state={}, scheduler_state={},
                           data_cursor={}, recipe_text="training: {mode: full}\n")
    out = tmp_path / "ft.safetensors"
    assert _cli("--checkpoint", tmp_path / "run", "--to", "original", "--dtype", "bf16", "-o", out) == 0
    assert f"step 4 of {ckpt}" in capsys.readouterr().out
    got = _read(out)[0]
    assert got.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(got[key], value.to(torch.bfloat16)), key

    lora_run = save_checkpoint(tmp_path / "lora_run", 1, trainable={"w": torch.ones(1)}, optimizer_state={},
                               scheduler_state={}, data_cursor={}, recipe_text="training: {mode: lora}\n")
    new = tmp_path / "new.safetensors"
    errors = {
        "is from a LoRA run": ("--checkpoint", lora_run, "--to", "original", "-o", new),
        "drop --lora": ("--checkpoint", ckpt, "--lora", "x.safetensors", "--to", "original", "-o", out),
        "is a LoRA format": ("--checkpoint", ckpt, "--to", "peft", "-o", new),
        "the diffusers layout is a folder": ("--checkpoint", ckpt, "--to", "diffusers", "-o", out),
        "not a checkpoint folder": ("--checkpoint", tmp_path, "--to", "original", "-o", new),
        "give --checkpoint DIR": ("--model", base_file, "--lora", "x", "--to", "original", "-o", out),
        "give --model": ("--lora", "x.safetensors", "--to", "peft", "-o", new),
    }
    for message, args in errors.items():
        assert _cli(*args) == 2, message
        assert message in capsys.readouterr().err


def test_cli_lora_format_names_match_the_writers():
    """runner/export.py keeps its own list (no heavy import for --help); it must name every writer."""
    from runner.export import LORA_FORMATS
    from runner.export_io import LORA_FILE_FORMATS

    assert set(LORA_FORMATS) == set(LORA_FILE_FORMATS)
