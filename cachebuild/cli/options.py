"""The command line's options, grouped as the commands share them, and the configs built from them. Imports no
torch: ``--help`` stays fast."""

from __future__ import annotations

from pathlib import Path

import click

from cachebuild.config import TextFamily

TEXT_FAMILIES = tuple(f.value for f in TextFamily)  # --family choices; config imports no torch: --help stays fast


class Location(click.ParamType):
    """A local folder or file (a ``Path``), or an fsspec URL such as s3://bucket/images (a ``storage.UrlPath``)."""

    name = "path_or_url"

    def convert(self, value, param, ctx):
        from cachebuild.storage import UrlPath, as_location

        return value if isinstance(value, (Path, UrlPath)) else as_location(str(value))


LOCATION = Location()


def option_group(*options):
    """One decorator that applies ``options`` in the order listed (as --help shows them)."""

    def apply(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return apply


def dtype_option(name: str, default: str | None, help: str):
    choices = ["auto", "fp32", "fp16", "bf16"]
    return click.option(name, type=click.Choice(choices), default=default, show_default=default is not None, help=help)


output_options = option_group(
    click.option("--quiet", "-q", is_flag=True, help="No progress bar; errors and the summary only."),
    click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout."),
)


build_options = option_group(  # every cache-building command
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


vae_options = option_group(  # where the VAE comes from: latents and preview
    click.option(
        "--model",
        help="Preset (sd15, sd2, sdxl, sd3, sd35-large, sd35-medium, flux, chroma, z-image, qwen-image, flux2-dev, "
        "flux2-klein-4b, flux2-klein-9b, hidream, lumina2, sana, flux-kontext; video: wan2.1-t2v-1.3b, wan2.1-t2v-14b, "
        "wan2.2-t2v-a14b, wan2.1-i2v-14b-480p|-720p, wan2.2-i2v-a14b, wan2.2-ti2v-5b, hunyuanvideo-1.5[-720p][-i2v], "
        "ltx-2[-i2v]), pipeline hub id or local pipeline folder.",
    ),
    click.option("--vae", help="VAE hub id, local diffusers folder, or a single .safetensors file."),
    click.option("--vae-config", help="Config folder or hub id for a single-file --vae (default: --model's)."),
    click.option("--revision", help="Hub revision (branch, tag or commit) for hub ids."),
)


bucket_options = option_group(  # which bucket, resize and crop each image gets
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
    click.option(
        "--color",
        type=click.Choice(["none", "icc"]),
        help="Embedded ICC profiles: none (values as stored, as diffusers and the trainers read them) or icc "
        "(converted to sRGB). Default none; a cache built before this option keeps icc.",
    ),
    click.option(
        "--alpha",
        type=click.Choice(["drop", "white", "black"]),
        help="Transparency: drop (the colour under it, as diffusers and the trainers read it) or composite over "
        "white or black. Default drop; a cache built before this option keeps white.",
    ),
    click.option(
        "--alpha-mask", is_flag=True, help="Also store each image's alpha at bucket size, for sd-scripts' --alpha_mask."
    ),
)


DEVICES_OPTION = click.option(
    "--devices",
    help="Encode on several devices, one process each: cuda:0,cuda:1, all (every GPU) or cpu,cpu.",
)
ENGINE_OPTION = click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where to run: this machine, or a Ray cluster (decode tasks, one encoder actor per GPU; needs "
    "cachebuild[ray]).",
)
RAY_ADDRESS_OPTION = click.option(
    "--ray-address",
    help="With --engine ray: auto (the cluster this machine belongs to) or an address; default: a local cluster.",
)


latents_options = option_group(  # what is stored per image and how the encoder runs
    click.option(
        "--latents",
        "latents_mode",
        type=click.Choice(["sample", "mean", "moments"]),
        default="sample",
        show_default=True,
        help="Posterior sample (seeded per item), its mean, or mean and std.",
    ),
    dtype_option(
        "--dtype", "auto", "Compute dtype; auto is bf16 on CUDA from Ampere on, fp16 on older CUDA, else fp32."
    ),
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
    click.option(
        "--control",
        type=click.Path(path_type=Path, file_okay=False),
        help="flux-kontext: folder of condition images, one per image, keyed alike; encoded as the pipeline "
        "encodes its reference image. Image-to-video models: one per video, keyed like it (default: each clip's "
        "first frame).",
    ),
    click.option("--last-frame", is_flag=True, help="Wan I2V: condition on each clip's last frame too (last_image)."),
    click.option("--hash", "hash_files", is_flag=True, help="Fingerprint files by content too (slower scan)."),
    click.option(
        "--read-timeout",
        type=float,
        default=60.0,
        show_default=True,
        help="Seconds one image file's read may take (a stalled mount, a locked file); past it the item fails.",
    ),
    DEVICES_OPTION,
    click.option(
        "--vram-budget",
        type=float,
        help="Device memory for --batch-size auto, GiB (default: free memory at start less 10%, at least 1 GiB).",
    ),
    ENGINE_OPTION,
    RAY_ADDRESS_OPTION,
    click.option(
        "--tiling",
        type=click.Choice(["auto", "off", "on"]),
        default="auto",
        show_default=True,
        help="Video VAEs: encode in overlapping spatial tiles (less device memory; the latents change, see "
        "docs/cli.md; recorded); auto: a new cache only where its largest clip does not fit --vram-budget whole.",
    ),
    click.option("--tile-size", type=int, help="Tile side, pixels (default: the VAE's own: 256; LTX-2 512)."),
    click.option("--tile-stride", type=int, help="Pixels between tile starts (default: the VAE's: 192; LTX-2 448)."),
)


text_encoder_options = option_group(  # which encoders run and which of their outputs are stored
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


caption_options = option_group(
    click.option("--caption-ext", default=".txt", show_default=True, help="Caption file extension."),
    click.option("--caption-column", default="text", show_default=True, help="Text column of a metadata file."),
    click.option(
        "--caption-max-bytes",
        type=int,
        default=64 * 1024,
        show_default=True,
        help="Bytes of a caption read and encoded; a longer one is cut there and reported (over 16 MiB it fails).",
    ),
)


text_run_options = option_group(  # how the text encoders run
    click.option("--revision", help="Hub revision (branch, tag or commit) for hub ids."),
    dtype_option(
        "--dtype",
        "auto",
        "Compute dtype of the encoders; auto is bf16 on CUDA from Ampere on, fp16 on older CUDA, else fp32.",
    ),
    dtype_option(
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
    DEVICES_OPTION,
    ENGINE_OPTION,
    RAY_ADDRESS_OPTION,
)


def latents_config(dataset: Path, o: dict):
    """The one LatentsConfig that the latents command's options describe."""
    from cachebuild.cli.clips import clip_config
    from cachebuild.config import (
        AlphaMode,
        BucketConfig,
        BucketRule,
        ColorMode,
        CropMode,
        DType,
        EngineKind,
        ExifMode,
        LatentsConfig,
        LatentsMode,
        TilingMode,
        default_workers,
    )
    from cachebuild.engines.devices import parse_devices

    buckets = BucketConfig(
        parse_resolution(o["resolution"]),
        o["min_bucket_reso"],
        o["max_bucket_reso"],
        o["bucket_reso_steps"],
        o["bucket_no_upscale"],
        BucketRule(o.get("bucket_rule") or "kohya"),
    )
    return LatentsConfig(
        dataset=dataset,
        model=model_spec(o),
        buckets=buckets,
        crop=CropMode.RANDOM if o["random_crop"] else CropMode.CENTER,
        seed=o["seed"],
        flip=o["flip_aug"],
        latents=LatentsMode(o["latents_mode"]),
        dtype=DType(o["dtype"]),
        batch_size=parse_batch_size(o["batch_size"]),
        workers=default_workers() if o["workers"] is None else o["workers"],
        devices=parse_devices(o["devices"]) if o["devices"] else (),
        vram_budget_gb=o["vram_budget"],
        engine=EngineKind(o["engine"]),
        ray_address=o["ray_address"],
        max_pixels=o["max_pixels"],
        hash_files=o["hash_files"],
        exif=ExifMode(o.get("exif") or "apply"),
        color=ColorMode(o["color"]) if o.get("color") else None,  # unset: see images.pixels.run_pixels
        alpha=AlphaMode(o["alpha"]) if o.get("alpha") else None,
        alpha_mask=bool(o.get("alpha_mask")),
        clips=clip_config(o),  # cli.clips
        read_timeout=o["read_timeout"],
        control=o.get("control"),
        last_frame=bool(o.get("last_frame")),
        tiling=TilingMode(o.get("tiling") or "auto"),
        tile_size=o.get("tile_size"),
        tile_stride=o.get("tile_stride"),
        **build_settings(o),
    )


def textenc_config(captions: Path, o: dict):
    """The one TextencConfig that the textenc command's options describe."""
    from cachebuild.config import DType, EngineKind, Offload, TextencConfig, TextFamily
    from cachebuild.engines.devices import parse_devices

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
        caption_max_bytes=o["caption_max_bytes"],
        revision=o["revision"],
        dtype=DType(o["dtype"]),
        t5_dtype=DType(o["t5_dtype"]) if o["t5_dtype"] else None,
        batch_size=o["batch_size"],
        chunk_mb=o["chunk_mb"],
        offload=Offload(o["offload"]),
        control=o["control"],
        devices=parse_devices(o["devices"]) if o["devices"] else (),
        engine=EngineKind(o["engine"]),
        ray_address=o["ray_address"],
        **build_settings(o),
    )


def build_settings(o: dict) -> dict:
    """The config fields of ``build_options``, which every cache-building command shares."""
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


def model_spec(o: dict):
    from cachebuild.config import ModelSpec

    return ModelSpec(model=o["model"], vae=o["vae"], vae_config=o["vae_config"], revision=o["revision"])


def parse_batch_size(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: give a number of images, or auto", param_hint="--batch-size") from None


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        return (parts[0], parts[0])
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise click.BadParameter(f"{text!r}: give one side (1024) or W,H (1024,768)", param_hint="--resolution")
