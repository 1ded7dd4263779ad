"""File-system helpers for the sample store: URL resolution, atomic writes, clear errors.

Atomic visibility: on a local file system a file is written under a hidden temporary name in the
same folder (``.NAME.<random>.tmp``: the leading '.' makes pyarrow.dataset skip it and the suffix
makes Ray Data / DuckDB globs on ``*.parquet`` skip it), fsync'ed, then renamed over the final name
with ``os.replace`` (atomic on POSIX). On object stores (s3://, gs://, ...) and memory:// the
payload is built in memory and written with ONE ``fs.pipe_file`` call: the key appears only when
the PUT (or the completed multipart upload) succeeds, so a reader never sees a partial object.
"""
from __future__ import annotations

import errno
import io
import os
import posixpath
import uuid
from typing import Any, Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StoreError(OSError):
    """Base class of sample-store I/O errors."""


class StoreNotWritableError(StoreError):
    """The store root cannot be written (read-only folder, path under a file, missing bucket, ...)."""


class StoreFullError(StoreError):
    """The storage ran out of space (ENOSPC / EDQUOT) while writing; nothing partial was made visible."""


def resolve(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with storage options; returns (filesystem, path without protocol)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/") or path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local file system (where rename is atomic and fsync matters)."""
    return isinstance(fs, LocalFileSystem)


def _fsync_dir(path: str) -> None:
    # make the rename itself durable; not all platforms allow opening a directory
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_space_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, write_fn: Callable[[Any], None]) -> None:
    """Write a whole file so that ``path`` shows either the previous content or the complete new one.

    ``write_fn(f)`` writes the payload to a binary file object. On any failure the temporary file is
    removed and ``path`` is left as it was; ENOSPC/EDQUOT become :class:`StoreFullError`.
    """
    if is_local(fs):
        folder, name = posixpath.split(path)
        fs.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with fs.open(tmp, "wb") as f:
                write_fn(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            try:
                if os.path.lexists(tmp):
                    os.remove(tmp)
            except OSError:
                pass
            if _is_space_error(e):
                raise StoreFullError(errno.ENOSPC, f"no space left on the store while writing {path}; "
                                     f"the file was not made visible and earlier files are untouched") from e
            raise
        _fsync_dir(folder)
        return
    buf = io.BytesIO()
    write_fn(buf)
    try:
        fs.pipe_file(path, buf.getvalue())
    except OSError as e:
        if _is_space_error(e):
            raise StoreFullError(errno.ENOSPC, f"no space left on the store while writing {path}; "
                                 f"the object was not made visible and earlier objects are untouched") from e
        raise


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """:func:`atomic_write` of a bytes payload."""
    atomic_write(fs, path, lambda f: f.write(data))


def check_writable(fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
    """Create ``path`` and write + delete a probe file; raise :class:`StoreNotWritableError` if that fails."""
    probe = posixpath.join(path, f".write-probe-{uuid.uuid4().hex[:12]}")
    try:
        if is_local(fs):
            if os.path.exists(path) and not os.path.isdir(path):
                raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", path)
            fs.makedirs(path, exist_ok=True)
        # object stores have no folders; never makedirs there (s3fs would silently create a bucket)
        fs.pipe_file(probe, b"ok")
        fs.rm(probe)
    except Exception as e:
        raise StoreNotWritableError(errno.EACCES, f"sample store {url!r} is not writable "
                                    f"({type(e).__name__}: {e}); fix the path or permissions "
                                    f"before starting chains") from e


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Existence check that does not trust a stale listing cache (s3fs caches directory listings)."""
    try:
        fs.invalidate_cache(posixpath.dirname(path))
    except Exception:
        pass
    return fs.exists(path)


def remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete ``path``; a file already gone (another cleaner, a retried delete) is fine."""
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def list_names(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """Base names of the files directly in ``folder`` (empty if it does not exist), fresh listing."""
    try:
        fs.invalidate_cache(folder)
    except Exception:
        pass
    try:
        entries = fs.ls(folder, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)
