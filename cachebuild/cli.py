"""The ``cachebuild`` command line: parse options, build one config, call one library function.

Exit codes: 0 all items done; 3 the run finished but some items failed (see ``cachebuild status``);
2 bad arguments or configuration (nothing was done); 1 an unexpected internal error.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import click

from cachebuild.config import TextFamily

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_ITEMS_FAILED = 0, 1, 2, 3
_LISTED = 20  # skipped items and conflicts printed by name; --json has them all
TEXT_FAMILIES = tuple(f.value for f in TextFamily)  # --family choices; config imports no torch: --help stays fast


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


class _Location(click.ParamType):
    """A local folder or file (a ``Path``), or an fsspec URL such as s3://bucket/images (a ``storage.UrlPath``)."""

    name = "path_or_url"

    def convert(self, value, param, ctx):
        from cachebuild.storage import UrlPath, as_location

        return value if isinstance(value, (Path, UrlPath)) else as_location(str(value))


LOCATION = _Location()


def _options(*options):
    """One decorator that applies ``options`` in the order listed (as --help shows them)."""

    def apply(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return apply


def _dtype_option(name: str, default: str | None, help: str):
    choices = ["auto", "fp32", "fp16", "bf16"]
    return click.option(name, type=click.Choice(choices), default=default, show_default=default is not None, help=help)


_output_options = _options(
    click.option("--quiet", "-q", is_flag=True, help="No progress bar; errors and the summary only."),
    click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout."),
)

_build_options = _options(  # every cache-building command
    click.option(
        "--out", "-o", type=LOCATION, required=True, help="Cache folder (created), or a URL such as s3://bucket/cache."
    ),
    click.option(
        "--dtype-out",
        type=click.Choice(["fp16", "bf16", "fp32"]),
        help="Stored dtype (default: fp16; for text, the family's: bf16 for LLM encoders such as Z-Image's Qwen3 "
        "and Qwen-Image's Qwen2.5-VL).",
    ),
    click.option("--device", help="cuda, cuda:1, mps or cpu (default: the best available)."),
    click.option(
        "--format",
        "fmt",
        type=click.Choice(["safetensors", "hdf5"]),
        default="safetensors",
        show_default=True,
        help="Shard file format.",
    ),
    click.option("--shard-mb", default=64.0, show_default=True, help="Shard size on disk, MiB."),
    click.option("--retry-failed", is_flag=True, help="Encode items that failed before again."),
    click.option("--rebuild", is_flag=True, help="Discard entries made with other settings and encode again."),
    click.option(
        "--prune",
        is_flag=True,
        help="Confirm removing entries whose source is gone when the scan finds nothing or loses many of them.",
    ),
    click.option(
        "--manifest-dir",
        type=click.Path(path_type=Path),
        help="Local folder for the manifest of a URL --out (default: under ~/.cache/cachebuild/manifests).",
    ),
)

_vae_options = _options(  # where the VAE comes from: latents and preview
    click.option(
        "--model",
        help="Preset (sd15, sd2, sdxl, sd3, sd35-large, sd35-medium, flux, chroma, z-image, qwen-image, flux2-dev, "
        "flux2-klein-4b, flux2-klein-9b, hidream, lumina2, sana), pipeline hub id or local pipeline folder.",
    ),
    click.option("--vae", help="VAE hub id, local diffusers folder, or a single .safetensors file."),
    click.option("--vae-config", help="Config folder or hub id for a single-file --vae (default: --model's)."),
    click.option("--revision", help="Hub revision (branch, tag or commit) for hub ids."),
)

_bucket_options = _options(  # which bucket, resize and crop each image gets
    click.option("--resolution", default="1024", show_default=True, help="Bucket area as one side (1024) or W,H."),
    click.option("--min-bucket-reso", default=256, show_default=True, help="Smallest bucket side, pixels."),
    click.option("--max-bucket-reso", default=2048, show_default=True, help="Largest bucket side, pixels."),
    click.option("--bucket-reso-steps", default=64, show_default=True, help="Bucket sides are multiples of this."),
    click.option("--bucket-no-upscale", is_flag=True, help="Buckets follow each image's size; never enlarge."),
    click.option(
        "--buckets",
        "bucket_rule",
        type=click.Choice(["kohya", "musubi"]),
        default="kohya",
        show_default=True,
        help="Bucket rule: sd-scripts' (steps, min/max side) or musubi-tuner's (steps of 16; for --format musubi).",
    ),
    click.option(
        "--random-crop", is_flag=True, help="Crop at a random offset (seeded per item) instead of the centre."
    ),
    click.option("--seed", default=0, show_default=True, help="Seed for random crops and sampled latents."),
    click.option("--flip-aug", is_flag=True, help="Also store latents of the mirrored image."),
    click.option(
        "--exif",
        "exif",
        type=click.Choice(["apply", "ignore"]),
        default="apply",
        show_default=True,
        help="EXIF orientation: apply (upright) or ignore (pixels as stored, as sd-scripts and musubi read them).",
    ),
)

_latents_options = _options(  # what is stored per image and how the encoder runs
    click.option(
        "--latents",
        "latents_mode",
        type=click.Choice(["sample", "mean", "moments"]),
        default="sample",
        show_default=True,
        help="Posterior sample (seeded per item), its mean, or mean and std.",
    ),
    _dtype_option("--dtype", "auto", "Compute dtype; auto is bf16 on CUDA with bf16 support, else fp32."),
    click.option(
        "--batch-size",
        default="auto",
        show_default=True,
        help="Images per encoder call, or auto: per bucket shape the largest that fits --vram-budget (4 on a CPU); "
        "halved on OOM.",
    ),
    click.option(
        "--workers", type=int, default=None, help="Decode processes (default: cores - 1, at most 8; 0: none)."
    ),
    click.option(
        "--max-pixels", default=178_956_970, show_default=True, help="Larger images fail as decompression bombs."
    ),
    click.option("--hash", "hash_files", is_flag=True, help="Fingerprint files by content too (slower scan)."),
    click.option(
        "--devices",
        help="Encode on several devices, one process each: cuda:0,cuda:1, all (every GPU) or cpu,cpu.",
    ),
    click.option(
        "--vram-budget",
        type=float,
        help="Device memory for --batch-size auto, GiB (default: free memory at start less 10%, at least 1 GiB).",
    ),
    click.option(
        "--engine",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="Where to run: this machine, or a Ray cluster (decode tasks, one encoder actor per GPU; needs "
        "cachebuild[ray]).",
    ),
    click.option(
        "--ray-address",
        help="With --engine ray: auto (the cluster this machine belongs to) or an address; default: a local cluster.",
    ),
)

_text_encoder_options = _options(  # which encoders run and which of their outputs are stored
    click.option(
        "--model",
        help="Preset (sd15, sd2, sdxl, sd3, sd35-large, sd35-medium, flux, chroma, z-image, qwen-image, flux2-dev, "
        "flux2-klein-4b, flux2-klein-9b, hidream, lumina2, sana), pipeline hub id or local pipeline folder.",
    ),
    click.option(
        "--family",
        type=click.Choice(TEXT_FAMILIES),
        help="Family of a --model that is not a preset (default: from its model_index.json).",
    ),
    click.option("--text-encoder", help="Generic: encoder folder or hub id (instead of --model)."),
    click.option("--tokenizer", help="Generic: tokenizer folder or hub id (default: the encoder's)."),
    click.option(
        "--layer",
        default=-1,
        show_default=True,
        help="Generic: hidden-state layer; -1 is the last, -2 the penultimate.",
    ),
    click.option(
        "--max-length",
        type=int,
        help="Generic: token limit (default 77 for CLIP, 512 otherwise); hidream: max_sequence_length (default 128).",
    ),
    click.option("--clip-skip", default=1, show_default=True, help="sd15: 2 stores the penultimate CLIP layer."),
    click.option("--t5-max-length", type=int, help="T5 token limit (default: sd3 256, flux 512)."),
    click.option(
        "--t5-mask",
        is_flag=True,
        help="Run T5 with the attention mask and store only the real tokens (kohya's --apply_t5_attn_mask); "
        "default: unmasked over every position, as the Flux.1 and SD3 pipelines run it.",
    ),
)

_caption_options = _options(
    click.option("--caption-ext", default=".txt", show_default=True, help="Caption file extension."),
    click.option("--caption-column", default="text", show_default=True, help="Text column of a metadata file."),
)

_text_run_options = _options(  # how the text encoders run
    click.option("--revision", help="Hub revision (branch, tag or commit) for hub ids."),
    _dtype_option(
        "--dtype", "auto", "Compute dtype of the encoders; auto is bf16 on CUDA with bf16 support, else fp32."
    ),
    _dtype_option(
        "--t5-dtype",
        None,
        "Compute dtype of T5 (default: --dtype). fp16 T5 overflows; such captions are redone in fp32.",
    ),
    click.option("--batch-size", default=16, show_default=True, help="Captions per encoder call (halved on OOM)."),
    click.option(
        "--chunk-mb",
        default=2048.0,
        show_default=True,
        help="Encoder outputs held in host memory while the encoders take turns on the device, MiB.",
    ),
    click.option(
        "--offload",
        type=click.Choice(["never", "auto", "always"]),
        default="auto",
        show_default=True,
        help="Keep an encoder's weights in host memory and stream them to the device block by block: auto when "
        "it does not fit the GPU's free memory (slower, same outputs).",
    ),
    click.option(
        "--control",
        type=click.Path(path_type=Path, file_okay=False),
        help="qwen-image-edit: folder of condition images (the pictures to edit), one per caption, keyed alike.",
    ),
)


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
@_build_options
@_vae_options
@_bucket_options
@_latents_options
@_output_options
@_library_errors
def latents(dataset, quiet, as_json, **opts):
    """Encode every image under DATASET into VAE latents in --out.

    Killed or crashed? Run the same command again: it continues where it stopped.

    \b
    Example:
      cachebuild latents ./dataset --model sdxl --out ./cache --batch-size 8
    """
    from cachebuild.jobs.latents import build_latents

    _run_build(build_latents, _latents_config(dataset, opts), quiet or as_json, as_json, unit="img")


@cli.command()
@click.argument("captions", type=LOCATION)
@_build_options
@_text_encoder_options
@_caption_options
@_text_run_options
@_output_options
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

    _run_build(build_textenc, _textenc_config(captions, opts), quiet or as_json, as_json, unit="caption")


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
    for label, store in [("latents", info)] + ([("textenc", info["textenc"])] if "textenc" in info else []):
        items = store["items"]
        click.echo(
            f"{label}: {items['done']} done, {items['failed']} failed, {items['pending']} pending; "
            f"{store['shards']} shards, {_human_bytes(store['bytes'])}"
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
        click.echo(
            f"checked {report.items_checked} items in {report.shards_checked} shards "
            f"({_human_bytes(report.bytes_checked)}) in {report.seconds:.1f} s: "
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
@click.option("--arch", type=click.Choice(["qi", "zi", "f2d", "f2k4b", "f2k9b"]), help="musubi: architecture.")
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
    cache_directory. webdataset: tar shards of per-sample tensors and JSON in --to. Identical files are
    skipped; differing ones are left alone (exit 3) unless --overwrite.

    \b
    Example:
      cachebuild export ./cache --format kohya --to ./dataset
      cachebuild export ./cache --format kohya --to ./dataset --model lumina2
      cachebuild export ./cache --format musubi --arch zi --to ./musubi_cache
      cachebuild export ./cache --format webdataset --to ./shards
    """
    with _export_progress(quiet or as_json) as on_progress:
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
        if len(summary.skipped) > _LISTED or len(summary.conflicts) > _LISTED:
            click.echo(f"  (first {_LISTED} of each listed; --json lists all)")
        for warning in summary.warnings:
            click.echo(f"warning: {warning}", err=True)
        if summary.conflicts:
            click.echo("pass --overwrite to replace the files that differ", err=True)
    sys.exit(EXIT_ITEMS_FAILED if summary.conflicts else EXIT_OK)


class _export_progress:
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


@cli.command()
@click.argument("cache", type=click.Path(path_type=Path))
@_vae_options
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

    summary = preview_cache(cache, _model_spec(model), output, n=count, seed=seed, dataset=dataset, device=device)
    click.echo(f"wrote {summary.path}: {len(summary.keys)} items, {summary.size[0]}x{summary.size[1]} px")
    if dataset is None:
        click.echo("source tiles are grey: pass --dataset to compare with the source images", err=True)
    for m in summary.missing_sources:
        click.echo(f"  no source for {m['key']}: {m['reason']}", err=True)


def _latents_config(dataset: Path, o: dict):
    """The one LatentsConfig that the latents command's options describe."""
    from cachebuild.config import (
        BucketConfig,
        BucketRule,
        CropMode,
        DType,
        EngineKind,
        ExifMode,
        LatentsConfig,
        LatentsMode,
        default_workers,
    )
    from cachebuild.engines.devices import parse_devices

    buckets = BucketConfig(
        _parse_resolution(o["resolution"]),
        o["min_bucket_reso"],
        o["max_bucket_reso"],
        o["bucket_reso_steps"],
        o["bucket_no_upscale"],
        BucketRule(o.get("bucket_rule") or "kohya"),
    )
    return LatentsConfig(
        dataset=dataset,
        model=_model_spec(o),
        buckets=buckets,
        crop=CropMode.RANDOM if o["random_crop"] else CropMode.CENTER,
        seed=o["seed"],
        flip=o["flip_aug"],
        latents=LatentsMode(o["latents_mode"]),
        dtype=DType(o["dtype"]),
        batch_size=_parse_batch_size(o["batch_size"]),
        workers=default_workers() if o["workers"] is None else o["workers"],
        devices=parse_devices(o["devices"]) if o["devices"] else (),
        vram_budget_gb=o["vram_budget"],
        engine=EngineKind(o["engine"]),
        ray_address=o["ray_address"],
        max_pixels=o["max_pixels"],
        hash_files=o["hash_files"],
        exif=ExifMode(o.get("exif") or "apply"),
        **_build_settings(o),
    )


def _textenc_config(captions: Path, o: dict):
    """The one TextencConfig that the textenc command's options describe."""
    from cachebuild.config import DType, Offload, TextencConfig, TextFamily

    return TextencConfig(
        source=captions,
        model=o["model"],
        family=TextFamily(o["family"]) if o["family"] else None,
        text_encoder=o["text_encoder"],
        tokenizer=o["tokenizer"],
        layer=o["layer"],
        max_length=o["max_length"],
        clip_skip=o["clip_skip"],
        t5_max_length=o["t5_max_length"],
        t5_mask=o["t5_mask"],
        caption_ext=o["caption_ext"],
        caption_column=o["caption_column"],
        revision=o["revision"],
        dtype=DType(o["dtype"]),
        t5_dtype=DType(o["t5_dtype"]) if o["t5_dtype"] else None,
        batch_size=o["batch_size"],
        chunk_mb=o["chunk_mb"],
        offload=Offload(o["offload"]),
        control=o["control"],
        **_build_settings(o),
    )


def _build_settings(o: dict) -> dict:
    """The config fields of ``_build_options``, which every cache-building command shares."""
    from cachebuild.config import DType, StoreFormat

    return {
        "out": o["out"],
        "device": o["device"],
        "format": StoreFormat(o["fmt"]),
        "shard_mb": o["shard_mb"],
        "retry_failed": o["retry_failed"],
        "rebuild": o["rebuild"],
        "prune": o["prune"],
        "manifest_dir": o["manifest_dir"],
    } | ({"dtype_out": DType(o["dtype_out"])} if o["dtype_out"] else {})  # absent: the config's own default


def _model_spec(o: dict):
    from cachebuild.config import ModelSpec

    return ModelSpec(model=o["model"], vae=o["vae"], vae_config=o["vae_config"], revision=o["revision"])


def _run_build(build, cfg, quiet: bool, as_json: bool, unit: str) -> None:
    """Run one build with a progress bar, print its summary and exit with its code."""
    with _progress_bar(quiet, unit=unit) as on_progress:
        summary = build(cfg, on_progress)
    _print_summary(summary, as_json)
    sys.exit(EXIT_ITEMS_FAILED if summary.failed else EXIT_OK)


def _parse_batch_size(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: give a number of images, or auto", param_hint="--batch-size") from None


def _parse_resolution(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        return (parts[0], parts[0])
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise click.BadParameter(f"{text!r}: give one side (1024) or W,H (1024,768)", param_hint="--resolution")


class _progress_bar:
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
        post = {"failed": p.failed, "rss": _human_bytes(psutil.Process().memory_info().rss)}
        if p.device_bytes is not None:
            post["dev"] = _human_bytes(p.device_bytes)
        for d in getattr(p, "devices", ()):  # several devices: each one's rate, or that it was lost
            post[d.name] = f"{d.rate:.1f}/s" if d.alive else "lost"
        self.bar.set_postfix(post, refresh=False)

    def __exit__(self, *_):
        if self.bar is not None:
            self.bar.close()


def _print_summary(summary, as_json: bool) -> None:
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
        f"{summary.shards_written} shards, {_human_bytes(summary.bytes_written)} written in {summary.seconds:.1f} s",
        err=True,
    )
    if summary.offloaded:
        click.echo(f"streamed from host memory (--offload): {', '.join(summary.offloaded)}", err=True)
    if summary.truncated:
        click.echo(f"{summary.truncated} caption(s) were longer than an encoder's limit and were truncated", err=True)
    if summary.failed:
        click.echo(f"see why with: cachebuild status {summary.out}", err=True)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
