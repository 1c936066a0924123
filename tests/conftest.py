"""Shared test fixtures: where the reference facts live, and small helpers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("CASCADE_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))
GOLDEN_DIR = REFERENCE_DIR / "golden"
MANIFEST_DIR = REFERENCE_DIR / "manifests"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference facts not found at {REFERENCE_DIR}; set CASCADE_REFERENCE_DIR")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def golden_dir(reference_dir: Path) -> Path:
    return reference_dir / "golden"


@pytest.fixture(scope="session")
def manifest_dir(reference_dir: Path) -> Path:
    return reference_dir / "manifests"


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield
