"""Dataset sources: one registered class per dataset; `load_source(cfg.data)` reads one.

A source is opened cheaply first (`open_source`: find the files, fail at once with a clear
message when they are missing, compute an `identity` fingerprint from paths and stat data) and
only loaded (`.load()`: decode images, read lists) when the prepared store is not cached.

Small fixed-size images (digits, CIFAR) are returned as uint8 pixels [N, H, W, C]; large or
variable-size ones (PACS, ImageNet-LT) as file paths whose encoded bytes the store keeps.
"""
from __future__ import annotations

import abc
import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from fedplatform.config import DataConfig
from fedplatform.errors import UserError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""torchvision ImageFolder's list: other files in class folders are ignored, as there."""
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class SplitData:
    labels: np.ndarray  # int64 [N]
    domains: np.ndarray  # int16 [N] (zeros when the source has no domains)
    pixels: np.ndarray | None = None  # uint8 [N, H, W, C] for small fixed-size images
    paths: list[str] | None = None  # image files, for large / variable-size images

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> SplitData:
        return SplitData(
            self.labels[idx],
            self.domains[idx],
            self.pixels[idx] if self.pixels is not None else None,
            [self.paths[i] for i in idx] if self.paths is not None else None,
        )


@dataclass
class SourceData:
    class_names: list[str]
    domain_names: list[str]  # [] when the source has no domains
    train: SplitData
    test: SplitData | None  # None = no official test split
    norm_mean: tuple[float, ...]  # student-view normalisation
    norm_std: tuple[float, ...]
    identity: dict  # JSON-able fingerprint of the source files, part of the cache key


class Source(abc.ABC):
    """A located dataset. __init__ must stay cheap (no decoding) and raise UserError when the
    data are missing; `identity()` feeds the cache key; `load()` does the real work."""

    name: ClassVar[str]

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    @abc.abstractmethod
    def identity(self) -> dict:
        """Cheap JSON-able description of the source files (paths, sizes, mtimes)."""

    @abc.abstractmethod
    def load(self) -> SourceData:
        """Read and decode the data."""


SOURCES: dict[str, type[Source]] = {}


def register_source(name: str):
    def deco(cls: type[Source]) -> type[Source]:
        cls.name = name
        SOURCES[name] = cls
        return cls

    return deco


def open_source(cfg: DataConfig) -> Source:
    """Locate the data of `cfg.dataset` (cheap; downloads first when asked and needed)."""
    if cfg.dataset not in SOURCES:
        raise UserError(
            f"data.dataset={cfg.dataset!r} is not a registered dataset; choose one of: {', '.join(sorted(SOURCES))}"
        )
    return SOURCES[cfg.dataset](cfg)


def load_source(cfg: DataConfig) -> SourceData:
    return open_source(cfg).load()


# ---------------------------------------------------------------------------- helpers


class _Refused(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the official CIFAR pickles hold: dicts, lists, str/bytes, ints and numpy
    arrays. Any other global (os.system, builtins.eval, ...) is refused before it can run, so a
    crafted file in data.root cannot execute code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        target = self.ALLOWED.get((module, name))
        if target is None:
            raise _Refused(f"it refers to {module}.{name}, which a CIFAR file never contains")
        import importlib

        return getattr(importlib.import_module(target[0]), target[1])


def read_cifar_pickle(path: Path) -> dict:
    """One official CIFAR python file, through the restricted unpickler; a UserError for anything
    that is not a well-formed CIFAR dict (crafted, corrupt or truncated)."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except _Refused as exc:
        raise UserError(f"{path} is not an official CIFAR file and was not loaded: {exc}; replace it with the "
                        "file from the official archive") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, OSError) as exc:
        raise UserError(f"{path} is corrupt or truncated ({type(exc).__name__}); replace it with the file from "
                        "the official archive") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not the dict of an official CIFAR file; replace it "
                        "with the file from the official archive")
    return obj


def _stat(path: Path) -> dict:
    st = path.stat()
    out = {"path": str(path), "mtime_ns": st.st_mtime_ns}
    if path.is_dir():  # adding or removing a file changes the count (and usually the mtime)
        out["entries"] = sum(1 for _ in os.scandir(path))
    else:
        out["size"] = st.st_size
    return out


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".tar.bz2", ".tar.xz", ".gz")


def _check_not_archive(cfg: DataConfig, root: Path) -> None:
    """data.root naming a downloaded archive: say to extract it (not 'no data under it')."""
    if root.is_file() and root.name.lower().endswith(ARCHIVE_SUFFIXES):
        how = (f"unzip {root} -d {root.parent}" if root.name.lower().endswith(".zip")
               else f"tar -xf {root} -C {root.parent}")
        raise UserError(f"data.root={cfg.root!r} is an archive, not a folder; extract it first ({how}) and set "
                        "data.root to the extracted folder")


def _require_root(cfg: DataConfig, what: str) -> Path:
    if cfg.root is None:
        raise UserError(f"data.root is required for data.dataset={cfg.dataset}: set it to the folder holding {what}")
    root = Path(cfg.root).expanduser().resolve()
    _check_not_archive(cfg, root)
    if not root.is_dir():
        raise UserError(f"data.root={cfg.root!r} is not a directory ({root}); it must hold {what}")
    return root


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _image_files(class_dir: Path) -> list[str]:
    """Image files under `class_dir` in torchvision ImageFolder order (sorted walk, sorted names)."""
    out = []
    for dirpath, _, names in sorted(os.walk(class_dir, followlinks=True)):
        out += [os.path.join(dirpath, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    return out


def decode_images(paths: list[str], shape: tuple[int, int, int]) -> np.ndarray:
    """Decode image files into uint8 [N, H, W, C] (RGB, or L when C = 1); every image must
    already have size (H, W). A thread pool overlaps file reads with decoding."""
    from PIL import Image

    out = np.empty((len(paths), *shape), dtype=np.uint8)
    mode = "RGB" if shape[2] == 3 else "L"

    def work(start: int) -> None:
        for i in range(start, min(start + 512, len(paths))):
            try:
                with Image.open(paths[i]) as im:
                    if im.mode != mode:
                        im = im.convert(mode)
                    if im.size != (shape[1], shape[0]):
                        raise UserError(
                            f"image {paths[i]} is {im.size[0]}x{im.size[1]}; this dataset needs {shape[1]}x{shape[0]}"
                        )
                    # tobytes + frombuffer is about twice as fast as np.asarray(im) for tiny images
                    out[i] = np.frombuffer(im.tobytes(), dtype=np.uint8).reshape(shape)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise UserError(f"cannot read image {paths[i]} ({type(exc).__name__}: {exc}); remove or "
                                "replace it") from None

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(work, range(0, len(paths), 512)))
    return out


# ---------------------------------------------------------------------------- sources


@register_source("digits")
class Digits(Source):
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 images, 10 classes, no network.

    Pixels 0..16 are scaled to 0..255 (round(x * 255 / 16)) as uint8 [N, 8, 8, 1]. No official
    test split (the store holds out `data.test_fraction`, stratified). Normalisation: the mean
    and std of all 1,797 images on the 0..1 scale (0.3053 / 0.3759). `data.root` is not used.
    """

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        import importlib.util

        # Locate the bundled file without importing scikit-learn (slow) on the cached path.
        spec = importlib.util.find_spec("sklearn")
        self.file = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"

    def identity(self) -> dict:
        return {"files": [_stat(self.file)]}

    def load(self) -> SourceData:
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        labels = d.target.astype(np.int64)
        return SourceData(
            class_names=[str(i) for i in range(10)],
            domain_names=[],
            train=SplitData(labels, np.zeros(len(labels), np.int16), pixels=pixels),
            test=None,
            norm_mean=(0.3053,),
            norm_std=(0.3759,),
            identity=self.identity(),
        )


class _Cifar(Source):
    """CIFAR from the official python pickles or from class folders, found under data.root.

    Layouts: pickles (`cifar-10-batches-py/` or `cifar-100-python/`, as torchvision downloads
    them) or class folders `train/<class>/*` and `test/<class>/*` (class index = sorted folder
    name, order within a class = sorted file name), looked for in data.root and a few usual
    subfolders. Normalisation: CIFAR-10 statistics for CIFAR-10 and CIFAR-100 alike (reference).
    `download: true` fetches the pickles with torchvision when no layout is found.
    """

    num_classes: ClassVar[int]
    title: ClassVar[str]
    pickle_dir: ClassVar[str]
    pickle_files: ClassVar[tuple[str, ...]]
    folder_dirs: ClassVar[tuple[str, ...]]
    torchvision_class: ClassVar[str]
    url: ClassVar[str]  # torchvision's download URL, probed before torchvision is imported

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        layouts = (
            f"the official pickles ({self.pickle_dir}/: {', '.join(self.pickle_files)}) or class folders "
            "(train/<class>/*, test/<class>/*)"
        )
        if cfg.root is None:
            raise UserError(f"data.root is required for data.dataset={cfg.dataset}: the folder holding {layouts}")
        self.root = Path(cfg.root).expanduser().resolve()
        _check_not_archive(cfg, self.root)
        found = self._find()
        if found is None and cfg.download:
            self._download()
            found = self._find()
        if found is None:
            looked = ", ".join(str(d) for d in self._candidates())
            raise UserError(
                f"no {self.title} data under data.root={cfg.root!r}: looked in {looked} for {layouts}; "
                "point data.root at one of them or set data.download=true"
            )
        self.layout, self.dir = found

    def _candidates(self) -> list[Path]:
        return [self.root, self.root / self.pickle_dir, *(self.root / d for d in self.folder_dirs)]

    def _find(self) -> tuple[str, Path] | None:
        for d in self._candidates():
            if all((d / f).is_file() for f in self.pickle_files):
                return "pickle", d
            if (d / "train").is_dir() and (d / "test").is_dir():
                self._check_folders(d)
                return "folders", d
        return None

    def _check_folders(self, d: Path) -> None:
        train, test = _subdirs(d / "train"), _subdirs(d / "test")
        if len(train) != self.num_classes or train != test:
            raise UserError(
                f"{d} holds class folders train/ ({len(train)} classes) and test/ ({len(test)} classes); "
                f"{self.title} needs the same {self.num_classes} class folders in both"
            )

    def _download(self) -> None:
        import socket
        import urllib.request

        # Probe once with a short timeout, before importing torch, so that an offline machine
        # fails in a moment instead of after a slow import and long retries.
        try:
            urllib.request.urlopen(urllib.request.Request(self.url, method="HEAD"), timeout=10).close()
        except OSError as exc:
            raise UserError(
                f"data.download=true but {self.url} is unreachable ({getattr(exc, 'reason', exc)}); download "
                f"{self.title} elsewhere and set data.root to the folder holding {self.pickle_dir}/"
            ) from None
        import torchvision

        log.info("downloading %s into %s", self.title, self.root)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)  # a stalled transfer fails instead of hanging forever
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            getattr(torchvision.datasets, self.torchvision_class)(str(self.root), train=True, download=True)
        except (OSError, RuntimeError) as exc:
            raise UserError(f"downloading {self.title} from {self.url} failed: {exc}") from None
        finally:
            socket.setdefaulttimeout(previous)

    def identity(self) -> dict:
        if self.layout == "pickle":
            files = [_stat(self.dir / f) for f in self.pickle_files]
        else:
            files = [_stat(self.dir / s / c) for s in ("train", "test") for c in _subdirs(self.dir / s)]
        return {"layout": self.layout, "files": files}

    def load(self) -> SourceData:
        if self.layout == "pickle":
            class_names, train, test = self._load_pickles()
        else:
            class_names, train, test = self._load_folders()
        return SourceData(class_names, [], train, test, CIFAR_MEAN, CIFAR_STD, self.identity())

    def _read_pickle(self, name: str) -> dict:
        return read_cifar_pickle(self.dir / name)

    def _names(self, name: str, key: bytes) -> list[str]:
        names = self._read_pickle(name).get(key)
        if not isinstance(names, list) or len(names) != self.num_classes or not all(
                isinstance(n, (bytes, str)) for n in names):
            raise UserError(f"{self.dir / name} lacks the {self.num_classes} class names of {self.title} under "
                            f"{key.decode()}; replace it with the file from the official archive")
        return [n.decode() if isinstance(n, bytes) else n for n in names]

    def _split(self, names: list[str], label_key: bytes) -> SplitData:
        pixels, labels = [], []
        for name in names:
            b = self._read_pickle(name)
            data, y = b.get(b"data"), b.get(label_key)
            ok = (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                  and data.shape[1] == 3 * 32 * 32 and isinstance(y, list) and len(y) == len(data)
                  and all(isinstance(v, int) for v in y))
            y = np.asarray(y, dtype=np.int64) if ok else None
            if not ok or (len(y) and not (0 <= y.min() and y.max() < self.num_classes)):
                raise UserError(f"{self.dir / name} is not an official {self.title} batch (uint8 data [N, 3072] "
                                f"and N labels 0..{self.num_classes - 1} under {label_key.decode()}); replace it "
                                "with the file from the official archive")
            pixels.append(data)
            labels.append(y)
        x = np.concatenate(pixels).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.concatenate(labels)
        return SplitData(y, np.zeros(len(y), np.int16), pixels=np.ascontiguousarray(x))

    def _load_folders(self) -> tuple[list[str], SplitData, SplitData]:
        class_names = _subdirs(self.dir / "train")
        splits = []
        for split in ("train", "test"):
            paths, labels = [], []
            for c, name in enumerate(class_names):
                files = _image_files(self.dir / split / name)
                if not files:
                    raise UserError(f"class folder {self.dir / split / name} has no image files "
                                    f"({', '.join(IMG_EXTENSIONS)}); every class needs images in train/ and test/")
                paths += files
                labels += [c] * len(files)
            log.info("decoding %d %s images from %s", len(paths), split, self.dir / split)
            pixels = decode_images(paths, (32, 32, 3))
            splits.append(SplitData(np.asarray(labels, np.int64), np.zeros(len(labels), np.int16), pixels=pixels))
        return class_names, splits[0], splits[1]


@register_source("cifar10")
class Cifar10(_Cifar):
    __doc__ = _Cifar.__doc__
    num_classes, title = 10, "CIFAR-10"
    pickle_dir = "cifar-10-batches-py"
    pickle_files = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
    folder_dirs = ("cifar10-jpeg", "cifar10", "CIFAR10", "cifar-10")
    torchvision_class = "CIFAR10"
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

    def _load_pickles(self):
        names = self._names("batches.meta", b"label_names")
        train = self._split([f"data_batch_{i}" for i in range(1, 6)], b"labels")
        return names, train, self._split(["test_batch"], b"labels")


@register_source("cifar100")
class Cifar100(_Cifar):
    __doc__ = _Cifar.__doc__
    num_classes, title = 100, "CIFAR-100"
    pickle_dir = "cifar-100-python"
    pickle_files = ("train", "test", "meta")
    folder_dirs = ("cifar100-jpeg", "cifar100", "CIFAR100", "cifar-100")
    torchvision_class = "CIFAR100"
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"

    def _load_pickles(self):
        names = self._names("meta", b"fine_label_names")
        train = self._split(["train"], b"fine_labels")
        return names, train, self._split(["test"], b"fine_labels")


@register_source("imagefolder_domains")
class ImageFolderDomains(Source):
    """Multi-domain image folders `root/<domain>/<class>/<image>` (PACS, VLCS, Office-Home).

    Domains and classes in sorted folder order (every domain must have the same class folders);
    samples ordered by domain, then as torchvision's ImageFolder (class, then sorted path), each
    carrying its domain index. Images are kept encoded (file bytes). No official test split:
    per_domain holds out `data.test_domain`; other schemes hold out `data.test_fraction`.
    Normalisation: ImageNet statistics.
    """

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.root = _require_root(cfg, "one folder per domain, each with one folder per class")
        self.domains = [d for d in _subdirs(self.root) if not d.startswith(".")]
        if not self.domains:
            raise UserError(f"data.root={cfg.root!r} has no domain folders; expected <root>/<domain>/<class>/<image>")
        self.classes = _subdirs(self.root / self.domains[0])
        for d in self.domains:
            classes = _subdirs(self.root / d)
            if not classes or classes != self.classes:
                raise UserError(
                    f"domain folder {self.root / d} has classes {classes}; every domain needs the same class "
                    f"folders as {self.domains[0]}: {self.classes}"
                )

    def identity(self) -> dict:
        return {"files": [_stat(self.root / d / c) for d in self.domains for c in self.classes]}

    def load(self) -> SourceData:
        paths, labels, domains = [], [], []
        for di, d in enumerate(self.domains):
            for ci, c in enumerate(self.classes):
                files = _image_files(self.root / d / c)
                if not files:
                    raise UserError(f"class folder {self.root / d / c} has no images ({', '.join(IMG_EXTENSIONS)})")
                paths += files
                labels += [ci] * len(files)
                domains += [di] * len(files)
        train = SplitData(np.asarray(labels, np.int64), np.asarray(domains, np.int16), paths=paths)
        return SourceData(self.classes, self.domains, train, None, IMAGENET_MEAN, IMAGENET_STD, self.identity())


@register_source("imagenet_lt")
class ImageNetLT(Source):
    """ImageNet-LT (Liu et al. 2019): `ImageNet_LT_train.txt` and `ImageNet_LT_test.txt` under
    data.root, lines `relative/path.JPEG label`, images at root/relative/path. Class names from
    an optional root/classnames.txt (one per line, label order), else each class's folder name
    (the WordNet id). Already long-tailed: keep data.imbalance_factor = 1. Images kept encoded;
    ImageNet normalisation. The val list is not used (the test list is the official test split).
    """

    lists = ("ImageNet_LT_train.txt", "ImageNet_LT_test.txt")

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.root = _require_root(cfg, f"{' and '.join(self.lists)} and the image folders they list")
        missing = [f for f in self.lists if not (self.root / f).is_file()]
        if missing:
            raise UserError(
                f"data.root={cfg.root!r} lacks {', '.join(missing)}; imagenet_lt needs {' and '.join(self.lists)} there"
            )

    def identity(self) -> dict:
        files = [self.root / f for f in (*self.lists, "classnames.txt") if (self.root / f).is_file()]
        return {"files": [_stat(f) for f in files]}

    def _read_list(self, name: str) -> tuple[list[str], np.ndarray]:
        paths, labels = [], []
        try:
            text = (self.root / name).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.root / name} cannot be read as a text list ({type(exc).__name__}); it needs "
                            "lines 'relative/path label'") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise UserError(f"{self.root / name} line {n}: expected 'relative/path label', got {line!r}")
            paths.append(str(self.root / parts[0]))
            labels.append(int(parts[1]))
        return paths, np.asarray(labels, np.int64)

    def load(self) -> SourceData:
        (train_paths, train_labels), (test_paths, test_labels) = map(self._read_list, self.lists)
        for name, labels in zip(self.lists, (train_labels, test_labels)):
            if not len(labels):
                raise UserError(f"{self.root / name} lists no images; it needs lines 'relative/path label'")
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        names_file = self.root / "classnames.txt"
        if names_file.is_file():
            names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()]
            if len(names) != num_classes:
                raise UserError(
                    f"{names_file} has {len(names)} names; the lists use {num_classes} classes (one name per line)"
                )
        else:
            first: dict[int, str] = {}
            for p, y in zip(train_paths + test_paths, np.concatenate([train_labels, test_labels])):
                first.setdefault(int(y), Path(p).parent.name)
            names = [first.get(c, f"class_{c}") for c in range(num_classes)]

        def split(paths, labels):
            return SplitData(labels, np.zeros(len(labels), np.int16), paths=paths)

        return SourceData(names, [], split(train_paths, train_labels), split(test_paths, test_labels),
                          IMAGENET_MEAN, IMAGENET_STD, self.identity())
