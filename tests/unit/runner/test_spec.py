"""The frozen spec dataclasses equal the schema, in both directions, and build from resolved recipes."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import pytest

from runner.recipe import load_schema, read_recipe
from runner.spec import Recipe, build_spec, spec_to_dict

REPO = Path(__file__).resolve().parents[3]
_SCALARS = {"integer": int, "number": float, "string": str, "boolean": bool}


def _split_optional(hint: typing.Any) -> tuple[typing.Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        assert len(args) == 1, hint
        return args[0], len(typing.get_args(hint)) == 2
    return hint, False


def _check(schema: dict, hint: typing.Any, where: str) -> None:
    types_ = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    inner, optional = _split_optional(hint)
    assert optional == ("null" in types_), f"{where}: nullable in schema {types_} vs hint {hint}"
    (kind,) = [t for t in types_ if t != "null"]
    if "enum" in schema:
        assert typing.get_origin(inner) is typing.Literal, f"{where}: enum needs a Literal"
        assert list(typing.get_args(inner)) == [v for v in schema["enum"] if v is not None], where
    elif kind == "object":
        _check_dataclass(schema, inner, where)
    elif kind == "array":
        assert typing.get_origin(inner) is tuple, f"{where}: arrays are tuples, got {inner}"
        item_hint, ellipsis = typing.get_args(inner)
        assert ellipsis is Ellipsis, where
        _check(schema["items"], item_hint, f"{where}[]")
    else:
        assert inner is _SCALARS[kind], f"{where}: {kind} vs {inner}"


def _check_dataclass(schema: dict, cls: type, where: str) -> None:
    assert dataclasses.is_dataclass(cls), f"{where}: object needs a dataclass, got {cls}"
    assert cls.__dataclass_params__.frozen, f"{cls.__name__} must be frozen"
    fields = [f.name for f in dataclasses.fields(cls)]
    assert fields == list(schema["properties"]), f"{where} ({cls.__name__}): fields {fields} != schema keys"
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, (
            f"{cls.__name__}.{f.name}: defaults live in the schema only"
        )
        _check(schema["properties"][f.name], hints[f.name], f"{where}.{f.name}")


def test_spec_equals_schema_both_directions() -> None:
    _check_dataclass(load_schema(), Recipe, "recipe")


@pytest.mark.parametrize("name", ["stage_c_lora.yaml", "quickstart.yaml", "stage_c_full.yaml"])
def test_spec_round_trips_to_the_resolved_dict(name: str) -> None:
    loaded = read_recipe(REPO / "recipes" / name, paths="warn")
    assert spec_to_dict(loaded.spec) == loaded.resolved
    assert build_spec(Recipe, spec_to_dict(loaded.spec)) == loaded.spec
    hash(loaded.spec)


def test_spec_is_frozen_and_numbers_are_floats() -> None:
    spec = read_recipe(REPO / "recipes" / "stage_c_lora.yaml", paths="warn").spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.training.seed = 1  # type: ignore[misc]
    assert isinstance(spec.training.lora.alpha, float)
    assert isinstance(spec.data.sources, tuple)


def test_build_spec_rejects_mismatched_keys() -> None:
    from runner.spec import EmaSpec

    with pytest.raises(ValueError, match="do not match"):
        build_spec(EmaSpec, {"enabled": True})
