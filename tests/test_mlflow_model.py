"""The trained model as an MLflow model: pyfunc from code, registry, dataset lineage, run names."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from fedplatform.config import load_config
from fedplatform.data import prepare
from fedplatform.experiment import run_experiment
from fedplatform.models.adapters import AttentionAdapter
from fedplatform.models.clip import create_clip
from fedplatform.tracking.mlflow_run import Tracker
from quickstart_helpers import QUICKSTART

REGISTERED = "digits-quickstart"


def quickstart(tmp, pipeline=QUICKSTART, *sets):
    return load_config(pipeline, [f"runtime.storage={tmp / 'runs'}", "tracking.experiment=models",
                                  "runtime.num_client_actors=1", *sets])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow_model")
    return tmp, f"sqlite:///{tmp / 'mlflow.db'}"


@pytest.fixture
def tracking(store):
    """The fluent API (mlflow.pyfunc.load_model) reads this test's store, then the default again."""
    mlflow.set_tracking_uri(store[1])
    yield store[1]
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def fedavg_run(store, ray_session):
    """A finished quickstart run (2 rounds), its model registered."""
    tmp, uri = store
    cfg = quickstart(tmp, QUICKSTART, "rounds=2", f"tracking.register_model={REGISTERED}")
    return cfg, run_experiment(cfg, tracking_uri=uri, progress=False)


def accuracy(model, cfg) -> tuple[float, np.ndarray]:
    ds = prepare(cfg)
    probs = model.predict(ds.pixels(ds.test_ids))
    return float((probs.argmax(1) == ds.labels[ds.test_ids]).mean()), probs


def test_logged_model_predicts_the_test_set_with_the_accuracy_the_run_reported(tracking, fedavg_run):
    cfg, result = fedavg_run
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    acc, probs = accuracy(model, cfg)
    assert acc == result.summary["final_accuracy"]
    assert probs.dtype == np.float32 and probs.shape[1] == 10
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    sig = model.metadata.signature
    assert sig.inputs.inputs[0].shape == (-1, 8, 8, 1) and sig.inputs.inputs[0].type == np.dtype(np.uint8)


def test_creff_model_predicts_with_the_retrained_classifier(store, tracking, ray_session):
    """CReFF scores `accuracy` with phi-hat, not the FedAvg head: the logged model does too."""
    tmp, uri = store
    cfg = quickstart(tmp, QUICKSTART.with_name("quickstart_creff.yaml"), "rounds=1")
    result = run_experiment(cfg, tracking_uri=uri, progress=False)
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    assert model.unwrap_python_model().predictor.head == "retrained_classifier"
    assert accuracy(model, cfg)[0] == result.summary["final_accuracy"]


def test_register_model_creates_a_version_of_the_run_model(store, tracking, fedavg_run):
    cfg, result = fedavg_run
    (version,) = MlflowClient(store[1]).search_model_versions(f"name='{REGISTERED}'")
    assert version.run_id == result.run_id
    registered = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/{version.version}")
    from_run = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    _, a = accuracy(registered, cfg)
    _, b = accuracy(from_run, cfg)
    np.testing.assert_array_equal(a, b)


def test_run_logs_its_dataset_with_fingerprint_and_partition(store, fedavg_run):
    cfg, result = fedavg_run
    ds = prepare(cfg)
    (inp,) = MlflowClient(store[1]).get_run(result.run_id).inputs.dataset_inputs
    tags = {t.key: t.value for t in inp.tags}
    assert inp.dataset.name == "digits" and inp.dataset.digest == ds.fingerprint[:32]
    assert tags["fingerprint"] == ds.fingerprint
    assert (tags["partition.scheme"], tags["partition.num_clients"], tags["partition.dirichlet_alpha"],
            tags["data.imbalance_factor"], tags["mlflow.data.context"]) == ("dirichlet", "10", "0.5", "10.0", "train")


def test_runs_of_one_pipeline_get_distinct_readable_names(store, fedavg_run):
    _, result = fedavg_run
    client = MlflowClient(store[1])
    assert client.get_run(result.run_id).info.run_name.startswith("quickstart-fedavg-s7-")
    tracker = Tracker(store[1])
    names = set()
    for _ in range(2):
        run_id = tracker.start("models", None, {}, {}, default_name="quickstart-fedavg-s7")
        names.add(client.get_run(run_id).info.run_name)
        tracker.finish()
    assert len(names) == 2 and all(n.startswith("quickstart-fedavg-s7-") for n in names)
    named = tracker.start("models", "mine", {}, {}, default_name="quickstart-fedavg-s7")
    assert client.get_run(named).info.run_name == "mine"
    tracker.finish()


def test_exported_state_drops_server_optimizer_moments():
    from fedplatform.algorithms import get_algorithm

    state = {"w": torch.ones(2), "server_optimizer.m.w": torch.zeros(2)}
    assert set(get_algorithm("fedavg").inference_state(state)) == {"w"}


@pytest.fixture(scope="module")
def fedclip_run(store, ray_session):
    """A finished FedCLIP quickstart run (tiny untrained CLIP, 1 round) and its logged model's folder."""
    tmp, uri = store
    cfg = quickstart(tmp, QUICKSTART.with_name("quickstart_fedclip.yaml"), "rounds=1")
    result = run_experiment(cfg, tracking_uri=uri, progress=False)
    with _use_tracking_uri(uri):
        return cfg, result, Path(mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/model"))


def test_fedclip_model_is_the_adapter_and_predicts_with_the_accuracy_the_run_reported(store, tracking, fedclip_run):
    """The frozen CLIP is not copied into the run: it is rebuilt (here: untrained, seed 0) at load."""
    from safetensors.torch import load_file

    import fedplatform

    cfg, result, folder = fedclip_run
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    acc, probs = accuracy(model, cfg)
    assert acc == result.summary["final_accuracy"]
    assert probs.dtype == np.float32 and probs.shape[1] == 10
    assert set(load_file(next(folder.rglob("model.safetensors")))) == set(AttentionAdapter(512).state_dict())
    predictor = fedplatform.load_model(folder)
    clip = predictor.spec["clip"]
    assert (clip["model"], clip["pretrained"], clip["weights"], clip["untrained_seed"]) == \
        ("fedplatform-tiny", None, "untrained:seed0", 0)
    used = predictor.clip.visual.preprocess_cfg  # what the run's CLIP preprocessing was
    assert (tuple(clip["preprocess"]["size"]), predictor.spec["norm_mean"], predictor.spec["norm_std"]) == \
        (tuple(used["size"]), list(used["mean"]), list(used["std"]))
    ds = prepare(cfg)
    with torch.no_grad():
        logits = predictor(torch.from_numpy(ds.pixels(ds.test_ids)))
    np.testing.assert_array_equal(logits.argmax(1).numpy(), probs.argmax(1))


def test_fedclip_model_needs_the_runs_clip_weights_and_says_so_in_one_line(store, fedclip_run, monkeypatch,
                                                                           tmp_path):
    """Loaded by run id from a store that is not the active one; a hub tag this machine cannot get
    fails fast (never untrained weights instead); a checkpoint that is not the run's is refused."""
    from huggingface_hub import constants

    import fedplatform
    from fedplatform.errors import UserError
    from fedplatform.models import clip as clipmod
    from fedplatform.tracking.mlflow_model import Predictor

    _, result, folder = fedclip_run
    spec = json.loads(next(folder.rglob("fedplatform_model.json")).read_text())
    assert fedplatform.load_model(result.run_id, tracking_uri=store[1]).spec == spec
    adapter = {k: torch.zeros_like(v) for k, v in AttentionAdapter(512).state_dict().items()}
    monkeypatch.setattr(clipmod, "_reachable", lambda host, timeout=0: False)  # no network
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # and nothing cached
    tag = spec | {"clip": spec["clip"] | {"model": "ViT-B-32", "pretrained": "openai", "weights": "tag:openai"}}
    with pytest.raises(UserError, match=r"needs the run's frozen CLIP ViT-B-32 \(tag:openai\): .*cannot be reached"):
        Predictor(tag, adapter)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(create_clip("fedplatform-tiny", None)[0].state_dict(), checkpoint)
    other = spec | {"clip": spec["clip"] | {"pretrained": str(checkpoint), "weights": "sha256:" + "0" * 64}}
    with pytest.raises(UserError, match=r"tiny.pt holds sha256:[0-9a-f]{64}; give it the run's weights"):
        Predictor(other, adapter)
