"""Locations on object storage: any fsspec URL (``s3://``, ``gs://``, ``hf://``, ``memory://``...).

A dataset, a caption folder or an output may be a URL instead of a local folder. ``UrlPath`` carries such a
URL through the config and the jobs with the few ``pathlib.Path`` methods they use (``/``, ``name``,
``suffix``, ``exists``, ``is_dir``, ``is_file``, ``read_bytes``, ``resolve``), so the code that joins and
reads paths stays the same for both. Plain strings that are URLs (an ``ItemPlan.path`` in a decode worker)
are read with ``open_input`` and ``read_input``.

Credentials and endpoints come from each backend's own environment and nothing is stored: for S3 the usual
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE`` and ``AWS_ENDPOINT_URL`` (botocore reads it), or
fsspec's ``FSSPEC_S3_ENDPOINT_URL``-style variables (``FSSPEC_<PROTOCOL>_<OPTION>``, read when fsspec is
imported). Decode workers inherit the environment, so they reach the same endpoint. No torch in here.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

from cachebuild.errors import ConfigError, StorageError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
HEADER_BLOCK_BYTES = 64 * 1024  # first read of a remote image while planning: headers sit in the first KBs,
# and a small block keeps planning from downloading whole images twice
EXTRA_FOR = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "hf": "huggingface_hub"}  # pip name hints


def is_url(location: object) -> bool:
    """Whether ``location`` is a remote URL (a ``UrlPath``, or text with a scheme other than ``file://``)."""
    if isinstance(location, UrlPath):
        return True
    return isinstance(location, str) and bool(_URL.match(location)) and not location.startswith("file://")


def as_location(text: str) -> Path | UrlPath:
    """``text`` as a local ``Path``, or a ``UrlPath`` when it is a URL (``file://`` becomes a local path)."""
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    return UrlPath(text) if is_url(text) else Path(text)


class UrlPath:
    """A file or folder at an fsspec URL, with the ``Path`` methods the jobs use.

    Example:
        >>> (UrlPath("s3://bucket/images/") / "sub/a.jpg").url
        's3://bucket/images/sub/a.jpg'
    """

    def __init__(self, url: str):
        scheme, rest = url.split("://", 1)
        self.url = f"{scheme}://{rest.rstrip('/')}"
        self.protocol = scheme

    # -- pure path arithmetic ---------------------------------------------------------------------------
    def __truediv__(self, rel: str | Path) -> UrlPath:
        return UrlPath(f"{self.url}/{str(rel).lstrip('/')}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"UrlPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UrlPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind(".") :] if "." in name.strip(".") else ""

    def resolve(self) -> UrlPath:
        return self

    # -- the filesystem ---------------------------------------------------------------------------------
    @property
    def fs(self):
        """The fsspec filesystem (fsspec caches one instance per set of options)."""
        return filesystem(self.url)[0]

    @property
    def path(self) -> str:
        """The path inside the filesystem, without the protocol (what fsspec lists)."""
        return filesystem(self.url)[1]

    def exists(self) -> bool:
        return _ask(self, lambda fs, p: fs.exists(p))

    def is_dir(self) -> bool:
        return _ask(self, lambda fs, p: fs.isdir(p))

    def is_file(self) -> bool:
        return _ask(self, lambda fs, p: fs.isfile(p))

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for ``url``.

    Raises:
        ConfigError: the backend's package is not installed, naming the pip command.
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        scheme = url.split("://", 1)[0]
        package = EXTRA_FOR.get(scheme)
        if package == "s3":
            hint = "pip install 'cachebuild[s3]'"
        elif package:
            hint = f"pip install {package}"
        else:
            hint = "install the fsspec backend for it"
        raise ConfigError(f"cannot open {scheme}:// URLs ({exc}); {hint}") from None


def open_input(path: str, whole: bool = True):
    """A local path as is, or a binary file object for a URL: the whole object in memory when ``whole``
    (decoding reads every byte anyway: one request), else a lazily read file for header-only reads."""
    if not is_url(path):
        return path
    fs, inner = filesystem(path)
    with remote_read_errors(path):
        if whole:
            return io.BytesIO(fs.cat_file(inner, start=0))  # a range from 0: one GET, no size request first
        fh = fs.open(inner, "rb", block_size=HEADER_BLOCK_BYTES, cache_type="readahead")
        fh.read(1)  # fetch the first block here, where a failure of the store is told from a bad file
        fh.seek(0)
        return fh


def read_input(path: str) -> bytes:
    """Every byte of a local path or a URL."""
    if is_url(path):
        fs, inner = filesystem(path)
        with remote_read_errors(path):
            return fs.cat_file(inner, start=0)
    with open(path, "rb") as fh:
        return fh.read()


def input_size(path: str) -> int:
    """Size in bytes of a local path or a URL."""
    if is_url(path):
        fs, inner = filesystem(path)
        with remote_read_errors(path):
            return int(fs.size(inner))
    import os

    return os.path.getsize(path)


@contextlib.contextmanager
def remote_read_errors(url: str) -> Iterator[None]:
    """A missing or forbidden object stays what it is locally (the item fails with its reason); any other
    failure (connection, throttling after the backend's own retries, credentials) is the store's, not the
    item's: a StorageError that stops the run, whose committed shards are kept for the same command to go on.
    """
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as exc:
        raise StorageError(
            f"reading {url} failed ({type(exc).__name__}: {exc}); check the connection, the credentials and the "
            "endpoint, then run the same command again: committed shards are kept"
        ) from None


def _ask(location: UrlPath, question):
    """A yes/no question to the backend; a failure to reach it is a configuration error (checked before any
    work), named with where the endpoint and credentials come from."""
    fs, inner = filesystem(location.url)
    try:
        return bool(question(fs, inner))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except Exception as exc:  # network, credentials, permissions: all stop the run before work starts
        raise ConfigError(
            f"cannot reach {location.url} ({type(exc).__name__}: {exc}); check the URL, the credentials and the "
            "endpoint in the environment (AWS_ENDPOINT_URL, AWS_PROFILE, ... for s3://)"
        ) from None
