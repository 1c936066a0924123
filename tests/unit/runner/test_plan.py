"""`runner plan`: offline; hub files listed, not fetched; data, buckets, steps, memory, int8/rollout costs."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from runner.cli import main
from runner.memory_estimate import estimate_memory, prior_sizes, rollout_cost
from runner.recipe import read_recipe

REPO = Path(__file__).resolve().parents[3]
LORA = str(REPO / "recipes" / "stage_c_lora.yaml")
INT8 = str(REPO / "recipes" / "stage_c_lora_int8.yaml")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF cache in tmp, offline mode on, and any network connection an error."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("runner plan tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache


@pytest.fixture(scope="module")
def photos(tmp_path_factory, noise_images) -> Path:
    """Five captioned images in three aspect ratios, one too small, and one without its caption file."""
    images = [
        ("a", (1024, 1024), "a cat"),
        ("b", (1200, 900), "a dog"),
        ("c", (900, 1600), "a tree"),
        ("d", (1100, 1100), "a cat\na kitten"),
        ("tiny", (200, 200), "too small"),
        ("nocap", (1024, 1024), None),
    ]
    return noise_images(tmp_path_factory.mktemp("photos"), images, 0)


def local_data(folder: Path) -> list[str]:
    return [
        "data.sources.0.type=local",
        f"data.sources.0.path={folder}",
        "data.sources.0.minimum_image_size=512",
    ]


def test_plan_offline_lists_hub_files_without_fetching(offline_hub, capsys) -> None:
    assert main(["plan", LORA]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == read_recipe(LORA, paths="warn").resolved  # still the resolved recipe
    assert "model.prior: hub stabilityai/stable-cascade-prior@main (would be downloaded)" in out
    assert "#     prior/diffusion_pytorch_model.safetensors  [not cached]" in out
    assert "#     effnet_encoder.safetensors  [not cached]" in out
    assert "#     decoder_lite/config.json  [not cached]" in out
    assert "shard glob 'datasets/my_subject/shards/*.tar' matches no file" in out
    assert "encoder unknown until downloaded" in out
    assert "square bucket 24x24 latents" in out and "Stage C (stage-c): 3,589,103,632 parameters" in out
    assert not any(offline_hub.iterdir()), "plan must not write into the hub cache"


def test_plan_says_what_goes_to_the_hub_and_if_a_token_is_there(offline_hub, capsys, monkeypatch) -> None:
    import huggingface_hub

    push = ["hub.model_id=me/fox", "hub.push=true"]
    assert main(["plan", LORA]) == 0
    assert "# hub:" not in capsys.readouterr().out  # uploads nothing
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["plan", LORA, *push, "hub.push_checkpoints=true"]) == 0
    out = capsys.readouterr().out
    assert ("# hub: uploads each checkpoint and the exports, model card and images at the end to me/fox "
            "(private if new); NO token found: run `hf auth login`") in out
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    assert main(["plan", LORA, *push, "hub.private=false", "--json"]) == 0
    hub = json.loads(capsys.readouterr().out)["hub"]
    assert hub == {"repo": "me/fox", "private": False, "at_end": True, "checkpoints": False,
                   "token_found": True}


def test_plan_sees_files_already_in_the_hub_cache(offline_hub, capsys) -> None:
    repo = offline_hub / "models--stabilityai--stable-cascade"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "effnet_encoder.safetensors").write_bytes(b"x")
    assert main(["plan", LORA]) == 0
    out = capsys.readouterr().out
    assert "model.effnet: hub stabilityai/stable-cascade@main (in the local HF cache)" in out
    assert "effnet_encoder.safetensors  [cached: effnet_encoder.safetensors]" in out
    assert "previewer.safetensors  [not cached]" in out


def test_plan_with_local_data_shows_buckets_steps_and_memory(offline_hub, photos, capsys) -> None:
    run_length = ["training.max_steps=10", "training.scheduler.warmup_steps=2"]
    assert main(["plan", LORA, *local_data(photos), *run_length]) == 0
    out = capsys.readouterr().out
    assert "4 samples" in out
    assert "skipped 1: 1 x missing caption file (e.g. nocap.png)" in out
    assert "filtered 1: 1 x below minimum_image_size (e.g. tiny.png)" in out
    assert "my_subject: 24x24 cells  1024x1024 px  encoder 768x768  2" in out
    assert "my_subject: 21x28 cells" in out and "my_subject: 32x18 cells" in out
    steps = "steps: 3 batches per epoch (batch 4, gradient accumulation 1), 10 optimizer steps in total"
    assert steps + " = 3.33 epochs" in out
    assert "4 captions, cached count unknown" in out
    assert "estimated GPU memory (largest bucket" in out and "weights             6.73 GiB  (bf16)" in out
    assert "+ text_encoder      2.59 GiB" in out and "int8 quality cost" not in out


def test_plan_json_parses(offline_hub, photos, capsys) -> None:
    assert main(["plan", LORA, *local_data(photos), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["recipe"]["training"]["batch_size"] == 4
    assert plan["data"][0]["samples"] == 4 and plan["steps"]["per_epoch"] == 3
    assert sum(b["samples"] for b in plan["buckets"]) == 4
    assert plan["sources"][0]["files"][0] == {"pattern": "prior/config.json", "cached": []}
    assert plan["memory"]["weights_gib"] == 6.73 and plan["int8_quality"] is None


def test_plan_int8_shows_the_measured_quality_cost(offline_hub, capsys) -> None:
    assert main(["plan", INT8]) == 0
    out = capsys.readouterr().out
    assert (
        "int8 quality cost (int8): output diff vs bf16 max 0.059 / mean 0.0129 on outputs of mean "
        "magnitude 0.9 (~1.4%)"
    ) in out
    assert "int8-torchao max 0.07 / mean 0.016" in out and "random weights" in out and "2026-11-29" in out
    assert "weights             3.43 GiB  (int8 (int8) + fp32 scales" in out


@pytest.mark.parametrize(
    ("recipe", "overrides", "weights", "peak"),
    [
        (LORA, [], 6.73, 10.3),
        (LORA, ["training.gradient_checkpointing=false"], 6.73, 17.9),
        (INT8, [], 3.45, 7.0),
        (INT8, ["training.gradient_checkpointing=false"], 3.45, 14.6),
        ("fp32", ["training.gradient_checkpointing=false"], 13.42, 34.7),
    ],
)
def test_memory_estimate_reproduces_the_measured_h200_figures(
    recipe, overrides, weights, peak, tmp_path
) -> None:
    """Stage C, batch 4, 24x24 latents, LoRA rank 16 (H200 measurements; fp32 from issue 12's table)."""
    if recipe == "fp32":  # the LoRA recipe with mixed_precision: no (bf16_mode must then be absent)
        data = yaml.safe_load(Path(LORA).read_text())
        data["training"]["precision"] = {"mixed_precision": "no"}
        recipe = tmp_path / "fp32.yaml"
        recipe.write_text(yaml.safe_dump(data))
    spec = read_recipe(recipe, overrides, paths="warn").spec
    est = estimate_memory(spec, prior_sizes(spec), (24, 24), {})
    assert est["weights_gib"] == pytest.approx(weights, abs=0.05)
    assert est["stage_c_step_gib"] == pytest.approx(peak, abs=0.15)


def test_rollout_extra_forwards_are_probability_times_mean_offset() -> None:
    spec = read_recipe(
        LORA,
        [
            "training.scheduled_sampling.enabled=true",
            "training.scheduled_sampling.max_offset=3",
            "training.scheduled_sampling.probability=0.5",
        ],
        paths="warn",
    ).spec
    cost = rollout_cost(spec, 100)
    assert cost["mean_offset"] == 2.0 and cost["extra_forwards_per_step"] == 1.0
    assert cost["extra_sample_forwards_per_step"] == 4.0  # x batch 4
