import logging
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from fedplatform.config import ExperimentConfig
from fedplatform.data import FederatedDataset, open_store, prepare
from fedplatform.data import store as store_mod
from fedplatform.data.sources import load_source, open_source
from fedplatform.data.store import StoreError, fingerprint
from fedplatform.errors import UserError


def digits_cfg(cache, **over):
    raw = {"seed": 7, "data": {"dataset": "digits", "imbalance_factor": 10, "cache_dir": str(cache)},
           "partition": {"scheme": "dirichlet", "num_clients": 10}, "clients_per_round": 5}
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            raw.setdefault(section, {})[name] = value
        else:
            raw[section] = value
    return ExperimentConfig.model_validate(raw)


def test_round_trip_keeps_every_used_sample(tmp_path):
    ds = prepare(digits_cfg(tmp_path, data__imbalance_factor=1, partition__scheme="iid"))
    source = load_source(digits_cfg(tmp_path).data)
    assert len(ds) == 1797 and len(ds.test_ids) == 360  # IF 1 keeps all; 20 % stratified test split
    stored = {(int(y), ds.pixels([i]).tobytes()) for i, y in enumerate(ds.labels)}
    original = {(int(y), x.tobytes()) for y, x in zip(source.train.labels, source.train.pixels)}
    assert stored == original
    assert ds.image_shape == (8, 8, 1) and ds.class_names == [str(i) for i in range(10)]


def test_clients_and_test_set_partition_the_samples(tmp_path):
    ds = prepare(digits_cfg(tmp_path))
    train = np.concatenate([ds.client_samples(c) for c in ds.client_ids])
    assert ds.client_ids == list(range(10))
    assert len(np.unique(train)) == len(train) == int(ds.train_class_counts.sum())
    assert not set(train.tolist()) & set(ds.test_ids.tolist())
    assert sorted(train.tolist() + ds.test_ids.tolist()) == list(range(len(ds)))
    assert ds.train_class_counts[0] > ds.train_class_counts[-1]  # long-tailed train pool
    assert ds.test_class_counts.min() >= 35  # balanced test split taken before the long tail


def test_second_prepare_opens_the_cached_store(tmp_path, caplog):
    cfg = digits_cfg(tmp_path)
    first = prepare(cfg)
    stamp = (first.path / "samples.arrow").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="fedplatform"):
        second = prepare(cfg)
    assert second.path == first.path and (second.path / "samples.arrow").stat().st_mtime_ns == stamp
    assert "using prepared data" in caplog.text
    assert second.path.name == f"digits-{second.fingerprint[:16]}"


def test_opening_is_zero_copy(tmp_path):
    ds = open_store(prepare(digits_cfg(tmp_path)).path, verify=False)
    assert not ds.labels.flags.writeable and not ds.labels.flags.owndata  # views of the memory map
    assert not ds._pixels.flags.owndata
    assert ds.pixels(ds.client_samples(0)).shape == (len(ds.client_samples(0)), 8, 8, 1)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "drop_meta"])
def test_damaged_store_is_detected_and_rebuilt(tmp_path, caplog, damage):
    cfg = digits_cfg(tmp_path)
    good = prepare(cfg)
    expected = good.describe()
    samples = good.path / "samples.arrow"
    if damage == "flip_byte":
        data = bytearray(samples.read_bytes())
        data[len(data) // 2] ^= 0xFF
        samples.write_bytes(bytes(data))
        with pytest.raises(StoreError, match="samples.arrow does not match its sha256"):
            open_store(good.path)
    elif damage == "truncate":
        with open(good.path / "manifest.arrow", "r+b") as f:
            f.truncate(100)
        with pytest.raises(StoreError, match="manifest.arrow has 100 bytes"):
            open_store(good.path, verify=False)
    else:
        (good.path / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="fedplatform"):
        rebuilt = prepare(cfg)
    assert "removing it and rebuilding" in caplog.text
    assert rebuilt.path == good.path and rebuilt.describe() == expected
    open_store(rebuilt.path, verify=True)


def test_fingerprint_follows_what_changes_the_content(tmp_path):
    base = digits_cfg(tmp_path)
    fp = lambda cfg: fingerprint(cfg, open_source(cfg.data))  # noqa: E731
    same = [digits_cfg(tmp_path / "elsewhere"), digits_cfg(tmp_path, rounds=3)]
    different = [digits_cfg(tmp_path, seed=8), digits_cfg(tmp_path, data__imbalance_factor=50),
                 digits_cfg(tmp_path, partition__dirichlet_alpha=0.3), digits_cfg(tmp_path, partition__scheme="iid"),
                 digits_cfg(tmp_path, data__test_fraction=0.3), digits_cfg(tmp_path, data__longtail_seed=3)]
    assert all(fp(c) == fp(base) for c in same)
    assert len({fp(base), *map(fp, different)}) == 1 + len(different)


def test_failed_write_leaves_no_partial_directory(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "_write_manifest", broken)
    with pytest.raises(OSError, match="disk full"):
        prepare(digits_cfg(tmp_path))
    assert os.listdir(tmp_path) == []


def test_concurrent_builder_that_finishes_first_wins(tmp_path, monkeypatch):
    cfg = digits_cfg(tmp_path)
    real = store_mod._write_manifest
    state = {"raced": False}

    def racing(*args):
        if not state["raced"]:  # another process completes the same store meanwhile
            state["raced"] = True
            prepare(cfg)
        real(*args)

    monkeypatch.setattr(store_mod, "_write_manifest", racing)
    ds = prepare(cfg)
    assert [p.name for p in tmp_path.iterdir()] == [ds.path.name]
    open_store(ds.path, verify=True)


def test_longtail_seed_fixes_the_long_tail_whatever_the_run_seed(tmp_path):
    from test_sources import tiny_cifar, write_cifar10_pickles

    write_cifar10_pickles(tmp_path / "cifar-10-batches-py", *tiny_cifar(n_train=300, n_test=20))

    def pool(seed, longtail_seed):
        cfg = ExperimentConfig.model_validate({
            "seed": seed, "clients_per_round": 2, "partition": {"scheme": "iid", "num_clients": 2},
            "data": {"dataset": "cifar10", "root": str(tmp_path), "imbalance_factor": 5,
                     "longtail_seed": longtail_seed, "cache_dir": str(tmp_path / "cache")}})
        ds = prepare(cfg)
        train = np.sort(np.concatenate([ds.client_samples(c) for c in ds.client_ids]))
        return ds.pixels(train), ds.client_samples(0)

    (a, a0), (b, b0), (c, _) = pool(1, 7), pool(2, 7), pool(1, 8)
    assert np.array_equal(a, b) and not np.array_equal(a0, b0)  # same images kept; partition follows seed
    assert a.shape == c.shape and not np.array_equal(a, c)  # same counts, other images
    assert np.array_equal(pool(7, None)[0], a)  # null follows the run seed (7 here)


def test_encoded_images_round_trip_with_per_domain(tmp_path):
    root = tmp_path / "pacs"
    rng = np.random.default_rng(0)
    for d in ("art_painting", "cartoon", "photo"):
        for c in ("dog", "horse"):
            (root / d / c).mkdir(parents=True)
            for i in range(10):
                Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(root / d / c / f"{i}.png")
    cfg = ExperimentConfig.model_validate({
        "seed": 0, "clients_per_round": 2,
        "data": {"dataset": "imagefolder_domains", "root": str(root), "test_domain": "cartoon",
                 "cache_dir": str(tmp_path / "cache")},
        "partition": {"scheme": "per_domain", "num_clients": 2}})
    ds = prepare(cfg)
    assert ds.image_shape is None and ds.domain_names == ["art_painting", "cartoon", "photo"]
    assert [len(ds.client_samples(0, s)) for s in ("train", "val", "test")] == [12, 4, 4]
    assert set(ds.domains[ds.test_ids].tolist()) == {1} and len(ds.test_ids) == 20
    assert set(ds.domains[ds.client_samples(1, "val")].tolist()) == {2}
    first = ds.encoded(ds.client_samples(0)[:1])[0]
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    files = {p.read_bytes() for p in root.rglob("*.png")}
    assert set(ds.encoded(np.arange(len(ds)))) == files
    with pytest.raises(ValueError, match="encoded"):
        ds.pixels([0])


def test_encoded_store_streams_in_several_record_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "ENCODED_BATCH_BYTES", 1)  # one image per record batch
    root = tmp_path / "data"
    for d in ("a", "b"):
        (root / d / "x").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(root / d / "x" / f"{i}.png")
    cfg = ExperimentConfig.model_validate({
        "clients_per_round": 2,
        "data": {"dataset": "imagefolder_domains", "root": str(root), "cache_dir": str(tmp_path / "c")},
        "partition": {"scheme": "per_domain", "num_clients": 2, "split_fractions": [1.0, 0.0, 0.0]}})
    ds = prepare(cfg)
    table = pa.ipc.open_file(pa.memory_map(str(ds.path / "samples.arrow"))).read_all()
    assert table.column("image").num_chunks == 6
    assert ds.labels.tolist() == [0] * 6 and ds.domains.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.encoded([5])[0] == (root / "b" / "x" / "2.png").read_bytes()


def test_per_domain_rejects_a_long_tail(tmp_path):
    cfg = digits_cfg(tmp_path, partition__scheme="per_domain", partition__num_clients=5)
    with pytest.raises(UserError, match="imbalance_factor=10.0 cannot be combined with partition.scheme='per_domain'"):
        prepare(cfg)


def test_cache_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPLATFORM_CACHE", str(tmp_path / "env-cache"))
    ds = prepare(digits_cfg(tmp_path, data__cache_dir=None))
    assert ds.path.parent == tmp_path / "env-cache"
    assert isinstance(ds, FederatedDataset)


def test_describe_has_exactly_the_documented_shape(tmp_path):
    d = prepare(digits_cfg(tmp_path)).describe()
    assert list(d) == ["dataset", "num_classes", "class_names", "train_class_counts", "test_class_counts", "clients"]
    assert [list(c) for c in d["clients"]] == [["id", "num_samples", "class_counts"]] * 10
    assert sum(c["num_samples"] for c in d["clients"]) == sum(d["train_class_counts"])
    assert all(sum(c["class_counts"]) == c["num_samples"] for c in d["clients"])
