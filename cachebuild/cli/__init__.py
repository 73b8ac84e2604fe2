"""The ``cachebuild`` command line: parse options, build one config, call one library function.

Exit codes: 0 all items done; 3 the run finished but some items failed (see ``cachebuild status``);
2 bad arguments or configuration (nothing was done); 1 an unexpected internal error; 130 and 143 a build
stopped by SIGINT (Ctrl-C) or SIGTERM, its committed work kept.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import click

from cachebuild.cli.clips import clip_options
from cachebuild.cli.options import (
    LOCATION,
    bucket_options,
    build_options,
    caption_options,
    latents_config,
    latents_options,
    model_spec,
    output_options,
    text_encoder_options,
    text_run_options,
    textenc_config,
    vae_options,
)
from cachebuild.cli.output import (
    EXIT_INTERNAL,  # noqa: F401  (the exit codes are the command line's public names)
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ExportProgress,
    human_bytes,
    run_build,
)
from cachebuild.cli.project import project_options, watch_options

_LISTED = 20  # skipped items and conflicts printed by name; --json has them all


class UsageError(click.ClickException):
    """A library error shown as ``Error: ...`` with the usage exit code."""

    exit_code = EXIT_USAGE


def _library_errors(fn):
    """Turn the library's errors into messages with exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from cachebuild.errors import CachebuildError, storage_error

        try:
            return fn(*args, **kwargs)
        except CachebuildError as exc:
            raise UsageError(str(exc)) from exc
        except OSError as exc:  # the disk said no (full, read-only, ...): one line; any other OSError is a bug
            problem = storage_error(exc)
            if problem is None:
                raise
            raise UsageError(str(problem)) from exc

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cachebuild")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Build VAE-latent and text-encoder caches for diffusion training.

    \b
    Example:
      cachebuild latents ./dataset --model sdxl --out ./cache
      cachebuild status ./cache
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@cli.command()
@click.argument("dataset", type=LOCATION)
@build_options
@vae_options
@bucket_options
@latents_options
@clip_options
@output_options
@_library_errors
def latents(dataset, quiet, as_json, **opts):
    """Encode every image under DATASET into VAE latents in --out.

    For a video VAE (Wan, HunyuanVideo 1.5, LTX-2), videos become clips (--frames, --extract), one item each,
    and images one-frame items. Killed or crashed? Run the same command again: it continues where it stopped.

    \b
    Example:
      cachebuild latents ./dataset --model sdxl --out ./cache --batch-size 8
      cachebuild latents ./clips --model wan2.1-t2v-14b --frames 17,33,81 --out ./cache
      cachebuild latents ./clips --model ltx-2 --frames 49,97 --extract chunk --out ./cache
    """
    from cachebuild.jobs.latents import build_latents

    run_build(build_latents, latents_config(dataset, opts), quiet or as_json, as_json, unit="img", store="latents")


@cli.command()
@click.argument("captions", type=LOCATION)
@build_options
@text_encoder_options
@caption_options
@text_run_options
@output_options
@_library_errors
def textenc(captions, quiet, as_json, **opts):
    """Encode every caption under CAPTIONS (a folder of .txt files or a metadata.jsonl/.csv) into --out.

    Keys match `cachebuild latents` keys, so latents and text join by key. Identical captions are stored
    once. Killed or crashed? Run the same command again.

    \b
    Example:
      cachebuild textenc ./dataset --model flux --out ./cache --t5-max-length 512
    """
    from cachebuild.jobs.textenc import build_textenc

    cfg = textenc_config(captions, opts)
    run_build(build_textenc, cfg, quiet or as_json, as_json, unit="caption", store="textenc")


@cli.command()
@click.argument("project_file", required=False, type=click.Path(path_type=Path, dir_okay=False))
@project_options
@output_options
@_library_errors
def build(project_file, quiet, as_json, **source):
    """Build every cache that PROJECT_FILE (default: ./cachebuild.toml) declares, and its exports.

    Each cache has its own manifest and resumes like a single command; latent caches of one dataset with the same
    preprocessing decode each image once. With --from-musubi or --from-kohya, the trainer's own dataset config
    says what to build, in that trainer's layout (see docs/project.md).

    \b
    Example:
      cachebuild build
      cachebuild build --from-musubi dataset.toml --arch qi
      cachebuild build --from-kohya dataset_config.toml --model sdxl
    """
    from cachebuild.cli.project import load_source, run_project_build

    run_project_build(load_source(project_file, **source), quiet, as_json)


@cli.command()
@click.argument("project_file", required=False, type=click.Path(path_type=Path, dir_okay=False))
@project_options
@watch_options
@click.option("--quiet", "-q", is_flag=True, help="Errors only.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line on stdout (done, failed, removed, ...).")
@_library_errors
def watch(project_file, quiet, as_json, settle, max_settle, poll, idle_timeout, keep_gb, **source):
    """Build every cache of PROJECT_FILE (default: ./cachebuild.toml), then keep them current as files arrive,
    change or vanish; models stay loaded while work keeps coming.

    A file is read once it has stopped changing (--settle); removals follow the --prune guard. SIGTERM or Ctrl-C
    stops it between batches; start it again to resume.

    \b
    Example:
      cachebuild watch cachebuild.toml --json
    """
    from cachebuild.cli.project import load_source, run_watch

    project = load_source(project_file, **source)
    run_watch(
        project,
        quiet,
        as_json,
        settle=settle,
        max_settle=max_settle,
        poll=poll,
        idle_timeout=idle_timeout,
        keep_gb=keep_gb,
    )


@cli.command()
@click.argument("cache", type=LOCATION)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_library_errors
def status(cache, as_json):
    """Show what the cache at CACHE holds: counts, failures with reasons, shards, bytes, buckets.

    \b
    Example:
      cachebuild status ./cache --json
    """
    from cachebuild.consumers.status import cache_status

    info = cache_status(cache)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for label, store in [("latents", info)] + [(name, info[name]) for name in ("textenc", "control") if name in info]:
        items = store["items"]
        click.echo(
            f"{label}: {items['done']} done, {items['failed']} failed, {items['pending']} pending; "
            f"{store['shards']} shards, {human_bytes(store['bytes'])}"
            + (f", {store['unique']} unique captions" if "unique" in store else "")
        )
        if store.get("buckets"):
            click.echo("  buckets: " + ", ".join(f"{b} ({n})" for b, n in store["buckets"].items()))
        for f in store["failures"]:
            click.echo(f"  failed {f['path'] or f['key']}: {f['reason']}")
        if store["fingerprint"]:
            click.echo("  fingerprint: " + json.dumps(store["fingerprint"], sort_keys=True))


@cli.command()
@click.argument("cache", type=LOCATION)
@click.option("--repair", is_flag=True, help="Mark damaged items pending and delete bad or stray shard files.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@_library_errors
def verify(cache, repair, as_json):
    """Check every shard's checksum, every tensor's shape, dtype and values against the manifest.

    Exits 0 when all is well and 3 when anything is wrong (the damaged items are named). With --repair the
    damaged items are marked pending, so the next build command with the same settings re-encodes only them,
    and it exits 0 once everything damaged is queued. Leftover temporary files are listed, never an error.

    \b
    Example:
      cachebuild verify ./cache --repair && cachebuild latents ./dataset --model sdxl --out ./cache
    """
    from cachebuild.consumers.verify import verify_cache

    report = verify_cache(cache, repair=repair)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for p in report.problems:
            where = p.key if p.key is not None else p.shard
            click.echo(f"{p.store}: {where}: {p.message}")
        if report.leftovers and not repair:
            click.echo(
                f"{len(report.leftovers)} leftover file(s) of an interrupted run (harmless; the next build or "
                "--repair deletes them)",
                err=True,
            )
        if report.unnamed:
            click.echo(
                f"{len(report.unnamed)} shard file(s) the manifest never named nor wrote (e.g. {report.unnamed[0]}): "
                f"kept; if they belong to this cache, rebuild its index with: cachebuild rebuild-manifest {cache}",
                err=True,
            )
        click.echo(
            f"checked {report.items_checked} items in {report.shards_checked} shards "
            f"({human_bytes(report.bytes_checked)}) in {report.seconds:.1f} s: "
            + ("ok" if report.ok else f"{len(report.problems)} problem(s)"),
            err=True,
        )
        if repair and report.repaired_items:
            stores = " / ".join(f"cachebuild {s}" for s in report.damaged_keys)
            click.echo(f"{report.repaired_items} item(s) marked pending: run `{stores}` again to re-encode them")
        elif not report.ok and not repair:
            click.echo(f"to re-queue the damaged items: cachebuild verify {cache} --repair")
    # with --repair, success means every damage is queued for the next build (which the message names)
    sys.exit(EXIT_OK if report.ok or (repair and report.repaired) else EXIT_ITEMS_FAILED)


@cli.command("rebuild-manifest")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@_library_errors
def rebuild_manifest(cache, as_json):
    """Write a new manifest for CACHE from its shard files, when manifest.sqlite is damaged or lost.

    The damaged file is moved aside, never deleted. Failed items are not in any shard: the next build tries
    them again; nothing that was done is encoded again.

    \b
    Example:
      cachebuild rebuild-manifest ./cache && cachebuild status ./cache
    """
    from cachebuild.cache.rebuild import rebuild_manifest as rebuild

    summary = rebuild(cache)
    if as_json:
        click.echo(json.dumps(asdict(summary), indent=2))
        return
    restored = ", ".join(f"{store}: {n} items in {summary.shards[store]} shards" for store, n in summary.items.items())
    click.echo(f"rebuilt the manifest of {cache}: {restored or 'nothing to restore'}")
    if summary.moved_to:
        click.echo(f"the old manifest was kept as {summary.moved_to}", err=True)
    for s in summary.skipped:
        click.echo(f"  skipped {s['shard']}: {s['reason']}", err=True)


@cli.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Path(path_type=Path), required=True, help="Folder the trainer reads.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["kohya", "musubi", "webdataset"]),
    default="kohya",
    show_default=True,
    help="kohya: sd-scripts .npz beside the images; musubi: musubi-tuner's cache_directory; webdataset: tar shards.",
)
@click.option("--family", type=click.Choice(["sd", "sdxl", "flux", "sd3", "lumina"]), help="kohya: model family.")
@click.option(
    "--arch",
    type=click.Choice(["qi", "qie", "zi", "fk", "f2d", "f2k4b", "f2k9b", "hv15", "wan"]),
    help="musubi: architecture.",
)
@click.option("--images", type=click.Path(path_type=Path), help="musubi: image folder (default: the one cached).")
@click.option("--overwrite", is_flag=True, help="Replace existing files whose contents differ.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sample exported from a moments cache.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--model", help="kohya lumina: the Lumina 2 pipeline the text cache was built with (for input_ids).")
@_library_errors
def export(cache, to, fmt, family, arch, images, overwrite, seed, quiet, as_json, model):
    """Write the cache as another trainer's own cache files (see docs/export.md).

    kohya: sd-scripts `<stem>_<W>x<H>_<family>.npz` beside the images in --to, for --cache_latents_to_disk.
    musubi: musubi-tuner `<stem>_<W>x<H>_<arch>.safetensors` and `<stem>_<arch>_te.safetensors` in --to, its
    cache_directory (hv15 clips: `<video>_<start>-<frames>_<W>x<H>_hv15.safetensors`, text per video).
    webdataset: tar shards of per-sample tensors and JSON in --to. Identical files are skipped; differing ones
    are left alone (exit 3) unless --overwrite; a folder at a file's name is never replaced (exit 3).

    \b
    Example:
      cachebuild export ./cache --format kohya --to ./dataset
      cachebuild export ./cache --format kohya --to ./dataset --model lumina2
      cachebuild export ./cache --format musubi --arch zi --to ./musubi_cache
      cachebuild export ./cache --format musubi --arch hv15 --to ./musubi_cache
      cachebuild export ./cache --format webdataset --to ./shards
    """
    with ExportProgress(quiet or as_json) as on_progress:
        if fmt == "musubi":
            from cachebuild.consumers.export.musubi import export_musubi

            summary = export_musubi(cache, to, arch=arch, overwrite=overwrite, images=images, progress=on_progress)
        elif fmt == "webdataset":
            from cachebuild.consumers.export.webdataset import export_webdataset

            summary = export_webdataset(cache, to, overwrite=overwrite, progress=on_progress)
        else:
            from cachebuild.consumers.export.kohya import export_kohya

            summary = export_kohya(
                cache, to, family=family, overwrite=overwrite, seed=seed, progress=on_progress, model=model
            )
    if as_json:
        click.echo(json.dumps(asdict(summary), indent=2))
    else:
        click.echo(
            f"{fmt} export ({summary.family}) to {summary.to}: wrote {summary.written}, skipped {summary.unchanged} "
            f"identical, refused {len(summary.skipped)} items and {len(summary.conflicts)} differing files "
            f"in {summary.seconds:.1f} s"
        )
        for s in summary.skipped[:_LISTED]:
            click.echo(f"  refused {s['key']}: {s['reason']}")
        for name in summary.conflicts[:_LISTED]:
            click.echo(f"  differs, left alone: {name}")
        for b in summary.blocked[:_LISTED]:
            click.echo(f"  refused {b['path']}: {b['reason']}")
        if max(len(summary.skipped), len(summary.conflicts), len(summary.blocked)) > _LISTED:
            click.echo(f"  (first {_LISTED} of each listed; --json lists all)")
        for warning in summary.warnings:
            click.echo(f"warning: {warning}", err=True)
        if summary.conflicts:
            click.echo("pass --overwrite to replace the files that differ", err=True)
    sys.exit(EXIT_ITEMS_FAILED if summary.conflicts or summary.blocked else EXIT_OK)


@cli.command()
@click.argument("cache", type=click.Path(path_type=Path))
@vae_options
@click.option(
    "--output", "-o", type=click.Path(path_type=Path), default="preview.png", show_default=True, help="PNG to write."
)
@click.option("-n", "count", default=16, show_default=True, help="How many items to show.")
@click.option("--seed", default=0, show_default=True, help="Picks the items.")
@click.option(
    "--dataset",
    type=click.Path(path_type=Path),
    help="Dataset folder, to show each source crop (default: the one the cache was built from).",
)
@click.option("--device", help="Device for decoding (default: cpu).")
@_library_errors
def preview(cache, output, count, seed, dataset, device, **model):
    """Decode a sample of cached latents into a PNG grid, each beside its source image's crop.

    \b
    Example:
      cachebuild preview ./cache --model sdxl --dataset ./dataset -n 16 -o preview.png
    """
    from cachebuild.consumers.preview import preview_cache

    summary = preview_cache(cache, model_spec(model), output, n=count, seed=seed, dataset=dataset, device=device)
    click.echo(f"wrote {summary.path}: {len(summary.keys)} items, {summary.size[0]}x{summary.size[1]} px")
    if dataset is None:
        click.echo("source tiles are grey: pass --dataset to compare with the source images", err=True)
    for m in summary.missing_sources:
        click.echo(f"  no source for {m['key']}: {m['reason']}", err=True)
