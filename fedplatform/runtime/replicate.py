"""Prepared directories (the data store, a CLIP feature cache) reach every node that runs an actor.

The driver prepares them once under its cache root. A node that sees a directory at the same path
(the driver's machine, or shared storage such as EFS mounted at FEDPLATFORM_CACHE) reads it in
place. A node that does not copies it from the driver's node through Ray: a `FileServer` actor
pinned there serves the files in chunks, each file's sha256 is checked on arrival, and the copy
is renamed into place only when complete. A node copies once; later runs find its copy.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from fedplatform.data.store import META, FederatedDataset, atomic_directory, open_store, sha256_file

CHUNK_BYTES = 64 << 20
# Every prepared directory (store, feature cache) writes META last: its presence marks it complete.


@ray.remote(num_cpus=0)
class FileServer:
    """Serves the files of the listed directories (nothing else) from the driver's node."""

    def __init__(self, directories: list[str]):
        self.directories = set(directories)
        self._listings: dict[str, list[tuple[str, int, str]]] = {}

    def _directory(self, directory: str) -> Path:
        if directory not in self.directories:
            raise ValueError(f"{directory} is not served")
        return Path(directory)

    def files(self, directory: str) -> list[tuple[str, int, str]]:
        """(name, bytes, sha256) of each file, meta.json last."""
        if directory not in self._listings:
            files = sorted((p for p in self._directory(directory).iterdir() if p.is_file()), key=lambda p: (p.name == META, p.name))
            self._listings[directory] = [(p.name, p.stat().st_size, sha256_file(p)) for p in files]
        return self._listings[directory]

    def read(self, directory: str, name: str, offset: int) -> bytes:
        with open(self._directory(directory) / name, "rb") as f:
            f.seek(offset)
            return f.read(CHUNK_BYTES)


def start_file_server(directories: list[str]):
    """A FileServer on this process's node (the one that prepared `directories`)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return FileServer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
        [str(d) for d in directories])


def ensure_local(directory: str, server, source: str | None = None) -> bool:
    """Make `directory` complete on this node, copying it from `server` (its `source` directory,
    default the same path) when it is not; True if it was copied."""
    path = Path(directory)
    if (path / META).is_file():
        return False
    source = source or directory
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(path, META) as tmp:
        for name, size, digest in ray.get(server.files.remote(source)):
            h = hashlib.sha256()
            with open(tmp / name, "wb") as f:
                while f.tell() < size:
                    chunk = ray.get(server.read.remote(source, name, f.tell()))
                    if not chunk:
                        break
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != digest:
                raise RuntimeError(f"copy of {source}/{name} from the driver's node does not match its sha256")
    return True


@dataclass(frozen=True)
class PreparedData:
    """What the driver prepared for the actors: the store, every directory they read (the store
    included) and the FileServer that copies those to nodes without them."""

    store: str
    directories: tuple[str, ...]
    server: Any

    @classmethod
    def serve(cls, store: str | Path, others: list[str | Path] = ()) -> PreparedData:
        directories = tuple(dict.fromkeys(str(d) for d in (store, *others)))
        return cls(str(store), directories, start_file_server(list(directories)))

    def open_here(self) -> FederatedDataset:
        """The store on this node, after copying whatever is missing here (a copy is verified in full)."""
        copied = {d: ensure_local(d, self.server) for d in self.directories}
        return open_store(self.store, verify=copied[self.store])
