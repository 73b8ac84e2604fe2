"""sd-scripts' dataset config (``--dataset_config``, TOML or JSON) as a project: the ``.npz`` caches it writes
beside the images with ``--cache_latents_to_disk`` and ``--cache_text_encoder_outputs_to_disk``.

sd-scripts (``library/config_util.py``, ``docs/config_README-en.md``) reads ``[general]``, ``[[datasets]]`` and
their ``[[datasets.subsets]]``; a value is looked up in the subset, the dataset, then ``[general]``, then the
default. Each subset (one ``image_dir``) becomes one cache, exported beside its images with
``cachebuild export --format kohya``. Images are read as sd-scripts reads them (no EXIF rotation), centre-cropped,
and the latents sampled from the posterior, as its caching does.

Keys, by what happens to them:

* honoured: ``image_dir``, ``resolution``, ``enable_bucket`` (false: one bucket of exactly ``resolution``, square
  only), ``min_bucket_reso`` (256), ``max_bucket_reso`` (1024), ``bucket_reso_steps`` (64),
  ``bucket_no_upscale``, ``flip_aug``, ``caption_extension`` (``.caption``), ``alpha_mask`` where cachebuild stores
  masks, ``resize_interpolation = "lanczos"`` (what cachebuild resizes with);
* ignored (training-time, nothing stored changes): ``batch_size``, ``num_repeats``, ``keep_tokens`` and the
  separators, ``caption_prefix``/``caption_suffix`` (sd-scripts' text cache holds the caption without them),
  ``face_crop_aug_range`` (its caching does not apply it), ``is_reg``, ``cache_info``, ``network_multiplier``,
  ``validation_*``, ``custom_attributes``, ``token_warmup_min``, ``debug_dataset``, ``class_tokens`` where every
  image has a caption file;
* text not cached, as sd-scripts refuses to: ``shuffle_caption``, ``enable_wildcard``, caption and tag dropout,
  ``token_warmup_step`` (the caption changes every step); the latents are still built;
* refused by name: ``random_crop`` and ``color_aug`` (sd-scripts cannot cache those latents either),
  ``metadata_file`` (fine-tuning metadata), ``conditioning_data_dir`` (ControlNet), another
  ``resize_interpolation``, ``class_tokens`` for images without a caption file, multi-line caption files (sd-scripts
  encodes the first line only).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cachebuild.config import PRESET_FAMILY, PRESETS, BucketConfig, ExifMode, LatentsConfig, ModelSpec, TextencConfig
from cachebuild.errors import ConfigError
from cachebuild.project.files import ProjectError, read_config
from cachebuild.project.spec import CacheSpec, DatasetSpec, ExportSpec, Project, file_keys
from cachebuild.project.trainers import Layers, cache_root, check_keys, folder, outside_files, resolution

DATASET_KEYS = {"batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso"}
DATASET_KEYS |= {"min_bucket_reso", "validation_seed", "validation_split", "resolution", "network_multiplier"}
DATASET_KEYS |= {"resize_interpolation", "debug_dataset", "prior_loss_weight"}
SUBSET_KEYS = {"color_aug", "face_crop_aug_range", "flip_aug", "num_repeats", "random_crop", "shuffle_caption"}
SUBSET_KEYS |= {"keep_tokens", "keep_tokens_separator", "secondary_separator", "caption_separator", "enable_wildcard"}
SUBSET_KEYS |= {"token_warmup_min", "token_warmup_step", "caption_prefix", "caption_suffix", "custom_attributes"}
SUBSET_KEYS |= {"resize_interpolation", "caption_dropout_every_n_epochs", "caption_dropout_rate"}
SUBSET_KEYS |= {"caption_tag_dropout_rate", "caption_extension", "class_tokens", "cache_info", "validation_seed"}
SUBSET_KEYS |= {"validation_split"}
OWN_SUBSET_KEYS = {"image_dir", "is_reg", "alpha_mask", "metadata_file", "conditioning_data_dir"}
IGNORED = {"batch_size", "num_repeats", "keep_tokens", "keep_tokens_separator", "secondary_separator"}
IGNORED |= {"caption_separator", "caption_prefix", "caption_suffix", "face_crop_aug_range", "is_reg", "cache_info"}
IGNORED |= {"network_multiplier", "validation_seed", "validation_split", "custom_attributes", "token_warmup_min"}
IGNORED |= {"debug_dataset", "prior_loss_weight"}
DEFAULTS = {"min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64, "caption_extension": ".caption"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")  # train_util.IMAGE_EXTENSIONS (+ .jxl)
KOHYA_FAMILY = {"sd15": "sd", "sd2": "sd", "sdxl": "sdxl", "flux": "flux", "sd3": "sd3", "lumina2": "lumina"}
TEXT_LAYOUTS = {"sdxl", "flux", "sd3", "lumina"}  # families whose text outputs sd-scripts caches to disk


def read_kohya(path: Path, model: str | None, out: Path | None = None, device: str | None = None) -> Project:
    """The project of sd-scripts' dataset config at ``path`` for ``model`` (a preset, hub id or folder).

    Raises:
        ProjectError: an unknown key, a key cachebuild cannot honour (named), a model sd-scripts has no cache for.
    """
    family = _family(model)
    cf = read_config(path)
    check_keys(cf, cf.data, (), {"general", "datasets"}, "sd-scripts")
    general = cf.data.get("general", {})
    check_keys(cf, general, ("general",), DATASET_KEYS | SUBSET_KEYS | {"class_tokens", "cache_info"}, "sd-scripts")
    datasets, caches, exports, notes = [], [], [], set()
    root = cache_root(cf, out, f"kohya-{Path(model).name}")
    for i, table in enumerate(cf.data.get("datasets", [])):
        check_keys(cf, table, ("datasets", i), DATASET_KEYS | SUBSET_KEYS | {"subsets"}, "sd-scripts [[datasets]]")
        for j, subset in enumerate(table.get("subsets", [])):
            where = ("datasets", i, "subsets", j)
            check_keys(cf, subset, where, SUBSET_KEYS | OWN_SUBSET_KEYS, "sd-scripts [[datasets.subsets]]")
            layers = Layers(cf, [(subset, where), (table, ("datasets", i)), (general, ("general",))])
            ds, cache = _subset(layers, f"{i + 1}.{j + 1}", root, model, family, device, notes)
            datasets.append(ds)
            caches.append(cache)
            options = {"family": family} if family else {}
            if family == "lumina":  # its text file holds input_ids, tokenized again with the pipeline's tokenizer
                options["model"] = model
            exports.append(ExportSpec(cache.target, ds.name, "kohya", cache.out, ds.path, options))
    if not caches:
        raise cf.error((), "no [[datasets.subsets]] with an image_dir: sd-scripts would find no image either")
    for tables in [general, *cf.data.get("datasets", [])]:
        notes |= {f"ignored {k}: a training-time setting, nothing a cache stores" for k in tables if k in IGNORED}
    return Project(cf.path, tuple(datasets), tuple(caches), tuple(exports), tuple(sorted(notes)))


def _family(model: str | None) -> str | None:
    """sd-scripts' name for the model's family (None: told from the cache when it is exported)."""
    if not model:
        raise ConfigError("--from-kohya needs --model: sdxl, sd15, flux, sd3, lumina2, a hub id or a local folder")
    if model not in PRESETS:
        return None
    family = PRESET_FAMILY.get(model, model)
    family = "sd3" if model.startswith("sd35") else family
    if family not in KOHYA_FAMILY:
        raise ConfigError(f"sd-scripts has no cache layout for {model}; build it with --from-musubi or a project file")
    return KOHYA_FAMILY[family]


def _subset(layers: Layers, name: str, root: Path, model: str, family: str | None, device, notes: set):
    subset, where = layers.tables[0]
    for key, why in (
        ("metadata_file", "fine-tuning metadata: cachebuild reads caption files beside the images"),
        ("conditioning_data_dir", "ControlNet conditioning images: not a cache cachebuild writes"),
    ):
        if key in subset:
            raise layers.refuse(key, why)
    for key in ("random_crop", "color_aug"):
        if layers.typed(key, (bool,), False, "true or false"):
            raise layers.refuse(key, "sd-scripts cannot cache the latents of this augmentation either; drop it")
    if "image_dir" not in subset:
        raise layers.cf.error(where, "[[datasets.subsets]] needs image_dir (the folder of images)")
    images = folder(layers.cf, subset["image_dir"], (*where, "image_dir"), "image_dir")
    stray = outside_files(images, IMAGE_EXTENSIONS)
    if stray:
        notes.add(f"{images}: {len(stray)} image(s) sd-scripts does not read (e.g. {stray[0]}) are cached too")
    out = root / f"{name}-{images.name}"  # sd-scripts' files go beside the images; cachebuild's own cache here
    latents = _latents(layers, images, out, model, device)
    text = None
    if family is None or family in TEXT_LAYOUTS:
        text = _text(layers, images, out, model, device, notes)
    name = f"{name}-{images.name}"
    return DatasetSpec(name, images, images), CacheSpec("kohya", name, out, latents, text)


def _latents(layers: Layers, images: Path, out: Path, model: str, device) -> LatentsConfig:
    interpolation = layers.get("resize_interpolation")
    if interpolation not in (None, "lanczos"):
        raise layers.refuse("resize_interpolation", 'cachebuild resizes with Lanczos; use "lanczos" or leave it out')
    extra = {}
    if layers.typed("alpha_mask", (bool,), False, "true or false"):
        if "alpha_mask" not in {f.name for f in dataclasses.fields(LatentsConfig)}:
            raise layers.refuse("alpha_mask", "this cachebuild stores no alpha masks yet")
        extra["alpha_mask"] = True
    try:
        return LatentsConfig(
            images,
            out,
            ModelSpec(model=model),
            _buckets(layers),
            flip=layers.typed("flip_aug", (bool,), False, "true or false"),
            exif=ExifMode.IGNORE,
            device=device,
            **extra,
        )
    except ConfigError as exc:
        raise layers.cf.error(layers.tables[0][1], file_keys(str(exc))) from None


def _buckets(layers: Layers) -> BucketConfig:
    w, h = resolution(layers, None)
    ints = {k: layers.typed(k, (int,), DEFAULTS[k], "a whole number") for k in DEFAULTS if k != "caption_extension"}
    try:
        if layers.typed("enable_bucket", (bool,), False, "true or false"):
            no_upscale = layers.typed("bucket_no_upscale", (bool,), False, "true or false")
            return BucketConfig(
                (w, h), ints["min_bucket_reso"], ints["max_bucket_reso"], ints["bucket_reso_steps"], no_upscale
            )
        if w != h:
            raise layers.refuse(
                "enable_bucket",
                f"is false with a {w}x{h} resolution: cachebuild makes a single "
                "fixed bucket only when it is square; set enable_bucket = true",
            )
        steps = next((s for s in (64, 16, 8) if w % s == 0), 0)
        if not steps:
            raise layers.refuse("resolution", f"{w} is not a multiple of 8 pixels")
        return BucketConfig((w, h), w, w, steps)  # min = max = the side: one bucket, the image resized to cover it
    except ProjectError:
        raise
    except ConfigError as exc:
        raise layers.cf.error(layers.where("resolution"), file_keys(str(exc))) from None


def _text(layers: Layers, images: Path, out: Path, model: str, device, notes: set) -> TextencConfig | None:
    """The text cache sd-scripts would write for the subset, or None where it caches none (the caption changes
    from step to step)."""
    changing = [
        k
        for k, on in (
            ("shuffle_caption", layers.get("shuffle_caption")),
            ("enable_wildcard", layers.get("enable_wildcard")),
            ("caption_dropout_rate", (layers.get("caption_dropout_rate") or 0) > 0),
            ("caption_dropout_every_n_epochs", (layers.get("caption_dropout_every_n_epochs") or 0) > 0),
            ("caption_tag_dropout_rate", (layers.get("caption_tag_dropout_rate") or 0) > 0),
            ("token_warmup_step", (layers.get("token_warmup_step") or 0) > 0),
        )
        if on
    ]
    if changing:
        notes.add(f"{images}: text outputs not cached ({', '.join(changing)}): sd-scripts cannot cache them either")
        return None
    ext = layers.typed("caption_extension", (str,), DEFAULTS["caption_extension"], 'a string such as ".txt"')
    _check_captions(layers, images, ext)
    try:
        return TextencConfig(images, out, model=model, caption_ext=ext, device=device)
    except ConfigError as exc:
        raise layers.cf.error(layers.tables[0][1], file_keys(str(exc))) from None


def _check_captions(layers: Layers, images: Path, ext: str) -> None:
    """sd-scripts encodes a caption file's first line, and ``class_tokens`` for an image without one: refuse
    what cachebuild would encode otherwise."""
    from cachebuild.sources.scan import scan_files

    for f in scan_files(images).files:
        caption = images / (os.path.splitext(f.path)[0] + ext)
        if not caption.is_file():
            if layers.get("class_tokens"):
                raise layers.refuse(
                    "class_tokens",
                    f"{f.path} has no {ext} file, so sd-scripts would encode "
                    "class_tokens for it; cachebuild encodes caption files only: write one",
                )
            continue
        lines = [line for line in caption.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        if len(lines) > 1:
            raise layers.refuse(
                "caption_extension",
                f"{caption.name} has {len(lines)} lines: sd-scripts encodes the "
                "first only, cachebuild the whole file; keep one line per caption file",
            )
