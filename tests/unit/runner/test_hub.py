"""Hub sources resolved from a local folder laid out like the huggingface_hub cache (offline)."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from runner.hub import HubError, looks_like_repo_id, model_file_patterns, resolve_model_source

REPO = "stabilityai/stable-cascade-prior"
COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """models--owner--name/{refs/<branch>, snapshots/<commit>/...} as huggingface_hub writes it."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    for ref, commit in (("main", COMMIT_MAIN), ("v1", COMMIT_V1)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        prior = repo / "snapshots" / commit / "prior"
        prior.mkdir(parents=True)
        (prior / "config.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, prior / "diffusion_pytorch_model.safetensors")
        save_file({"w": torch.zeros(2)}, repo / "snapshots" / commit / "stage_c_lite.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_subfolder_resolves_to_the_cached_snapshot(hub_cache):
    root = resolve_model_source(REPO, subfolder="prior")
    assert root == hub_cache / "snapshots" / COMMIT_MAIN
    assert (root / "prior" / "diffusion_pytorch_model.safetensors").is_file()


def test_revision_is_pinned(hub_cache):
    assert resolve_model_source(REPO, subfolder="prior", revision="v1") == hub_cache / "snapshots" / COMMIT_V1
    assert resolve_model_source(REPO, revision=COMMIT_V1, filename="stage_c_lite.safetensors") == (
        hub_cache / "snapshots" / COMMIT_V1 / "stage_c_lite.safetensors"
    )


def test_offline_and_not_cached_gives_actionable_error(hub_cache):
    with pytest.raises(
        HubError, match=r"not in the local cache and offline mode is on.*hf download someone/other"
    ):
        resolve_model_source("someone/other", subfolder="prior")


def test_missing_files_in_cached_snapshot(hub_cache):
    with pytest.raises(HubError, match="no matching files"):
        resolve_model_source(REPO, subfolder="prior_lite", local_files_only=True)


def test_local_paths_win_over_repo_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert not looks_like_repo_id("org/model")
    assert resolve_model_source("org/model") == tmp_path / "org" / "model"
    assert looks_like_repo_id("org/other")
    with pytest.raises(HubError, match="neither an existing path"):
        resolve_model_source(str(tmp_path / "missing" / "x" / "y"))


def test_patterns_fetch_only_one_variant():
    plain = model_file_patterns("prior")
    assert "prior/diffusion_pytorch_model.safetensors" in plain and "prior/config.json" in plain
    assert not any("bf16" in p for p in plain)
    bf16 = model_file_patterns("prior", variant="bf16")
    assert "prior/diffusion_pytorch_model.bf16.safetensors" in bf16
    assert model_file_patterns(filename="stage_c_bf16.safetensors") == ["stage_c_bf16.safetensors"]


def test_text_encoder_and_tokenizer_folders_fetch_their_own_files():
    from runner.hub import folder_kind, model_file_patterns

    assert folder_kind("prior") == "diffusers" and folder_kind("text_encoder") == "transformers"
    assert folder_kind("tokenizer_2") == "tokenizer"
    assert "text_encoder/model.safetensors" in model_file_patterns("text_encoder")
    assert "text_encoder/model.safetensors.index.json" in model_file_patterns("text_encoder")
    assert {"tokenizer/vocab.json", "tokenizer/merges.txt"} <= set(model_file_patterns("tokenizer"))
    assert "prior/diffusion_pytorch_model.safetensors" in model_file_patterns("prior")
