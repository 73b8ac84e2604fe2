"""The ``build`` and ``watch`` commands' options, and what they print. Imports no torch: ``--help`` stays fast."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from cachebuild.cli.options import option_group
from cachebuild.cli.output import EXIT_ITEMS_FAILED, EXIT_OK, human_bytes, until_interrupted

project_options = option_group(  # where the project comes from: a cachebuild.toml, or a trainer's dataset config
    click.option(
        "--from-musubi",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Read musubi-tuner's dataset config instead: the caches its caching scripts write, in each "
        "cache_directory.",
    ),
    click.option(
        "--arch", help="With --from-musubi: the architecture (qi, zi, f2d, f2k4b, f2k9b), as musubi names it."
    ),
    click.option(
        "--from-kohya",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Read sd-scripts' dataset config instead: the .npz caches it writes beside the images.",
    ),
    click.option(
        "--model",
        help="With --from-musubi (default: the arch's preset) or --from-kohya (required): preset, hub id or folder.",
    ),
    click.option(
        "--out",
        type=click.Path(path_type=Path, file_okay=False),
        help="With --from-musubi/--from-kohya: where cachebuild keeps its own caches (default: cachebuild-cache "
        "beside the config).",
    ),
    click.option("--device", help="With --from-musubi/--from-kohya: cuda, cuda:1, mps or cpu (default: the best)."),
)


def load_source(project_file, from_musubi, arch, from_kohya, model, out, device):
    """The project the options name: a trainer's config, or the project file (default: ./cachebuild.toml)."""
    if from_musubi and from_kohya:
        raise click.UsageError("pass one of --from-musubi and --from-kohya")
    if (from_musubi or from_kohya) and project_file:
        raise click.UsageError("a project file and --from-musubi/--from-kohya name the caches twice; pass one")
    if from_musubi:
        from cachebuild.project.musubi import read_musubi

        return read_musubi(from_musubi, arch, model, out, device)
    if from_kohya:
        from cachebuild.project.kohya import read_kohya

        return read_kohya(from_kohya, model, out, device)
    if arch or model or out or device:
        raise click.UsageError(
            "--arch, --model, --out and --device go with --from-musubi/--from-kohya; a project "
            "file sets them in its tables"
        )
    from cachebuild.project.spec import DEFAULT_FILE, load_project

    return load_project(Path(project_file or DEFAULT_FILE))


def run_project_build(project, quiet: bool, as_json: bool) -> None:
    """Build the project, print its summary and exit with its code; interrupted (SIGINT, SIGTERM), one line with
    the items its caches committed, exit 130 or 143, as ``latents`` and ``textenc`` do."""
    from cachebuild.project.build import build_project

    def work():
        with ProjectProgress(quiet or as_json) as on_progress:
            return build_project(project, on_progress)

    summary = until_interrupted(work, lambda start: _committed_since(project, start))
    if as_json:
        click.echo(json.dumps(asdict(summary), indent=2, default=str))
    else:
        print_build_summary(summary)
    sys.exit(EXIT_ITEMS_FAILED if summary.failed or summary.conflicts else EXIT_OK)


def _committed_since(project, start: float) -> int:
    """Items every cache of ``project`` committed since Unix time ``start``, latents and text."""
    from cachebuild.cache.manifest import LATENTS, TEXTENC
    from cachebuild.cache.remote import committed_since

    return sum(
        committed_since(cache.out, getattr(cfg, "manifest_dir", None), store, start)
        for cache in project.caches
        for store, cfg in ((LATENTS, cache.latents), (TEXTENC, cache.text))
        if cfg is not None
    )


def print_build_summary(summary) -> None:
    """One line per cache, shared decode and export, then the totals; on stderr, as every command's summary."""
    for c in summary.caches:
        parts = [_store_line(name, s) for name, s in (("latents", c.latents), ("text", c.text)) if s is not None]
        click.echo(f"{c.label}: " + "; ".join(parts), err=True)
    for s in summary.shared:
        click.echo(
            f"decoded {s['decoded']} images once for {len(s['caches'])} caches ({', '.join(s['caches'])}): "
            f"{s['fed']} fed to their VAEs",
            err=True,
        )
    for e in summary.exports:
        x = e.summary
        click.echo(
            f"{e.format} export of {e.target}/{e.dataset} to {x.to}: wrote {x.written}, {x.unchanged} identical, "
            f"refused {len(x.skipped)} items and {len(x.conflicts)} differing files",
            err=True,
        )
        for warning in x.warnings:
            click.echo(f"  warning: {warning}", err=True)
    for note in summary.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(
        f"built {len(summary.caches)} cache(s) and {len(summary.exports)} export(s) in {summary.seconds:.1f} s; "
        f"{summary.failed} failed item(s), {summary.conflicts} differing export file(s)",
        err=True,
    )
    if summary.failed:
        click.echo("see why with: cachebuild status <cache folder>", err=True)


def _store_line(name: str, s) -> str:
    if s.nothing_to_do:
        return f"{name} up to date ({s.done} done, {s.failed} failed)"
    return (
        f"{name} encoded {s.encoded}, failed {s.failed_now} (cache: {s.done} done, {s.failed} failed, "
        f"{s.pending} pending; {human_bytes(s.bytes_written)} written)"
    )


class ProjectProgress:
    """One tqdm bar on stderr per cache and store while it runs; a no-op when quiet."""

    def __init__(self, quiet: bool):
        self.quiet, self.bars = quiet, {}

    def __enter__(self):
        return None if self.quiet else self.update

    def update(self, label: str, p) -> None:
        from tqdm import tqdm

        bar = self.bars.get(label)
        if bar is None:
            bar = self.bars[label] = tqdm(total=p.total, desc=label, file=sys.stderr, dynamic_ncols=True, leave=False)
        bar.update(p.processed - bar.n)

    def __exit__(self, *_):
        for bar in self.bars.values():
            bar.close()


watch_options = option_group(
    click.option(
        "--settle",
        default=1.0,
        show_default=True,
        help="Seconds a changed file must keep its size and time before it is read (one being written changes).",
    ),
    click.option(
        "--max-settle", default=60.0, show_default=True, help="Seconds after which a file still changing is read."
    ),
    click.option(
        "--poll",
        default=30.0,
        show_default=True,
        help="Seconds between listings of URL datasets (and of local ones without watchfiles).",
    ),
    click.option(
        "--idle-timeout",
        default=300.0,
        show_default=True,
        help="Seconds without work after which the loaded models are released (device memory freed).",
    ),
    click.option(
        "--keep-gb", type=float, help="Memory the loaded models may hold, GiB (default: 60% of the device's)."
    ),
)


def run_watch(project, quiet: bool, as_json: bool, **opts) -> None:
    """Watch until SIGTERM or SIGINT; then exit 143 or 130, saying so, with the work committed kept."""
    from cachebuild.project.shared import Interrupted
    from cachebuild.project.watch import WatchOptions, watch_project

    keep_gb = opts.pop("keep_gb")
    options = WatchOptions(keep_bytes=None if keep_gb is None else int(keep_gb * 2**30), **opts)
    with StopOnSignals() as stop, contextlib.suppress(Interrupted):
        watch_project(project, options, EventPrinter(quiet, as_json), stop.requested)
    if stop.signum is not None:
        click.echo(f"interrupted: {stop.name}; run the same command again to resume", err=True)
        sys.exit(128 + stop.signum)


class EventPrinter:
    """--json: one JSON object per line on stdout; otherwise one line per event on stderr (errors even when
    quiet)."""

    def __init__(self, quiet: bool, as_json: bool):
        self.quiet, self.as_json = quiet, as_json

    def __call__(self, event: dict) -> None:
        if self.as_json:
            click.echo(json.dumps(event))
        elif not self.quiet or event["event"] == "error":
            rest = " ".join(f"{k}={v}" for k, v in event.items() if k != "event")
            click.echo(f"{event['event']}: {rest}", err=True)


class StopOnSignals:
    """SIGTERM and SIGINT set a flag (``requested()``) instead of killing the process, so that the watch stops
    between batches; the previous handlers come back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.signum).name if self.signum is not None else ""

    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *_):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
