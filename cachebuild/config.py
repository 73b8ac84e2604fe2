"""Frozen configuration objects for a cache build.

Every option a user can pass lands in one of these dataclasses. Invalid values and combinations fail in
``__post_init__`` with a message that names the fix, before any file is read or model loaded.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from cachebuild.errors import ConfigError


class LatentsMode(str, Enum):
    """What is stored per image."""

    SAMPLE = "sample"  # one draw of the posterior, seeded per item key (what kohya and diffusers scripts cache)
    MEAN = "mean"  # the posterior mean: deterministic, no noise
    MOMENTS = "moments"  # mean and std, so a reader can draw a fresh sample every epoch (2x the bytes)


class DType(str, Enum):
    AUTO = "auto"  # compute only: bf16 on a CUDA device that supports it, else fp32
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def torch(self):
        import torch

        if self is DType.AUTO:
            raise ConfigError("internal: resolve DType.AUTO for a device before asking for a torch dtype")
        return {DType.FP32: torch.float32, DType.FP16: torch.float16, DType.BF16: torch.bfloat16}[self]


class CropMode(str, Enum):
    CENTER = "center"
    RANDOM = "random"  # deterministic per item key and --seed, never per batch


class BucketRule(str, Enum):
    """Which trainer's rule puts an image into a bucket (the resize and the centre crop are the same)."""

    KOHYA = "kohya"  # sd-scripts: --resolution area, --bucket-reso-steps, min/max side (docs/cli.md)
    MUSUBI = "musubi"  # musubi-tuner's BucketSelector: sides in steps of 16, no min/max side (docs/export.md)


class StoreFormat(str, Enum):
    SAFETENSORS = "safetensors"
    HDF5 = "hdf5"


class EngineKind(str, Enum):
    """Where the stages run (``engines/``)."""

    LOCAL = "local"  # this machine: one device, or one process per --devices entry
    RAY = "ray"  # a Ray cluster: decode tasks, one encoder actor per GPU (pip install cachebuild[ray])


class ExifMode(str, Enum):
    """Whether decoding applies the EXIF orientation tag (images.load)."""

    APPLY = "apply"  # upright, as a viewer shows it; the recorded original size is the upright size
    IGNORE = "ignore"  # pixels and size as stored in the file, as sd-scripts and musubi-tuner read them

    @classmethod
    def recorded(cls, fingerprint: dict | None) -> ExifMode:
        """The mode a latents cache was built with: its fingerprint names it only when ``ignore``."""
        return cls((fingerprint or {}).get("exif", cls.APPLY.value))


class ColorMode(str, Enum):
    """What decoding does with an embedded ICC profile (images.pixels)."""

    NONE = "none"  # nothing: the stored values, as diffusers' load_image, sd-scripts and musubi-tuner read them
    ICC = "icc"  # converted to sRGB (LittleCMS), so the VAE sees the colours a colour-managed viewer shows


class AlphaMode(str, Enum):
    """What decoding does with transparency (images.pixels)."""

    DROP = "drop"  # the colour under it, alpha dropped: Pillow's convert("RGB"), as the trainers read it
    WHITE = "white"  # composited over white
    BLACK = "black"  # composited over black


class ExtractMode(str, Enum):
    """How clips are cut from a video (musubi-tuner's ``frame_extraction``; video.clips has the rules)."""

    HEAD = "head"  # one clip per --frames count, from the first frame
    CHUNK = "chunk"  # back-to-back clips of each count: starts 0, N, 2N, ... while a whole clip fits
    SLIDE = "slide"  # a window of each count every --stride frames
    UNIFORM = "uniform"  # --samples clips of each count, starts spread evenly over the video
    FULL = "full"  # the whole video (at most --max-frames), cut down to the frame rule


@dataclass(frozen=True)
class ClipConfig:
    """How videos become clips: one item per clip. Fields left None were not given (their mode's default
    applies); one given for a mode that does not use it is refused, so a typo never passes silently."""

    frames: tuple[int, ...] | None = None  # target frame counts (--frames 17,33,81); each must fit the family's
    # frame rule (4k+1 for Wan), checked once the family is known; None: only --extract full needs none
    extract: ExtractMode = ExtractMode.HEAD
    stride: int | None = None  # slide: frames between window starts (default 1)
    samples: int | None = None  # uniform: clips per count (default 1)
    max_frames: int | None = None  # full: longest clip (default 129, musubi's)
    fps: float | str | None = None  # resample to this rate by dropping frames; "family": the family's own
    # (Wan 16); None: every frame of the source is kept
    source_fps: float | None = None  # with fps: the source's rate instead of the container's timestamps

    def __post_init__(self) -> None:
        if self.frames is not None and (not self.frames or min(self.frames) < 1):
            raise ConfigError(f"--frames takes positive frame counts such as 17,33,81; got {self.frames}")
        for name, value, mode in (
            ("--stride", self.stride, ExtractMode.SLIDE),
            ("--samples", self.samples, ExtractMode.UNIFORM),
            ("--max-frames", self.max_frames, ExtractMode.FULL),
        ):
            if value is not None and self.extract is not mode:
                raise ConfigError(f"{name} is for --extract {mode.value}; drop it or pass --extract {mode.value}")
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.extract is ExtractMode.FULL and self.frames is not None:
            raise ConfigError("--extract full takes the whole video (up to --max-frames); drop --frames")
        if self.fps is not None and self.fps != "family" and not float(self.fps) > 0:
            raise ConfigError(f"--fps must be a positive rate, or given alone for the family's; got {self.fps}")
        if self.source_fps is not None and (self.fps is None or not self.source_fps > 0):
            raise ConfigError("--source-fps (positive) only sets the source rate for --fps; add --fps or drop it")

    @property
    def max_frames_or_default(self) -> int:
        return 129 if self.max_frames is None else self.max_frames  # musubi-tuner's max_frames default


class TilingMode(str, Enum):
    """Whether a video VAE encodes a clip in overlapping spatial tiles (families.video_vae); tiles lower device
    memory and change the latents slightly, so what a run used is recorded in the fingerprint."""

    AUTO = "auto"  # a new cache: untiled when the largest clip fits --vram-budget at batch 1, else tiled; a cache
    # being finished: what it was started with
    OFF = "off"  # never: the latents are exactly the untiled encode
    ON = "on"  # always, with the VAE's own tile size and stride unless --tile-size/--tile-stride say otherwise


PRESETS: dict[str, str] = {
    # --model NAME -> the public pipeline repository whose `vae` (and text encoders) are used
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "flux": "black-forest-labs/FLUX.1-dev",
    "sd35-large": "stabilityai/stable-diffusion-3.5-large",
    "sd35-medium": "stabilityai/stable-diffusion-3.5-medium",
    "chroma": "lodestones/Chroma1-HD",
    "z-image": "Tongyi-MAI/Z-Image-Turbo",
    "qwen-image": "Qwen/Qwen-Image",
    "flux2-dev": "black-forest-labs/FLUX.2-dev",
    "flux2-klein-4b": "black-forest-labs/FLUX.2-klein-4B",  # Qwen3-4B text encoder
    "flux2-klein-9b": "black-forest-labs/FLUX.2-klein-9B",  # Qwen3-8B text encoder
    "hidream": "HiDream-ai/HiDream-I1-Full",  # its Llama 3.1 from families.hidream.LLAMA_REPO where the repo has none
    "lumina2": "Alpha-VLLM/Lumina-Image-2.0",
    "sana": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",  # loads without a variant; Sana's own docs load
    # the BF16 repos (the pipeline docstring's example) with variant="bf16", which cachebuild does not pass
}
# presets whose family goes by another name
PRESET_FAMILY = {"sd35-large": "sd3", "sd35-medium": "sd3", "flux2-dev": "flux2"}
READ_TIMEOUT_SECONDS = 60.0  # default --read-timeout: a disk or mount that gives no image file in a minute (a
# 500 MB TIFF at 10 MB/s is 50 s) is stalled (a dead NFS or FUSE server, a file locked by a lease), not slow
CAPTION_MAX_BYTES = 64 * 1024  # default --caption-max-bytes: the prefix of a caption that is read and encoded.
# The longest encoder windows (1024 tokens) take a few KB of text; a caption past this is cut here, so reading,
# hashing and tokenizing it cost the same whatever the file's size
CAPTION_FILE_LIMIT_BYTES = 16 * 1024 * 1024  # a caption (file or metadata text) larger than this fails, its size
# and this limit named: no caption is that long, so it is a wrong or damaged file rather than text to train on
PRESETS["qwen-image-edit"] = "Qwen/Qwen-Image-Edit"  # QwenImageEditPipeline's docstring
PRESETS["qwen-image-edit-2509"] = "Qwen/Qwen-Image-Edit-2509"  # QwenImageEditPlusPipeline's docstring
PRESET_FAMILY["qwen-image-edit-2509"] = "qwen-image-edit-plus"
PRESET_FAMILY |= {"flux2-klein-4b": "flux2-klein", "flux2-klein-9b": "flux2-klein"}
HUNYUANVIDEO15_REPO = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-{}"  # diffusers' model docs; the pipeline
# docstrings name the same repositories without "-Diffusers". One VAE for every variant; the transformers differ
PRESETS |= {  # the video families' diffusers repositories, as their pipelines' docstrings and docs name them
    "wan2.1-t2v-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "wan2.1-t2v-14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    "wan2.2-t2v-a14b": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "wan2.1-i2v-14b-480p": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    "wan2.1-i2v-14b-720p": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
    "wan2.2-i2v-a14b": "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
    "wan2.2-ti2v-5b": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    "hunyuanvideo-1.5": HUNYUANVIDEO15_REPO.format("480p_t2v"),  # the pipeline docstring's example
    "hunyuanvideo-1.5-720p": HUNYUANVIDEO15_REPO.format("720p_t2v"),
    "hunyuanvideo-1.5-i2v": HUNYUANVIDEO15_REPO.format("480p_i2v"),
    "hunyuanvideo-1.5-720p-i2v": HUNYUANVIDEO15_REPO.format("720p_i2v"),
    "ltx-2": "Lightricks/LTX-2",  # LTX2Pipeline's and LTX2ImageToVideoPipeline's docstrings: one repository
    "ltx-2-i2v": "Lightricks/LTX-2",  # the same repository, its image-to-video pipeline (families.i2v)
    "flux-kontext": "black-forest-labs/FLUX.1-Kontext-dev",  # FluxKontextPipeline's docstring
}
PRESET_FAMILY |= {name: "wan" for name in PRESETS if name.startswith("wan2.")}
PRESET_FAMILY["ltx-2-i2v"] = "ltx-2"
PRESET_FAMILY |= {
    name: "hunyuanvideo-1.5" for name in ("hunyuanvideo-1.5-720p", "hunyuanvideo-1.5-i2v", "hunyuanvideo-1.5-720p-i2v")
}


def check_output(out: Path, dtype_out: DType, fmt: StoreFormat, shard_mb: float) -> None:
    """The checks every cache-building config makes on where and how it writes."""
    if shard_mb <= 0:
        raise ConfigError(f"--shard-mb must be positive, got {shard_mb}")
    if dtype_out is DType.AUTO:  # None (text: the family's default) passes
        raise ConfigError("--dtype-out takes fp16, bf16 or fp32, not auto")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; pass a folder path")
    require_format(fmt)


def require_format(fmt: StoreFormat) -> None:
    """Fail before any work when the shard format's optional package is not installed."""
    if fmt is StoreFormat.HDF5 and importlib.util.find_spec("h5py") is None:
        raise ConfigError("--format hdf5 needs the h5py package; install it with: pip install 'cachebuild[hdf5]'")


def default_workers() -> int:
    """Decode processes: leave one core for the main process, and more than 8 rarely helps one GPU."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class BucketConfig:
    """kohya-compatible aspect-ratio buckets. All sizes are pixels."""

    resolution: tuple[int, int] = (1024, 1024)  # (W, H); bucket area is about W * H
    min_reso: int = 256  # smallest bucket side
    max_reso: int = 2048  # largest bucket side
    steps: int = 64  # every bucket side is a multiple of this
    no_upscale: bool = False  # buckets follow each image's own size; images are never enlarged
    rule: BucketRule = BucketRule.KOHYA  # musubi: musubi-tuner's selector, which ignores steps and min/max side

    def __post_init__(self) -> None:
        w, h = self.resolution
        if w <= 0 or h <= 0:
            raise ConfigError(f"--resolution must be positive, got {w},{h}; for example --resolution 1024")
        if self.steps <= 0:
            raise ConfigError(f"--bucket-reso-steps must be positive, got {self.steps}; 64 is the usual value")
        if self.min_reso % self.steps or self.max_reso % self.steps:
            raise ConfigError(
                f"--min-bucket-reso ({self.min_reso}) and --max-bucket-reso ({self.max_reso}) must be multiples "
                f"of --bucket-reso-steps ({self.steps})"
            )
        if not 0 < self.min_reso <= self.max_reso:
            raise ConfigError(
                f"--min-bucket-reso ({self.min_reso}) must be positive and at most --max-bucket-reso ({self.max_reso})"
            )
        if min(w, h) < self.min_reso and self.rule is BucketRule.KOHYA:
            raise ConfigError(
                f"--resolution {w},{h} is below --min-bucket-reso {self.min_reso}; lower --min-bucket-reso"
            )

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


@dataclass(frozen=True)
class ModelSpec:
    """Where the VAE comes from. Exactly one of ``vae`` and ``model`` is needed; both may be given."""

    model: str | None = None  # preset name, hub id or local folder of a whole pipeline (its `vae` subfolder)
    vae: str | None = None  # hub id, local diffusers folder, or a single .safetensors file
    vae_config: str | None = None  # config folder/hub id for a single-file VAE (default: the preset's)
    revision: str | None = None  # hub revision (branch, tag or commit) for hub ids

    def __post_init__(self) -> None:
        if not self.model and not self.vae:
            raise ConfigError(
                "no model given: pass --model sd15|sdxl|sd3|flux|chroma|... (or a pipeline hub id / folder), or --vae "
                "<hub id | folder | file.safetensors>"
            )

    @property
    def preset(self) -> str | None:
        return self.model if self.model in PRESETS else None

    @property
    def pipeline(self) -> str | None:
        """The pipeline repository or folder that ``--model`` names, presets expanded."""
        if self.model is None:
            return None
        return PRESETS.get(self.model, self.model)


@dataclass(frozen=True)
class LatentsConfig:
    """Everything one ``cachebuild latents`` run needs."""

    dataset: Path
    out: Path
    model: ModelSpec
    buckets: BucketConfig = field(default_factory=BucketConfig)
    crop: CropMode = CropMode.CENTER
    seed: int = 0  # seeds random crops and `sample` draws, per item key
    flip: bool = False  # also store latents of the horizontally mirrored image
    latents: LatentsMode = LatentsMode.SAMPLE
    dtype: DType = DType.AUTO  # compute dtype on the device
    dtype_out: DType = DType.FP16  # stored dtype: raw latents stay within a few hundred, where fp16 is exact
    # to 11 bits (bf16 only to 8); an overflow is caught by the non-finite guard, never written
    batch_size: int | None = None  # images per encoder call; None (auto): per bucket shape, the largest that fits
    # --vram-budget (engines.batchsize), 4 on a CPU; halved automatically on out-of-memory either way
    workers: int = field(default_factory=default_workers)  # decode processes; 0 decodes in this process
    device: str | None = None  # None: cuda, then mps, then cpu
    format: StoreFormat = StoreFormat.SAFETENSORS
    shard_mb: float = 64.0  # shard size on disk; also bounds host memory (about 2 shards' worth at the write)
    max_pixels: int = 178_956_970  # larger images fail as decompression bombs (Pillow's own hard limit)
    hash_files: bool = False  # add a content hash to each file's fingerprint (size + mtime_ns otherwise)
    retry_failed: bool = False  # encode items that failed in an earlier run again
    rebuild: bool = False  # discard entries made with other settings instead of refusing
    prune: bool = False  # False: a scan that finds nothing, or loses many done items, refuses (cache.store)
    devices: tuple[str, ...] = ()  # several: one encoder process per device (engines.devices); () : --device
    vram_budget_gb: float | None = None  # device memory a batch-size search may plan for, GiB; None: free memory
    # at start less a margin (engines.batchsize.default_budget)
    manifest_dir: Path | None = None  # where a URL --out keeps its manifest locally; None: under the user cache
    # folder, keyed by the URL (cache.remote). Unused for a local --out, whose manifest lives in it
    engine: EngineKind = EngineKind.LOCAL  # ray: a Ray cluster (engines.ray_cluster); the bytes are the same
    ray_address: str | None = None  # --engine ray: "auto" or a cluster address; None starts a local cluster
    exif: ExifMode = ExifMode.APPLY  # ignore: decode unrotated, as sd-scripts and musubi do (their exports need it)
    color: ColorMode | None = None  # None: not set, so none, or what a cache built before the option recorded
    alpha: AlphaMode | None = None  # None: not set, so drop, or what a cache built before the option recorded
    alpha_mask: bool = False  # also store each image's alpha channel at bucket size (sd-scripts' --alpha_mask)
    clips: ClipConfig = field(default_factory=ClipConfig)  # how videos become clips (video families only)
    read_timeout: float = READ_TIMEOUT_SECONDS  # one file's read (header or bytes) may take this long, then fails
    control: Path | None = None  # flux-kontext: the folder of condition images, one per image key (jobs.control);
    # image-to-video models: one per video (or image) key, instead of each clip's first frame (jobs.conditions)
    last_frame: bool = False  # Wan I2V: condition on each clip's last frame too (the pipeline's last_image)
    tiling: TilingMode = TilingMode.AUTO  # video VAEs: spatial tiles (families.video_vae.resolve_tiling)
    tile_size: int | None = None  # tiled: tile side in image pixels; None: the VAE's own (256; LTX-2 512)
    tile_stride: int | None = None  # tiled: pixels between tile starts; None: the VAE's own (192; LTX-2 448)

    def __post_init__(self) -> None:
        if self.read_timeout <= 0:
            raise ConfigError(f"--read-timeout must be positive (seconds), got {self.read_timeout}")
        if self.control is not None and not self.control.is_dir():
            raise ConfigError(f"--control {self.control} is not a folder; pass the folder of condition images")
        if self.control is not None and self.engine is EngineKind.RAY:
            raise ConfigError("--control encodes the condition images on this machine; drop --engine ray")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be auto or at least 1, got {self.batch_size}")
        if self.vram_budget_gb is not None and self.vram_budget_gb <= 0:
            raise ConfigError(f"--vram-budget must be positive (GiB), got {self.vram_budget_gb}")
        if self.devices and self.device is not None:
            raise ConfigError("--device and --devices name the devices twice; pass one of them")
        if self.workers < 0:
            raise ConfigError(f"--workers must be 0 (decode in this process) or more, got {self.workers}")
        if self.max_pixels < 1:
            raise ConfigError(f"--max-pixels must be positive, got {self.max_pixels}")
        if not self.dataset.is_dir():
            raise ConfigError(f"dataset folder {self.dataset} does not exist or is not a folder")
        check_output(self.out, self.dtype_out, self.format, self.shard_mb)
        check_engine(self.engine, self.ray_address, self.devices, self.device)
        check_tiles(self.tiling, self.tile_size, self.tile_stride)

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_mb * 1024 * 1024)

    @property
    def vram_budget_bytes(self) -> int | None:
        return None if self.vram_budget_gb is None else int(self.vram_budget_gb * 2**30)


class TextFamily(str, Enum):
    """Which encoders run and which of their outputs are stored (see docs/format.md)."""

    SD15 = "sd15"  # CLIP-L hidden states (last layer, or penultimate with --clip-skip 2)
    SD2 = "sd2"  # OpenCLIP-H: the diffusers text_encoder's last layer (OpenCLIP's penultimate)
    SDXL = "sdxl"  # CLIP-L penultimate + OpenCLIP-bigG penultimate and pooled projection
    SD3 = "sd3"  # CLIP-L and CLIP-G penultimate + pooled projections, and T5-XXL
    FLUX = "flux"  # CLIP-L pooled output and T5-XXL last hidden state
    CHROMA = "chroma"  # T5-XXL with its attention mask: the real tokens and the first padding token
    ZIMAGE = "z-image"  # Qwen3's penultimate hidden state over the chat template, masked: the real tokens only
    QWENIMAGE = "qwen-image"  # Qwen2.5-VL's last hidden state over a system template, masked: the caption's tokens
    HIDREAM = "hidream"  # CLIP-L + CLIP-G pooled projections; T5-XXL and every Llama 3.1 layer, masked, all 128 rows
    FLUX2 = "flux2"  # Mistral3 hidden states 10/20/30 side by side over the system + user template, masked, 512 rows
    FLUX2_KLEIN = "flux2-klein"  # Qwen3 hidden states 9/18/27 side by side over the chat template, masked, 512 rows
    LUMINA2 = "lumina2"  # Gemma2's penultimate hidden state over system prompt + caption, masked: real tokens only
    SANA = "sana"  # Gemma2's last hidden state over instruction + caption, masked: row 0 and the caption's rows
    QWENIMAGE_EDIT = "qwen-image-edit"  # Qwen2.5-VL over the edit template with the item's --control image
    QWENIMAGE_EDIT_PLUS = "qwen-image-edit-plus"  # as qwen-image-edit; the image sized 384^2 for Qwen2.5-VL
    WAN = "wan"  # UMT5 over the cleaned caption, masked: the real tokens (zeros past them at 512)
    HUNYUANVIDEO15 = "hunyuanvideo-1.5"  # Qwen2.5-VL hidden_states[-3] over a system template; ByT5 over quotes
    LTX2 = "ltx-2"  # Gemma 3, left-padded: every hidden state per channel, the real tokens
    FLUX_KONTEXT = "flux-kontext"  # as flux: CLIP-L pooled and T5-XXL
    GENERIC = "generic"  # --text-encoder/--tokenizer/--layer/--max-length


class Offload(str, Enum):
    """Where an encoder's weights live while it runs (cachebuild.offload); the outputs are the same either way."""

    NEVER = "never"  # the whole model on the device
    AUTO = "auto"  # in host memory, streamed to the device block by block, when it does not fit the free memory
    # of a CUDA device; never on the CPU or MPS (whose memory is the host's)
    ALWAYS = "always"  # streamed whatever the device, the CPU included (slower; proves the path)


@dataclass(frozen=True)
class TextencConfig:
    """Everything one ``cachebuild textenc`` run needs."""

    source: Path  # a folder of caption files, or a metadata.jsonl / metadata.csv file
    out: Path
    model: str | None = None  # preset, pipeline hub id or local pipeline folder
    family: TextFamily | None = None  # None: from the preset or the pipeline's model_index.json
    text_encoder: str | None = None  # generic: encoder folder or hub id
    tokenizer: str | None = None  # generic: tokenizer folder or hub id (default: the encoder's)
    layer: int = -1  # generic: hidden-state index; -1 is the last layer's output (final norm included)
    max_length: int | None = None  # generic: token limit (default: the tokenizer's model_max_length); hidream: the
    # pipeline's max_sequence_length (128 unless set), which bounds all four of its encoders
    clip_skip: int = 1  # sd15: 2 stores the penultimate layer (with the final layer norm, as trainers do)
    t5_max_length: int | None = None  # sd3: 256, flux: 512 unless set
    t5_mask: bool = False  # False: T5 runs unmasked over all max-length positions and is stored whole, exactly as
    # the Flux.1 and SD3 pipelines run it; True: masked and stored trimmed (kohya's --apply_t5_attn_mask)
    caption_ext: str = ".txt"
    caption_column: str = "text"  # the text column of a metadata file
    revision: str | None = None
    dtype: DType = DType.AUTO  # compute dtype of the CLIP encoders
    t5_dtype: DType | None = None  # compute dtype of T5 (None: as --dtype); fp16 T5 overflows, bf16 does not
    dtype_out: DType | None = None  # None: the family's (families.text.stored_dtype): bf16 for LLM encoders,
    # whose hidden states carry activations past fp16's 65504; fp16 for CLIP and T5 outputs
    batch_size: int = 16  # captions per encoder call; halved automatically on out-of-memory
    device: str | None = None
    format: StoreFormat = StoreFormat.SAFETENSORS
    shard_mb: float = 64.0
    chunk_mb: float = 2048.0  # encoder outputs held in host memory while encoders take turns on the device
    retry_failed: bool = False
    rebuild: bool = False
    prune: bool = False  # False: a scan that finds nothing, or loses many done items, refuses (cache.store)
    offload: Offload = Offload.AUTO  # not in the fingerprint: streaming the weights does not change the outputs
    manifest_dir: Path | None = None  # where a URL --out keeps its manifest locally; None: under the user cache
    # folder, keyed by the URL (cache.remote). Unused for a local --out, whose manifest lives in it
    control: Path | None = None  # qwen-image-edit: the folder of condition images, one per caption key
    caption_max_bytes: int = CAPTION_MAX_BYTES  # bytes of a caption read and encoded; the rest is cut (reported)
    devices: tuple[str, ...] = ()  # several: one encoder process per device (engines.devices); () : --device
    engine: EngineKind = EngineKind.LOCAL  # ray: a Ray cluster (engines.ray_cluster); the bytes are the same
    ray_address: str | None = None  # --engine ray: "auto" or a cluster address; None starts a local cluster

    def __post_init__(self) -> None:
        if not 1 <= self.caption_max_bytes <= CAPTION_FILE_LIMIT_BYTES:
            raise ConfigError(
                f"--caption-max-bytes must be between 1 and {CAPTION_FILE_LIMIT_BYTES} (16 MiB), "
                f"got {self.caption_max_bytes}"
            )
        if not self.source.exists():
            raise ConfigError(f"caption source {self.source} does not exist; pass a folder or a metadata file")
        if self.source.is_file() and self.source.suffix.lower() not in (".jsonl", ".csv"):
            raise ConfigError(f"{self.source} is a file but not .jsonl or .csv; pass a caption folder or metadata file")
        if self.model is None and self.text_encoder is None:
            raise ConfigError(
                "no encoder given: pass --model sd15|sd2|sdxl|sd3|flux (or a pipeline), or --text-encoder"
            )
        if self.text_encoder is not None and self.family not in (None, TextFamily.GENERIC):
            raise ConfigError("--text-encoder is for generic encoders; drop --family or use --model for a family")
        if self.clip_skip not in (1, 2):
            raise ConfigError(f"--clip-skip takes 1 (last layer) or 2 (penultimate), got {self.clip_skip}")
        for name, value in (("--batch-size", self.batch_size), ("--chunk-mb", self.chunk_mb)):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name, value in (("--t5-max-length", self.t5_max_length), ("--max-length", self.max_length)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")
        if not self.caption_ext.startswith("."):
            raise ConfigError(f"--caption-ext must start with a dot, e.g. .txt (got {self.caption_ext!r})")
        if self.devices and self.device is not None:
            raise ConfigError("--device and --devices name the devices twice; pass one of them")
        check_output(self.out, self.dtype_out, self.format, self.shard_mb)
        check_engine(self.engine, self.ray_address, self.devices, self.device)

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_mb * 1024 * 1024)

    @property
    def chunk_bytes(self) -> int:
        return int(self.chunk_mb * 1024 * 1024)


def check_tiles(tiling: TilingMode, size: int | None, stride: int | None) -> None:
    """Tile settings that can never apply; those that do not suit a VAE are refused once it is known."""
    if tiling is TilingMode.OFF and (size is not None or stride is not None):
        raise ConfigError("--tile-size/--tile-stride set the tiles of --tiling on or auto; drop them with --tiling off")
    for name, value in (("--tile-size", size), ("--tile-stride", stride)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be a positive number of pixels, got {value}")
    if size is not None and stride is not None and stride >= size:
        raise ConfigError(
            f"--tile-stride ({stride}) must be below --tile-size ({size}): tiles overlap by the difference"
        )


def check_engine(engine: EngineKind, ray_address: str | None, devices: tuple[str, ...], device: str | None) -> None:
    """``--engine ray`` needs ray installed and takes its devices from the cluster; ``--ray-address`` needs it."""
    if engine is not EngineKind.RAY:
        if ray_address is not None:
            raise ConfigError("--ray-address is for --engine ray; add --engine ray or drop --ray-address")
        return
    if devices or device is not None:
        raise ConfigError("--engine ray uses every GPU of the cluster; drop --device/--devices")
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("--engine ray needs Ray: pip install 'cachebuild[ray]'")
