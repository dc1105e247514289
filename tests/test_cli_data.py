import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from fedplatform import __version__
from fedplatform.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "pipelines" / "quickstart.yaml")
CIFAR10 = str(REPO / "pipelines" / "clip2fl_cifar10_lt.yaml")
CIFAR_TAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar"


def describe(capsys, *args):
    code = main(["data", "describe", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_schema(d):
    assert list(d) == ["dataset", "num_classes", "class_names", "train_class_counts", "test_class_counts", "clients"]
    C = d["num_classes"]
    assert isinstance(d["dataset"], str) and len(d["class_names"]) == C
    assert len(d["train_class_counts"]) == len(d["test_class_counts"]) == C
    for c in d["clients"]:
        assert list(c) == ["id", "num_samples", "class_counts"] and len(c["class_counts"]) == C
        assert sum(c["class_counts"]) == c["num_samples"]
    assert [c["id"] for c in d["clients"]] == sorted(c["id"] for c in d["clients"])


def test_describe_json_is_one_object_with_the_schema(capsys):
    code, out, _ = describe(capsys, QUICKSTART, "--json")
    d = json.loads(out)  # the whole of stdout
    assert code == 0
    assert_schema(d)
    assert d["dataset"] == "digits" and len(d["clients"]) == 10
    assert sum(c["num_samples"] for c in d["clients"]) == sum(d["train_class_counts"])
    # n_max = 1437 / 10 after the 20 % test split; class 0 holds only 142 of its 143
    assert d["train_class_counts"] == [142, 111, 86, 66, 51, 39, 30, 23, 18, 14]


def test_describe_prints_counts_histograms_and_summary(capsys):
    code, out, _ = describe(capsys, QUICKSTART, "--set", "partition.num_clients=6")
    assert code == 0
    for text in ("train class counts, head to tail", "client label histograms", "samples per client",
                 "classes per client"):
        assert text in out


def test_describe_plot_writes_a_png(capsys, tmp_path):
    code, out, _ = describe(capsys, QUICKSTART, "--json", "--plot", str(tmp_path / "p.png"))
    assert code == 0 and json.loads(out)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == __version__


def test_as_a_subprocess_stdout_holds_only_the_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedplatform.cli", "data", "describe", QUICKSTART, "--json",
                           "--set", f"data.cache_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert_schema(json.loads(proc.stdout))
    assert "preparing digits" in proc.stderr  # progress goes to stderr


@pytest.mark.parametrize("pipeline, overrides, expected", [
    (QUICKSTART, ["data.colour=red"], "unknown key 'data.colour'"),
    (QUICKSTART, ["data.imbalance_factor=0.5"], "data.imbalance_factor=0.5"),
    (QUICKSTART, ["partition.dirichlet_alpha=0"], "partition.dirichlet_alpha=0"),
    (QUICKSTART, ["partition.num_clients=5000"], "partition.num_clients=5000 exceeds the 580 samples"),
    (CIFAR10, ["data.root=/nonexistent/cifar"], "no CIFAR-10 data under data.root='/nonexistent/cifar': looked in"),
    (QUICKSTART, ["data.dataset=mnist"], "data.dataset='mnist' is not a registered dataset"),
    (QUICKSTART, ["partition.scheme=shards"], "partition.scheme='shards' is not a registered partitioner"),
])
def test_bad_input_is_one_error_line_and_exit_code_2(capsys, pipeline, overrides, expected):
    code, out, err = describe(capsys, pipeline, *[a for o in overrides for a in ("--set", o)])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and out == ""
    assert len(errors) == 1 and expected in errors[0]
    assert "Traceback" not in err


def test_bad_input_as_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "fedplatform.cli", "data", "describe", QUICKSTART,
                           "--set", "partition.dirichlet_alpha=0"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")


def test_usage_errors_are_one_line_too(capsys):
    assert main(["data", "describe"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: the following arguments are required: pipeline (see `fedplatform data describe --help`)"


def test_debug_shows_the_traceback(capsys):
    code, _, err = describe(capsys, QUICKSTART, "--set", "data.dataset=mnist", "--debug")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


@pytest.fixture(scope="session")
def cifar10_jpeg(tmp_path_factory):
    if not CIFAR_TAR.is_file():
        pytest.skip(f"{CIFAR_TAR} is absent (the shared CIFAR-10 JPEG tar; see shared/datasets/README.md)")
    # 60,000 small files: extract into RAM (tmpfs) when there is room; on a busy disk writing
    # and deleting them takes minutes.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 << 30:
        root = Path(tempfile.mkdtemp(prefix="fedplatform-cifar10-", dir=shm))
    else:
        root = tmp_path_factory.mktemp("cifar10")
    if shutil.which("tar"):  # several times faster than tarfile for 60,000 small members
        subprocess.run(["tar", "-xf", str(CIFAR_TAR), "-C", str(root)], check=True)
    else:
        with tarfile.open(CIFAR_TAR) as tar:
            tar.extractall(root, filter="data")
    yield root / "cifar10-jpeg"
    shutil.rmtree(root, ignore_errors=True)


def test_cifar10_jpeg_folders_give_the_reference_partition(capsys, cifar10_jpeg):
    code, out, err = describe(capsys, CIFAR10, "--set", f"data.root={cifar10_jpeg}", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["train_class_counts"] == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(d["train_class_counts"]) == 12406 and d["test_class_counts"] == [1000] * 10
    assert d["class_names"][0] == "airplane" and d["class_names"][-1] == "truck"
    assert [c["num_samples"] for c in d["clients"]] == [621] * 6 + [620] * 14
    assert d["clients"][7]["class_counts"] == [620] + [0] * 9  # spec clip2fl 3.2 histograms
    assert d["clients"][0]["class_counts"] == [37, 11, 321, 32, 103, 113, 4, 0, 0, 0]
