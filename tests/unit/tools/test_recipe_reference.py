"""README.md's recipe reference is generated from the schema: it must not go stale."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[3] / "tools" / "gen_recipe_reference.py"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_recipe_reference_is_current():
    tool = load_tool("gen_recipe_reference")
    assert tool.updated_readme(tool.README.read_text(encoding="utf-8")) == tool.README.read_text(
        encoding="utf-8"), "README.md is stale: run python tools/gen_recipe_reference.py"


def test_every_schema_leaf_is_in_the_reference():
    tool = load_tool("gen_recipe_reference")
    schema = json.loads(tool.SCHEMA.read_text(encoding="utf-8"))
    rendered = tool.render()
    for key in ("training.lora.rank", "data.sources[].crop_style", "validation.prior_guidance",
                "model.previewer.path", "distributed.strategy"):
        assert f"`{key}`" in rendered, key
    assert rendered.count("\n| `") == len(tool.rows(schema, schema))
