"""What the command line prints: progress bars on stderr, the run summary, and the exit code that goes with it."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_ITEMS_FAILED = 0, 1, 2, 3


def run_build(build, cfg, quiet: bool, as_json: bool, unit: str) -> None:
    """Run one build with a progress bar, print its summary and exit with its code."""
    with ProgressBar(quiet, unit=unit) as on_progress:
        summary = build(cfg, on_progress)
    print_summary(summary, as_json)
    sys.exit(EXIT_ITEMS_FAILED if summary.failed else EXIT_OK)


class ExportProgress:
    """tqdm on stderr over an export's items; a no-op when quiet."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def __enter__(self):
        return None if self.quiet else self.update

    def update(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit="item", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *_):
        if self.bar is not None:
            self.bar.close()


class ProgressBar:
    """tqdm on stderr with images/s, ETA, host RSS and device memory; a no-op when quiet."""

    def __init__(self, quiet: bool, unit: str = "img"):
        self.quiet, self.unit, self.bar = quiet, unit, None

    def __enter__(self):
        return None if self.quiet else self.update

    def update(self, p) -> None:
        import psutil
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=p.total, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
        self.bar.update(p.processed - self.bar.n)
        post = {"failed": p.failed, "rss": human_bytes(psutil.Process().memory_info().rss)}
        if p.device_bytes is not None:
            post["dev"] = human_bytes(p.device_bytes)
        for d in getattr(p, "devices", ()):  # several devices: each one's rate, or that it was lost
            post[d.name] = f"{d.rate:.1f}/s" if d.alive else "lost"
        self.bar.set_postfix(post, refresh=False)

    def __exit__(self, *_):
        if self.bar is not None:
            self.bar.close()


def print_summary(summary, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(asdict(summary), indent=2))
        return
    if summary.nothing_to_do:
        click.echo(
            f"nothing left to do: {summary.done} items done, {summary.failed} failed ({summary.seconds:.1f} s)",
            err=True,
        )
        return
    click.echo(
        f"{summary.store}: encoded {summary.encoded}, failed {summary.failed_now} this run; cache has "
        f"{summary.done} done, {summary.failed} failed, {summary.pending} pending; "
        f"{summary.shards_written} shards, {human_bytes(summary.bytes_written)} written in {summary.seconds:.1f} s",
        err=True,
    )
    if summary.offloaded:
        click.echo(f"streamed from host memory (--offload): {', '.join(summary.offloaded)}", err=True)
    if summary.truncated:
        click.echo(f"{summary.truncated} caption(s) were longer than an encoder's limit and were truncated", err=True)
    if summary.failed:
        click.echo(f"see why with: cachebuild status {summary.out}", err=True)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
