"""What reading musubi-tuner's and sd-scripts' dataset configs shares: their ``[general]`` / ``[[datasets]]``
layering (a value is looked up from the innermost table out, then the trainer's default), the keys they know, and
the three fates of a key: honoured (it changes what is stored, and cachebuild stores it that way), ignored (it
changes nothing a cache holds: training-time settings) or refused by name (cachebuild cannot store what the
trainer would).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachebuild.project.files import ConfigFile, Where
from cachebuild.project.options import suggest


@dataclass
class Layers:
    """A dataset's (or subset's) tables, innermost first, with where each one is in the file."""

    cf: ConfigFile
    tables: list[tuple[dict, Where]]
    ignored: set[str] = field(default_factory=set)  # keys seen that change nothing stored

    def get(self, key: str, default: Any = None) -> Any:
        """The trainer's lookup: the first table that sets ``key`` to something other than None, else ``default``."""
        for table, _ in self.tables:
            if table.get(key) is not None:
                return table[key]
        return default

    def where(self, key: str) -> Where:
        for table, where in self.tables:
            if key in table:
                return (*where, key)
        return self.tables[0][1]

    def typed(self, key: str, kinds: tuple[type, ...], default: Any, words: str) -> Any:
        value = self.get(key, default)
        if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise self.cf.error(self.where(key), f"'{key}' takes {words}, not {value!r}")
        return value

    def refuse(self, key: str, why: str):
        return self.cf.error(self.where(key), f"'{key}': {why}")


def check_keys(cf: ConfigFile, table: Any, where: Where, known: Iterable[str], trainer: str) -> None:
    """Refuse a key the trainer itself would refuse (its schema allows no others)."""
    known = set(known)
    if not isinstance(table, dict):
        raise cf.error(where, f"expected a table at {'.'.join(str(w) for w in where) or 'the top'}")
    for key in table:
        if key not in known:
            raise cf.error((*where, key), f"unknown key '{key}': not a {trainer} dataset option{suggest(key, known)}")


def resolution(layers: Layers, default: tuple[int, int] | None) -> tuple[int, int]:
    """``resolution = 512`` or ``[W, H]``, as both trainers read it."""
    value = layers.get("resolution", default)
    if value is None:
        raise layers.cf.error(layers.tables[0][1], "'resolution' is not set: set it in [general] or [[datasets]]")
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    raise layers.cf.error(layers.where("resolution"), f"'resolution' takes 512 or [W, H], not {value!r}")


def place(value: str) -> Path:
    """A path from a trainer's config: relative ones from the current folder, as the trainer opens them."""
    return Path(value).expanduser().absolute()


def folder(cf: ConfigFile, value: Any, where: Where, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise cf.error(where, f"'{key}' takes a folder path")
    path = place(value)
    if not path.is_dir():
        raise cf.error(where, f"'{key}' {path} is not a folder")
    return path


def outside_files(image_dir: Path, extensions: Iterable[str]) -> list[str]:
    """Images cachebuild's scan would cache that the trainer never reads: in a subfolder, or of a type outside
    ``extensions`` (its glob: the folder's own files only)."""
    from cachebuild.sources.scan import scan_files

    ext = {e.lower() for e in extensions}
    return [
        f.path for f in scan_files(image_dir).files if "/" in f.path or os.path.splitext(f.path)[1].lower() not in ext
    ]


def cache_root(cf: ConfigFile, out: Path | None, name: str) -> Path:
    """Where cachebuild keeps its own caches for a trainer's config: ``out`` or ``cachebuild-cache`` beside it."""
    return (Path(out) if out is not None else cf.folder / "cachebuild-cache") / name
