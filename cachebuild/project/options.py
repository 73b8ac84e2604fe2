"""A project file's option keys, mapped onto the config dataclasses by their fields and types.

Nothing here lists the options: every field of ``LatentsConfig`` and ``TextencConfig`` (nested dataclasses such as
``BucketConfig`` and ``ModelSpec`` flattened into their own fields) is a key, named as the command line names it
(``--bucket-reso-steps`` is ``bucket_reso_steps``) and checked against the field's type. An option added to a
config is a key of the file the day it lands. ``CLI_NAMES`` holds only the few fields whose command-line name
differs from the field's.

Example:
    >>> option_table()["resolution"][0].path
    ('buckets', 'resolution')
    >>> coerce(512, option_table()["resolution"][0].type, Path("."))
    (512, 512)
"""

from __future__ import annotations

import difflib
import enum
import functools
import types
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from cachebuild.config import LatentsConfig, TextencConfig

STORES = {"latents": LatentsConfig, "text": TextencConfig}
PLACED = frozenset({"dataset", "out", "source"})  # given by the file's structure: a dataset's path, a target's out
CLI_NAMES = {  # field path -> the command line's name for it, where the two differ
    "buckets.steps": "bucket_reso_steps",
    "buckets.min_reso": "min_bucket_reso",
    "buckets.max_reso": "max_bucket_reso",
    "buckets.no_upscale": "bucket_no_upscale",
    "buckets.rule": "buckets",
    "flip": "flip_aug",
    "hash_files": "hash",
    "vram_budget_gb": "vram_budget",
}
LOCATIONS = frozenset({"model", "vae", "vae_config", "text_encoder", "tokenizer"})  # a preset or hub id, or a
# local folder: relative to the project file when such a folder exists there
AUTO = "auto"  # the value that leaves an option whose default is automatic (None) at that default


@dataclass(frozen=True)
class Option:
    """One key's place in one config: ``path`` names the field (nested: ``("buckets", "steps")``)."""

    key: str
    store: str  # "latents" or "text"
    path: tuple[str, ...]
    type: Any


class TypeProblem(Exception):
    """A value does not fit a key's type; the message says what the key takes."""


@functools.cache
def option_table() -> dict[str, tuple[Option, ...]]:
    """Every key, with the config field (one per store that has it) it sets."""
    table: dict[str, list[Option]] = {}
    for store, cls in STORES.items():
        for path, tp in _leaves(cls, ()):
            if path[0] in PLACED:
                continue
            key = CLI_NAMES.get(".".join(path), path[-1])
            if any(o.store == store for o in table.get(key, ())):  # two fields claim one key: a naming bug
                raise RuntimeError(f"internal: key {key!r} names two fields of {cls.__name__}")
            table.setdefault(key, []).append(Option(key, store, path, tp))
    return {k: tuple(v) for k, v in table.items()}


def suggest(key: str, known: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a close known key, or nothing."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(value: Any, tp: Any, base: Path) -> Any:
    """``value`` as read from TOML, made the field type ``tp``; relative paths are under ``base``.

    Raises:
        TypeProblem: naming what the key takes.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if value == AUTO and len(arms) < len(typing.get_args(tp)) and not _auto_member(arms):
            return None  # an enum with an "auto" member keeps it (t5_dtype = "auto" is DType.AUTO, as on the CLI)
        for arm in arms:
            try:
                return coerce(value, arm, base)
            except TypeProblem:
                continue
        raise TypeProblem(describe(tp))
    if _fits(value, tp):
        return _plain(value, tp, base)
    if origin is tuple:
        return _tuple(value, typing.get_args(tp), base, tp)
    raise TypeProblem(describe(tp))


def describe(tp: Any) -> str:
    """What a key of type ``tp`` takes, in words."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(arms) < len(typing.get_args(tp)) and not _auto_member(arms)
        auto = f' or "{AUTO}"' if optional else ""
        return " or ".join(describe(a) for a in arms) + auto
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{describe(args[0])} or a list of them"
        return f"{describe(args[0])} or a list of {len(args)}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(f'"{m.value}"' for m in tp)
    return _WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def make_config(store: str, values: dict[str, Any], placed: dict[str, Any]):
    """The ``store``'s config from ``values`` ({key: coerced value}; keys of other stores are skipped) and the
    ``placed`` fields. Raises the config's own ``ConfigError`` for values its ``__post_init__`` refuses."""
    by_path = {}
    for key, value in values.items():
        for opt in option_table().get(key, ()):
            if opt.store == store:
                by_path[opt.path] = value
    return _construct(STORES[store], by_path, placed, ())


def applies_to(key: str) -> set[str]:
    """The stores whose config has ``key``."""
    return {o.store for o in option_table().get(key, ())}


_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", Path: "a path"}


def _auto_member(arms: list) -> bool:
    """Whether one of ``arms`` is an enum with an "auto" member (which "auto" then means)."""
    return any(isinstance(a, type) and issubclass(a, enum.Enum) and _fits(AUTO, a) for a in arms)


def _fits(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp in (str, Path):
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, str) and value in {m.value for m in tp}
    return False


def _plain(value: Any, tp: Any, base: Path) -> Any:
    if tp is float:
        return float(value)
    if tp is Path:
        from cachebuild.storage import as_location, is_url

        return as_location(value) if is_url(value) else _under(base, value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    return value


def _tuple(value: Any, args: tuple, base: Path, tp: Any) -> tuple:
    """A list (or one value, repeated for a fixed tuple of one type, as ``resolution = 512``) as a tuple."""
    if len(args) == 2 and args[1] is Ellipsis:
        items, kinds = (value if isinstance(value, list) else [value]), None
        kinds = [args[0]] * len(items)
    elif isinstance(value, list):
        items, kinds = value, list(args)
    elif len(set(args)) == 1:
        items, kinds = [value] * len(args), list(args)
    else:
        raise TypeProblem(describe(tp))
    if len(items) != len(kinds) or not items:
        raise TypeProblem(describe(tp))
    try:
        return tuple(coerce(v, k, base) for v, k in zip(items, kinds, strict=True))
    except TypeProblem:
        raise TypeProblem(describe(tp)) from None


def _under(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _leaves(cls: type, prefix: tuple[str, ...]) -> typing.Iterator[tuple[tuple[str, ...], Any]]:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        nested = _nested_class(hints[f.name])
        if nested is not None:
            yield from _leaves(nested, (*prefix, f.name))
        else:
            yield (*prefix, f.name), hints[f.name]


def _nested_class(tp: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), or None for a plain field."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = arms[0] if len(arms) == 1 else None
    return tp if isinstance(tp, type) and is_dataclass(tp) else None


def _construct(cls: type, by_path: dict, placed: dict, prefix: tuple[str, ...]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        path = (*prefix, f.name)
        if not prefix and f.name in placed:
            kwargs[f.name] = placed[f.name]
            continue
        nested = _nested_class(hints[f.name])
        if nested is None:
            if path in by_path:
                kwargs[f.name] = by_path[path]
            continue
        inner = {p: v for p, v in by_path.items() if p[: len(path)] == path}
        if inner or (f.default is MISSING and f.default_factory is MISSING):
            kwargs[f.name] = _construct(nested, inner, {}, path)
    return cls(**kwargs)
