"""The Ray runtime end to end on digits: learning, reproducibility, failures, tracking, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from fedplatform.config import validate
from fedplatform.errors import UserError
from fedplatform.experiment import run_experiment
from fedplatform.runtime.checkpoint import find_run_dir, load
from fedplatform.runtime.engine import ClientError, RoundTimeout, client_batch

pytestmark = pytest.mark.usefixtures("ray_session")


def make_cfg(tmp, **over):
    raw = {
        "name": "rt", "seed": 3,
        "data": {"dataset": "digits", "imbalance_factor": 10, "cache_dir": str(tmp / "cache")},
        "partition": {"scheme": "dirichlet", "num_clients": 10, "dirichlet_alpha": 0.5, "min_client_size": 10},
        "model": {"name": "small_cnn"},
        "algorithm": {"name": "fedavg", "local_epochs": 1, "lr": 0.05, "batch_size": 32, "augmentation": "none"},
        "rounds": 3, "clients_per_round": 5,
        "runtime": {"num_client_actors": 1, "storage": str(tmp / "runs")},
        "tracking": {"experiment": "tests"},
    }
    for key, value in over.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return validate(raw)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runtime")
    return tmp, f"sqlite:///{tmp / 'mlflow.db'}"


@pytest.fixture(scope="module")
def baseline(work):
    tmp, uri = work
    return run_experiment(make_cfg(tmp), tracking_uri=uri, progress=False)


class Faults:
    """Writes the chaos-testing fault file the client actors read (see runtime.actors.FAULT_ENV)."""

    def __init__(self, path):
        self.path = path

    def __call__(self, **spec):
        self.path.write_text(json.dumps(spec))

    def clear(self):
        self.path.unlink(missing_ok=True)


@pytest.fixture
def fault(ray_session):
    faults = Faults(ray_session["fault_file"])
    yield faults
    faults.clear()


def final_state(result):
    _, state = load(result.run_dir)
    return state


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def dies(actor, within_s: float = 60) -> bool:
    """Whether the actor is dead within `within_s`: ray.kill is asynchronous, so a call made just
    after it may still run."""
    import time

    import ray

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=within_s)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.1)
    return False


def test_fedavg_on_digits_learns_well_above_chance(work):
    tmp, uri = work
    result = run_experiment(make_cfg(tmp, rounds=8, **{"algorithm.local_epochs": 2}), tracking_uri=uri,
                            progress=False)
    assert result.history[-1]["accuracy"] > 0.6  # chance is 0.1


def test_same_seed_gives_bit_identical_weights_with_one_and_three_actors(work, baseline):
    tmp, uri = work
    three = run_experiment(make_cfg(tmp, **{"runtime.num_client_actors": 3}), tracking_uri=uri, progress=False)
    assert_same_state(final_state(baseline), final_state(three))
    assert [h["accuracy"] for h in three.history] == [h["accuracy"] for h in baseline.history]


def test_server_in_the_driver_and_in_an_actor_give_bit_identical_weights(work, baseline):
    tmp, uri = work
    actor = run_experiment(make_cfg(tmp, **{"runtime.server_process": "actor"}), tracking_uri=uri, progress=False)
    tags = {r: MlflowClient(uri).get_run(r).data.tags["fedplatform.server_process"] for r in (baseline.run_id, actor.run_id)}
    assert tags == {baseline.run_id: "driver", actor.run_id: "actor"}  # auto: one node, no GPU asked
    assert_same_state(final_state(baseline), final_state(actor))
    assert [h["accuracy"] for h in actor.history] == [h["accuracy"] for h in baseline.history]


def test_in_a_placement_group_the_next_run_takes_the_idle_actors_and_keeps_its_numbers(work, baseline):
    """In a placement group (a Tune trial) a run leaves its idle actors to the next run in its
    process, which sets them up again; an actor of another shape is killed. The reused actors must
    not change the numbers: the second run equals the baseline run on fresh actors."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    tmp, uri = work

    @ray.remote(num_cpus=0)
    def runs(*cfgs):
        from fedplatform.runtime import engine

        idle, results = [], []
        for cfg in cfgs:
            results.append(run_experiment(cfg, tracking_uri=uri, progress=False))
            idle.append({k[0] is engine.ServerActor and "server" or "client": a._actor_id.hex()
                         for k, a in engine._IDLE.items()})
        return idle, results[1]

    actor_server = {"runtime.server_process": "actor"}
    pg = placement_group([{"CPU": 1}, {"CPU": 1}])  # the server's bundle, then the client actor's
    try:
        ray.get(pg.ready(), timeout=60)
        idle, second = ray.get(runs.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_capture_child_tasks=True)).remote(
                make_cfg(tmp, seed=4, rounds=2, **actor_server), make_cfg(tmp, **actor_server),
                make_cfg(tmp, rounds=1, **{"runtime.client_resources": {"num_cpus": 0.5}})))
    finally:
        remove_placement_group(pg)
    assert idle[0].keys() == {"server", "client"}
    assert idle[1] == idle[0]  # the second run ran on the first run's two actors
    assert idle[2]["client"] != idle[0]["client"] and "server" not in idle[2]  # another shape; server in the driver
    assert_same_state(final_state(baseline), final_state(second))
    assert [h["accuracy"] for h in second.history] == [h["accuracy"] for h in baseline.history]


def test_inside_reuse_actors_a_run_takes_the_last_runs_actors_and_they_die_when_the_block_ends(work, baseline):
    import fedplatform
    from fedplatform.runtime import engine

    tmp, uri = work
    actor_server = {"runtime.server_process": "actor"}
    assert not engine._IDLE  # runs outside a block (the baseline's) leave no actor behind
    with fedplatform.reuse_actors():
        run_experiment(make_cfg(tmp, seed=4, rounds=2, **actor_server), tracking_uri=uri, progress=False)
        first = {k: a._actor_id for k, a in engine._IDLE.items()}
        second = run_experiment(make_cfg(tmp, **actor_server), tracking_uri=uri, progress=False)
        assert len(first) == 2 and {k: a._actor_id for k, a in engine._IDLE.items()} == first
        actors = list(engine._IDLE.values())
    assert not engine._IDLE
    assert all(dies(actor) for actor in actors)
    assert_same_state(final_state(baseline), final_state(second))


def test_an_idle_actor_that_died_before_the_next_run_is_replaced_by_a_new_one(work, baseline):
    import ray

    import fedplatform
    from fedplatform.runtime import engine

    tmp, uri = work
    with fedplatform.reuse_actors():
        run_experiment(make_cfg(tmp, seed=4, rounds=1), tracking_uri=uri, progress=False)
        [(key, dead)] = engine._IDLE.items()
        ray.kill(dead, no_restart=True)
        assert dies(dead)
        result = run_experiment(make_cfg(tmp), tracking_uri=uri, progress=False)
        assert engine._IDLE[key]._actor_id != dead._actor_id
    assert_same_state(final_state(baseline), final_state(result))


def test_a_bad_input_met_by_a_reused_actor_is_the_same_one_line_error(work):
    import fedplatform

    tmp, uri = work
    actor_server = {"runtime.server_process": "actor"}
    with fedplatform.reuse_actors():
        run_experiment(make_cfg(tmp, rounds=1, **actor_server), tracking_uri=uri, progress=False)
        with pytest.raises(UserError) as reused:  # the server actor's restart finds no CUDA device
            run_experiment(make_cfg(tmp, rounds=1, **{**actor_server, "runtime.device": "cuda"}), tracking_uri=uri,
                           progress=False)
    assert str(reused.value).startswith("runtime.device=cuda with num_gpus=0 but this Ray worker sees no CUDA")
    assert "\n" not in str(reused.value)


def test_a_server_in_the_driver_leaves_the_callers_torch_threads_as_they_were(work):
    tmp, uri = work
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # the caller's own setting; the server (server_resources 1 CPU) runs on 1
    try:
        run_experiment(make_cfg(tmp, rounds=1), tracking_uri=uri, progress=False)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_killed_client_actor_is_replaced_and_the_result_is_unchanged(work, baseline, fault):
    tmp, uri = work
    client = baseline.history[1]["clients"][2]
    fault(round=2, client=client, action="exit", marker=str(tmp / "killed-once"))
    result = run_experiment(make_cfg(tmp, **{"runtime.num_client_actors": 2}), tracking_uri=uri, progress=False)
    assert (tmp / "killed-once").exists()  # the actor really died
    assert_same_state(final_state(baseline), final_state(result))


def test_clients_are_batched_per_task_only_when_each_can_still_be_told_apart():
    rt = make_cfg(Path("/tmp")).runtime
    small = 40_000
    assert [client_batch(rt, n, 2, small) for n in (3, 8, 10, 64)] == [1, 2, 2, 4]
    assert client_batch(rt, 64, 2, None) == 1  # round 1: the updates' size is not known yet
    assert client_batch(rt, 64, 2, 2 << 20) == 1  # big updates: the server would hold 4x more ahead of their turn
    assert client_batch(rt.model_copy(update={"client_failures": "skip"}), 64, 2, small) == 1
    assert client_batch(rt.model_copy(update={"client_timeout_s": 30.0}), 64, 2, small) == 1


def test_an_actor_killed_in_a_batch_reruns_its_clients_and_the_result_is_unchanged(work, baseline, fault):
    tmp, uri = work  # one actor and 5 clients a round: from round 2, tasks of 2 clients
    client = sorted(baseline.history[1]["clients"])[1]  # the second of its task
    fault(round=2, client=client, action="exit", marker=str(tmp / "killed-in-batch"))
    result = run_experiment(make_cfg(tmp), tracking_uri=uri, progress=False)
    assert (tmp / "killed-in-batch").exists()
    assert_same_state(final_state(baseline), final_state(result))


def test_an_actor_killed_in_a_batch_with_no_retries_names_the_whole_batch(work, baseline, fault):
    tmp, uri = work
    first, second = sorted(baseline.history[1]["clients"])[:2]
    fault(round=2, client=second, action="exit", marker=str(tmp / "killed-no-retry"))
    with pytest.raises(ClientError, match=rf"clients \[{first}, {second}\] in round 2, run in one task: their "
                                          r"actor died 1 times \(runtime.max_client_retries=0\)"):
        run_experiment(make_cfg(tmp, **{"runtime.max_client_retries": 0}), tracking_uri=uri, progress=False)


def test_a_client_raising_in_a_batch_is_the_one_named(work, baseline, fault):
    tmp, uri = work
    client = sorted(baseline.history[1]["clients"])[1]  # second in round 2's first task, after one that succeeds
    fault(round=2, client=client, action="raise")
    with pytest.raises(ClientError, match=rf"client {client} failed in round 2\. Traceback") as info:
        run_experiment(make_cfg(tmp), tracking_uri=uri, progress=False)
    assert "injected failure" in str(info.value)


def test_client_exception_names_client_and_round_with_its_traceback_and_fails_the_run(work, baseline, fault):
    tmp, uri = work
    client = baseline.history[0]["clients"][0]
    fault(round=1, client=client, action="raise")
    with pytest.raises(ClientError) as info:
        run_experiment(make_cfg(tmp, **{"tracking.run_name": "fails"}), tracking_uri=uri, progress=False)
    message = str(info.value)
    assert f"client {client} failed in round 1" in message
    assert "Traceback" in message and 'File "' in message and "injected failure" in message
    runs = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("tests").experiment_id],
        filter_string="tags.`mlflow.runName` = 'fails'")
    assert runs and runs[0].info.status == "FAILED"
    assert "injected failure" in runs[0].data.tags["error"]


def test_resume_after_a_crash_equals_the_uninterrupted_run(work, baseline, fault):
    tmp, uri = work
    client = baseline.history[2]["clients"][0]
    fault(round=3, client=client, action="raise")
    with pytest.raises(ClientError):
        run_experiment(make_cfg(tmp, **{"tracking.run_name": "crashes"}), tracking_uri=uri, progress=False)
    client_ = MlflowClient(uri)
    exp = client_.get_experiment_by_name("tests").experiment_id
    run_id = client_.search_runs([exp], filter_string="tags.`mlflow.runName` = 'crashes'")[0].info.run_id
    ckpt, _ = load(find_run_dir(tmp / "runs", run_id))
    assert ckpt.round == 2
    fault.clear()
    resumed = run_experiment(make_cfg(tmp, **{"tracking.run_name": "crashes"}), tracking_uri=uri, resume=run_id, progress=False)
    assert resumed.run_id == run_id
    assert_same_state(final_state(baseline), final_state(resumed))
    assert [h["accuracy"] for h in resumed.history] == [h["accuracy"] for h in baseline.history]
    run = client_.get_run(run_id)
    assert run.info.status == "FINISHED"  # the crash stays on record, no longer as the run's error
    assert "error" not in run.data.tags and "injected failure" in run.data.tags["resumed_after_error"]
    assert [m.step for m in client_.get_metric_history(run_id, "accuracy")][-1] == 3


def test_mlflow_holds_params_tags_per_round_metrics_and_artifacts(work, baseline):
    tmp, uri = work
    client = MlflowClient(uri)
    run = client.get_run(baseline.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm.name"] == "fedavg"
    assert run.data.params["partition.num_clients"] == "10"
    assert run.data.tags["fedplatform.version"]
    assert run.data.tags["dataset_fingerprint"]
    assert run.data.tags["clip_pretrained"] == "false"
    for metric in ("accuracy", "many_shot_acc", "few_shot_acc", "train_loss", "time/round_s",
                   "time/client_compute_s", "time/server_s", "time/orchestration_s",
                   "comm/bytes_down", "comm/bytes_up", "memory/client_actor_rss_mb", "memory/server_rss_mb"):
        steps = [m.step for m in client.get_metric_history(baseline.run_id, metric)]
        assert steps == [1, 2, 3], metric
    artifacts = {a.path for a in client.list_artifacts(baseline.run_id)}
    assert {"config.yaml", "partition.png", "accuracy_curve.png", "per_class_accuracy.png",
            "model.safetensors", "summary.json"} <= artifacts
    weights = load_file(client.download_artifacts(baseline.run_id, "model.safetensors", str(tmp)))
    assert_same_state(weights, final_state(baseline))
    summary = json.loads(open(client.download_artifacts(baseline.run_id, "summary.json", str(tmp))).read())
    assert summary["final_accuracy"] == baseline.history[-1]["accuracy"]
    assert run.data.metrics["summary/best_accuracy"] == summary["best_accuracy"]
    # start-up, split into its phases (from the call here: no process start through the API), and the rounds' wall
    metrics = run.data.metrics
    phases = [metrics[f"time/startup/{phase}_s"] for phase in ("imports", "data", "ray_init", "actors", "mlflow")]
    assert min(phases) >= 0 and sum(phases) <= metrics["time/startup_s"]
    assert metrics["time/rounds_total_s"] >= sum(h["time/round_s"] for h in baseline.history)
    assert [m.step for m in client.get_metric_history(baseline.run_id, "time/startup_s")] == [3]


def test_round_exceeding_its_timeout_fails_naming_the_clients_still_running(work, baseline, fault):
    tmp, uri = work
    client = baseline.history[0]["clients"][1]
    fault(round=1, client=client, action="hang", seconds=60)
    with pytest.raises(RoundTimeout, match=rf"round 1 exceeded runtime.round_timeout_s=8; clients still running: \[{client}\]"):
        run_experiment(make_cfg(tmp, **{"runtime.round_timeout_s": 8, "runtime.num_client_actors": 2}),
                       tracking_uri=uri, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a Ray cluster without GPUs (this machine has one)")
def test_gpu_fraction_the_cluster_cannot_place_is_a_clear_error(work):
    tmp, uri = work
    cfg = make_cfg(tmp, **{"runtime.client_resources": {"num_cpus": 1, "num_gpus": 0.25}})
    with pytest.raises(UserError, match=r"num_gpus=0.25.*0 GPUs"):
        run_experiment(cfg, tracking_uri=uri, progress=False)


def test_resume_of_a_run_that_does_not_exist_is_a_clear_error(work):
    tmp, uri = work
    with pytest.raises(UserError, match="no checkpoint found"):
        run_experiment(make_cfg(tmp), tracking_uri=uri, resume="nope", progress=False)


def test_unreachable_tracking_server_fails_fast_before_training(work):
    tmp, _ = work
    runs_before = set((tmp / "runs").iterdir()) if (tmp / "runs").exists() else set()
    with pytest.raises(UserError, match="cannot be reached"):
        run_experiment(make_cfg(tmp), tracking_uri="http://127.0.0.1:9", progress=False)
    runs_after = set((tmp / "runs").iterdir()) if (tmp / "runs").exists() else set()
    assert runs_after == runs_before
