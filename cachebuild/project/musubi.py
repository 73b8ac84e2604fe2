"""musubi-tuner's dataset config (``--dataset_config``) as a project: the caches its caching scripts write.

musubi-tuner (``dataset/config_utils.py``, ``docs/dataset_config.md``) reads ``[general]`` and ``[[datasets]]``;
a dataset's value wins over ``[general]``'s, then its own default. Each image dataset becomes one cache, built
the way musubi's ``*_cache_latents.py`` and ``*_cache_text_encoder_outputs.py`` compute it (the posterior mode,
musubi's bucket rule, pixels as stored with no EXIF rotation, the VAE's dtype there) and exported into its
``cache_directory`` (default: the image directory) with ``cachebuild export --format musubi``.

Keys, by what happens to them:

* honoured: ``image_directory``, ``cache_directory``, ``resolution`` (default [960, 544]), ``enable_bucket``
  (must be true: with false musubi makes one bucket of exactly ``resolution``, which cachebuild's musubi rule does
  not), ``bucket_no_upscale``, ``caption_extension`` (required: without it musubi encodes an empty caption);
* ignored (training-time, nothing stored changes): ``batch_size``, ``num_repeats``, ``debug_dataset``, the
  FramePack ``fp_*`` keys, and ``multiple_target``, ``no_resize_control``, ``control_resolution`` at their
  defaults;
* refused by name: ``image_jsonl_file`` (absolute paths with their own captions), ``control_directory``,
  ``multiple_target = true``, and video datasets (``video_directory``, ``video_jsonl_file``): no musubi layout of
  cachebuild's takes them yet.
"""

from __future__ import annotations

from pathlib import Path

from cachebuild.config import (
    BucketConfig,
    BucketRule,
    DType,
    ExifMode,
    LatentsConfig,
    LatentsMode,
    ModelSpec,
    TextencConfig,
)
from cachebuild.errors import ConfigError
from cachebuild.project.files import ConfigFile, ProjectError, read_config
from cachebuild.project.spec import CacheSpec, DatasetSpec, ExportSpec, Project, file_keys
from cachebuild.project.trainers import Layers, cache_root, check_keys, folder, outside_files, place, resolution

ASCENDING = {"caption_extension", "batch_size", "num_repeats", "resolution", "enable_bucket", "bucket_no_upscale"}
IMAGE_KEYS = ASCENDING | {
    "image_directory",
    "image_jsonl_file",
    "cache_directory",
    "control_directory",
    "multiple_target",
    "fp_latent_window_size",
    "fp_1f_clean_indices",
    "fp_1f_target_index",
    "fp_1f_no_post",
    "no_resize_control",
    "control_resolution",
    "debug_dataset",
}
VIDEO_KEYS = ASCENDING | {
    "video_directory",
    "video_jsonl_file",
    "control_directory",
    "target_frames",
    "frame_extraction",
    "frame_stride",
    "frame_sample",
    "max_frames",
    "cache_directory",
    "source_fps",
    "fp_latent_window_size",
    "debug_dataset",
}
IGNORED = {"batch_size", "num_repeats", "debug_dataset", "fp_latent_window_size", "fp_1f_clean_indices"}
IGNORED |= {"fp_1f_target_index", "fp_1f_no_post", "no_resize_control", "control_resolution", "multiple_target"}
DEFAULT_RESOLUTION = (960, 544)  # BaseDatasetParams.resolution
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")  # media_utils.IMAGE_EXTENSIONS (+ .jxl
# with a plug-in): musubi globs these in the image directory itself, not in its subfolders
PRESETS = {"qi": "qwen-image", "zi": "z-image", "f2d": "flux2-dev", "f2k4b": "flux2-klein-4b"}
PRESETS["f2k9b"] = "flux2-klein-9b"


def read_musubi(
    path: Path, arch: str | None, model: str | None = None, out: Path | None = None, device: str | None = None
) -> Project:
    """The project of musubi-tuner's dataset config at ``path`` for architecture ``arch``.

    Raises:
        ProjectError: an unknown key, a key cachebuild cannot honour (named), or an arch it has no layout for.
    """
    from cachebuild.consumers.export.musubi import ARCHS

    if arch not in ARCHS:
        raise ConfigError(
            f"--from-musubi needs --arch, one of {', '.join(ARCHS)} (the architectures cachebuild writes musubi "
            f"caches for){'' if arch is None else f'; {arch} is not one of them yet'}"
        )
    cf = read_config(path)
    check_keys(cf, cf.data, (), {"general", "datasets"}, "musubi-tuner")
    general = cf.data.get("general", {})
    check_keys(cf, general, ("general",), ASCENDING, "musubi-tuner [general]")
    tables = cf.data.get("datasets", [])
    if not isinstance(tables, list) or not tables:
        raise cf.error((), "no [[datasets]] table: musubi-tuner's config lists its datasets as [[datasets]]")
    root = cache_root(cf, out, f"musubi-{arch}")
    latent_dtype = DType({"bfloat16": "bf16", "float32": "fp32"}[str(ARCHS[arch].latent_dtype).split(".")[-1]])
    model = model or PRESETS[arch]
    datasets, caches, exports, seen = [], [], [], {}
    for i, table in enumerate(tables):
        layers = Layers(cf, [(table, ("datasets", i)), (general, ("general",))])
        ds, cache, to = _dataset(cf, layers, i, root, model, latent_dtype, device)
        if str(to) in seen:
            raise cf.error(
                layers.where("cache_directory"),
                f"cache_directory {to} is also dataset {seen[str(to)]}'s; musubi-tuner needs one per dataset",
            )
        seen[str(to)] = i + 1
        datasets.append(ds)
        caches.append(cache)
        exports.append(ExportSpec(cache.target, ds.name, "musubi", cache.out, to, {"arch": arch}))
    notes = _notes(tables, general)
    return Project(cf.path, tuple(datasets), tuple(caches), tuple(exports), tuple(notes))


def _dataset(cf: ConfigFile, layers: Layers, i: int, root: Path, model: str, dtype: DType, device):
    """One image dataset's (DatasetSpec, CacheSpec, cache_directory)."""
    table, where = layers.tables[0]
    _refuse(cf, layers)
    images = folder(cf, table["image_directory"], (*where, "image_directory"), "image_directory")
    stray = outside_files(images, IMAGE_EXTENSIONS)
    if stray:
        raise cf.error(
            (*where, "image_directory"),
            f"{len(stray)} image(s) musubi would not read (in a subfolder, or of another type), e.g. {stray[0]}: "
            "their cache files would train too; move them out",
        )
    name, caption_ext = f"{i + 1}-{images.name}", layers.get("caption_extension")
    out = root / name  # cachebuild's own cache; musubi's files go to cache_directory
    try:
        latents = LatentsConfig(
            images, out, ModelSpec(model=model), _buckets(layers), latents=LatentsMode.MEAN, exif=ExifMode.IGNORE,
            dtype=dtype, dtype_out=dtype, device=device,
        )  # fmt: skip
        text = TextencConfig(images, out, model=model, caption_ext=caption_ext, device=device)
    except ProjectError:
        raise
    except ConfigError as exc:
        raise cf.error(where, file_keys(str(exc))) from None
    to = place(table.get("cache_directory") or table["image_directory"])
    return DatasetSpec(name, images, images), CacheSpec(f"musubi-{Path(model).name}", name, out, latents, text), to


def _refuse(cf: ConfigFile, layers: Layers) -> None:
    """Keys of an image dataset whose caches cachebuild cannot write as musubi would, refused by name."""
    table, where = layers.tables[0]
    if "video_directory" in table or "video_jsonl_file" in table:
        check_keys(cf, table, where, VIDEO_KEYS, "musubi-tuner video")
        key = "video_directory" if "video_directory" in table else "video_jsonl_file"
        raise layers.refuse(key, "video datasets: cachebuild writes musubi caches for image architectures only")
    check_keys(cf, table, where, IMAGE_KEYS, "musubi-tuner image")
    refusals = (
        ("image_jsonl_file", "cachebuild reads image folders with caption files beside the images; point "
         "image_directory at the folder instead"),
        ("control_directory", "control images: cachebuild's musubi caches hold no control latents"),
        ("multiple_target", "Qwen-Image-Layered targets: not a layout cachebuild writes"),
    )  # fmt: skip
    for key, why in refusals:
        if layers.get(key):
            raise layers.refuse(key, why)
    if "image_directory" not in table:
        raise cf.error(where, "[[datasets]] needs image_directory (the folder of images)")
    if not layers.typed("enable_bucket", (bool,), False, "true or false"):
        raise layers.refuse(
            "enable_bucket",
            "is false (musubi's default): musubi then makes one bucket of exactly `resolution`; cachebuild builds "
            "musubi's aspect-ratio buckets: set enable_bucket = true",
        )
    if not layers.typed("caption_extension", (str,), None, 'a string such as ".txt"'):
        raise layers.refuse(
            "caption_extension",
            'is not set: musubi then encodes an empty caption for every image; set it, e.g. ".txt"',
        )


def _buckets(layers: Layers) -> BucketConfig:
    no_upscale = layers.typed("bucket_no_upscale", (bool,), False, "true or false")
    try:
        return BucketConfig(resolution(layers, DEFAULT_RESOLUTION), no_upscale=no_upscale, rule=BucketRule.MUSUBI)
    except ConfigError as exc:
        raise layers.cf.error(layers.where("resolution"), file_keys(str(exc))) from None


def _notes(tables: list[dict], general: dict) -> list[str]:
    seen = sorted({k for t in [general, *tables] for k in t if k in IGNORED})
    return [f"ignored {', '.join(seen)}: training-time settings, nothing a cache stores"] if seen else []
