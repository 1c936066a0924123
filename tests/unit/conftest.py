"""Fixtures shared by the unit tests: the tiny random checkpoint folder (built once per session)."""

from __future__ import annotations

import importlib.util
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
def tiny_checkpoints_tool() -> ModuleType:
    return load_tool("make_tiny_checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_checkpoints_tool) -> Path:
    """A folder laid out like stabilityai/stable-cascade(-prior) with tiny random models (seed 0).

    See tools/make_tiny_checkpoints.py for the layout and dimensions. Treat it as read-only.
    """
    return tiny_checkpoints_tool.make_tiny_checkpoints(tmp_path_factory.mktemp("tiny_checkpoints"), seed=0)
