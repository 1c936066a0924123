"""Recipe loading: YAML -> command-line overrides -> schema -> defaults -> cross-field rules -> frozen spec.

Every problem is collected and reported at once, each with its YAML path, its file:line:column (or the
command-line override it came from), what was expected and, for unknown keys, a did-you-mean. The schema
(`schemas/recipe.schema.json`) is the only place defaults live.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml

from runner.errors import UserError
from runner.spec import Recipe, build_spec

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "recipe.schema.json"
PathMode = Literal["error", "warn"]
YamlPath = tuple[str | int, ...]


def format_path(path: YamlPath) -> str:
    """`data.sources[0].path` style, as users read it; `<recipe>` for the top level."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<recipe>"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where (`file:line:column` or the override), what, and the fix."""

    path: str
    location: str
    message: str

    def render(self) -> str:
        return f"{self.location}: {self.path}: {self.message}"


class RecipeError(UserError):
    """A recipe with problems; `problems` lists all of them, `str()` is the full report."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        super().__init__("\n".join([f"{source}: {count}"] + ["  " + p.render() for p in self.problems]))


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe: the frozen spec, the resolved plain dict (defaults filled), and warnings."""

    spec: Recipe
    resolved: dict[str, Any]
    warnings: tuple[Problem, ...]
    source: str


# ---------------------------------------------------------------- YAML with YAML 1.2 scalars
class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars: `1e-4` is a float and `no`/`off`/`yes` stay strings
    (PyYAML follows YAML 1.1, where `1e-4` is a string and `mixed_precision: no` would be False)."""


_Loader.yaml_implicit_resolvers = {
    ch: [
        (tag, rx)
        for tag, rx in resolvers
        if tag not in {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int"}
    ]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$|^0x[0-9a-fA-F_]+$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*|[0-9][0-9_]*(?=[eE]))(?:[eE][-+]?[0-9]+)?$"
        r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def parse_scalar(text: str) -> Any:
    """A command-line value read as YAML (`1e-4` -> float, `null` -> None, `[a, b]` -> list)."""
    return yaml.load(text, Loader=_Loader)


class _Marks:
    """Where each YAML path was written: the key's and the value's `file:line:column`."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.keys: dict[YamlPath, str] = {}
        self.values: dict[YamlPath, str] = {(): f"{source}:1:1"}

    def at(self, mark: yaml.Mark) -> str:
        return f"{self.source}:{mark.line + 1}:{mark.column + 1}"

    def walk(self, node: yaml.Node, path: YamlPath, problems: list[Problem]) -> None:
        self.values[path] = self.at(node.start_mark)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = key_node.value
                if key in seen:
                    problems.append(
                        Problem(
                            format_path(path + (key,)),
                            self.at(key_node.start_mark),
                            f"key '{key}' appears twice in this section; keep one",
                        )
                    )
                seen.add(key)
                self.keys[path + (key,)] = self.at(key_node.start_mark)
                self.walk(value_node, path + (key,), problems)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, path + (i,), problems)

    def locate(self, path: YamlPath, key: bool = False) -> str:
        """The closest known location: the path itself, else its nearest written ancestor."""
        if key and path in self.keys:
            return self.keys[path]
        while path not in self.values:
            path = path[:-1]
        return self.values[path]

    def override(self, path: YamlPath, text: str) -> None:
        for known in [p for p in self.values if p[: len(path)] == path]:
            del self.values[known]
        self.keys[path] = self.values[path] = f"command line `{text}`"


def _read_yaml(path: Path) -> tuple[Any, _Marks, list[Problem]]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"recipe file {source} does not exist; check the path (recipes live in recipes/)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read recipe {source}: {e}") from None
    marks = _Marks(source)
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = marks.at(mark) if mark else source
        raise RecipeError(source, [Problem("<recipe>", where, f"not valid YAML: {e.problem or e}")]) from None
    problems: list[Problem] = []
    if node is not None:
        marks.walk(node, (), problems)
    return data, marks, problems


# ---------------------------------------------------------------- overrides
def apply_override(data: dict[str, Any], text: str, marks: _Marks) -> None:
    """Apply one `dotted.key=value` (list items by index: `data.sources.0.repeats=3`); raises UserError."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override `{text}` is not KEY=VALUE (e.g. training.learning_rate=5e-5)")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise UserError(f"override `{text}`: empty part in key `{key}` (write a.b.c=VALUE)")
    value = parse_scalar(raw)
    node: Any = data
    path: YamlPath = ()
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(
                    f"override `{text}`: {format_path(path)} is a list of {len(node)} item(s); "
                    f"use an index from 0 to {len(node) - 1} instead of `{part}`"
                )
            step: str | int = int(part)
        elif isinstance(node, dict):
            step = part
        else:
            raise UserError(
                f"override `{text}`: {format_path(path)} is a {type(node).__name__}, not a section, "
                f"so it has no key `{part}`"
            )
        path += (step,)
        if last:
            node[step] = value
        else:
            if isinstance(node, dict) and step not in node:
                node[step] = {}
            node = node[step]
    marks.override(path, text)


# ---------------------------------------------------------------- schema
@cache
def load_schema() -> dict[str, Any]:
    """The recipe schema (parsed once)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@cache
def _simpletuner_names() -> dict[str, str]:
    """SimpleTuner option name -> our dotted path, from the schema descriptions (for did-you-mean)."""
    out: dict[str, str] = {}

    def walk(schema: dict[str, Any], path: str) -> None:
        for name, sub in schema.get("properties", {}).items():
            here = f"{path}.{name}" if path else name
            for st in re.findall(r"SimpleTuner `([a-z0-9_]+)", sub.get("description", "")):
                out.setdefault(st, here)
            walk(sub, here)
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], path + "[N]")

    walk(load_schema(), "")
    return out


_JSON_TYPES = {
    dict: "a section (mapping)",
    list: "a list",
    str: "a string",
    bool: "true/false",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def _describe(value: Any) -> str:
    kind = _JSON_TYPES.get(type(value), type(value).__name__)
    return kind if isinstance(value, dict | list) else f"{kind} {json.dumps(value)}"


# Keys earlier versions accepted, with what to do instead (a plain "unknown key" would leave users guessing).
RETIRED_KEYS = {
    "data.shuffle_buffer": "it had no effect and is gone: each epoch's whole plan is shuffled from the seed "
                           "(exactly resumable), so delete the key",
}


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _schema_problems(error: jsonschema.ValidationError, marks: _Marks) -> list[Problem]:
    path: YamlPath = tuple(error.absolute_path)
    kind, schema, value = error.validator, error.schema, error.instance
    if kind == "additionalProperties":
        allowed = list(schema.get("properties", {}))
        out = []
        for key in [k for k in value if k not in allowed]:
            st = _simpletuner_names().get(str(key))
            retired = RETIRED_KEYS.get(format_path(tuple(p for p in path if not isinstance(p, int)) + (key,)))
            if retired:
                hint = f"; {retired}"
            elif st:
                hint = f"; `{key}` is SimpleTuner's name: here it is `{st}`"
            else:
                hint = _suggest(str(key), allowed)
            if not hint:
                hint = "; allowed keys here: " + ", ".join(allowed)
            out.append(
                Problem(
                    format_path(path + (key,)),
                    marks.locate(path + (key,), key=True),
                    f"unknown key '{key}'{hint}",
                )
            )
        return out
    if kind == "required":
        missing = error.validator_value
        keys = [k for k in missing if isinstance(value, dict) and k not in value]
        return [
            Problem(
                format_path(path + (k,)),
                marks.locate(path),
                f"missing required key '{k}' ({schema['properties'][k]['description']})",
            )
            for k in keys
        ]
    got = _describe(value)
    expected = {
        "type": lambda v: (
            "expected "
            + " or ".join(
                _JSON_TYPES[
                    {
                        "object": dict,
                        "array": list,
                        "string": str,
                        "boolean": bool,
                        "integer": int,
                        "number": float,
                        "null": type(None),
                    }[t]
                ]
                for t in ([v] if isinstance(v, str) else v)
            )
        ),
        "enum": lambda v: "expected one of " + ", ".join(json.dumps(x) for x in v),
        "minimum": lambda v: f"expected a value >= {v}",
        "maximum": lambda v: f"expected a value <= {v}",
        "exclusiveMinimum": lambda v: f"expected a value > {v}",
        "exclusiveMaximum": lambda v: f"expected a value < {v}",
        "multipleOf": lambda v: f"expected a multiple of {v}",
        "minItems": lambda v: f"expected at least {v} item(s)",
        "maxItems": lambda v: f"expected at most {v} item(s)",
        "uniqueItems": lambda v: "expected no repeated items",
        "minLength": lambda v: "expected a non-empty string",
        "pattern": lambda v: f"expected text matching {v}",
    }.get(kind)
    message = f"{expected(error.validator_value)}, got {got}" if expected else error.message
    if kind == "type" and isinstance(value, str) and _looks_numeric(value):
        message += " (remove the quotes to make it a number)"
    if kind == "type" and isinstance(value, str) and value.lower() in ("yes", "no", "on", "off"):
        message += " (write true or false)"
    if kind == "enum" and isinstance(value, str):
        message += _suggest(value, [str(x) for x in error.validator_value])
    return [Problem(format_path(path), marks.locate(path), message)]


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def fill_defaults(schema: dict[str, Any], value: Any) -> None:
    """Add every missing key that has a schema default, recursively (in place)."""
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                fill_defaults(sub, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            fill_defaults(schema["items"], item)


# ---------------------------------------------------------------- entry points
def read_recipe(
    path: str | Path, overrides: Sequence[str] = (), *, paths: PathMode = "error"
) -> LoadedRecipe:
    """Load, override, validate and resolve a recipe; raise RecipeError listing every problem.

    `paths="warn"` turns "this local file or folder does not exist" into warnings (`runner validate` and
    `runner plan`, so recipes validate before their data is made); training uses "error".
    """
    from runner.recipe_rules import cross_field_problems, path_problems

    data, marks, problems = _read_yaml(Path(path))
    source = marks.source
    if data is None:
        raise RecipeError(
            source,
            [
                Problem(
                    "<recipe>",
                    f"{source}:1:1",
                    "the recipe is empty; start from a file in recipes/ (e.g. recipes/stage_c_lora.yaml)",
                )
            ],
        )
    if not isinstance(data, dict):
        raise RecipeError(
            source,
            [
                Problem(
                    "<recipe>",
                    f"{source}:1:1",
                    f"expected a mapping of sections (model:, training:, data: ...), got {_describe(data)}",
                )
            ],
        )
    for text in overrides:
        apply_override(data, text, marks)
    raw = copy.deepcopy(data)
    validator = jsonschema.Draft202012Validator(load_schema())
    for error in validator.iter_errors(data):
        problems.extend(_schema_problems(error, marks))
    if problems:
        raise RecipeError(source, _sorted(problems))
    fill_defaults(load_schema(), data)
    spec = build_spec(Recipe, data)
    for rule_path, message in cross_field_problems(spec, raw):
        problems.append(Problem(format_path(rule_path), marks.locate(rule_path), message))
    found = [Problem(format_path(p), marks.locate(p), m) for p, m in path_problems(spec)]
    if paths == "error":
        problems.extend(found)
    if problems:
        raise RecipeError(source, _sorted(problems))
    warnings = tuple(_sorted(found)) if paths == "warn" else ()
    return LoadedRecipe(spec=spec, resolved=data, warnings=warnings, source=source)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """The frozen spec of a recipe that is ready to run (missing local paths are errors)."""
    return read_recipe(path, overrides, paths="error").spec


def _sorted(problems: list[Problem]) -> list[Problem]:
    def key(p: Problem) -> tuple[int, int, int, str]:
        m = re.search(r":(\d+):(\d+)$", p.location)
        return (0, int(m[1]), int(m[2]), p.path) if m else (1, 0, 0, p.path)

    return sorted(problems, key=key)
