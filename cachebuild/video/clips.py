"""Clips: which frames of a video make each clip, the frame rule of a video VAE, and ``--fps`` resampling.

Pure arithmetic on frame counts and timestamps; nothing is decoded here. The extraction modes are musubi-tuner's
(``VideoDataset.retrieve_latent_cache_batches`` in its ``dataset/image_video_dataset.py``), so its users find the
same clips. For a video of N frames (counted after any ``--fps`` resampling) and target counts T (``--frames``,
sorted, each used once):

* ``head``: (0, t) for each t <= N;
* ``chunk``: (i, t) for i = 0, t, 2t, ... while i + t <= N;
* ``slide``: (i, t) for i in range(0, N - t + 1, stride);
* ``uniform``: (i, t) for i in ``numpy.linspace(0, N - t, samples, dtype=int)``;
* ``full``: one clip (0, m) with m = min(N, max_frames) cut down to the frame rule, (m - 1) // k * k + 1.

A clip that two rules name twice (``uniform`` with more samples than starts) is one item. musubi-tuner rounds a
target count down to its frame rule with a warning; here a count that breaks the rule is refused
(:func:`check_frame_rule`), since Wan's VAE would otherwise drop the extra frames without a word.

``--fps R`` keeps, of the source frames in presentation order, each frame that is the first in its slot of
1/R seconds: slot(t) = floor((t - t0) * R) with t the frame's timestamp and t0 the first frame's; a frame is kept
when its slot differs from the previous frame's. For a constant rate S this is musubi-tuner's rule (it keeps frame
i when floor(i * R / S) changes), in exact arithmetic; for a variable rate it follows the timestamps. Past the
source rate every frame is kept (no frame is repeated), as in musubi-tuner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from cachebuild.config import ClipConfig, ExtractMode
from cachebuild.errors import ConfigError

Span = tuple[int, int]  # (first frame, frame count) on the resampled timeline


def clip_spans(frames: int, cfg: ClipConfig, modulus: int) -> list[Span]:
    """The (start, count) of every clip of a video of ``frames`` frames, sorted; empty when none fits.

    Example:
        >>> clip_spans(40, ClipConfig(frames=(17,), extract=ExtractMode.CHUNK), 4)
        [(0, 17), (17, 17)]
    """
    if frames < 1:
        return []
    if cfg.extract is ExtractMode.FULL:
        m = min(frames, cfg.max_frames_or_default)
        return [(0, (m - 1) // modulus * modulus + 1)]
    spans: set[Span] = set()
    for t in sorted(set(cfg.frames or ())):
        if t > frames:
            continue
        if cfg.extract is ExtractMode.HEAD:
            spans.add((0, t))
        elif cfg.extract is ExtractMode.CHUNK:
            spans |= {(i, t) for i in range(0, frames - t + 1, t)}
        elif cfg.extract is ExtractMode.SLIDE:
            spans |= {(i, t) for i in range(0, frames - t + 1, cfg.stride or 1)}
        else:
            spans |= {(i, t) for i in _linspace_int(frames - t, cfg.samples or 1)}
    return sorted(spans)


def check_frame_rule(counts: Sequence[int], modulus: int, what: str, family: str) -> None:
    """Refuse, in one line, any count that is not k * modulus + 1, naming the nearest valid counts.

    Raises:
        ConfigError: e.g. ``--frames 80 breaks AutoencoderKLWan's frame rule (4k+1 frames); use 77 or 81``.
    """
    bad = [n for n in counts if (n - 1) % modulus]
    if not bad:
        return
    fixes = "; ".join(f"{n}: use {' or '.join(str(v) for v in nearest_valid(n, modulus))}" for n in bad)
    raise ConfigError(f"{what} {','.join(map(str, bad))} breaks {family}'s frame rule ({modulus}k+1 frames); {fixes}")


def nearest_valid(n: int, modulus: int) -> tuple[int, ...]:
    """The valid counts (k * modulus + 1) either side of a count ``n`` >= 1 that breaks the rule."""
    below = (n - 1) // modulus * modulus + 1
    return below, below + modulus


def kept(times: Sequence[Fraction], fps: Fraction | None, prev: Fraction | None = None) -> list[bool]:
    """Which of the frames at ``times`` (seconds from the first frame of the video, ascending) ``--fps`` keeps;
    ``prev`` is the time of the frame before ``times[0]`` (None: it is the first frame). All True without fps."""
    if fps is None:
        return [True] * len(times)
    out, last = [], None if prev is None else slot(prev, fps)
    for t in times:
        s = slot(t, fps)
        out.append(s != last)
        last = s
    return out


def slot(t: Fraction, fps: Fraction) -> int:
    """The 1/fps-second slot of a frame at ``t`` seconds from the first frame."""
    return math.floor(t * fps)


def _linspace_int(stop: int, num: int) -> list[int]:
    """``numpy.linspace(0, stop, num, dtype=int)``: evenly spaced, truncated toward zero, both ends included."""
    import numpy as np

    return [int(v) for v in np.linspace(0, stop, num, dtype=int)]
