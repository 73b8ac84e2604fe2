"""Clips as musubi-tuner cuts them: its extraction loop and its fps rule, restated from its code, give the same
clips as ``video.clips`` for the same video length and settings; a count that breaks the frame rule is refused
in one line with the nearest valid counts, through the CLI, before any work."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from click.testing import CliRunner

from cachebuild.cli import cli
from cachebuild.config import ClipConfig, ExtractMode
from cachebuild.errors import ConfigError
from cachebuild.keys import clip_key, split_clip_key
from cachebuild.video.clips import check_frame_rule, clip_spans, kept


def musubi_spans(frame_count: int, mode: str, targets, stride=1, sample=1, max_frames=129) -> list[tuple[int, int]]:
    """musubi-tuner v0.3.4 ``VideoDataset.retrieve_latent_cache_batches``: the (crop_pos, target_frame) list it builds
    for a video of ``frame_count`` frames (after its fps conversion), restated line for line; ``targets`` are its
    ``target_frames`` after its own rounding (sorted, unique)."""
    out = []
    if mode == "uniform" and sample == 1:
        mode = "head"  # musubi: "frame_sample is set to 1 for frame_extraction=uniform ... changed to head"
    if mode == "head":
        for t in targets:
            if frame_count >= t:
                out.append((0, t))
    elif mode == "chunk":
        for t in targets:
            for i in range(0, frame_count, t):
                if i + t <= frame_count:
                    out.append((i, t))
    elif mode == "slide":
        for t in targets:
            if frame_count >= t:
                for i in range(0, frame_count - t + 1, stride):
                    out.append((i, t))
    elif mode == "uniform":
        for t in targets:
            if frame_count >= t:
                for i in np.linspace(0, frame_count - t, sample, dtype=int):
                    out.append((int(i), t))
    elif mode == "full":
        t = min(frame_count, max_frames)
        out.append((0, (t - 1) // 4 * 4 + 1))
    return out


def musubi_kept(n: int, source_fps, target_fps) -> list[int]:
    """musubi-tuner's ``load_video`` fps conversion: the source frame indices it keeps. With Fractions the sum is
    exact; with floats it is musubi's own, whose rounding can fall just below a whole slot."""
    delta, acc, previous, keep = target_fps / source_fps, 0 * target_fps, -1, []
    for i in range(n):
        index = int(acc)
        acc += delta
        if index == previous:
            continue
        previous = index
        keep.append(i)
    return keep


@pytest.mark.parametrize(
    "mode,extra",
    [("head", {}), ("chunk", {}), ("slide", {"stride": 3}), ("slide", {}), ("uniform", {"samples": 4}),
     ("uniform", {"samples": 1}), ("full", {}), ("full", {"max_frames": 33})],
)  # fmt: skip
def test_extraction_modes_match_musubi_tuner(mode, extra):
    targets = None if mode == "full" else (17, 33, 81)
    cfg = ClipConfig(frames=targets, extract=ExtractMode(mode), **extra)
    for n in (1, 5, 16, 17, 18, 33, 40, 81, 100, 163, 300):
        want = musubi_spans(n, mode, targets or (), extra.get("stride", 1), extra.get("samples", 1),
                            extra.get("max_frames", 129))  # fmt: skip
        assert clip_spans(n, cfg, 4) == sorted(set(want)), (mode, extra, n)


def test_uniform_with_more_samples_than_starts_makes_each_clip_once():
    spans = clip_spans(19, ClipConfig(frames=(17,), extract=ExtractMode.UNIFORM, samples=5), 4)
    assert spans == [(0, 17), (1, 17), (2, 17)]  # musubi makes (0,17) twice, both writing one file


@pytest.mark.parametrize("source,target", [(30, 16), (24, 16), (25, 16), (60, 24), (16, 16), (10, 16), (29.97, 16)])
def test_fps_keeps_the_frames_musubi_keeps(source, target):
    """musubi's rule in exact arithmetic, and its float sum everywhere but where a slot starts on a frame exactly
    (30 -> 16: frame 15 is at 15 * 16 / 30 = 8 slots, its float sum 7.9999999): there its float sum keeps the next
    frame instead."""
    n, s, t = 400, Fraction(str(source)), Fraction(target)
    ours = [i for i, k in enumerate(kept([Fraction(i) / s for i in range(n)], t)) if k]
    assert ours == musubi_kept(n, s, t)
    floats = musubi_kept(n, float(source), float(target))
    assert all((i * t / s).denominator == 1 for i in set(ours) - set(floats))
    assert all(((j - 1) * t / s).denominator == 1 for j in set(floats) - set(ours))


def test_fps_follows_timestamps_for_a_variable_rate():
    times = [Fraction(t, 100) for t in (0, 2, 4, 5, 13, 14, 30, 31, 32, 50)]  # seconds, irregular
    assert kept(times, Fraction(10)) == [True, False, False, False, True, False, True, False, False, True]
    assert kept(times, None) == [True] * 10


def test_the_frame_rule_names_the_nearest_valid_counts():
    check_frame_rule((1, 5, 17, 81), 4, "--frames", "AutoencoderKLWan")
    with pytest.raises(ConfigError) as err:
        check_frame_rule((16, 80, 33), 4, "--frames", "AutoencoderKLWan")
    msg = str(err.value)
    assert "\n" not in msg
    assert "--frames 16,80 breaks AutoencoderKLWan's frame rule (4k+1 frames)" in msg
    assert "16: use 13 or 17" in msg and "80: use 77 or 81" in msg


def test_clip_keys_round_trip():
    assert clip_key("walk/cam1", 16, 33) == "walk/cam1@00016-033"
    assert split_clip_key("walk/cam1@00016-033") == ("walk/cam1", 16, 33)
    assert split_clip_key("walk/cam1@01234-1001") == ("walk/cam1", 1234, 1001)
    assert split_clip_key("walk/cam1") is None


def test_the_cli_refuses_a_count_that_breaks_the_rule_before_any_work(tmp_path, tiny_wan_vae):
    vae = tiny_wan_vae
    data = tmp_path / "data"
    data.mkdir()
    args = ["latents", str(data), "--vae", str(vae), "--out", str(tmp_path / "c"), "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--frames", "17,80"])
    assert result.exit_code == 2
    assert "--frames 80 breaks AutoencoderKLWan's frame rule (4k+1 frames); 80: use 77 or 81" in result.output
    assert not (tmp_path / "c").exists()  # nothing done
    odd = CliRunner().invoke(cli, [*args, "--frames", "17", "--stride", "2"])
    assert odd.exit_code == 2 and "--stride is for --extract slide" in odd.output
    for pixel_option in (["--alpha-mask"], ["--color", "icc"], ["--alpha", "white"]):
        refused = CliRunner().invoke(cli, [*args, "--frames", "17", *pixel_option])
        assert refused.exit_code == 2 and "are for image families" in refused.output, pixel_option
    assert not (tmp_path / "c").exists()


def test_clip_options_are_refused_for_an_image_vae(tmp_path, tiny_vae):
    data = tmp_path / "data"
    data.mkdir()
    args = ["latents", str(data), "--vae", str(tiny_vae), "--out", str(tmp_path / "c"), "--frames", "17"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "are for video VAEs" in result.output


def test_auto_batch_size_is_searched_per_width_height_and_frames():
    from cachebuild.engines.batchsize import BatchSizer

    seen = []

    def peak(n: int, bucket: tuple[int, ...]) -> int:
        seen.append(bucket)
        return n * bucket[0] * bucket[1] * bucket[2]  # bytes grow with every side of the clip

    sizer = BatchSizer(None, label="gpu", budget=64 * 48 * 17 * 4, peak=peak)
    assert sizer.size((64, 48, 17)) == 4 and sizer.size((64, 48, 33)) == 2 and sizer.size((64, 48, 17)) == 4
    assert set(sizer.known) == {"gpu|64x48x17", "gpu|64x48x33"} and sizer.searches == 2
    assert {b for b in seen} == {(64, 48, 17), (64, 48, 33)}
