"""Shared storage: a local or NFS path, or any URI `pyarrow.fs` resolves (s3://bucket/prefix, gs://...).

Run checkpoints, sweep state, summaries and published data go through these few functions, so the
same code writes to a head's disk or to a bucket every node (and a brand-new head) can reach.
S3 endpoints other than AWS (MinIO, a test server) come from $AWS_ENDPOINT_URL, as for boto3.
Object stores have no rename: a writer puts the files first and the one that marks completion
last (a single PUT is atomic), so a reader never sees a half-written commit point.
"""
from __future__ import annotations

import os
import posixpath
from pathlib import Path
from functools import lru_cache

import pyarrow.fs as pafs

from fedplatform.errors import UserError


def is_uri(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def join(location: str, *parts: str) -> str:
    location = str(location)
    return posixpath.join(location, *parts) if is_uri(location) else os.path.join(location, *parts)


@lru_cache(maxsize=None)
def _filesystem(scheme_and_bucket: str) -> pafs.FileSystem:
    fs, _ = pafs.FileSystem.from_uri(scheme_and_bucket)
    return fs


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location.removeprefix("file://")))
    scheme, rest = location.split("://", 1)
    bucket = rest.split("/", 1)[0]
    try:
        fs = _filesystem(f"{scheme}://{bucket}")
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        raise UserError(f"storage '{location}' cannot be opened ({exc}); use a local path or a URI such as "
                        "s3://bucket/prefix") from None
    return fs, rest.rstrip("/")


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file; on a local disk through a temporary name and a rename (atomic)."""
    fs, path = resolve(location)
    fs.create_dir(posixpath.dirname(path) if is_uri(location) else os.path.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload(local_file: str, location: str) -> None:
    """Copy one local file to `location`, streamed in 8 MiB blocks (multipart on object stores)."""
    fs, path = resolve(location)
    fs.create_dir(posixpath.dirname(path) if is_uri(location) else os.path.dirname(path), recursive=True)
    pafs.copy_files(os.path.abspath(local_file), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs, chunk_size=8 << 20)


def mtime(location: str) -> float:
    """Last modification time of a file (seconds since the epoch)."""
    fs, path = resolve(location)
    return fs.get_file_info(path).mtime.timestamp()


def list_dir(location: str) -> list[str]:
    """Names of the entries directly under `location` (empty when it does not exist)."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def delete(location: str) -> None:
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def check_writable(location: str) -> None:
    """One clear error before anything starts when `location` cannot take checkpoints: a local path
    must be (or be creatable in) a writable folder — checked without creating anything; an
    object-store URI (unknown scheme, missing bucket, no credentials, endpoint down) gets a small
    probe object written and deleted."""
    if not is_uri(location):
        path = Path(location.removeprefix("file://")).expanduser().absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise UserError(f"runtime.storage={location!r}: '{existing}' is a file, not a folder; "
                            "set runtime.storage to a writable folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"runtime.storage={location!r}: '{existing}' is not writable; run from a writable "
                            "folder or set runtime.storage to one")
        return
    resolve(location)  # an unknown scheme: its own error, naming `location`
    probe = join(location, f".fedplatform-probe-{os.getpid()}")
    try:
        write_bytes(probe, b"")
        delete(probe)
    except OSError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"storage '{location}' is not writable ({reason}); check that the bucket exists, the "
                        "credentials (AWS_ACCESS_KEY_ID or an instance profile) and $AWS_ENDPOINT_URL, or use "
                        "a local path") from None
