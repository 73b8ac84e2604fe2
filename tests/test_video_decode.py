"""Decoding clips: the display rotation applied, a clip in a long video reached by seeking with the same frames as
decoding from the start, a variable frame rate followed by its timestamps, 10-bit sources brought to 8-bit RGB as
FFmpeg's default conversion does; and every odd file of a video dataset failing alone with its reason."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cachebuild.cli import cli
from cachebuild.config import BucketConfig, ClipConfig, CropMode
from cachebuild.images.plan import BucketPlan
from cachebuild.testing.videos import clip_frames, write_audio_only, write_gif, write_video
from cachebuild.video.clips import kept
from cachebuild.video.plan import plan_clip
from cachebuild.video.probe import VIDEO, probe

MAX_PIXELS = 178_956_970


def decoded(path: Path, start: int, n: int, fps: Fraction | None = None, source: Fraction | None = None):
    """(header, plan, frames) of the clip (start, n) of ``path`` at its own size."""
    header = probe(str(path), VIDEO, fps, source, MAX_PIXELS)
    w, h = header.size
    buckets = BucketPlan(BucketConfig((w, h), 16, 4096, 16))
    plan = plan_clip(buckets, "k", str(path), header, (start, n), CropMode.CENTER, 0, (fps, source))
    assert plan.size == header.size  # no resize: the frames come back as stored
    return header, plan, plan.decode(MAX_PIXELS)


def ffmpeg_frames(path: Path) -> np.ndarray:
    """Every frame decoded from the start by PyAV, as FFmpeg's default conversion gives rgb24."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_the_display_rotation_is_applied(tmp_path):
    frames = clip_frames(5, (32, 16), seed=1)  # stored 32 wide, 16 high
    path = write_video(tmp_path / "r.mov", frames, codec="png", rotation=90)  # shown turned 90 degrees left
    header, _, clip = decoded(path, 1, 3)
    assert header.rotation == 90 and header.size == (16, 32)
    assert np.array_equal(clip, np.stack([np.rot90(f) for f in frames[1:4]]))


def test_a_clip_in_a_long_video_is_seeked_and_equals_decoding_from_the_start(tmp_path):
    frames = clip_frames(96, (32, 32), seed=2)
    path = write_video(tmp_path / "long.mp4", frames, codec="libx264", options={"g": "8", "bf": "2"})
    reference = ffmpeg_frames(path)
    header, plan, clip = decoded(path, 61, 9)
    assert len(header.seek) > 4 and plan.seek[0] is not None  # decoding starts at a keyframe past the start
    assert np.array_equal(clip, reference[61:70])
    fps = Fraction(10)  # 16 -> 10 frames per second: every frame that opens a tenth of a second
    times = [Fraction(i, 16) for i in range(96)]
    keep = [i for i, k in enumerate(kept(times, fps)) if k]
    header, plan, clip = decoded(path, 33, 5, fps)
    assert header.frames == len(keep) == 60 and plan.seek[0] is not None
    assert np.array_equal(clip, reference[keep[33:38]])


def test_a_variable_frame_rate_follows_the_timestamps(tmp_path):
    times = [0.0, 0.02, 0.04, 0.05, 0.13, 0.14, 0.30, 0.31, 0.32, 0.50, 0.61, 0.70]
    frames = clip_frames(len(times), (16, 16), seed=3)
    path = write_video(tmp_path / "vfr.mkv", frames, times=times)
    keep = [i for i, k in enumerate(kept([Fraction(round(t * 1000), 1000) for t in times], Fraction(10))) if k]
    assert keep == [0, 4, 6, 9, 10, 11]
    header, _, clip = decoded(path, 1, 5, Fraction(10))
    assert header.frames == 6
    assert np.array_equal(clip, frames[keep[1:6]])
    _, _, by_index = decoded(path, 0, 5, Fraction(10), source=Fraction(20))  # --source-fps: frame i at i / 20 s
    assert np.array_equal(by_index, frames[[0, 2, 4, 6, 8]])


def test_ten_bit_frames_become_8_bit_rgb_as_ffmpeg_converts_them(tmp_path):
    path = write_video(tmp_path / "deep.mkv", clip_frames(5, (32, 32), seed=4), pix_fmt="yuv420p10le")
    import av

    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p10le"
    _, _, clip = decoded(path, 0, 5)
    assert clip.dtype == np.uint8 and np.array_equal(clip, ffmpeg_frames(path))


@pytest.fixture
def odd_dataset(tmp_path) -> Path:
    data = tmp_path / "data"
    write_video(data / "good.mkv", clip_frames(9, (32, 32), seed=5), audio=True)  # audio is ignored
    write_video(data / "short.mkv", clip_frames(3, (32, 32), seed=6))
    (data / "zero.mp4").write_bytes(b"")
    (data / "junk.mov").write_bytes(b"not a video at all " * 64)
    write_audio_only(data / "sound.mkv")
    whole = write_video(tmp_path / "whole.mkv", clip_frames(64, (32, 32), seed=7)).read_bytes()
    (data / "cut.mkv").write_bytes(whole[: len(whole) // 2])
    colours = np.repeat(np.arange(6, dtype=np.uint8)[:, None, None, None] * 40, 32 * 32 * 3).reshape(6, 32, 32, 3)
    write_gif(data / "anim.gif", colours)
    write_gif(data / "still.gif", colours[:1])
    write_gif(data / "pic.png", colours[:1])
    return data


def test_odd_videos_fail_alone_with_their_reasons(tmp_path, odd_dataset, tiny_wan_vae):
    out = tmp_path / "cache"
    args = ["latents", str(odd_dataset), "--vae", str(tiny_wan_vae), "--latents", "mean", "--workers", "0"]
    args += ["--out", str(out), "--resolution", "32", "--min-bucket-reso", "16", "--bucket-reso-steps", "16"]
    args += ["--device", "cpu", "--dtype", "fp32", "--frames", "5", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 3, result.output  # the run finished; some items failed
    from cachebuild import open_cache
    from cachebuild.cache.manifest import Manifest

    cache = open_cache(out)
    assert cache.keys() == ["anim@00000-005", "good@00000-005", "pic", "still"]
    assert cache["anim@00000-005"]["latents"].shape == (4, 2, 8, 8) and cache["pic"]["latents"].shape == (4, 1, 8, 8)
    with Manifest.open(out, read_only=True) as m:
        reasons = {r.key: r.reason for r in m.items("latents", "failed")}
    assert set(reasons) == {"short", "zero", "junk", "sound", "cut"}
    assert "3 frames, fewer than every --frames count (5)" in reasons["short"]
    assert "empty (0 bytes)" in reasons["zero"]
    assert "FFmpeg cannot read it as a video" in reasons["junk"]
    assert "audio but no video stream" in reasons["sound"]
    assert "truncated" in reasons["cut"]
    again = CliRunner().invoke(cli, args)  # the headers are remembered: nothing is read or encoded again
    assert again.exit_code == 3 and '"encoded": 0' in again.output and '"model_loaded": false' in again.output


def test_a_video_dataset_without_frame_counts_is_refused(tmp_path, tiny_wan_vae):
    write_video(tmp_path / "data" / "a.mkv", clip_frames(5, (16, 16)))
    args = ["latents", str(tmp_path / "data"), "--vae", str(tiny_wan_vae), "--out", str(tmp_path / "c")]
    result = CliRunner().invoke(cli, [*args, "--device", "cpu"])
    assert result.exit_code == 2 and "pass --frames" in result.output and "or --extract full" in result.output


def test_clip_settings_enter_the_fingerprint(tmp_path, tiny_wan_vae):
    write_video(tmp_path / "data" / "a.mkv", clip_frames(9, (16, 16)))
    base = ["latents", str(tmp_path / "data"), "--vae", str(tiny_wan_vae), "--out", str(tmp_path / "c")]
    base += ["--device", "cpu", "--workers", "0", "--resolution", "16", "--min-bucket-reso", "16"]
    base += ["--bucket-reso-steps", "16", "--latents", "mean", "--quiet"]
    assert CliRunner().invoke(cli, [*base, "--frames", "5"]).exit_code == 0
    for change in (["--frames", "9"], ["--frames", "5", "--fps"], ["--frames", "5", "--extract", "chunk"]):
        result = CliRunner().invoke(cli, [*base, *change])
        assert result.exit_code == 2 and "clips." in result.output, change  # the diff names the clip setting
    assert ClipConfig(frames=(5,)) != ClipConfig(frames=(9,))
