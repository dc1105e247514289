"""Plug-ins: an external package's algorithm (with its own config) and model, found by name through
entry points once installed, or through `plugins:`, on the driver and on every Ray actor."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedplatform.config import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SRC = Path(__file__).resolve().parent / "plugin_pkg"
PIPELINE = """
name: plugin
data: {dataset: digits, imbalance_factor: 10}
partition: {num_clients: 4}
model: {name: tiny_mlp}
algorithm: {name: fedavg_scaled, server_lr: 0.5, local_epochs: 1, lr: 0.05, augmentation: none}
rounds: 2
clients_per_round: 2
runtime:
  num_client_actors: 2
  server_resources: {num_cpus: 0.5}
  client_resources: {num_cpus: 0.5}
  device: cpu
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The plug-in package installed (pip, offline) into a folder of its own, as a user would install it."""
    tmp = tmp_path_factory.mktemp("plugin")
    shutil.copytree(PLUGIN_SRC, tmp / "src")  # the build leaves its folders beside the sources
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(tmp / "site"), str(tmp / "src")], check=True)
    return tmp / "site"


def _env(*paths: Path, **extra: str) -> dict:
    """PYTHONPATH for a fresh process: Ray started there hands it on to every actor."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *map(str, paths)]), **extra}


def test_plugins_key_registers_the_algorithm_and_validates_its_own_keys(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    cfg = validate({"plugins": ["fedplugin_example"], "algorithm": {"name": "fedavg_scaled", "server_lr": 0.25}})
    assert (cfg.algorithm.name, cfg.algorithm.server_lr, cfg.algorithm.lr) == ("fedavg_scaled", 0.25, 0.1)
    with pytest.raises(ConfigError, match=r"unknown key 'algorithm.server_rate'; allowed keys for "
                                          r"algorithm.name=fedavg_scaled: .*server_lr"):
        validate({"plugins": ["fedplugin_example"], "algorithm": {"name": "fedavg_scaled", "server_rate": 1}})
    with pytest.raises(ConfigError, match=r"algorithm.server_lr=0 is invalid: input should be greater than 0"):
        validate({"plugins": ["fedplugin_example"], "algorithm": {"name": "fedavg_scaled", "server_lr": 0}})


def test_an_unknown_plugin_module_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"plugins: cannot import 'no_such_plugin' .*PYTHONPATH"):
        validate({"plugins": ["no_such_plugin"]})


def test_an_unknown_algorithm_lists_the_registered_and_installed_ones(installed):
    code = ("from fedplatform.config import validate\n"
            "try: validate({'algorithm': {'name': 'fedsgd'}})\nexcept Exception as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(installed), capture_output=True, text=True,
                         check=True).stdout
    assert "algorithm.name='fedsgd' is not a known algorithm; choose one of fedavg, fedprox" in out
    assert "fedavg_scaled" in out


def test_installed_plugin_runs_through_the_cli_on_two_actors(installed, tmp_path):
    """Entry points alone (no plugins: key): the driver and both client actors find it by name."""
    pipeline = tmp_path / "plugin.yaml"
    pipeline.write_text(PIPELINE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-m", "fedplatform.cli", "run", str(pipeline), "--tracking-uri", uri,
                           "--storage", str(tmp_path / "runs")], env=_env(installed), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plugin: fedavg_scaled on digits, 2 rounds" in proc.stdout
    import mlflow

    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["algorithm.server_lr"] == "0.5" and run.data.params["model.name"] == "tiny_mlp"
    assert run.data.params["runtime.num_client_actors"] == "2" and run.info.status == "FINISHED"


API_SCRIPT = """
import json, sys
import mlflow
import numpy as np
import fedplatform
from fedplatform.data import prepare

cfg = fedplatform.load_config(sys.argv[1], ["plugins=[fedplugin_example]"])
result = fedplatform.run(cfg, tracking_uri=sys.argv[2])
model = fedplatform.load_model(result.run_id, tracking_uri=sys.argv[2])
ds = prepare(cfg)
probs = model.probabilities(ds.pixels(ds.test_ids))
accuracy = float((probs.argmax(1) == ds.labels[ds.test_ids]).mean())
swept = fedplatform.sweep(sys.argv[3], tracking_uri=sys.argv[2])
trial = mlflow.MlflowClient(sys.argv[2]).get_run(swept.rows[0]["mlflow_run_id"]).data.params
print("RESULT", json.dumps({"summary": result.summary, "rounds": [h["round"] for h in result.history],
                            "accuracy": accuracy, "model": model.spec["model"], "trials": len(swept.rows),
                            "server_lrs": sorted(r["algorithm.server_lr"] for r in swept.rows),
                            "statuses": [r["status"] for r in swept.rows],
                            "trial_params": [trial["algorithm.server_lr"], trial["runtime.num_client_actors"]]}))
"""


def test_plugins_key_runs_through_the_python_api_and_a_sweep_on_two_actors(tmp_path):
    """Not installed (no entry points): `plugins:` makes the driver, both actors and the trial (its trainable and
    both its actors) import it; the trial sweeps the plug-in's own key away from the pipeline's value."""
    (tmp_path / "plugin.yaml").write_text(PIPELINE.replace("rounds: 2", "rounds: 1"))
    (tmp_path / "space.yaml").write_text(
        "base: plugin.yaml\nset: {plugins: [fedplugin_example]}\n"
        "space: {algorithm.server_lr: {grid: [1.0]}}\nsearcher: basic\nscheduler: {name: fifo}\n"
        "num_samples: 1\nmetric: accuracy\nmode: max\n")
    proc = subprocess.run([sys.executable, "-c", API_SCRIPT, str(tmp_path / "plugin.yaml"),
                           f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "space.yaml")],
                          env=_env(PLUGIN_SRC, FEDPLATFORM_STORAGE=str(tmp_path / "runs")), cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["rounds"] == [1] and out["model"] == "tiny_mlp"
    assert out["accuracy"] == pytest.approx(out["summary"]["final_accuracy"], abs=1e-9)
    assert out["trials"] == 1 and out["server_lrs"] == [1.0] and out["statuses"] == ["finished"]
    assert out["trial_params"] == ["1.0", "2"]  # the trial's own run: the swept value, on two actors
