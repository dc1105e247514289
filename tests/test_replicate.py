"""Prepared directories reach nodes that lack them, once per node: from the driver's node through
Ray, or from shared storage the driver published them to."""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import ray

from fake_cluster import run_cluster_script

from fedplatform import storage
from fedplatform.config import validate
from fedplatform.data import open_store, prepare
from fedplatform.runtime import replicate
from fedplatform.runtime.replicate import (
    IN_FLIGHT,
    LISTING,
    PreparedData,
    ServerSource,
    StorageSource,
    ensure_local,
    list_files,
    publish,
    start_file_server,
)

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture
def store(tmp_path):
    cfg = validate({"data": {"dataset": "digits", "imbalance_factor": 10, "cache_dir": str(tmp_path / "driver")},
                    "partition": {"num_clients": 4}, "clients_per_round": 2})
    return prepare(cfg)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(replicate, "CHUNK_BYTES", 8 << 10)  # the digits store spans many chunks


class Counting:
    """Wraps a source: counts reads requested but not yet collected, and can fail or stall."""

    def __init__(self, inner, fail_after=None, delay=0.0):
        self.inner, self.directory, self.fail_after, self.delay = inner, inner.directory, fail_after, delay
        self.outstanding = self.max_outstanding = self.got = 0

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def listing(self):
        return self.inner.listing()

    def read(self, *args):
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        return self.inner.read(*args)

    def get(self, handle):
        self.outstanding -= 1
        if self.fail_after is not None and self.got >= self.fail_after:
            raise ConnectionError("source lost half way")
        self.got += 1
        time.sleep(self.delay)
        return self.inner.get(handle)


def lock_is_free(path) -> bool:
    with open(path.parent / f".{path.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_a_node_without_the_store_copies_it_from_the_driver_with_chunks_in_flight(store, tmp_path, small_chunks):
    server = start_file_server([str(store.path)])
    here = tmp_path / "node" / store.path.name
    source = Counting(ServerSource(server, str(store.path)))
    assert ensure_local(here, source) is True
    assert source.got > IN_FLIGHT and source.max_outstanding == IN_FLIGHT
    copy = open_store(here, verify=True)
    assert copy.fingerprint == store.fingerprint and np.array_equal(copy.labels, store.labels)
    assert np.array_equal(copy.pixels(copy.client_samples(0)), store.pixels(store.client_samples(0)))
    assert ensure_local(here, ServerSource(server, str(store.path))) is False  # complete: not copied again


def test_a_copy_that_does_not_match_the_driver_s_files_is_not_kept(store, tmp_path):
    server = start_file_server([str(store.path)])
    listing = ray.get(server.files.remote(str(store.path)))  # digests taken now
    assert listing[-1][0] == "meta.json"
    samples = store.path / listing[0][0]
    samples.write_bytes(samples.read_bytes()[::-1])  # same size, other bytes: changed after listing
    here = tmp_path / "node" / store.path.name
    with pytest.raises(RuntimeError, match="does not match its sha256"):
        ensure_local(here, ServerSource(server, str(store.path)))
    assert not here.exists() and [p.name for p in here.parent.iterdir()] == [f".{here.name}.lock"]


def test_only_the_listed_directories_are_served(store, tmp_path):
    server = start_file_server([str(store.path)])
    with pytest.raises(ray.exceptions.RayTaskError, match="is not served"):
        ray.get(server.read.remote(str(tmp_path), "secret", 0))


def test_actors_open_the_store_in_place_when_their_node_sees_it(store):
    data = PreparedData.serve(store.path)
    assert data.directories == (store.path.name,) and data.path_here(store.path.name) == store.path
    assert data.fetch_here() == []
    assert data.open_here().fingerprint == store.fingerprint
    with pytest.raises(ValueError):  # no node had to fetch, so no FileServer was started
        ray.get_actor(data.server_name)


def test_the_first_fetch_starts_the_driver_s_file_server_and_later_ones_share_it(store, tmp_path):
    data = PreparedData.serve(store.path)
    name = store.path.name
    first = ensure_local(tmp_path / "node1" / name, lambda: data._source(name))  # as on a node that lacks it
    server = ray.get_actor(data.server_name)
    assert first is True and list_files(tmp_path / "node1" / name) == list_files(store.path)
    assert ensure_local(tmp_path / "node2" / name, lambda: data._source(name)) is True
    assert ray.get_actor(data.server_name)._actor_id == server._actor_id  # the same server, found by name
    assert ensure_local(tmp_path / "node2" / name, lambda: pytest.fail("a complete copy needs no source")) is False
    data.stop_file_server()  # as the engine does at the end of a run
    deadline = time.monotonic() + 30
    with pytest.raises(ValueError):  # the name goes when Ray has marked the actor dead
        while time.monotonic() < deadline:
            ray.get_actor(data.server_name)
            time.sleep(0.1)


def test_processes_of_one_node_fetch_once_and_the_others_read_that_copy(store, tmp_path, small_chunks):
    server = start_file_server([str(store.path)])
    here = tmp_path / "node" / store.path.name
    results = []

    def actor():  # each opens the lock file itself, as separate processes do
        results.append(ensure_local(here, Counting(ServerSource(server, str(store.path)), delay=0.01)))
        results.append(open_store(here, verify=True).fingerprint)

    threads = [threading.Thread(target=actor) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r for r in results if isinstance(r, bool)) == [False, False, False, True]
    assert {r for r in results if isinstance(r, str)} == {store.fingerprint}


def test_a_copy_interrupted_half_way_leaves_nothing_and_the_next_one_completes(store, tmp_path, small_chunks):
    server = start_file_server([str(store.path)])
    here = tmp_path / "node" / store.path.name
    broken = Counting(ServerSource(server, str(store.path)), fail_after=3)
    with pytest.raises(ConnectionError, match="half way"):
        ensure_local(here, broken)
    assert broken.got == 3
    assert [p.name for p in here.parent.iterdir()] == [f".{here.name}.lock"] and lock_is_free(here)
    assert ensure_local(here, ServerSource(server, str(store.path))) is True
    assert list_files(here) == list_files(store.path)


KILLED_COPIER = textwrap.dedent("""
    import sys, time
    from fedplatform.runtime import replicate
    from fedplatform.runtime.replicate import StorageSource, ensure_local

    replicate.CHUNK_BYTES = 8 << 10
    source_dir, dest, started = sys.argv[1:]

    class Stalls(StorageSource):
        got = 0

        def get(self, handle):
            if self.got == 1:
                open(started, "w").close()  # one chunk written: the parent kills this process now
                time.sleep(600)
            self.got += 1
            return super().get(handle)

    ensure_local(dest, Stalls(source_dir))
""")


def test_a_killed_copier_leaves_no_directory_and_frees_the_lock(store, tmp_path, small_chunks):
    published = tmp_path / "storage" / store.path.name
    publish(store.path, str(published))
    here, started = tmp_path / "node" / store.path.name, tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_COPIER, str(published), str(here), str(started)])
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the copier never started"
        assert not lock_is_free(here)  # held while it copies
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not here.exists() and lock_is_free(here)
    assert ensure_local(here, StorageSource(str(published))) is True
    assert list_files(here) == list_files(store.path)
    # the killed copier's temporary directory went with the next fetch
    assert sorted(p.name for p in here.parent.iterdir()) == sorted([here.name, f".{here.name}.lock"])


def test_published_once_then_fetched_from_storage_once_per_node(store, tmp_path, monkeypatch, small_chunks):
    location = str(tmp_path / "storage")
    data = PreparedData.serve(store.path, publish_to=location)
    published = tmp_path / "storage" / "data" / store.path.name
    assert data.server_name is None and (published / "meta.json").is_file() and (published / LISTING).is_file()
    stamp = (published / "meta.json").stat().st_mtime_ns
    assert publish(store.path, str(published)) is False  # same META there: not uploaded again
    assert (published / "meta.json").stat().st_mtime_ns == stamp
    # here the driver's node no longer has it complete at its path: fetched into its cache root
    driver_copy = tmp_path / "moved"
    shutil.move(store.path, driver_copy)
    monkeypatch.setenv("FEDPLATFORM_CACHE", str(tmp_path / "node"))
    assert data.fetch_here() == [store.path.name]
    assert data.open_here().path == tmp_path / "node" / store.path.name
    assert data.fetch_here() == []
    assert list_files(tmp_path / "node" / store.path.name) == list_files(driver_copy)


@pytest.fixture
def s3(monkeypatch):
    """A local S3 endpoint (moto's server mode) and a fresh bucket."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                 "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    bucket = f"fanout-{os.getpid()}-{time.monotonic_ns()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    server.stop()


def test_published_to_s3_and_fetched_once_per_node(store, tmp_path, s3, small_chunks):
    data = PreparedData.serve(store.path, publish_to=s3 + "/runs")
    location = data._published_at(data.published, store.path.name)
    assert location == f"{s3}/runs/data/{store.path.name}"
    assert storage.is_file(storage.join(location, "meta.json"))
    assert publish(store.path, location) is False
    fetched = {"a": [], "b": []}

    def actor(node):  # 4 actors on each of 2 nodes, each node with its own cache root
        fetched[node].append(ensure_local(tmp_path / node / store.path.name, StorageSource(location)))

    threads = [threading.Thread(target=actor, args=(n,)) for n in ("a", "b") for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(fetched["a"]) == sorted(fetched["b"]) == [False, False, False, True]
    for node in ("a", "b"):
        assert list_files(tmp_path / node / store.path.name) == list_files(store.path)


# ---------------------------------------------------------------------------- a simulated cluster

CLUSTER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster
    from fedplatform.config import validate
    from fedplatform.data import prepare
    from fedplatform.runtime.actors import ClientActor
    from fedplatform.runtime.replicate import PreparedData, list_files

    tmp = sys.argv[1]
    sys.path.insert(0, sys.argv[2])
    from fedclip_helpers import domain_config, make_domain_folders

    NODES = ("node_a", "node_b")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for n in NODES:  # each node has its own cache root, neither the driver's
        cluster.add_node(num_cpus=4, resources={n: 4}, env_vars={"FEDPLATFORM_CACHE": f"{tmp}/{n}"})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)

    def digits(seed):
        return validate({"seed": seed, "data": {"dataset": "digits", "imbalance_factor": 10,
                                                "cache_dir": tmp + "/driver"},
                         "partition": {"num_clients": 8}, "clients_per_round": 2,
                         "model": {"name": "small_cnn"}, "runtime": {"device": "cpu"}})

    def files(path):
        return [list(f) for f in list_files(path)]

    out = {}
    # 4 client actors on each node, data served from the driver's node
    cfg = digits(1)
    ds = prepare(cfg)
    data = PreparedData.serve(ds.path)
    actors = [ClientActor.options(num_cpus=1, resources={n: 1}).remote(cfg.model_dump(mode="json"), data, 1, 0)
              for n in NODES for _ in range(4)]
    info = ray.get([a.ready.remote() for a in actors])
    out["served"] = {"actors": [dict(i, group=n) for i, n in zip(info, [n for n in NODES for _ in range(4)])],
                     "driver": str(ds.path), "files": files(ds.path),
                     "copies": {p: files(p) for p in {i["store"] for i in info}}}
    for a in actors:
        ray.kill(a)

    # the same through shared storage (a local directory here)
    ds2 = prepare(digits(2))
    data2 = PreparedData.serve(ds2.path, publish_to=tmp + "/storage")

    @ray.remote(num_cpus=1)
    def fetch(data, group):
        return {"group": group, "fetched": data.fetch_here(), "store": str(data.open_here().path)}

    info = ray.get([fetch.options(resources={n: 1}).remote(data2, n) for n in NODES for _ in range(4)])
    out["published"] = {"actors": info, "driver": str(ds2.path), "files": files(ds2.path),
                        "copies": {p: files(p) for p in {i["store"] for i in info}}}

    # the CLIP feature cache, encoded on the nodes (the head has no CPUs), which lack this store
    from fedplatform.models.clip import create_clip
    from fedplatform.models.feature_cache import build_feature_cache, encode_samples, load_feature_cache

    fcfg = domain_config(make_domain_folders(__import__("pathlib").Path(tmp) / "pacs_like", per_class=2))
    fcfg.data.cache_dir = tmp + "/driver"
    fds = prepare(fcfg)
    build_feature_cache(fcfg, fds, batch_size=2, num_workers=2)  # 2 encoders of 4 CPUs
    clip, preprocess, _, _ = create_clip(fcfg.clip.model, fcfg.clip.pretrained)
    ref = encode_samples(clip, preprocess, fds, np.arange(len(fds)))
    out["features"] = {"max_diff": float(np.abs(load_feature_cache(fcfg, fds) - ref).max()),
                       "copies": {n: files(f"{tmp}/{n}/{fds.path.name}") if __import__("os").path.isdir(
                           f"{tmp}/{n}/{fds.path.name}") else None for n in NODES},
                       "files": files(fds.path)}
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fanout")
    tests = os.path.dirname(os.path.abspath(__file__))
    return str(tmp), run_cluster_script(CLUSTER, str(tmp), tests, timeout=300)


def copies_per_node(actors: list[dict], name: str) -> dict[str, int]:
    counts = {}
    for a in actors:
        counts[a["group"]] = counts.get(a["group"], 0) + (name in a["fetched"])
    return counts


@pytest.mark.cluster
def test_the_store_is_copied_once_per_node_not_once_per_actor(cluster):
    tmp, out = cluster
    served = out["served"]
    name = os.path.basename(served["driver"])
    assert len(served["actors"]) == 8
    assert copies_per_node(served["actors"], name) == {"node_a": 1, "node_b": 1}
    # each actor reads its node's own copy, under that node's cache root, identical to the driver's
    for a in served["actors"]:
        assert a["store"] == f"{tmp}/{a['group']}/{name}"
    assert sorted(served["copies"]) == [f"{tmp}/node_a/{name}", f"{tmp}/node_b/{name}"]
    assert all(files == served["files"] for files in served["copies"].values())


@pytest.mark.cluster
def test_published_data_are_fetched_once_per_node_from_storage(cluster):
    tmp, out = cluster
    published = out["published"]
    name = os.path.basename(published["driver"])
    assert copies_per_node(published["actors"], name) == {"node_a": 1, "node_b": 1}
    assert sorted(published["copies"]) == [f"{tmp}/node_a/{name}", f"{tmp}/node_b/{name}"]
    assert all(files == published["files"] for files in published["copies"].values())
    assert os.path.isfile(f"{tmp}/storage/data/{name}/meta.json")


@pytest.mark.cluster
def test_feature_cache_encoders_fetch_the_store_to_a_node_that_lacks_it(cluster):
    _, out = cluster
    features = out["features"]
    assert features["max_diff"] < 1e-5
    copies = [c for c in features["copies"].values() if c is not None]
    assert copies and all(c == features["files"] for c in copies)
