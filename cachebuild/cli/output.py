"""What the command line prints: progress bars on stderr, the run summary, and the exit code that goes with it."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sys
import time
from dataclasses import asdict

import click

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_ITEMS_FAILED = 0, 1, 2, 3
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; what timeout, systemd, Kubernetes and SLURM send


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached a build: raised in the main thread, so every ``finally`` runs on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_build(build, cfg, quiet: bool, as_json: bool, unit: str, store: str) -> None:
    """Run one build with a progress bar, print its summary and exit with its code; interrupted, as
    ``until_interrupted`` says."""

    def work():
        with ProgressBar(quiet, unit=unit) as on_progress:
            return build(cfg, on_progress)

    def committed(start: float) -> int:
        from cachebuild.cache.remote import committed_since

        return committed_since(cfg.out, getattr(cfg, "manifest_dir", None), store, start)

    summary = until_interrupted(work, committed)
    print_summary(summary, as_json)
    leave(EXIT_ITEMS_FAILED if summary.failed else EXIT_OK)


def until_interrupted(work, committed):
    """``work()``'s result; when SIGINT or SIGTERM stops it, one line with ``committed(start)`` (the items
    committed since the Unix time it started) and exit 128 + the signal's number (130, 143)."""
    start = time.time()
    with stop_signals():
        try:
            return work()
        except Interrupted as exc:
            signum = exc.signum
    # outside the handler: the interrupted frames, and what they hold, are gone
    click.echo(f"interrupted: {committed(start)} items committed; run the same command to continue", err=True)
    leave(128 + signum)


def leave(code: int) -> None:
    """Exit with ``code``. The garbage collector is frozen first: the interpreter's teardown then skips its
    passes over torch's and diffusers' objects, seconds on a busy machine, and the prompt comes back when the
    run is over (exit handlers still run: the work is committed, the files are closed)."""
    gc.freeze()
    sys.exit(code)


@contextlib.contextmanager
def stop_signals():
    """SIGINT and SIGTERM raise ``Interrupted`` once; a second one during the clean-up leaves at once (what is
    committed is durable; the decode workers die with this process)."""
    seen: list[int] = []

    def handler(signum, _frame):
        if seen:
            click.echo("interrupted again: leaving without waiting; run the same command to continue", err=True)
            os._exit(128 + seen[0])
        seen.append(signum)
        raise Interrupted(signum)

    before = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in before.items():
            signal.signal(sig, old)


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
