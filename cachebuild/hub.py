"""Hub: where a model's files are. A preset, hub id, local diffusers folder or single weights file is
resolved to local files (a hub id is fetched into the Hugging Face cache, a no-op when it is there already),
without building any model, so a finished job can be checked from configs and weight hashes alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cachebuild.config import PRESETS, ModelSpec
from cachebuild.errors import ModelLoadError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


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
            f"{path} is a single weights file, which carries no config; add --model sd15|sdxl|sd3|flux|chroma|... (or "
            "--vae-config <folder | hub id>) to say which VAE architecture it is"
        )
    cfg_path = Path(config_source).expanduser()
    if not cfg_path.is_dir():
        cfg_path = _fetch_hub_folder(config_source, "vae", spec.revision, configs_only=True)
    folder = cfg_path / "vae" if (cfg_path / "vae" / "config.json").is_file() else cfg_path
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"no VAE config.json found in {config_source} (looked in it and its vae/ folder)")
    return ResolvedVae(str(path), folder, path, _read_json(folder / "config.json"), (path,))


HUB_IGNORE = ["*.fp16.*", "*.fp16-*", "*.bin", "*.onnx*", "*.msgpack", "*.h5", "*.ckpt", "*.pt"]  # variants
# (`model.fp16-00001-of-00002.safetensors` is a sharded one) and
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


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def pipeline_folder(model: str | None, revision: str | None) -> Path:
    assert model is not None
    return local_or_hub(PRESETS.get(model, model), revision, pipeline=True)


def local_or_hub(source: str, revision: str | None, pipeline: bool = False) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if pipeline:
        subs = ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"]
        subs += ["text_encoder_4", "tokenizer_4"]  # HiDream's Llama, where a repository carries it
        patterns = ["model_index.json"] + [
            f"{s}/*.{ext}" for s in subs for ext in ("json", "safetensors", "txt", "model", "jinja")
        ]
    else:
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
    return fetch_hub_folder(source, patterns, revision)


def tokenizer_files(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.iterdir() if p.is_file()))
