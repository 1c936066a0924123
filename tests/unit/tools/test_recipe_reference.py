"""README.md's recipe reference is generated from the schema: it must not go stale."""
from __future__ import annotations

import json


def test_readme_recipe_reference_is_current(tools):
    tool = tools("gen_recipe_reference")
    assert tool.updated_readme(tool.README.read_text(encoding="utf-8")) == tool.README.read_text(
        encoding="utf-8"), "README.md is stale: run python tools/gen_recipe_reference.py"


def test_every_schema_leaf_is_in_the_reference(tools):
    tool = tools("gen_recipe_reference")
    schema = json.loads(tool.SCHEMA.read_text(encoding="utf-8"))
    rendered = tool.render()
    for key in ("training.lora.rank", "data.sources[].crop_style", "validation.prior_guidance",
                "model.previewer.path", "distributed.strategy"):
        assert f"`{key}`" in rendered, key
    assert rendered.count("\n| `") == len(tool.rows(schema, schema))
