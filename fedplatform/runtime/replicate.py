"""Prepared directories (the data store, a CLIP feature cache) reach every node that runs an actor,
fetched once per node.

The driver prepares them under its cache root and names each by its path relative to that root
(a directory elsewhere keeps its absolute path). The driver's node reads them in place; any other
node reads them under its own cache root ($FEDPLATFORM_CACHE, default ~/.cache/fedplatform) at the
same relative name: in place when complete there (shared storage such as EFS mounted at
$FEDPLATFORM_CACHE, or a copy an earlier run left), otherwise fetched there first.

One process per node fetches a directory: it holds an flock on a lock file beside the destination,
and the node's other actors wait for it and then read the complete copy. The source is the shared
storage the driver published the directories to (`<storage>/data/<name>/`, read with pyarrow.fs),
or else a `FileServer` actor on the driver's node. Several chunks are in flight at once, each
file's sha256 is checked, and the copy is renamed into place only when complete: a failed copy
leaves nothing behind, and a killed copier's temporary directory is removed by the next fetch.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import posixpath
import shutil
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import ray

from fedplatform import storage
from fedplatform.data.store import META, FederatedDataset, atomic_directory, open_store, sha256_file

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20
IN_FLIGHT = 4
"""Chunks requested at once by one fetch (at most IN_FLIGHT * CHUNK_BYTES in memory)."""
LISTING = "_files.json"
"""In a published directory: (name, bytes, sha256) of each of its files, written before META."""
FETCHING = ".fetching"
"""Marks the temporary directory of a fetch, so the next fetch can remove one a killed process left."""
# Every prepared directory (store, feature cache) writes META last: its presence marks it complete.

Listing = list[tuple[str, int, str]]


def node_cache_root() -> Path:
    """This node's cache root: $FEDPLATFORM_CACHE, else ~/.cache/fedplatform (data.store.cache_dir's defaults)."""
    return Path(os.environ.get("FEDPLATFORM_CACHE") or "~/.cache/fedplatform").expanduser().resolve()


def list_files(directory: Path) -> Listing:
    """(name, bytes, sha256) of each file of `directory`, META last."""
    files = sorted((p for p in Path(directory).iterdir() if p.is_file()), key=lambda p: (p.name == META, p.name))
    return [(p.name, p.stat().st_size, sha256_file(p)) for p in files]


@ray.remote(num_cpus=0, max_concurrency=4 * IN_FLIGHT)
class FileServer:
    """Serves the files of the listed directories (nothing else) from the driver's node; threaded,
    so several nodes and several chunks are served at once."""

    def __init__(self, directories: list[str]):
        self.directories = set(directories)
        self._listings: dict[str, Listing] = {}

    def _directory(self, directory: str) -> Path:
        if directory not in self.directories:
            raise ValueError(f"{directory} is not served")
        return Path(directory)

    def files(self, directory: str) -> Listing:
        if directory not in self._listings:
            self._listings[directory] = list_files(self._directory(directory))
        return self._listings[directory]

    def read(self, directory: str, name: str, offset: int, length: int = CHUNK_BYTES) -> bytes:
        with open(self._directory(directory) / name, "rb") as f:
            f.seek(offset)
            return f.read(length)


def start_file_server(directories: list[str], node: str | None = None, name: str | None = None):
    """A FileServer on `node` (default this process's node, the one that prepared `directories`);
    with `name`, the one of that name if it is already running."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = node or ray.get_runtime_context().get_node_id()
    named = {"name": name, "get_if_exists": True} if name else {}
    return FileServer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), **named).remote(
        [str(d) for d in directories])


@functools.cache
def _named_file_server(directories: tuple[str, ...], node: str, name: str):
    """The named FileServer, started if need be; the handle is kept for this process's lifetime, as
    an actor ends when no process holds a handle to it."""
    return start_file_server(list(directories), node, name)


# ---------------------------------------------------------------------------- sources


class ServerSource:
    """A directory on the driver's node, read through its FileServer."""

    def __init__(self, server, directory: str):
        self.server, self.directory = server, str(directory)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def listing(self) -> Listing:
        return ray.get(self.server.files.remote(self.directory))

    def read(self, name: str, offset: int, length: int):
        return self.server.read.remote(self.directory, name, offset, length)

    def get(self, handle) -> bytes:
        return ray.get(handle)


class StorageSource:
    """A directory published to shared storage (a local path or a URI), read with pyarrow.fs."""

    def __init__(self, location: str):
        self.directory = str(location)

    def __enter__(self):
        self.fs, self.path = storage.resolve(self.directory)
        self.pool = ThreadPoolExecutor(IN_FLIGHT)
        self.files: dict[str, Any] = {}
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(cancel_futures=True)
        for f in self.files.values():
            f.close()
        return False

    def listing(self) -> Listing:
        return [tuple(f) for f in json.loads(storage.read_bytes(storage.join(self.directory, LISTING)))]

    def read(self, name: str, offset: int, length: int):
        if name not in self.files:  # Arrow's read_at is thread-safe: one handle serves every chunk
            self.files[name] = self.fs.open_input_file(posixpath.join(self.path, name))
        return self.pool.submit(self.files[name].read_at, length, offset)

    def get(self, handle) -> bytes:
        return handle.result()


# ---------------------------------------------------------------------------- fetching


def _copy_into(tmp: Path, source) -> None:
    """Every file of `source` into `tmp`, IN_FLIGHT chunks in flight, each file's sha256 checked."""
    listing = source.listing()
    requests = iter([(name, offset, min(CHUNK_BYTES, size - offset))
                     for name, size, _ in listing for offset in range(0, size, CHUNK_BYTES)])
    hashes = {name: hashlib.sha256() for name, _, _ in listing}
    outs = {name: open(tmp / name, "wb") for name, _, _ in listing}
    try:
        pending = deque((r, source.read(*r)) for r in islice(requests, IN_FLIGHT))
        while pending:
            (name, offset, length), handle = pending.popleft()
            chunk = source.get(handle)
            pending.extend((r, source.read(*r)) for r in islice(requests, 1))
            if len(chunk) != length:
                raise RuntimeError(f"{source.directory}/{name} ended early: {len(chunk)} of {length} bytes at "
                                   f"offset {offset}")
            hashes[name].update(chunk)
            outs[name].write(chunk)
    finally:
        for f in outs.values():
            f.close()
    for name, _, digest in listing:
        if hashes[name].hexdigest() != digest:
            raise RuntimeError(f"copy of {source.directory}/{name} does not match its sha256")


@contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """Exclusive, per node: an flock on `.<name>.lock` beside `path` (the kernel frees it if its holder dies)."""
    with open(path.parent / f".{path.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process on this node to fetch %s", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_local(directory: str | Path, source) -> bool:
    """Make `directory` complete on this node, fetched from `source` by one process per node (the
    others wait and then read its copy); True if this process fetched it. `source` may be a
    function that returns the source: it is called only when this process fetches."""
    path = Path(directory)
    if (path / META).is_file():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with _node_lock(path):
        if (path / META).is_file():
            return False
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            if (stale / FETCHING).exists():  # left by a fetch that was killed
                shutil.rmtree(stale, ignore_errors=True)
        source = source() if callable(source) else source
        with source, atomic_directory(path, META) as tmp:
            (tmp / FETCHING).touch()
            _copy_into(tmp, source)
            (tmp / FETCHING).unlink()
    log.info("fetched %s from %s", path, source.directory)
    return True


# ---------------------------------------------------------------------------- publishing


def publish(directory: str | Path, location: str) -> bool:
    """Upload a prepared directory to `location` (a local path or URI): its files, then the
    listing, META last. False when a complete copy with the same META is already there."""
    directory = Path(directory)
    meta = (directory / META).read_bytes()
    target = storage.join(location, META)
    if storage.is_file(target):
        if storage.read_bytes(target) == meta:
            return False
        storage.delete(target)  # another version: not complete again until its META is rewritten
    listing = list_files(directory)
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        list(pool.map(lambda name: storage.upload(str(directory / name), storage.join(location, name)),
                      [name for name, _, _ in listing if name != META]))
    storage.write_bytes(storage.join(location, LISTING), json.dumps(listing).encode())
    storage.write_bytes(target, meta)
    log.info("published %s to %s", directory, location)
    return True


def publish_location(cfg) -> str | None:
    """runtime.storage when it is a URI (an object store every node reaches), else None."""
    return cfg.runtime.storage if storage.is_uri(cfg.runtime.storage) else None


@dataclass(frozen=True)
class PreparedData:
    """What the driver prepared for the actors: the store and every directory they read (the
    store first), named relative to the driver's cache root, and where nodes fetch them from:
    shared storage (`published`) or the driver's FileServer (`server_name`). The first process
    that must fetch starts that FileServer on the driver's node and later ones find it by name,
    so a run whose actors all share the driver's node starts none (the FileServer is owned by the
    actor that started it and ends with it)."""

    root: str
    node: str
    store: str
    directories: tuple[str, ...]
    server_name: str | None = None
    published: str | None = None

    @classmethod
    def serve(cls, store: str | Path, others: list[str | Path] = (), publish_to: str | None = None) -> PreparedData:
        """Serve the store (its parent is the driver's cache root) and `others`; with `publish_to`,
        upload each once to `<publish_to>/data/<name>/` and let nodes fetch from there."""
        root = Path(store).resolve().parent
        paths = list(dict.fromkeys(Path(d).resolve() for d in (store, *others)))
        names = tuple(str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths)
        node = ray.get_runtime_context().get_node_id()
        if publish_to is not None:
            for path, name in zip(paths, names):
                publish(path, cls._published_at(publish_to, name))
            return cls(str(root), node, names[0], names, published=str(publish_to))
        return cls(str(root), node, names[0], names, server_name=f"fedplatform-files-{uuid.uuid4().hex}")

    @staticmethod
    def _published_at(location: str, name: str) -> str:
        return storage.join(location, "data", *Path(name.lstrip("/")).parts)

    def _driver_path(self, name: str) -> Path:
        return Path(self.root) / name  # an absolute name stays itself

    def path_here(self, name: str) -> Path:
        """Where `name` is read on this node: the driver's path on the driver's node (while complete
        there) or for an absolute name, else the same name under this node's cache root."""
        driver = self._driver_path(name)
        if Path(name).is_absolute() or (ray.get_runtime_context().get_node_id() == self.node
                                        and (driver / META).is_file()):
            return driver
        return node_cache_root() / name

    def _source(self, name: str):
        if self.published is not None:
            return StorageSource(self._published_at(self.published, name))
        directories = tuple(str(self._driver_path(n)) for n in self.directories)
        return ServerSource(_named_file_server(directories, self.node, self.server_name), str(self._driver_path(name)))

    def stop_file_server(self) -> None:
        """Kill the FileServer if a fetch started one (a threaded actor left to exit on its own
        aborts in Ray)."""
        if self.server_name is None:
            return
        try:
            ray.kill(ray.get_actor(self.server_name), no_restart=True)
        except ValueError:  # none was started, or it ended with the actor that started it
            pass

    def fetch_here(self) -> list[str]:
        """Fetch whatever this node lacks (once per node); the names this process fetched."""
        return [name for name in self.directories
                if ensure_local(self.path_here(name), lambda name=name: self._source(name))]

    def open_here(self) -> FederatedDataset:
        """The store on this node, fetched first if missing (a fetched copy is verified in full)."""
        self.fetch_here()
        return open_store(self.path_here(self.store), verify=False)
