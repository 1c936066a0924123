"""Fixtures shared by the unit tests: the tiny random checkpoint folder (built once per session)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

TOOLS_DIR = Path(__file__).resolve().parents[2] / "tools"


def load_tool(name: str) -> ModuleType:
    """A script in tools/ loaded by path (tools/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tools() -> Callable[[str], ModuleType]:
    """`tools(name)`: the script tools/NAME.py as a module."""
    return load_tool


@pytest.fixture(scope="session")
def tiny_checkpoints_tool() -> ModuleType:
    return load_tool("make_tiny_checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_checkpoints_tool) -> Path:
    """A folder laid out like stabilityai/stable-cascade(-prior) with tiny random models (seed 0).

    See tools/make_tiny_checkpoints.py for the layout and dimensions. Treat it as read-only.
    """
    return tiny_checkpoints_tool.make_tiny_checkpoints(tmp_path_factory.mktemp("tiny_checkpoints"), seed=0)


@pytest.fixture(scope="session")
def tiny_cascade_models(tiny_checkpoints):
    """Every model of the tiny checkpoint folder, loaded once (CPU, fp32, eval): treat as read-only."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from cascade_core.decoder_io import load_previewer, load_stage_a, load_stage_b
    from cascade_core.pipeline import CascadeModels
    from cascade_core.stage_c_io import load_stage_c

    root = tiny_checkpoints
    return CascadeModels(
        stage_c=load_stage_c(root / "stage_c.safetensors"),
        text_model=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        previewer=load_previewer(root / "previewer.safetensors"),
        stage_b=load_stage_b(root / "stage_b.safetensors"),
        stage_a=load_stage_a(root / "stage_a.safetensors"),
    )
