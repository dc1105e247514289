"""The CLIP algorithms through the whole runtime (Ray actors, feature cache, MLflow, summary)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from fedplatform.cli import main
from fedplatform.config import validate
from fedplatform.experiment import run_experiment
from fedplatform.models.feature_cache import cache_path

from fedclip_helpers import DOMAINS, domain_config, make_domain_folders

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return make_domain_folders(tmp_path_factory.mktemp("domains"))


def test_fedclip_leave_one_domain_out_run_logs_domain_metrics_and_the_selected_round(tmp_path, domains):
    cfg = domain_config(domains, test_domain="art")
    cfg = validate({**cfg.model_dump(mode="json"), "rounds": 3,
                    "runtime": {"storage": str(tmp_path / "runs"), "num_client_actors": 1}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_experiment(cfg, tracking_uri=uri, progress=False)
    last = result.history[-1]
    for domain in DOMAINS[1:]:
        assert f"domain/{domain}/test_acc" in last and f"domain/{domain}/val_acc" in last
    assert "domain/art/test_acc" in last and "val_accuracy" in last and "in_federation_acc" in last
    assert last["comm/bytes_up"] == 3 * 2 * (512 * 512 + 512) * 4  # 3 clients, the adapter only, fp32
    summary = result.summary
    assert summary["selected_round"] in (1, 2, 3) and "final_accuracy" in summary
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["clip_pretrained"] == "false"
    best_val = max(h["val_accuracy"] for h in result.history)  # selection: best mean validation accuracy
    assert summary["selected_val_accuracy"] == best_val
    assert run.data.metrics["summary/selected_accuracy"] == summary["selected_accuracy"]
    assert run.data.metrics["summary/final_accuracy"] == last["accuracy"]
    assert [m.step for m in client.get_metric_history(result.run_id, "domain/art/test_acc")] == [1, 2, 3]
    # the reference's per-round train-split accuracy: global adapter on each participating train split
    train_acc = client.get_metric_history(result.run_id, "train_accuracy")
    assert [m.step for m in train_acc] == [1, 2, 3] and all(0 <= m.value <= 1 for m in train_acc)
    assert last["train_accuracy"] == pytest.approx(sum(last[f"domain/{d}/train_acc"] for d in DOMAINS[1:]) / 3)
    chosen = result.history[summary["selected_round"] - 1]
    assert summary["selected_domain/art/test_acc"] == chosen["domain/art/test_acc"]


def test_fedclip_with_several_held_out_domains_through_the_cli(tmp_path, domains, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump(domain_config(domains).model_dump(mode="json")))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = ["data.test_domain=[art, sketch]", "partition.num_clients=2", "clients_per_round=2", "rounds=1",
            "runtime.num_client_actors=1"]
    argv = ["run", str(pipeline), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0, capsys.readouterr().err
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    m = run.data.metrics
    assert {"domain/art/test_acc", "domain/sketch/test_acc", "domain/cartoon/val_acc", "train_accuracy"} <= set(m)
    assert "domain/photo/train_acc" in m and "domain/sketch/val_acc" not in m  # sketch is held out
    assert m["accuracy"] == pytest.approx((m["domain/art/test_acc"] + m["domain/sketch/test_acc"]) / 2)


def test_fedclip_with_every_domain_participating_runs(tmp_path, domains):
    cfg = domain_config(domains, test_domain=None)
    cfg = validate({**cfg.model_dump(mode="json"), "rounds": 1,
                    "runtime": {"storage": str(tmp_path / "runs"), "num_client_actors": 1}})
    result = run_experiment(cfg, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", progress=False)
    assert "in_federation_acc" in result.history[-1] and "accuracy" not in result.history[-1]


@pytest.mark.parametrize("algorithm", ["creff", "clip2fl"])
def test_creff_and_clip2fl_run_end_to_end_and_log_both_heads(tmp_path, algorithm):
    raw = yaml.safe_load((ROOT / "pipelines/quickstart_clip2fl.yaml").read_text())
    raw["algorithm"].update({"name": algorithm, "local_epochs": 1, "match_epoch": 5, "crt_epoch": 5})
    if algorithm == "creff":  # CReFF has no CLIP teacher
        raw.pop("clip")
        raw["algorithm"].pop("kd_weight")
    raw.update(rounds=2, runtime={"storage": str(tmp_path / "runs"), "num_client_actors": 1})
    result = run_experiment(validate(raw), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", progress=False)
    last = result.history[-1]
    assert 0.0 <= last["accuracy"] <= 1.0 and 0.0 <= last["fedavg_head_accuracy"] <= 1.0
    assert "few_shot_acc" in last


def test_cache_build_command_writes_the_cache_a_run_then_reuses(tmp_path, domains, capsys):
    cfg = domain_config(domains)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["cache", "build", str(pipeline)]) == 0
    built = capsys.readouterr().out.strip().splitlines()[-1]
    from fedplatform.data import prepare

    assert str(cache_path(cfg, prepare(cfg))) == built
    assert json.loads((cache_path(cfg, prepare(cfg)) / "meta.json").read_text())


def test_cache_build_without_a_clip_model_is_one_clear_error(tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("data: {dataset: digits}\n")
    assert main(["cache", "build", str(pipeline)]) == 2
    assert "sets no clip.model" in capsys.readouterr().err
