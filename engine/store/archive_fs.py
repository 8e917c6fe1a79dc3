"""Where the archive's files live: a local directory, or object storage by URL through fsspec.

A root is a local path (``Path`` or a string without a scheme, or ``file://<path>``: the local code
path, with renames and fsyncs) or a URL of any other fsspec protocol (``s3://bucket/prefix``,
``gs://...``, ``memory://...`` in tests). Cloud protocols need their fsspec package installed by the
deployment (``s3fs``, ``gcsfs``, ``adlfs``): they are not dependencies of the service.

Atomicity: locally a file is written under ``TMP_PREFIX``, fsynced, renamed over its name and its
directory fsynced. On object storage a whole-object PUT is atomic (a reader sees the old object or the
new one, never a part), so the final name is written directly; a crash mid-upload leaves no object.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from engine.errors import NbaError

TMP_PREFIX = ".tmp-"
Root = Path | str


class ArchiveStorageError(NbaError):
    """The archive's root cannot be used (an unknown URL protocol, its fsspec package missing)."""


def _url(root: Root) -> str | None:
    """``root`` as a URL when it is one that is not a local path; None for a local path."""
    text = str(root) if isinstance(root, str) else None
    if text is None or "://" not in text:
        return None
    if text.startswith("file://"):
        return None
    return text.rstrip("/")


def local_path(root: Root) -> Path | None:
    """The local directory of ``root`` (``file://`` URLs included); None for object storage."""
    if _url(root) is not None:
        return None
    text = str(root)
    return Path(text[len("file://"):]) if text.startswith("file://") else Path(text)


def is_remote(root: Root) -> bool:
    return _url(root) is not None


def filesystem(root: Root) -> Any:
    """The fsspec filesystem of a URL root (``ArchiveStorageError`` naming the package to install)."""
    url = _url(root)
    if url is None:
        raise ArchiveStorageError(f"{root} is a local directory, not a URL")
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ArchiveStorageError(f"archive {url}: fsspec is not installed") from exc
    protocol = url.split("://", 1)[0]
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as exc:
        raise ArchiveStorageError(f"archive {url}: no filesystem for {protocol}:// ({exc}); install its fsspec "
                                  f"package (s3fs for s3://, gcsfs for gs://, adlfs for az://)") from exc


def join(root: Root, *parts: str) -> Path | str:
    """A path under ``root``: a ``Path`` for a local root, a URL string for object storage."""
    url = _url(root)
    if url is None:
        base = local_path(root)
        assert base is not None
        return base.joinpath(*parts)
    return "/".join([url, *parts])


def name_of(path: Path | str) -> str:
    return path.name if isinstance(path, Path) else str(path).rsplit("/", 1)[-1]


def parent_of(path: Path | str) -> Path | str:
    return path.parent if isinstance(path, Path) else str(path).rsplit("/", 1)[0]


def listdir(path: Path | str) -> Iterator[tuple[Path | str, bool]]:
    """The entries of directory ``path`` as (path, is a directory); nothing when there is no such directory."""
    if isinstance(path, Path):
        if path.is_dir():
            for child in path.iterdir():
                yield child, child.is_dir()
        return
    fs = filesystem(path)
    try:
        found = fs.ls(path, detail=True)
    except FileNotFoundError:
        return
    for info in found:
        name = str(info["name"]).rstrip("/")
        if name != str(fs._strip_protocol(path)).rstrip("/"):  # some stores list the directory itself
            yield f"{path.rstrip('/')}/{name.rsplit('/', 1)[-1]}", info.get("type") == "directory"


def isdir(path: Path | str) -> bool:
    if isinstance(path, Path):
        return path.is_dir()
    fs = filesystem(path)
    return bool(fs.isdir(path))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs(directory: Path | str) -> None:
    """Make ``directory`` (locally with its new parents fsynced; object storage has no directories)."""
    if not isinstance(directory, Path):
        return
    if directory.is_dir():
        return
    missing = []
    at = directory
    while not at.is_dir():
        missing.append(at)
        at = at.parent
    directory.mkdir(parents=True, exist_ok=True)
    for made in missing:
        fsync_dir(made.parent)


def write_atomic(path: Path | str, write: Callable[[IO[bytes]], None]) -> None:
    """Write the file ``path`` by ``write(stream)`` so that readers see the old file or the whole new one
    (see the module's docstring)."""
    if not isinstance(path, Path):
        fs = filesystem(path)
        with fs.open(path, "wb") as out:
            write(out)
        return
    makedirs(path.parent)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}"
    with open(tmp, "wb") as out:
        write(out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove(path: Path | str) -> None:
    """Remove the file ``path`` (gone already: nothing to do); locally its directory is fsynced."""
    if isinstance(path, Path):
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)
        return
    fs = filesystem(path)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        return


def open_read(path: Path | str) -> Any:
    """A binary stream of the file ``path`` (pyarrow reads Parquet from it)."""
    if isinstance(path, Path):
        return open(path, "rb")  # noqa: SIM115 (the caller closes it)
    return filesystem(path).open(path, "rb")


def read_bytes(path: Path | str) -> bytes:
    with open_read(path) as f:
        data: bytes = f.read()
    return data


def connect_duckdb(root: Root) -> Any:
    """A DuckDB connection that reads the archive's files at ``root`` by their ``ArchivedFile.path``
    (``str(path)``): for a URL root, with the root's fsspec filesystem registered."""
    import duckdb

    con = duckdb.connect()
    if is_remote(root):
        con.register_filesystem(filesystem(root))
    return con
