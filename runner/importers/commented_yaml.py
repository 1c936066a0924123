"""A small YAML writer that puts a comment above chosen keys (for lossy mappings in imported recipes).

PyYAML cannot emit comments; recipes are plain mappings, lists and scalars, so writing them is short.
Scalars are written so that the recipe loader reads them back as the same values.
"""

from __future__ import annotations

import json
import re
from typing import Any

from runner.recipe import parse_scalar

Path_ = tuple[str | int, ...]
_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./ +-]*(?<! )$")


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text) and parse_scalar(text) == text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _comment(lines: list[str], indent: str, text: str | None) -> None:
    if text:
        lines.extend(f"{indent}# {line}".rstrip() for line in text.splitlines())


def _is_flat_list(value: Any) -> bool:
    return isinstance(value, list) and all(not isinstance(v, dict | list) for v in value)


def _emit(value: Any, path: Path_, indent: str, notes: dict[Path_, str], lines: list[str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            here = path + (key,)
            _comment(lines, indent, notes.get(here))
            if isinstance(item, dict) and item:
                lines.append(f"{indent}{key}:")
                _emit(item, here, indent + "  ", notes, lines)
            elif isinstance(item, list) and item and not _is_flat_list(item):
                lines.append(f"{indent}{key}:")
                _emit(item, here, indent + "  ", notes, lines)
            else:
                lines.append(f"{indent}{key}: {_inline(item)}")
    else:
        for i, item in enumerate(value):
            here = path + (i,)
            _comment(lines, indent, notes.get(here))
            if isinstance(item, dict) and item:
                sub: list[str] = []
                _emit(item, here, indent + "  ", notes, sub)
                first = next(n for n, line in enumerate(sub) if not line.lstrip().startswith("#"))
                sub[first] = f"{indent}- " + sub[first][len(indent) + 2 :]
                lines.extend(sub)
            else:
                lines.append(f"{indent}- {_inline(item)}")


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return _scalar(value)


def render(data: dict[str, Any], notes: dict[Path_, str], header: str) -> str:
    """`data` as block YAML, each `notes[path]` as a comment above that key, `header` as opening comments."""
    lines: list[str] = []
    _comment(lines, "", header)
    lines.append("")
    _emit(data, (), "", notes, lines)
    return "\n".join(lines) + "\n"
