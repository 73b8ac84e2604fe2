"""One exception hierarchy for cachebuild.

Configuration and environment problems raise a :class:`CachebuildError` subclass and stop the run
before any work; the CLI turns them into a message and exit code 2. Problems with a single input item
never raise out of the pipeline: they become a ``failed`` manifest row with a reason (see
:class:`ItemError`, used only inside the per-item boundary).
"""

from __future__ import annotations


class CachebuildError(Exception):
    """Base class for errors that stop a run. The message always says how to fix it."""


class ConfigError(CachebuildError):
    """An invalid option or combination of options."""


class ModelLoadError(CachebuildError):
    """The model could not be found or loaded from the given source."""


class FingerprintMismatch(CachebuildError):
    """The cache at ``--out`` was built with settings that change the bytes written."""

    def __init__(self, store: str, out: str, differences: list[tuple[str, object, object]]):
        self.store = store
        self.differences = differences
        lines = [f"  {name}: cache has {old!r}, this run asks for {new!r}" for name, old, new in differences]
        super().__init__(
            f"the {store} cache in {out} was built with different settings:\n"
            + "\n".join(lines)
            + "\nUse another --out for a cache with the new settings, or pass --rebuild to discard the"
            " existing entries and encode everything again."
        )


class CacheError(CachebuildError):
    """The cache folder is missing, damaged or of an unknown version."""


class ItemError(Exception):
    """A single input item cannot be cached; the message is the reason recorded in the manifest."""
