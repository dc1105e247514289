import pickle
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from fedplatform.config import DataConfig
from fedplatform.data.sources import SOURCES, decode_images, load_source, open_source
from fedplatform.errors import UserError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def tiny_cifar(n_train=40, n_test=20, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    make = lambda n: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),  # noqa: E731
                      rng.permutation(np.arange(n) % num_classes))
    return make(n_train), make(n_test)


def write_cifar10_pickles(d, train, test):
    """The official python layout: row-major CHW bytes under b'data', labels under b'labels'."""
    d.mkdir(parents=True)
    (x, y), (tx, ty) = train, test
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5), 1):
        batch = {b"data": x[part].transpose(0, 3, 1, 2).reshape(len(part), -1), b"labels": y[part].tolist()}
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (d / "test_batch").write_bytes(pickle.dumps({b"data": tx.transpose(0, 3, 1, 2).reshape(len(ty), -1),
                                                  b"labels": ty.tolist()}))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in CIFAR10_NAMES]}))


def write_class_folders(d, train, test, names):
    """train/<class>/NNNN.png, test/<class>/NNNN.png; lossless PNG, file names in dataset order."""
    for split, (x, y) in (("train", train), ("test", test)):
        for i, (img, label) in enumerate(zip(x, y)):
            f = d / split / names[label] / f"{i:04d}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(f)


def by_label(split):
    order = np.argsort(split.labels, kind="stable")
    return split.labels[order], split.pixels[order]


def test_cifar10_pickles_and_class_folders_load_the_same_arrays(tmp_path):
    train, test = tiny_cifar()
    write_cifar10_pickles(tmp_path / "pickles" / "cifar-10-batches-py", train, test)
    write_class_folders(tmp_path / "folders", train, test, CIFAR10_NAMES)
    a = load_source(DataConfig(dataset="cifar10", root=str(tmp_path / "pickles")))
    b = load_source(DataConfig(dataset="cifar10", root=str(tmp_path / "folders")))
    assert a.class_names == b.class_names == CIFAR10_NAMES
    assert np.array_equal(a.train.pixels, train[0]) and np.array_equal(a.train.labels, train[1])  # official order
    for split in ("train", "test"):
        la, pa_ = by_label(getattr(a, split))
        lb, pb = by_label(getattr(b, split))
        assert np.array_equal(la, lb) and np.array_equal(pa_, pb)
    assert a.train.pixels.dtype == np.uint8 and a.train.pixels.shape == (40, 32, 32, 3)
    assert a.norm_mean == (0.4914, 0.4822, 0.4465) and a.norm_std == (0.2023, 0.1994, 0.2010)


def test_cifar10_layout_is_found_in_a_usual_subfolder(tmp_path):
    train, test = tiny_cifar()
    write_class_folders(tmp_path / "cifar10-jpeg", train, test, CIFAR10_NAMES)
    src = open_source(DataConfig(dataset="cifar10", root=str(tmp_path)))
    assert (src.layout, src.dir) == ("folders", tmp_path / "cifar10-jpeg")


def test_cifar100_pickles_use_fine_labels_and_cifar10_normalisation(tmp_path):
    train, test = tiny_cifar(200, 100, num_classes=100)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, (x, y) in (("train", train), ("test", test)):
        (d / name).write_bytes(pickle.dumps({b"data": x.transpose(0, 3, 1, 2).reshape(len(y), -1),
                                             b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist()}))
    names = [f"class_{i:02d}" for i in range(100)]
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [n.encode() for n in names]}))
    src = load_source(DataConfig(dataset="cifar100", root=str(tmp_path)))
    assert src.class_names == names
    assert np.array_equal(src.test.labels, test[1]) and np.array_equal(src.test.pixels, test[0])
    assert src.norm_mean == (0.4914, 0.4822, 0.4465)


def test_missing_cifar_data_says_where_it_looked_and_what_it_accepts(tmp_path):
    with pytest.raises(UserError) as err:
        open_source(DataConfig(dataset="cifar10", root=str(tmp_path / "nowhere")))
    msg = str(err.value)
    assert "\n" not in msg
    for place in ("nowhere", "nowhere/cifar-10-batches-py", "nowhere/cifar10-jpeg"):
        assert str(tmp_path / place) in msg
    assert "pickles" in msg and "train/<class>/*" in msg and "data.download=true" in msg


def test_cifar_without_root_is_a_user_error():
    with pytest.raises(UserError, match="data.root is required for data.dataset=cifar100"):
        open_source(DataConfig(dataset="cifar100"))


def test_cifar_folders_with_the_wrong_classes_are_rejected(tmp_path):
    train, test = tiny_cifar(num_classes=3)
    write_class_folders(tmp_path, train, test, ["a", "b", "c"])
    with pytest.raises(UserError, match="needs the same 10 class folders"):
        open_source(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_download_without_network_fails_fast(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    start = time.perf_counter()
    with pytest.raises(UserError, match="data.download=true but .* is unreachable"):
        open_source(DataConfig(dataset="cifar10", root=str(tmp_path), download=True))
    assert time.perf_counter() - start < 30


def test_digits_are_uint8_8x8x1_scaled_to_255():
    src = load_source(DataConfig(dataset="digits"))
    assert src.train.pixels.shape == (1797, 8, 8, 1) and src.train.pixels.dtype == np.uint8
    assert src.train.pixels.max() == 255 and src.test is None and src.domain_names == []
    assert np.bincount(src.train.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def make_domains(root, domains=("sketch", "art"), classes=("dog", "cat"), per_class=3):
    rng = np.random.default_rng(0)
    for d in domains:
        for c in classes:
            (root / d / c).mkdir(parents=True)
            for i in reversed(range(per_class)):  # creation order differs from sorted order
                pixels = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / d / c / f"img{i}.png")
            (root / d / c / "notes.txt").write_text("not an image")


def test_imagefolder_domains_order_and_domains(tmp_path):
    make_domains(tmp_path)
    src = load_source(DataConfig(dataset="imagefolder_domains", root=str(tmp_path)))
    assert src.domain_names == ["art", "sketch"] and src.class_names == ["cat", "dog"]
    rel = [p.removeprefix(str(tmp_path) + "/") for p in src.train.paths]
    assert rel[:4] == ["art/cat/img0.png", "art/cat/img1.png", "art/cat/img2.png", "art/dog/img0.png"]
    assert len(rel) == 12 and src.train.pixels is None and src.test is None
    assert src.train.labels.tolist() == [0, 0, 0, 1, 1, 1] * 2
    assert src.train.domains.tolist() == [0] * 6 + [1] * 6


def test_imagefolder_domains_need_the_same_classes(tmp_path):
    make_domains(tmp_path)
    (tmp_path / "art" / "horse").mkdir()
    with pytest.raises(UserError, match="same class folders"):
        open_source(DataConfig(dataset="imagefolder_domains", root=str(tmp_path)))


def test_imagenet_lt_lists_and_class_names(tmp_path):
    for rel in ("train/n01/a.JPEG", "train/n02/b.JPEG", "val/n02/c.JPEG"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 30)).save(tmp_path / rel, format="JPEG")
    (tmp_path / "ImageNet_LT_train.txt").write_text("train/n01/a.JPEG 0\ntrain/n02/b.JPEG 1\n")
    (tmp_path / "ImageNet_LT_test.txt").write_text("val/n02/c.JPEG 1\n")
    src = load_source(DataConfig(dataset="imagenet_lt", root=str(tmp_path)))
    assert src.class_names == ["n01", "n02"] and src.test.labels.tolist() == [1]
    assert src.train.paths == [str(tmp_path / "train/n01/a.JPEG"), str(tmp_path / "train/n02/b.JPEG")]
    (tmp_path / "classnames.txt").write_text("tench\ngoldfish\n")
    assert load_source(DataConfig(dataset="imagenet_lt", root=str(tmp_path))).class_names == ["tench", "goldfish"]


def test_imagenet_lt_without_lists_names_them(tmp_path):
    with pytest.raises(UserError, match="lacks ImageNet_LT_train.txt, ImageNet_LT_test.txt"):
        open_source(DataConfig(dataset="imagenet_lt", root=str(tmp_path)))


def test_unknown_dataset_lists_the_registered_ones():
    expected = "'mnist' is not a registered dataset; choose one of: " + ", ".join(sorted(SOURCES))
    with pytest.raises(UserError, match=expected):
        open_source(DataConfig(dataset="mnist"))


def test_decode_rejects_images_of_another_size(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="a.png is 16x16; this dataset needs 32x32"):
        decode_images([str(tmp_path / "a.png")], (32, 32, 3))


def test_source_identity_changes_when_files_are_added(tmp_path):
    make_domains(tmp_path)
    cfg = DataConfig(dataset="imagefolder_domains", root=str(tmp_path))
    before = open_source(cfg).identity()
    Image.new("RGB", (8, 8)).save(tmp_path / "art" / "dog" / "img9.png")
    assert open_source(cfg).identity() != before
