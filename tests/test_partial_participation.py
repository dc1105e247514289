"""runtime.client_failures=skip: failing and hung clients are dropped deterministically, recorded in
the checkpoint and MLflow, and the run fails with one line once too few clients can reply."""
from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from fedplatform.config import validate
from fedplatform.errors import RunFailed
from fedplatform.experiment import run_experiment
from fedplatform.runtime.checkpoint import ClientSampler, load

pytestmark = pytest.mark.usefixtures("ray_session")

FAULT_ROUND = 2


def make_cfg(tmp, **runtime):
    return validate({
        "name": "pp", "seed": 5,
        "data": {"dataset": "digits", "imbalance_factor": 10, "cache_dir": str(tmp / "cache")},
        "partition": {"scheme": "dirichlet", "num_clients": 10, "dirichlet_alpha": 0.5, "min_client_size": 10},
        "model": {"name": "small_cnn"},
        "algorithm": {"name": "fedavg", "local_epochs": 1, "lr": 0.05, "batch_size": 64, "augmentation": "none"},
        "rounds": 3, "clients_per_round": 8,
        "runtime": {"num_client_actors": 2, "storage": str(tmp / "runs"), "client_failures": "skip",
                    "min_clients": 5, "client_timeout_s": 20, **runtime},
        "tracking": {"experiment": "partial"},
    })


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def setting(tmp_path_factory, ray_session):
    """Round 2: two clients raise and one hangs for 5 minutes (past client_timeout_s=20)."""
    from fedplatform.data import prepare

    tmp = tmp_path_factory.mktemp("partial")
    cfg = make_cfg(tmp)
    sampler = ClientSampler(cfg.seed, prepare(cfg).client_ids, cfg.clients_per_round)
    for _ in range(FAULT_ROUND):
        sampled = sampler.sample()
    raising, hung = sampled[:2], sampled[2]
    ray_session["fault_file"].write_text(json.dumps(
        [{"round": FAULT_ROUND, "client": c, "action": "raise"} for c in raising]
        + [{"round": FAULT_ROUND, "client": hung, "action": "hang", "seconds": 300}]))
    try:
        yield tmp, f"sqlite:///{tmp / 'mlflow.db'}", sorted([*raising, hung]), hung
    finally:
        ray_session["fault_file"].unlink(missing_ok=True)


@pytest.fixture(scope="module")
def skipped(setting):
    tmp, uri, _, _ = setting
    return run_experiment(make_cfg(tmp), tracking_uri=uri, progress=False)


def test_failing_and_hung_clients_are_dropped_and_the_run_finishes(setting, skipped):
    tmp, uri, dropped, hung = setting
    row = skipped.history[FAULT_ROUND - 1]
    assert row["dropped_clients"] == dropped
    assert (row["clients/succeeded"], row["clients/dropped"]) == (5, 3)
    assert all(h["clients/dropped"] == 0 for h in skipped.history if h["round"] != FAULT_ROUND)
    ckpt, _ = load(skipped.run_dir)
    assert ckpt.round == 3 and ckpt.dropped == {str(FAULT_ROUND): dropped}
    client = MlflowClient(uri)
    assert client.get_run(skipped.run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(skipped.run_id, "clients/dropped")] == [0, 3, 0]
    files = {a.path for a in client.list_artifacts(skipped.run_id, "client_failures")}
    assert files == {f"client_failures/round_{FAULT_ROUND:04d}_client_{c}.txt" for c in dropped}
    hung_text = open(client.download_artifacts(
        skipped.run_id, f"client_failures/round_{FAULT_ROUND:04d}_client_{hung}.txt", str(tmp))).read()
    assert "timed out" in hung_text and "client_timeout_s=20" in hung_text
    raised = next(c for c in dropped if c != hung)
    raised_text = open(client.download_artifacts(
        skipped.run_id, f"client_failures/round_{FAULT_ROUND:04d}_client_{raised}.txt", str(tmp))).read()
    assert "Traceback" in raised_text and "injected failure" in raised_text


def test_a_repeat_with_other_actor_counts_and_a_resume_give_identical_weights(setting, skipped):
    tmp, uri, dropped, _ = setting
    _, expected = load(skipped.run_dir)
    # The first two rounds (with the failures) on 3 actors, then resumed on 1 actor for round 3.
    first = run_experiment(make_cfg(tmp, num_client_actors=3).model_copy(update={"rounds": 2}),
                           tracking_uri=uri, progress=False)
    assert first.history[FAULT_ROUND - 1]["dropped_clients"] == dropped
    resumed = run_experiment(make_cfg(tmp, num_client_actors=1), tracking_uri=uri, resume=first.run_id,
                             progress=False)
    ckpt, state = load(resumed.run_dir)
    assert states_equal(state, expected)
    assert ckpt.dropped == {str(FAULT_ROUND): dropped}
    assert [h["accuracy"] for h in resumed.history] == [h["accuracy"] for h in skipped.history]


def test_too_few_replies_fail_the_run_with_one_line_and_mlflow_marks_it_failed(setting):
    tmp, uri, dropped, _ = setting
    cfg = make_cfg(tmp, min_clients=7).model_copy(update={"tracking": make_cfg(tmp).tracking.model_copy(
        update={"run_name": "too-few"})})
    with pytest.raises(RunFailed) as info:
        run_experiment(cfg, tracking_uri=uri, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"round {FAULT_ROUND}: 2 of 8 clients dropped (client ")
    assert message.endswith("so at most 6 can reply, fewer than runtime.min_clients=7")
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("partial").experiment_id],
                               filter_string="tags.`mlflow.runName` = 'too-few'")
    assert run.info.status == "FAILED"


def test_min_clients_needs_skip_and_at_most_clients_per_round(tmp_path):
    from fedplatform.errors import UserError

    with pytest.raises((UserError, ValueError), match="min_clients=5 only applies with runtime.client_failures=skip"):
        make_cfg(tmp_path, client_failures="abort")
    with pytest.raises((UserError, ValueError), match="min_clients=9 exceeds clients_per_round=8"):
        make_cfg(tmp_path, min_clients=9)
