"""`runner import simpletuner`: every key mapped or reported, lossy mappings commented, output validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.cli import main
from runner.errors import UserError
from runner.importers.simpletuner import import_simpletuner
from runner.recipe import read_recipe

EVERY_KEY = {
    "model_family": "stable_cascade",
    "model_flavour": "stage-c-lite",
    "model_type": "lora",
    "mixed_precision": "bf16",
    "i_know_what_i_am_doing": True,
    "gradient_checkpointing": True,
    "vae_batch_size": 8,
    "validation_resolution": "1024x1536",
    "validation_prompt": "a photo of sks dog",
    "validation_negative_prompt": "blurry",
    "validation_guidance": 5.0,
    "validation_num_inference_steps": 12,
    "validation_prompt_library": "prompts.json",
    "stable_cascade_use_decoder_for_validation": True,
    "stable_cascade_decoder_model_name_or_path": "someone/cascade-decoder",
    "stable_cascade_decoder_subfolder": "decoder_lite",
    "stable_cascade_validation_prior_num_inference_steps": 25,
    "stable_cascade_validation_prior_guidance_scale": 3.5,
    "stable_cascade_validation_decoder_guidance_scale": 0.5,
    "base_model_precision": "int8-torchao",
    "checkpoint_step_interval": 250,
    "gradient_accumulation_steps": 2,
    "hub_model_id": "me/my-lora",
    "learning_rate": "1e-4",
    "lora_alpha": 8,
    "lora_rank": 32,
    "lora_type": "standard",
    "lr_scheduler": "cosine_with_restarts",
    "max_train_steps": 1500,
    "optimizer": "adamw_bf16",
    "output_dir": "output/dog",
    "report_to": "tensorboard",
    "seed": 7,
    "train_batch_size": 3,
    "use_ema": True,
    "data_backend_config": "multidatabackend.json",
}

BACKEND = [
    {
        "id": "dog photos",
        "type": "local",
        "dataset_type": "images",
        "instance_data_dir": "datasets/dog",
        "resolution": "1024x1024",
        "bucket_resolutions": ["1024x1024", "768x1280"],
        "crop": True,
        "crop_style": "centre",
        "minimum_image_size": 512,
        "maximum_image_size": 2048,
        "target_downsample_size": 1536,
        "caption_strategy": "instanceprompt",
        "prepend_instance_prompt": False,
        "instance_prompt": "sks dog",
        "repeats": 4,
        "cache_dir_vae": "cache/vae",
    },
    {
        "id": "style",
        "type": "local",
        "dataset_type": "image",
        "instance_data_dir": "datasets/style",
        "resolution": 768,
        "crop_style": "corner",
        "caption_strategy": "textfile",
        "prepend_instance_prompt": True,
        "instance_prompt": "in sks style",
        "probability": 0.5,
        "minimum_image_size": 0.25,
    },
    {
        "id": "text-cache",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": "cache/text",
    },
]


def _files(tmp_path: Path, config: dict, backend: list | None = BACKEND) -> Path:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    if backend is not None:
        (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    (tmp_path / "prompts.json").write_text(json.dumps({"beach": "a dog on a beach", "snow": "a dog in snow"}))
    return cfg


def test_every_key_converts_and_keeps_its_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dog.yaml"
    assert import_simpletuner(str(_files(tmp_path, EVERY_KEY)), output=str(out)) == 0
    err = capsys.readouterr().err
    assert "not imported" not in err
    text = out.read_text()
    assert text.startswith(f"# runner {out}\n")
    s = read_recipe(out, paths="warn").spec
    m, t, v, src = s.model, s.training, s.validation, s.data.sources
    assert (m.family, m.flavour, m.prior.subfolder) == ("stable_cascade", "stage-c-lite", "prior_lite")
    assert (t.mode, t.precision.mixed_precision, t.precision.i_know_what_i_am_doing) == ("lora", "bf16", True)
    assert (t.gradient_checkpointing, s.data.cache.encoder_batch_size) == (True, 8)
    assert (v.width, v.height, v.negative_prompt) == (1024, 1536, "blurry")
    assert v.prompts == ("a photo of sks dog", "a dog on a beach", "a dog in snow")
    assert (v.use_decoder, v.prior_steps, v.prior_guidance, v.decoder_guidance, v.decoder_steps) == (
        True,
        25,
        3.5,
        0.5,
        12,
    )
    assert m.decoder.source.path == "someone/cascade-decoder" and m.decoder.source.subfolder == "decoder_lite"
    assert m.decoder.flavour == "decoder_lite"
    assert t.precision.base_weights == "int8-torchao"
    assert (s.checkpoints.every_n_steps, t.gradient_accumulation_steps, s.hub.model_id) == (
        250,
        2,
        "me/my-lora",
    )
    assert (t.learning_rate, t.lora.alpha, t.lora.rank, t.scheduler.name, t.max_steps) == (
        1e-4,
        8.0,
        32,
        "cosine_with_restarts",
        1500,
    )
    assert (t.optimizer.name, s.output.dir, s.logging.report_to, t.seed, t.batch_size, t.ema.enabled) == (
        "adamw_bf16",
        "output/dog",
        "tensorboard",
        7,
        3,
        True,
    )
    assert [x.name for x in src] == ["dog-photos", "style"]
    dog, style = src
    assert (dog.type, dog.path, dog.resolution, dog.crop, dog.crop_style) == (
        "local",
        "datasets/dog",
        1024,
        True,
        "center",
    )
    assert dog.buckets == ((24, 24), (30, 18))
    assert (dog.minimum_image_size, dog.maximum_image_size, dog.target_downsample_size) == (512, 2048, 1536)
    assert (dog.caption_strategy, dog.instance_prompt, dog.prepend_instance_prompt, dog.repeats) == (
        "instanceprompt",
        "sks dog",
        False,
        4,
    )
    assert (style.resolution, style.crop_style, style.probability, style.minimum_image_size) == (
        768,
        "corner",
        0.5,
        512,
    )
    assert (style.caption_strategy, style.prepend_instance_prompt, style.instance_prompt) == (
        "textfile",
        True,
        "in sks style",
    )
    assert s.data.cache.text_embeddings_dir == "cache/text"
    assert s.data.cache.latents and s.data.cache.latents_dir == "cache/vae"
    for lossy in (
        'dataset_type "images" read as "image"',
        "bucket_resolutions",
        "SimpleTuner uses validation_guidance",
        "prompts from SimpleTuner validation_prompt_library",
        "cache_dir_vae",
    ):
        assert lossy in text, lossy


def test_unsupported_keys_are_reported_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = dict(
        EVERY_KEY,
        lora_type="lycoris",
        lr_scheduler="sine",
        optimizer="prodigy",
        base_model_precision="nf4-bnb",
        flux_lora_target="all",
        validation_prompt_library=True,
    )
    backend = BACKEND + [
        {"id": "s3", "type": "aws", "dataset_type": "image"},
        {
            "id": "x",
            "type": "local",
            "dataset_type": "image",
            "instance_data_dir": "d",
            "crop_aspect": "square",
            "crop_style": "face",
        },
    ]
    out = tmp_path / "r.yaml"
    assert import_simpletuner(str(_files(tmp_path, config, backend)), output=str(out)) == 0
    err = capsys.readouterr().err
    for name in (
        "lora_type",
        "lr_scheduler",
        "optimizer",
        "base_model_precision",
        "flux_lora_target",
        "validation_prompt_library",
        "backend[3] (s3)",
        "backend[4] (x).crop_aspect",
    ):
        assert f"not imported: {name}:" in err, name
        assert f"#   {name}:" in out.read_text(), name
    assert "crop_style 'face' is not available; random is used" in out.read_text()
    read_recipe(out, paths="warn")


def test_backend_option_overrides_config_and_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {k: v for k, v in EVERY_KEY.items() if k != "data_backend_config"}
    cfg = _files(tmp_path, config)
    with pytest.raises(UserError, match="pass --backend"):
        import_simpletuner(str(cfg))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(BACKEND[1:]))
    assert import_simpletuner(str(cfg), backend=str(other)) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# runner RECIPE.yaml") and "datasets/style" in printed
    assert "datasets/dog" not in printed


def test_never_overwrites_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _files(tmp_path, EVERY_KEY)
    out = tmp_path / "r.yaml"
    out.write_text("keep me")
    assert main(["import", "simpletuner", str(cfg), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main(["import", "simpletuner", str(cfg), "-o", str(out), "--force"]) == 0
    assert out.read_text().startswith("# runner")


def test_minimal_config_and_validation_off(tmp_path: Path) -> None:
    cfg = _files(
        tmp_path,
        {
            "model_family": "stable_cascade",
            "model_type": "full",
            "data_backend_config": "multidatabackend.json",
        },
        BACKEND[1:2],
    )
    out = tmp_path / "r.yaml"
    assert import_simpletuner(str(cfg), output=str(out)) == 0
    s = read_recipe(out, paths="warn").spec
    assert (s.training.mode, s.training.num_epochs, s.validation.enabled, s.model.decoder) == (
        "full",
        1,
        False,
        None,
    )


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_family": "flux"}, "only stable_cascade configs"),
        ({"model_family": "stable_cascade", "model_flavour": "stage-b"}, "not a Stage C flavour"),
        ({"model_family": "stable_cascade", "learning_rate": "fast"}, "is not a number"),
    ],
)
def test_bad_configs_are_user_errors(tmp_path: Path, config: dict, message: str) -> None:
    config = dict(config, data_backend_config="multidatabackend.json")
    with pytest.raises(UserError, match=message):
        import_simpletuner(str(_files(tmp_path, config)))


def test_out_of_range_value_is_written_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.yaml"
    assert import_simpletuner(str(_files(tmp_path, dict(EVERY_KEY, lora_rank=4096))), output=str(out)) == 2
    err = capsys.readouterr().err
    assert "needs fixing" in err and "training.lora.rank" in err and out.exists()
