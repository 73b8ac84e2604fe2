"""The latents command's clip options (video VAEs) and the ClipConfig they describe. Imports no torch."""

from __future__ import annotations

import click

_OPTIONS = (  # how videos become clips (video VAEs: Wan), in the order --help shows them
    click.option(
        "--frames", help="Video: clip lengths in frames, e.g. 17,33,81 (Wan: 4k+1; other counts are refused)."
    ),
    click.option(
        "--extract",
        type=click.Choice(["head", "chunk", "slide", "uniform", "full"]),
        default="head",
        show_default=True,
        help="Video: clips from the start, back to back, every --stride frames, --samples spread evenly, or the "
        "whole video (musubi-tuner's frame_extraction).",
    ),
    click.option("--stride", type=int, help="Video, --extract slide: frames between clip starts (default 1)."),
    click.option("--samples", type=int, help="Video, --extract uniform: clips per length (default 1)."),
    click.option("--max-frames", type=int, help="Video, --extract full: longest clip (default 129)."),
    click.option(
        "--fps",
        is_flag=False,
        flag_value="family",
        help="Video: resample to this rate by dropping frames; alone, to the family's (Wan 16, HunyuanVideo 1.5 and "
        "LTX-2 24). Default: every frame.",
    ),
    click.option("--source-fps", type=float, help="Video, with --fps: the source rate, instead of its timestamps."),
)


def clip_options(fn):
    """The clip options as one decorator (options.option_group's rule: applied in the order listed)."""
    for opt in reversed(_OPTIONS):
        fn = opt(fn)
    return fn


def clip_config(o: dict):
    """The ClipConfig of the clip options (defaults where the command has none of them)."""
    from cachebuild.config import ClipConfig, ExtractMode

    fps = o.get("fps")
    return ClipConfig(
        frames=parse_counts(o["frames"], "--frames") if o.get("frames") else None,
        extract=ExtractMode(o.get("extract") or "head"),
        stride=o.get("stride"),
        samples=o.get("samples"),
        max_frames=o.get("max_frames"),
        fps=fps if fps in (None, "family") else parse_rate(fps),
        source_fps=o.get("source_fps"),
    )


def parse_counts(text: str, hint: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give frame counts such as 17,33,81", param_hint=hint) from None


def parse_rate(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: give a rate such as 16, or --fps alone", param_hint="--fps") from None
