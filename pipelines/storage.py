"""Storage helpers every stage reuses: one URI → (fsspec filesystem, path), through fsspec.

Accepted URIs: local paths, `file://`, `gs://` (gcsfs) and `s3://` (s3fs); any other fsspec
protocol is passed through. Emulators are honoured from the environment:

- `STORAGE_EMULATOR_HOST` (fake-gcs-server): gcsfs with `token="anon"` and that endpoint; when
  it is set, `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT` defaults to `false` (else every bucket operation
  first stalls on a gRPC probe that emulators lack). Set it yourself before anything imports gcsfs.
- `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (moto, MinIO): s3fs with that endpoint.

Object-store listings are not cached: Ray workers write what the driver lists next.
Ray gets a pyarrow filesystem from `to_pyarrow` (pyarrow's native GCS ignores the emulator), and
Ray workers get the endpoint variables from `worker_env` (credentials are left to the cluster).
"""

from __future__ import annotations

import os
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import fsspec
import pyarrow
import pyarrow.fs
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

ENDPOINT_ENV_VARS = (
    "STORAGE_EMULATOR_HOST",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
T = TypeVar("T")
NOT_RETRIED = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


@dataclass(frozen=True)
class ListedFile:
    """One file found under an input: `uri` = `root` + "/" + `relpath`; `size` in bytes; `version`
    what the storage says changes with the content (crc32c, md5, etag, generation or mtime; "" if none)."""

    uri: str
    root: str
    relpath: str
    size: int
    version: str = ""


def resolve(uri: str) -> tuple[AbstractFileSystem, str]:
    """A URI or local path → (fsspec filesystem, path inside it without protocol)."""
    scheme = protocol(uri)
    if scheme in ("file", "local"):
        fs: AbstractFileSystem = LocalFileSystem()
    elif scheme in ("gs", "gcs"):
        fs = _gcs()
    elif scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options = {"endpoint_url": endpoint} if endpoint else {}
        fs = fsspec.filesystem("s3", use_listings_cache=False, **options)
    else:
        fs = fsspec.filesystem(scheme)
    return fs, fs._strip_protocol(uri)


def to_pyarrow(fs: AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """A pyarrow filesystem for Ray Data / Ray Train: native for local, fsspec-backed otherwise."""
    if isinstance(fs, LocalFileSystem):
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def worker_env() -> dict[str, str]:
    """The endpoint variables set here, for Ray `runtime_env={"env_vars": ...}`."""
    return {name: os.environ[name] for name in ENDPOINT_ENV_VARS if name in os.environ}


def join(uri: str, *parts: str) -> str:
    """Join URI parts with "/" (keeps the scheme: join("gs://b/x", "y") == "gs://b/x/y")."""
    pieces = [uri.rstrip("/")] + [part.strip("/") for part in parts if part.strip("/")]
    return "/".join(pieces)


def list_files(uri: str) -> list[ListedFile]:
    """Every file under `uri`, recursively, sorted; a file URI lists itself relative to its parent.

    URIs come back in the input's style (same scheme, absolute local paths). Empty if nothing is there."""
    fs, path = resolve(uri)
    prefix = _prefix(uri)
    if fs.isfile(path):
        root, found = posixpath.dirname(path), {path: fs.info(path)}
    else:
        root, found = path.rstrip("/"), fs.find(path, detail=True)
    return [
        ListedFile(prefix + name, prefix + root, name[len(root) :].lstrip("/"), int(info.get("size") or 0),
                   _version(info))
        for name, info in sorted(found.items())
        if info.get("type", "file") == "file"
    ]


def _version(info: dict) -> str:
    """A content or write stamp from a listing entry: a checksum where the store has one, else an
    etag or generation, else the modification time."""
    for key in ("crc32c", "md5Hash", "ETag", "etag", "generation"):
        if info.get(key):
            return f"{key}={str(info[key]).strip(chr(34))}"
    for key in ("mtime", "LastModified", "updated"):
        if info.get(key):
            return f"mtime={info[key]}"
    return ""


def _retrying(call: Callable[[], T], attempts: int, backoff_s: float, not_retried: tuple[type[Exception], ...]) -> T:
    """`call()`, retried up to `attempts` times in all with exponential backoff (backoff_s, 2×, 4× ...)
    on any exception but `not_retried`; the last error propagates."""
    failures = 0
    while True:
        try:
            return call()
        except not_retried:
            raise
        except Exception:
            failures += 1
            if failures >= attempts:
                raise
            time.sleep(backoff_s * 2 ** (failures - 1))


def read_bytes(uri: str, *, attempts: int = 4, backoff_s: float = 0.5) -> bytes:
    """The whole file; storage errors are retried with exponential backoff (0.5 s, 1 s, 2 s ...),
    missing files and permission errors are not. The last error propagates."""
    def read() -> bytes:
        fs, path = resolve(uri)
        return fs.cat_file(path)
    return _retrying(read, attempts, backoff_s, NOT_RETRIED)


def write_bytes(uri: str, data: bytes, *, attempts: int = 4, backoff_s: float = 0.5) -> None:
    """Write a whole file atomically: local = temporary name + rename; object stores = one upload.

    Object-store writes are retried whole with exponential backoff (0.5 s, 1 s, 2 s ...) on any
    error but a permission one: the client's own retries ride out a short outage, but an upload
    session begun before the server went away is unknown to it afterwards (404 → FileNotFoundError
    on gcsfs), and only starting the object again recovers it. A whole-object write is idempotent."""
    fs, path = resolve(uri)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
        return
    _retrying(lambda: fs.pipe_file(path, data), attempts, backoff_s, (PermissionError,))


def write_parquet(uri: str, table: pyarrow.Table, **options) -> None:
    """`table` as one Parquet file (`options` go to `pyarrow.parquet.write_table`), written whole
    through `write_bytes`: atomic, and retried whole on object stores. Sized for shards (tens of MB)."""
    import pyarrow.parquet as pq

    buffer = pyarrow.BufferOutputStream()
    pq.write_table(table, buffer, **options)
    write_bytes(uri, buffer.getvalue().to_pybytes())


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.exists(path)


def remove(uri: str) -> None:
    """Delete a file or a whole folder; nothing to do if it is not there."""
    fs, path = resolve(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def move_tree(source: str, destination: str) -> None:
    """Move a folder (or file) to a destination that does not exist yet.

    Local: one rename. Object stores: server-side copies of the objects (concurrent on gcsfs and
    s3fs), then the sources are deleted."""
    fs, src = resolve(source)
    _, dst = resolve(destination)
    if isinstance(fs, LocalFileSystem):
        fs.mv(src, dst)
        return
    names = [src] if fs.isfile(src) else fs.find(src)
    fs.copy(names, [dst + name[len(src) :] for name in names])
    fs.rm(src, recursive=True)


def _gcs() -> AbstractFileSystem:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator in ("", "default"):
        return fsspec.filesystem("gs", use_listings_cache=False)
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    if not emulator.startswith(("http://", "https://")):
        emulator = f"http://{emulator}"
    return fsspec.filesystem("gs", token="anon", endpoint_url=emulator, use_listings_cache=False)


def protocol(uri: str) -> str:
    """The URI's scheme (`gs`, `s3`, ...); `file` for local paths."""
    protocol, _ = fsspec.core.split_protocol(uri)
    return protocol or "file"


def _prefix(uri: str) -> str:
    protocol, _ = fsspec.core.split_protocol(uri)
    return f"{protocol}://" if protocol else ""
