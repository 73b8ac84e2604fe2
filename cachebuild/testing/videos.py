"""Tiny synthetic videos: frames of known pixels written losslessly, so what a decoder reads back is exact."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def clip_frames(n: int, size: tuple[int, int] = (64, 48), seed: int = 0) -> np.ndarray:
    """(n, H, W, 3) uint8 noise frames of ``size`` (W, H), each different, so a frame off by one shows."""
    rng = np.random.default_rng(seed)
    w, h = size
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def write_video(
    path: Path,
    frames: np.ndarray,
    fps: float = 16,
    codec: str = "ffv1",
    times: list[float] | None = None,
    rotation: int = 0,
    audio: bool = False,
    pix_fmt: str | None = None,
    options: dict | None = None,
) -> Path:
    """Write (n, H, W, 3) uint8 ``frames`` to ``path`` with PyAV. FFV1 in RGB (bgr0) is lossless, so decoding gives
    the frames back exactly; ``times`` (seconds, ascending) gives each frame its own timestamp (a variable rate);
    ``rotation`` sets the display matrix (degrees counterclockwise); ``audio`` adds a silent audio stream;
    ``pix_fmt`` and ``options`` (codec options such as {"g": "8", "bf": "2"}) override the codec's defaults."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tick = Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000), options=options or {})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt or {"ffv1": "bgr0", "png": "rgb24"}.get(codec, "yuv420p")
        stream.time_base = stream.codec_context.time_base = tick  # milliseconds: any timestamp, not 1/fps steps
        if rotation:
            stream.set_display_rotation(rotation)
        sound = container.add_stream("pcm_s16le", rate=8000) if audio else None
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24").reformat(
                format=stream.pix_fmt
            )
            at = times[i] if times is not None else i / fps
            frame.pts, frame.time_base = int(round(at * 1000)), tick
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
            samples.sample_rate, samples.pts = 8000, 0
            for packet in sound.encode(samples):
                container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    """A file with one silent audio stream and no video."""
    import av

    with av.open(str(path), "w") as container:
        sound = container.add_stream("pcm_s16le", rate=8000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        samples.sample_rate, samples.pts = 8000, 0
        for packet in [*sound.encode(samples), *sound.encode()]:
            container.mux(packet)
    return path


def write_gif(path: Path, frames: np.ndarray, ms: int = 100) -> Path:
    """An animated GIF of (n, H, W, 3) ``frames`` (one flat colour each reads back exactly), ``ms`` per frame."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms, loop=0)
    return path
