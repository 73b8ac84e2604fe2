"""Shared fixtures: tiny random-weight models saved to disk, and images of awkward sizes."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cachebuild.testing import make_tiny_vae

ODD_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "odd-images"


@pytest.fixture(scope="session", autouse=True)
def user_cache_folder(tmp_path_factory):
    """The session's user cache folder (remote mirrors, remembered shard checks): never the real ~/.cache."""
    import os

    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))
    yield Path(os.environ["XDG_CACHE_HOME"])
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    """A diffusers AutoencoderKL folder (config.json + safetensors), downsampling 2, 4 latent channels."""
    return make_tiny_vae(tmp_path_factory.mktemp("models") / "tiny-vae")


@pytest.fixture(scope="session")
def kontext_cache(tmp_path_factory):
    """A FLUX.1 Kontext cache with condition latents and text (tests.test_parity_flux_kontext.build_kontext_cache),
    built once for the parity and the musubi export tests."""
    from tests.test_parity_flux_kontext import build_kontext_cache

    return build_kontext_cache(tmp_path_factory.mktemp("kontext"))


@pytest.fixture(scope="session")
def pixel_caches(tmp_path_factory, tiny_vae) -> dict[str, Path]:
    """Files whose pixels depend on how they are read, and caches of them by both rules (tests/test_pixels.py);
    shared by the pixel and the pixel export tests."""
    from tests.test_pixels import build_pixel_caches

    return build_pixel_caches(tmp_path_factory.mktemp("pixels"), tiny_vae)


@pytest.fixture(scope="session")
def tiny_wan_vae(tmp_path_factory) -> Path:
    """A diffusers AutoencoderKLWan folder: 4x spatial, 4x temporal (4k+1 frames), 4 latent channels."""
    from cachebuild.testing import make_tiny_wan_vae

    return make_tiny_wan_vae(tmp_path_factory.mktemp("models") / "tiny-wan-vae")


@pytest.fixture(scope="session")
def medium_vae(tmp_path_factory) -> Path:
    """A diffusers AutoencoderKL of about 53 MiB in fp32 (14M parameters, downsampling 4): large enough that
    "nothing of it is left on the device" is a real check where a few kilobytes of tiny VAE would pass anyway."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(64, 128, 256),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        norm_num_groups=32,
        latent_channels=4,
    )
    path = tmp_path_factory.mktemp("models") / "medium-vae"
    vae.save_pretrained(path)
    return path


def write_image(path: Path, size: tuple[int, int], seed: int = 0, mode: str = "RGB", **save_kwargs) -> Path:
    """A noise image of ``size`` (W, H), saved in the format its suffix names."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save_kwargs)
    return path


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Eight images of mixed aspect ratios, one in a subfolder, JPEG and PNG."""
    root = tmp_path / "dataset"
    sizes = [(160, 96), (96, 160), (128, 128), (200, 120), (130, 70), (64, 64), (90, 150), (128, 128)]
    for i, size in enumerate(sizes):
        suffix = ".png" if i % 3 == 0 else ".jpg"
        sub = "sub/" if i == 7 else ""
        write_image(root / f"{sub}img{i:03d}{suffix}", size, seed=i)
    return root


def write_mixed_dataset(root: Path, n: int) -> Path:
    """``n`` images in three shapes (three buckets), for runs spread over several devices or workers."""
    for i in range(n):
        write_image(root / f"im{i:02d}.png", [(128, 128), (160, 96), (96, 160)][i % 3], seed=i)
    return root


@contextlib.contextmanager
def torch_threads(n: int):
    """Torch on ``n`` threads inside the block: CPU kernels give last-bit differences between thread counts, so
    a reference run uses the threads of the run it is compared with."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def done_count(out: Path) -> int:
    """Items done in the cache at ``out``, read from the manifest without locking it (0 before it exists)."""
    db = out / "manifest.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM items WHERE status='done'").fetchone()[0]
    except sqlite3.Error:
        return 0


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA and `hub` tests unless CACHEBUILD_HUB_TESTS=1 (they fetch real weights)."""
    import os

    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_hub = pytest.mark.skip(reason="needs real weights from the hub: set CACHEBUILD_HUB_TESTS=1 with network")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "hub" in item.keywords and os.environ.get("CACHEBUILD_HUB_TESTS") != "1":
            item.add_marker(skip_hub)


def kill_while_running(cmd: list[str], out: Path, targets: tuple[int, ...]) -> int:
    """Start ``cmd`` once per target and SIGKILL it as soon as ``out`` has that many done items; returns how
    many runs were really killed (a run may finish before its target)."""
    kills = 0
    for target in targets:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and done_count(out) < target:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    return kills


def leave_uncommitted_shard(out: Path, store: str = "latents", suffix: str = ".safetensors") -> str:
    """What a run killed between a shard's rename and its commit leaves: a shard name the run claimed in the
    manifest (cache.claims), a complete file under it, no commit. Returns the file's name."""
    from cachebuild.cache.claims import open_claim
    from cachebuild.cache.files import shard_name
    from cachebuild.cache.manifest import Manifest
    from cachebuild.cache.store import first_free_shard_index

    with Manifest.open(out, create=False) as m:
        index = first_free_shard_index(m, store)
        open_claim(m, store, index)
    name = shard_name(index, suffix)
    (out / store / name).write_bytes(b"renamed but never committed")
    return name


@pytest.fixture(scope="session")
def tiny_video_vaes(tmp_path_factory):
    """{kind: (folder, family, VAE loaded in fp32)} for every tiny video VAE (cachebuild.testing.TINY_VIDEO_VAES)."""
    import diffusers

    from cachebuild.config import ModelSpec
    from cachebuild.families.video_vae import video_family
    from cachebuild.hub import resolve_vae
    from cachebuild.testing import TINY_VIDEO_VAES, make_tiny_video_vae

    root = tmp_path_factory.mktemp("video-vaes")
    out = {}
    for kind in TINY_VIDEO_VAES:
        folder = make_tiny_video_vae(root / kind, kind)
        family = video_family(resolve_vae(ModelSpec(vae=str(folder))))
        out[kind] = (folder, family, getattr(diffusers, family.cls).from_pretrained(folder).eval())
    return out


@pytest.fixture(scope="session")
def video_family_caches(tmp_path_factory):
    """Caches of one lossless video and a still for Wan 2.2 TI2V-5B, HunyuanVideo 1.5 (with text) and LTX-2, built
    through the CLI once (tests.test_parity_video_families.build_video_family_caches): for the parity, tiling and
    musubi export tests."""
    from tests.test_parity_video_families import build_video_family_caches

    return build_video_family_caches(tmp_path_factory.mktemp("video-families"))
