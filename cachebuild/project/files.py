"""Reading a TOML (or JSON) config file together with the line each table and key is on, so that every refusal
is one line that points at the place to fix: ``cachebuild.toml:12: [[target]] "sdxl": unknown key 'resolutoin'``.

TOML parsers give values, not positions; ``_toml_lines`` finds them with a line scanner that knows tables,
arrays of tables, dotted keys and values spread over several lines. A key it cannot place is reported at its
table's header, and a table it cannot place at the top of the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from cachebuild.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

Where = tuple  # a place in the file: table names and array indices, then a key: ("target", 1, "text", "dtype")


class ProjectError(ConfigError):
    """A config file names something wrong; the message starts with ``file:line:``."""


@dataclass
class ConfigFile:
    """A parsed config file and where its tables and keys are."""

    path: Path
    data: dict
    lines: dict[Where, int] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        """Relative paths in the file are relative to its folder."""
        return self.path.resolve().parent

    def line(self, where: Where) -> int | None:
        """The line of ``where``, or of the nearest table around it that was found."""
        for n in range(len(where), 0, -1):
            if where[:n] in self.lines:
                return self.lines[where[:n]]
            if ("*", where[n - 1]) in self.lines and n == len(where):  # JSON: by key name
                return self.lines[("*", where[n - 1])]
            inside = [line for w, line in self.lines.items() if w[:n] == where[:n]]  # an array's first table
            if inside:
                return min(inside)
        return None

    def error(self, where: Where, message: str) -> ProjectError:
        line = self.line(where)
        return ProjectError(f"{self.path}:{line}: {message}" if line else f"{self.path}: {message}")


def read_config(path: Path) -> ConfigFile:
    """Parse ``path`` (TOML, or JSON for a ``.json`` name).

    Raises:
        ProjectError: the file is missing or not valid TOML/JSON, with the line the parser stopped at.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProjectError(f"{path} not found; pass the config file, or run in the folder that holds it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(f"{path} cannot be read: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            return ConfigFile(path, json.loads(text), _json_lines(text))
        except json.JSONDecodeError as exc:
            raise ProjectError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ProjectError(f"{path}:{match.group(1) if match else '?'}: not valid TOML: {message}") from None
    return ConfigFile(path, data, _toml_lines(text))


_HEADER = re.compile(r"^\s*(\[\[|\[)\s*(.+?)\s*(\]\]|\])\s*(#.*)?$")
_BARE = r"[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'"
_KEY = re.compile(rf"^\s*((?:{_BARE})(?:\s*\.\s*(?:{_BARE}))*)\s*=(.*)$")
_PART = re.compile(_BARE)


def _toml_lines(text: str) -> dict[Where, int]:
    lines: dict[Where, int] = {}
    counts: dict[Where, int] = {}  # array of tables (resolved path) -> index of its current element
    table: Where = ()
    open_string, depth = None, 0  # inside a multi-line string; inside a value's brackets
    for number, line in enumerate(text.splitlines(), 1):
        if open_string:
            open_string = None if open_string in line else open_string
            continue
        if depth > 0:
            depth = max(0, depth + _bracket_balance(line))
            continue
        header = _HEADER.match(line)
        if header and not _KEY.match(line):
            names = tuple(_unquote(p) for p in _PART.findall(header.group(2)))
            table = _resolve(names, counts, new_element=header.group(1) == "[[")
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            lines.setdefault(table + tuple(_unquote(p) for p in _PART.findall(key.group(1))), number)
            value = key.group(2)
            for quote in ('"""', "'''"):
                if value.count(quote) % 2:
                    open_string = quote
            depth = max(0, _bracket_balance(value))
    return lines


def _resolve(names: tuple[str, ...], counts: dict[Where, int], new_element: bool) -> Where:
    """A header's names as a path with array indices: ``[[datasets.subsets]]`` -> ("datasets", 0, "subsets", 2)."""
    path: Where = ()
    for n, name in enumerate(names):
        path = (*path, name)
        if n == len(names) - 1 and new_element:
            counts[path] = counts.get(path, -1) + 1
        if path in counts:
            path = (*path, counts[path])
    return path


def _bracket_balance(text: str) -> int:
    text = re.sub(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'", "", text).split("#", 1)[0]  # strings, then the comment
    return text.count("[") + text.count("{") - text.count("]") - text.count("}")


def _unquote(part: str) -> str:
    return part[1:-1] if part[:1] in "\"'" and len(part) > 1 else part


def _json_lines(text: str) -> dict[Where, int]:
    """JSON keeps no tables to scan: each key name's first line (``("*", key)``), enough to point at it."""
    lines: dict[Where, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        for key in re.findall(r"\"([^\"]+)\"\s*:", line):
            lines.setdefault(("*", key), number)
    return lines
