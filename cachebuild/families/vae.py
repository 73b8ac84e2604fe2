"""Find, identify and load models: hub ids, local diffusers folders and single files, one code path.

A model source is first *resolved* to local files (a hub id is fetched into the Hugging Face cache, a
no-op when it is there already), then *identified* (config and a hash of the weights, for the cache
fingerprint) and only then, if there is work to do, *loaded*. Identification never builds the model, so a
finished job can be checked without loading anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from cachebuild.config import ModelSpec
from cachebuild.errors import ModelLoadError

log = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 8 * 1024 * 1024  # read size while hashing weights; large reads, bounded memory
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

# Family factors by preset, for VAEs whose config lacks them (single files, old configs).
PRESET_FACTORS: dict[str, dict] = {
    "sd15": {"scaling_factor": 0.18215, "shift_factor": None, "latent_channels": 4},
    "sd2": {"scaling_factor": 0.18215, "shift_factor": None, "latent_channels": 4},
    "sdxl": {"scaling_factor": 0.13025, "shift_factor": None, "latent_channels": 4},
    "sd3": {"scaling_factor": 1.5305, "shift_factor": 0.0609, "latent_channels": 16},
    "flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16},
}


@dataclass(frozen=True)
class VaeFamily:
    """What a trainer needs to know about latents from this VAE."""

    cls: str  # "AutoencoderKL" or "AutoencoderTiny"
    latent_channels: int  # C of the stored (C, H/f, W/f) latents
    downsample: int  # f: pixels per latent cell along each side
    scaling_factor: float  # raw -> scaled: (z - shift_factor) * scaling_factor
    shift_factor: float | None

    @property
    def has_posterior(self) -> bool:
        """AutoencoderKL returns a distribution; AutoencoderTiny returns latents directly."""
        return self.cls == "AutoencoderKL"


@dataclass(frozen=True)
class ResolvedVae:
    """A VAE located on local disk."""

    source: str  # what the user gave, for the record
    folder: Path | None  # diffusers folder holding config.json and the weights
    file: Path | None  # a single weights file (then config comes from config_folder)
    config: dict  # the diffusers config
    weight_files: tuple[Path, ...]  # the files hashed into the identity


def resolve_vae(spec: ModelSpec) -> ResolvedVae:
    """Locate the VAE that ``spec`` names on local disk, fetching from the hub if needed.

    Raises:
        ModelLoadError: the source does not exist or holds no VAE; the message says what was looked for.
    """
    if spec.vae is not None:
        path = Path(spec.vae).expanduser()
        if path.is_file():
            return _resolve_single_file(spec, path)
        folder = path if path.is_dir() else _fetch_hub_folder(spec.vae, "", spec.revision)
        if (folder / "vae" / "config.json").is_file() and not (folder / "config.json").is_file():
            folder = folder / "vae"  # a whole pipeline given as --vae: use its vae
        return _resolve_folder(spec.vae, folder)
    pipeline = spec.pipeline
    assert pipeline is not None
    path = Path(pipeline).expanduser()
    root = path if path.is_dir() else _fetch_hub_folder(pipeline, "vae", spec.revision)
    if not (root / "vae").is_dir():
        raise ModelLoadError(
            f"{pipeline} has no 'vae' subfolder; pass the VAE itself with --vae <folder | file | hub id>"
        )
    return _resolve_folder(pipeline, root / "vae")


def family_of(vae: ResolvedVae, preset: str | None) -> VaeFamily:
    """Latent channels, downsampling and scaling, from the VAE's config first and the preset second."""
    cfg = vae.config
    cls = cfg.get("_class_name", "AutoencoderKL")
    fallback = PRESET_FACTORS.get(preset or "", {})
    if cls == "AutoencoderTiny":
        downsample = 2 ** (len(cfg.get("encoder_block_out_channels", (64, 64, 64, 64))) - 1)
    else:
        downsample = 2 ** (len(cfg.get("block_out_channels", (128, 256, 512, 512))) - 1)
    scaling = cfg.get("scaling_factor", fallback.get("scaling_factor"))
    if scaling is None:
        raise ModelLoadError(
            f"the VAE config from {vae.source} has no scaling_factor; pass --model sd15|sdxl|sd3|flux so the "
            "family's factor is used"
        )
    return VaeFamily(
        cls=cls,
        latent_channels=int(cfg.get("latent_channels", fallback.get("latent_channels", 4))),
        downsample=downsample,
        scaling_factor=float(scaling),
        shift_factor=cfg.get("shift_factor", fallback.get("shift_factor")),
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def load_vae(vae: ResolvedVae, family: VaeFamily, dtype, device):
    """Build the VAE from local files, in eval mode on ``device`` with parameters in ``dtype``."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()  # the CLI owns the terminal
    cls = getattr(diffusers, family.cls, None)
    if cls is None:
        raise ModelLoadError(f"unsupported VAE class {family.cls}; cachebuild reads AutoencoderKL and AutoencoderTiny")
    try:
        if vae.file is None:
            model = cls.from_pretrained(vae.folder, torch_dtype=dtype)
        elif _has_diffusers_keys(vae.file):
            model = cls.from_config(vae.config)
            model.load_state_dict(_read_state_dict(vae.file), strict=True)
            model.to(dtype)
        else:
            model = cls.from_single_file(str(vae.file), config=str(vae.folder), torch_dtype=dtype)
    except Exception as exc:  # diffusers raises many types; report them as one with the source named
        raise ModelLoadError(f"could not load the VAE from {vae.source}: {exc}") from exc
    return model.to(device).eval().requires_grad_(False)


def _resolve_folder(source: str, folder: Path) -> ResolvedVae:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json; pass a diffusers VAE folder or a .safetensors file")
    weights = weight_files(folder)
    if not weights:
        raise ModelLoadError(f"{folder} holds no weights (diffusion_pytorch_model.safetensors or .bin)")
    return ResolvedVae(source, folder, None, _read_json(config_path), weights)


def _resolve_single_file(spec: ModelSpec, path: Path) -> ResolvedVae:
    config_source = spec.vae_config or spec.pipeline
    if config_source is None:
        raise ModelLoadError(
            f"{path} is a single weights file, which carries no config; add --model sd15|sdxl|sd3|flux (or "
            "--vae-config <folder | hub id>) to say which VAE architecture it is"
        )
    cfg_path = Path(config_source).expanduser()
    if not cfg_path.is_dir():
        cfg_path = _fetch_hub_folder(config_source, "vae", spec.revision, configs_only=True)
    folder = cfg_path / "vae" if (cfg_path / "vae" / "config.json").is_file() else cfg_path
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"no VAE config.json found in {config_source} (looked in it and its vae/ folder)")
    return ResolvedVae(str(path), folder, path, _read_json(folder / "config.json"), (path,))


HUB_IGNORE = ["*.fp16.*", "*.bin", "*.onnx*", "*.msgpack", "*.h5", "*.ckpt", "*.pt"]  # variants and
# other frameworks' copies of the same weights: fetching them would cost gigabytes and change nothing


def fetch_hub_folder(repo_id: str, patterns: list[str], revision: str | None) -> Path:
    """The local snapshot of ``repo_id`` holding the files that match ``patterns`` (fetched if missing).

    Only the default-precision safetensors weights are fetched (see ``HUB_IGNORE``).

    Raises:
        ModelLoadError: not a local path and not a reachable hub repository.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=HUB_IGNORE, revision=revision))
    except Exception as exc:  # network, auth, missing repo: one message with the ways out
        raise ModelLoadError(
            f"{repo_id!r} is neither a local path nor a reachable hub repository ({type(exc).__name__}: {exc}). "
            "Check the spelling, run `hf auth login` (`huggingface-cli login` before huggingface_hub 1.0) for "
            "gated models, or pass a local folder."
        ) from exc


def _fetch_hub_folder(repo_id: str, subfolder: str, revision: str | None, configs_only: bool = False) -> Path:
    prefix = f"{subfolder}/" if subfolder else ""
    patterns = [f"{prefix}*.json"] if configs_only else [f"{prefix}*.json", f"{prefix}*.safetensors"]
    return fetch_hub_folder(repo_id, patterns, revision)


def weight_files(folder: Path) -> tuple[Path, ...]:
    """The weight files ``from_pretrained`` loads from ``folder``: safetensors without a variant infix
    (``model.fp16.safetensors`` is another copy), else any variant, else other formats."""
    tensors = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    plain = [p for p in tensors if p.name.count(".") == 1]
    found = plain or tensors or sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return tuple(found)


def _has_diffusers_keys(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("encoder.down_blocks.") for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)


def _read_state_dict(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
