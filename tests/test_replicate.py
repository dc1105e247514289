"""Prepared directories reach nodes that lack them: copied from the driver's node through Ray."""
from __future__ import annotations

import numpy as np
import pytest
import ray

from fedplatform.config import validate
from fedplatform.data import open_store, prepare
from fedplatform.runtime.replicate import PreparedData, ensure_local, start_file_server

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture
def store(tmp_path):
    cfg = validate({"data": {"dataset": "digits", "imbalance_factor": 10, "cache_dir": str(tmp_path / "driver")},
                    "partition": {"num_clients": 4}, "clients_per_round": 2})
    return prepare(cfg)


def test_a_node_without_the_store_copies_it_from_the_driver_and_verifies_it(store, tmp_path):
    server = start_file_server([str(store.path)])
    here = tmp_path / "node" / store.path.name
    assert ensure_local(str(here), server, source=str(store.path)) is True
    copy = open_store(here, verify=True)
    assert copy.fingerprint == store.fingerprint and np.array_equal(copy.labels, store.labels)
    assert np.array_equal(copy.pixels(copy.client_samples(0)), store.pixels(store.client_samples(0)))
    assert ensure_local(str(here), server, source=str(store.path)) is False  # complete: not copied again


def test_a_copy_that_does_not_match_the_driver_s_files_is_not_kept(store, tmp_path):
    server = start_file_server([str(store.path)])
    listing = ray.get(server.files.remote(str(store.path)))  # digests taken now
    assert listing[-1][0] == "meta.json"
    samples = store.path / listing[0][0]
    samples.write_bytes(samples.read_bytes()[::-1])  # same size, other bytes: changed after listing
    here = tmp_path / "node" / store.path.name
    with pytest.raises(RuntimeError, match="does not match its sha256"):
        ensure_local(str(here), server, source=str(store.path))
    assert not here.exists() and not list(here.parent.iterdir())


def test_only_the_listed_directories_are_served(store, tmp_path):
    server = start_file_server([str(store.path)])
    with pytest.raises(ray.exceptions.RayTaskError, match="is not served"):
        ray.get(server.read.remote(str(tmp_path), "secret", 0))


def test_actors_open_the_store_in_place_when_their_node_sees_it(store):
    data = PreparedData.serve(store.path)
    assert data.directories == (str(store.path),)
    assert data.open_here().fingerprint == store.fingerprint
