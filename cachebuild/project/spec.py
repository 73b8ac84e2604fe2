"""A project: the caches a file declares, each a finished config, and the exports made from them.

``cachebuild.toml`` holds three kinds of tables (docs/project.md has a complete example):

* ``[[dataset]]``: ``path`` (a folder or URL), ``name``, ``captions`` (where the text comes from, if not the
  folder itself), and any option of the ``latents``/``textenc`` commands (``resolution``, ``caption_ext``, ...);
* ``[[target]]``: ``name``, ``datasets`` (default: all), ``caches`` (``latents``, ``text``), ``out`` (default
  ``cache/{target}/{dataset}``), any option, and a ``[target.text]`` table of options for its text cache alone;
* ``[[export]]``: ``target``, ``format`` (kohya, musubi, webdataset), ``to``, ``datasets`` and that export's own
  options (``arch``, ``family``, ``overwrite``, ...).

Options at the top of the file apply to every cache; a dataset's override them, a target's override those.
Every key and value is checked before anything is built: an unknown key or a wrong type is refused in one line
that names the key and its line.
"""

from __future__ import annotations

import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachebuild.config import LatentsConfig, TextencConfig
from cachebuild.errors import ConfigError
from cachebuild.project.files import ConfigFile, ProjectError, Where, read_config
from cachebuild.project.options import (
    LOCATIONS,
    STORES,
    TypeProblem,
    applies_to,
    coerce,
    describe,
    make_config,
    option_table,
    suggest,
)
from cachebuild.storage import as_location, is_url

DEFAULT_FILE = "cachebuild.toml"
DEFAULT_OUT = "cache/{target}/{dataset}"
CACHE_KINDS = ("latents", "text")
EXPORTS = {  # format -> (module, function): the export's keyword parameters are the export table's keys
    "kohya": ("cachebuild.consumers.export.kohya", "export_kohya"),
    "musubi": ("cachebuild.consumers.export.musubi", "export_musubi"),
    "webdataset": ("cachebuild.consumers.export.webdataset", "export_webdataset"),
}
IGNORED = {"num_repeats": "how often a trainer repeats an image changes nothing a cache stores"}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: Any  # Path, or storage.UrlPath
    captions: Any  # the text caches' source: the folder itself, a metadata file, or a caption folder


@dataclass(frozen=True)
class CacheSpec:
    """One cache folder: a target over a dataset, with the configs of the stores it builds."""

    target: str
    dataset: str
    out: Any
    latents: LatentsConfig | None
    text: TextencConfig | None

    @property
    def label(self) -> str:
        return f"{self.target}/{self.dataset}"


@dataclass(frozen=True)
class ExportSpec:
    target: str
    dataset: str
    format: str
    cache: Any
    to: Any
    options: dict

    @property
    def label(self) -> str:
        return f"{self.target}/{self.dataset} -> {self.format}"


@dataclass(frozen=True)
class Project:
    source: Path  # the file it was read from
    datasets: tuple[DatasetSpec, ...]
    caches: tuple[CacheSpec, ...]
    exports: tuple[ExportSpec, ...] = ()
    notes: tuple[str, ...] = ()  # what was ignored, and why (trainer configs)


def load_project(path: Path) -> Project:
    """Read and check a ``cachebuild.toml``; every config is built (and so checked) here.

    Raises:
        ProjectError: with ``file:line:`` and the key to fix.
    """
    cf = read_config(path)
    _table(cf, cf.data, (), {"dataset", "target", "export"})
    top = option_values(cf, _options(cf.data, {"dataset", "target", "export"}), ())
    datasets = [_dataset(cf, table, ("dataset", i)) for i, table in enumerate(_array(cf, "dataset"))]
    if not datasets:
        raise cf.error((), "no [[dataset]] table: declare at least one dataset (path = ...)")
    _unique(cf, [(d.name, where) for d, _, where in datasets], "dataset")
    caches = []
    targets = _array(cf, "target")
    _unique(cf, [(t.get("name"), ("target", i)) for i, t in enumerate(targets) if isinstance(t, dict)], "target")
    for i, table in enumerate(targets):
        caches += _target_caches(cf, table, ("target", i), top, datasets)
    if not caches:
        raise cf.error((), "no [[target]] table: declare at least one target (name = ..., model = ...)")
    check_outs(cf, caches)
    exports = []
    for i, table in enumerate(_array(cf, "export")):
        exports += _exports(cf, table, ("export", i), caches, {d.name: d for d, _, _ in datasets})
    return Project(cf.path, tuple(d for d, _, _ in datasets), tuple(caches), tuple(exports))


def option_values(cf: ConfigFile, table: dict, where: Where) -> dict[str, dict[str, Any]]:
    """``{store: {key: value}}`` for the option keys of ``table``, each value made its field's type; a value is
    applied to every store whose field it fits (``batch_size = "auto"`` is the latents' auto alone)."""
    out: dict[str, dict[str, Any]] = {store: {} for store in STORES}
    for key, value in table.items():
        opts = option_table().get(key, ())
        if key in LOCATIONS and isinstance(value, str):
            value = _locate(value, cf.folder)
        fitted = 0
        for opt in opts:
            try:
                out[opt.store][key] = coerce(value, opt.type, cf.folder)
                fitted += 1
            except TypeProblem:
                continue
        if opts and not fitted:
            raise cf.error((*where, key), f"'{key}' takes {describe(opts[0].type)}, not {_shown(value)}")
    if "devices" in out["latents"]:  # "all" and names checked as the command line checks them
        from cachebuild.engines.devices import parse_devices

        try:
            out["latents"]["devices"] = parse_devices(",".join(out["latents"]["devices"]))
        except ConfigError as exc:
            raise cf.error((*where, "devices"), file_keys(str(exc))) from None
    return out


def build_config(
    cf: ConfigFile, store: str, values: dict, placed: dict, where: Where, what: str, origins: dict | None = None
):
    """The store's config, its ``__post_init__`` refusal turned into a line of the file: the command line's
    ``--option`` names in it become the file's keys, and the line is where the first key it names was set
    (``origins``: key -> where), else ``where``."""
    try:
        return make_config(store, values, placed)
    except ProjectError:
        raise
    except ConfigError as exc:
        message = file_keys(str(exc))
        named = [k for k in re.findall(r"[a-z][a-z0-9_]*", message) if k in (origins or {})]
        raise cf.error(origins[named[0]] if named else where, f"{what}: {message}") from None


def file_keys(message: str) -> str:
    """``--bucket-reso-steps`` in a message becomes ``bucket_reso_steps`` where that is a key of the file."""

    def swap(m: re.Match) -> str:
        key = m.group(1).replace("-", "_")
        return key if key in option_table() else m.group(0)

    return re.sub(r"--([a-z0-9][a-z0-9-]*)", swap, message)


def check_outs(cf: ConfigFile, caches: list[CacheSpec]) -> None:
    seen: dict[str, str] = {}
    for c in caches:
        out = str(c.out)
        if out in seen:
            raise cf.error((), f"{seen[out]} and {c.label} both write to {out}; give one of them another out")
        seen[out] = c.label


def _dataset(cf: ConfigFile, table: dict, where: Where) -> tuple[DatasetSpec, dict, Where]:
    _table(cf, table, where, {"name", "path", "captions", *IGNORED})
    path = _required_str(cf, table, where, "path", "a folder or URL of images")
    location = _place(path, cf.folder)
    name = _str(cf, table, where, "name") or Path(str(path).rstrip("/")).name
    captions = _str(cf, table, where, "captions")
    spec = DatasetSpec(name, location, _place(captions, cf.folder) if captions else location)
    return spec, option_values(cf, _options(table, {"name", "path", "captions", *IGNORED}), where), where


def _target_caches(cf: ConfigFile, table: dict, where: Where, top: dict, datasets: list) -> list[CacheSpec]:
    _table(cf, table, where, {"name", "datasets", "caches", "out", "text"})
    name = _required_str(cf, table, where, "name", "the target's name")
    own = option_values(cf, _options(table, {"name", "datasets", "caches", "out", "text"}), where)
    text_only = table.get("text", {})
    if not isinstance(text_only, dict):
        raise cf.error((*where, "text"), "'text' takes a table ([target.text]) of options for the text cache alone")
    _table(cf, text_only, (*where, "text"), set(), stores={"text"})
    text_own = option_values(cf, text_only, (*where, "text"))["text"]
    chosen = _chosen_datasets(cf, table, where, [d for d, _, _ in datasets])
    kinds = _kinds(cf, table, where, {**top["latents"], **own["latents"], **own["text"]})
    template = _str(cf, table, where, "out") or DEFAULT_OUT
    if len(chosen) > 1 and "{dataset}" not in template:
        raise cf.error((*where, "out"), f"target {name!r} builds {len(chosen)} datasets into one out; add {{dataset}}")
    caches = []
    for ds, ds_values, ds_where in datasets:
        if ds.name not in chosen:
            continue
        out = _place(template.format(target=name, dataset=ds.name), cf.folder)
        what = f'target "{name}", dataset "{ds.name}"'
        merged = {s: {**top[s], **ds_values[s], **own[s]} for s in STORES}
        origins = _origins([((), top), (ds_where, ds_values), (where, own), ((*where, "text"), {"text": text_own})])
        latents = text = None
        if "latents" in kinds:
            placed = {"dataset": ds.path, "out": out}
            latents = build_config(cf, "latents", merged["latents"], placed, where, what, origins)
        if "text" in kinds:
            placed = {"source": ds.captions, "out": out}
            text = build_config(cf, "text", merged["text"] | text_own, placed, where, what, origins)
        caches.append(CacheSpec(name, ds.name, out, latents, text))
    return caches


def _origins(layers: list[tuple[Where, dict]]) -> dict[str, Where]:
    """Where each key was set last, through the layers of precedence (each ``{store: {key: value}}``)."""
    origins: dict[str, Where] = {}
    for where, values in layers:
        for by_key in values.values():
            origins |= {key: (*where, key) for key in by_key}
    return origins


def _exports(cf: ConfigFile, table: dict, where: Where, caches: list[CacheSpec], datasets: dict) -> list[ExportSpec]:
    fmt = _required_str(cf, table, where, "format", " or ".join(EXPORTS))
    if fmt not in EXPORTS:
        raise cf.error((*where, "format"), f"'format' takes one of {', '.join(EXPORTS)}, not {_shown(fmt)}")
    params = export_params(fmt)
    _table(cf, table, where, {"target", "datasets", "format", "to"}, known=params)
    target = _required_str(cf, table, where, "target", "the name of a [[target]]")
    mine = [c for c in caches if c.target == target]
    if not mine:
        raise cf.error(
            (*where, "target"), f"no [[target]] named {target!r}" + suggest(target, {c.target for c in caches})
        )
    chosen = _chosen_datasets(cf, table, where, [datasets[c.dataset] for c in mine])
    options = {}
    for key, tp in params.items():
        if key in table:
            value = _locate(table[key], cf.folder) if key == "model" and isinstance(table[key], str) else table[key]
            try:
                options[key] = coerce(value, tp, cf.folder)
            except TypeProblem:
                raise cf.error((*where, key), f"'{key}' takes {describe(tp)}, not {_shown(value)}") from None
    template = _str(cf, table, where, "to")
    if template is None and fmt != "kohya":
        raise cf.error(where, f"a {fmt} export needs 'to', the folder it writes (may hold {{dataset}})")
    out = []
    for cache in mine:
        if cache.dataset in chosen:
            ds = datasets[cache.dataset]
            to = ds.path if template is None else _place(template.format(target=target, dataset=ds.name), cf.folder)
            out.append(ExportSpec(target, ds.name, fmt, cache.out, to, options))
    return out


def export_params(fmt: str) -> dict[str, Any]:
    """The keyword parameters of a format's export function, with their types: the export table's keys."""
    import importlib

    module, name = EXPORTS[fmt]
    fn = getattr(importlib.import_module(module), name)
    hints = typing.get_type_hints(fn)
    return {p: hints.get(p, str) for p in inspect.signature(fn).parameters if p not in ("cache", "to", "progress")}


def _table(
    cf: ConfigFile, table: Any, where: Where, structural: set[str], known: dict | None = None, stores=None
) -> None:
    """Refuse a key that is neither ``structural``, an option (of ``stores``), nor in ``known``."""
    if not isinstance(table, dict):
        raise cf.error(where, f"{_name(where)} must be a table")
    options = {k for k in option_table() if stores is None or applies_to(k) & stores}
    allowed = structural | (set(known) if known is not None else options)
    for key in table:
        if key not in allowed:
            raise cf.error((*where, key), f"unknown key '{key}' in {_name(where, table)}{suggest(key, allowed)}")


def _array(cf: ConfigFile, name: str) -> list[dict]:
    value = cf.data.get(name, [])
    if not isinstance(value, list):
        raise cf.error((name,), f"'{name}' must be an array of tables: write [[{name}]]")
    return value


def _options(table: dict, structural: set[str]) -> dict:
    return {k: v for k, v in table.items() if k not in structural}


def _chosen_datasets(cf: ConfigFile, table: dict, where: Where, available: list[DatasetSpec]) -> set[str]:
    names = [d.name for d in available]
    chosen = table.get("datasets", names)
    if not isinstance(chosen, list) or not all(isinstance(n, str) for n in chosen):
        raise cf.error((*where, "datasets"), "'datasets' takes a list of dataset names")
    for n in chosen:
        if n not in names:
            raise cf.error((*where, "datasets"), f"no dataset named {n!r} here{suggest(n, names)}")
    return set(chosen)


def _kinds(cf: ConfigFile, table: dict, where: Where, values: dict) -> set[str]:
    default = list(CACHE_KINDS) if values.get("model") or values.get("text_encoder") else ["latents"]
    kinds = table.get("caches", default)
    if not isinstance(kinds, list) or not kinds or not set(kinds) <= set(CACHE_KINDS):
        raise cf.error((*where, "caches"), f"'caches' takes a list of {' and '.join(CACHE_KINDS)}, not {kinds!r}")
    return set(kinds)


def _unique(cf: ConfigFile, names: list[tuple[str, Where]], what: str) -> None:
    seen = set()
    for name, where in names:
        if name is not None and name in seen:
            raise cf.error(where, f"two {what}s are named {name!r}; give each a name of its own")
        seen.add(name)


def _str(cf: ConfigFile, table: dict, where: Where, key: str) -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        raise cf.error((*where, key), f"'{key}' takes a string, not {_shown(value)}")
    return value


def _required_str(cf: ConfigFile, table: dict, where: Where, key: str, what: str) -> str:
    value = _str(cf, table, where, key)
    if not value:
        raise cf.error(where, f"{_name(where, table)} needs '{key}' ({what})")
    return value


def _place(text: str, base: Path):
    """A path or URL from the file: URLs as they are, relative paths under the file's folder."""
    if is_url(text):
        return as_location(text)
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _locate(value: str, base: Path) -> str:
    """A model location: a folder relative to the file when one is there, else the preset or hub id as given."""
    candidate = base / Path(value).expanduser()
    return str(candidate) if not Path(value).is_absolute() and candidate.exists() else value


def _name(where: Where, table: dict | None = None) -> str:
    """How a message names a table: ``[[target]] "sdxl"``, ``[[dataset]] #2``, ``[target.text]``."""
    if not where:
        return "the top of the file"
    if len(where) > 2:
        return f"[{where[0]}.{where[2]}]"
    if len(where) == 1:
        return f"[{where[0]}]"
    name = (table or {}).get("name") or (table or {}).get("target")
    return f'[[{where[0]}]] "{name}"' if isinstance(name, str) else f"[[{where[0]}]] #{where[1] + 1}"


def _shown(value: Any) -> str:
    return repr(value) if not isinstance(value, str) else f'"{value}"'
