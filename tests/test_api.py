"""The public Python API's cheap parts (run, sweep and load_model are exercised in test_plugins.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

import fedplatform
from fedplatform.config import ConfigError
from fedplatform.errors import UserError
from quickstart_helpers import QUICKSTART


def test_import_fedplatform_loads_neither_torch_nor_ray_nor_mlflow():
    code = "import sys, fedplatform; print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_load_config_takes_a_path_a_dict_or_a_config_with_overrides():
    from_file = fedplatform.load_config(QUICKSTART, ["rounds=2"])
    from_dict = fedplatform.load_config(from_file.model_dump(mode="json"), ["algorithm.lr=0.01"])
    again = fedplatform.load_config(from_dict)
    assert (from_file.rounds, from_dict.rounds, from_dict.algorithm.lr) == (2, 2, 0.01) and again == from_dict


def test_load_config_reports_a_bad_override_as_one_line():
    with pytest.raises(ConfigError, match=r"unknown key 'algorithm.lrr'; allowed keys for algorithm.name=fedavg"):
        fedplatform.load_config({"algorithm": {"name": "fedavg"}}, ["algorithm.lrr=1"])


def test_describe_gives_the_partition_of_the_config():
    desc = fedplatform.describe(fedplatform.load_config(QUICKSTART))
    assert len(desc["clients"]) == 10 and desc["dataset"] == "digits"
    assert sum(c["num_samples"] for c in desc["clients"]) == sum(desc["train_class_counts"])


def test_load_model_of_a_folder_without_a_model_names_what_to_give(tmp_path):
    with pytest.raises(UserError, match="holds no fedplatform_model.json"):
        fedplatform.load_model(tmp_path)
