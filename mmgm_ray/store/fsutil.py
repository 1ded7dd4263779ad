"""File-system helpers for the sample store: URL resolution, atomic writes, clear errors.

Atomic visibility: on a local file system a file is written under a hidden temporary name in the
same folder (``.NAME.<random>.tmp``: the leading '.' makes pyarrow.dataset skip it and the suffix
makes Ray Data / DuckDB globs on ``*.parquet`` skip it), fsync'ed, then renamed over the final name
with ``os.replace`` (atomic on POSIX). On object stores (s3://, gs://, ...) and memory:// the
payload is built in memory and written with ONE ``fs.pipe_file`` call: the key appears only when
the PUT (or the completed multipart upload) succeeds, so a reader never sees a partial object.

Every atomic write returns the size and CRC-32 of the bytes it made visible (:class:`Digest`), so a
commit can record what a later resume checks its files against (``BlockWriter.damaged``).

Errors name the file or option: a store that cannot be reached for want of credentials raises
:class:`StoreAccessError`, bad ``storage_options`` a ValueError naming the option.
"""
from __future__ import annotations

import errno
import io
import os
import posixpath
import re
import uuid
import zlib
from typing import Any, Callable, NamedTuple

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mmgm_ray import faults


class StoreError(OSError):
    """Base class of sample-store I/O errors."""


class StoreNotWritableError(StoreError):
    """The store root cannot be written (read-only folder, path under a file, missing bucket, ...)."""


class StoreFullError(StoreError):
    """The storage ran out of space (ENOSPC / EDQUOT) while writing; nothing partial was made visible."""


class StoreAccessError(StoreError):
    """The store cannot be reached: no credentials, access denied, unknown bucket or endpoint."""


class Digest(NamedTuple):
    """Size in bytes and CRC-32 (zlib) of a file as written."""
    size: int
    crc32: int


# exception class names of the cloud SDKs that mean "who are you?" (botocore, google-auth): matched by
# name so that the store never imports an SDK it does not otherwise need
_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                      "DefaultCredentialsError", "RefreshError", "NoAuthHandlerFound")


def _option_error(e: TypeError, url: str) -> ValueError:
    """A ValueError naming the storage option a file system's constructor (or session) refused."""
    m = re.search(r"unexpected keyword argument '([^']+)'", str(e))
    what = f"unknown option {m.group(1)!r}" if m else str(e)
    proto = url.split("://", 1)[0] if "://" in url else "file"
    return ValueError(f"--storage-options: {what} for the {proto}:// file system of {url}")


def resolve(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with storage options; returns (filesystem, path without protocol).

    Raises ValueError naming the option when the file system refuses one."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except TypeError as e:
        raise _option_error(e, url) from e
    return fs, path.rstrip("/") or path


def access_error(e: BaseException, url: str) -> StoreError | ValueError | None:
    """The one-line error for a failure to reach ``url`` (credentials, bad option), or None when
    ``e`` is something else."""
    if isinstance(e, TypeError) and "keyword argument" in str(e):
        return _option_error(e, url)
    names = {c.__name__ for c in type(e).__mro__}
    if names & set(_CREDENTIAL_ERRORS):
        return StoreAccessError(f"cannot access {url}: no usable credentials ({type(e).__name__}: {e}); give "
                                f"them to this process and the workers through the cluster (instance role, "
                                f"mounted secret, AWS_* / GOOGLE_APPLICATION_CREDENTIALS of the workers), an "
                                f"fsspec config, or --storage-options")
    if isinstance(e, PermissionError):
        return StoreAccessError(f"cannot access {url}: permission denied ({e})")
    return None


def probe(url: str, storage_options: dict | None = None) -> None:
    """Reach ``url`` once (resolve + existence check) so that bad storage options and missing
    credentials fail here, with one line, before any cluster work starts."""
    fs, path = resolve(url, storage_options)
    blocker = file_in_the_way(path) if is_local(fs) else None
    if blocker is not None:
        raise StoreNotWritableError(f"sample store {url!r} is not writable: {blocker} is a file, not a folder")
    try:
        exists(fs, path)
    except Exception as e:  # noqa: BLE001 - translated when we know what it means, re-raised otherwise
        err = access_error(e, url)
        if err is None:
            raise
        raise err from e


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


class _Tally:
    """A write-only view of a file that counts the bytes going through and their CRC-32. Streaming
    writers only (Parquet, torch.save): a writer that seeks back would make the CRC wrong, so
    ``seek`` is not offered."""

    def __init__(self, f):
        self._f, self.size, self.crc32 = f, 0, 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.crc32 = zlib.crc32(view, self.crc32)
        self.size += view.nbytes
        return self._f.write(data)

    def __getattr__(self, name: str):
        if name in ("seek", "truncate", "read"):
            raise AttributeError(name)
        return getattr(self._f, name)


def _space_error(e: BaseException, path: str) -> StoreFullError | None:
    if not _is_space_error(e):
        return None
    return StoreFullError(errno.ENOSPC, f"no space left on the store while writing {path}; the file was not "
                                        f"made visible and earlier files are untouched")


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, write_fn: Callable[[Any], None]) -> Digest:
    """Write a whole file so that ``path`` shows either the previous content or the complete new one;
    return its :class:`Digest`.

    ``write_fn(f)`` writes the payload to a binary file object (streaming: no seek). On any failure
    the temporary file is removed and ``path`` is left as it was; ENOSPC/EDQUOT become
    :class:`StoreFullError`.
    """
    if is_local(fs):
        folder, name = posixpath.split(path)
        fs.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            faults.before_store_write(path)
            with fs.open(tmp, "wb") as f:
                tally = _Tally(f)
                write_fn(tally)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            try:
                if os.path.lexists(tmp):
                    os.remove(tmp)
            except OSError:
                pass
            full = _space_error(e, path)
            if full is not None:
                raise full from e
            raise
        _fsync_dir(folder)
        return Digest(tally.size, tally.crc32)
    buf = io.BytesIO()
    write_fn(buf)
    data = buf.getvalue()
    try:
        faults.before_store_write(path)
        fs.pipe_file(path, data)
    except OSError as e:
        full = _space_error(e, path)
        if full is not None:
            raise full from e
        raise
    return Digest(len(data), zlib.crc32(data))


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> Digest:
    """:func:`atomic_write` of a bytes payload."""
    return atomic_write(fs, path, lambda f: f.write(data))


def check_writable(fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
    """Create ``path`` and write + delete a probe file; raise :class:`StoreNotWritableError` if that fails."""
    probe = posixpath.join(path, f".write-probe-{uuid.uuid4().hex[:12]}")
    try:
        if is_local(fs):
            blocker = file_in_the_way(path)
            if blocker is not None:
                raise NotADirectoryError(errno.ENOTDIR, f"{blocker} is a file, not a folder")
            fs.makedirs(path, exist_ok=True)
        # object stores have no folders; never makedirs there (s3fs would silently create a bucket)
        fs.pipe_file(probe, b"ok")
        fs.rm(probe)
    except Exception as e:
        err = access_error(e, url)
        if err is not None and not isinstance(e, PermissionError):
            raise err from e
        # no errno in the message: "[Errno 13]" on a not-a-directory error misleads
        raise StoreNotWritableError(f"sample store {url!r} is not writable ({type(e).__name__}: "
                                    f"{getattr(e, 'strerror', None) or e}); fix the path, permissions or "
                                    f"credentials before starting chains") from e


def file_in_the_way(path: str) -> str | None:
    """The first component of a local ``path`` that exists and is not a folder, or None."""
    head = os.path.abspath(path)
    parts = []
    while head and head != os.path.dirname(head):
        parts.append(head)
        head = os.path.dirname(head)
    for p in reversed(parts):
        if os.path.lexists(p) and not os.path.isdir(p):
            return p
    return None


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


def list_sizes(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, int]:
    """{base name: size in bytes} of the files directly in ``folder`` (empty if it does not exist)."""
    try:
        fs.invalidate_cache(folder)
    except Exception:
        pass
    try:
        entries = fs.ls(folder, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {posixpath.basename(str(e["name"]).rstrip("/")): int(e.get("size") or 0)
            for e in entries if e.get("type", "file") == "file"}


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
