import math

import numpy as np
import pytest
import torch

from fedplatform.algorithms import ClientData, Context, get_algorithm
from fedplatform.algorithms.clip2fl import check_clip2fl, kd_loss, teacher_logits
from fedplatform.algorithms.creff import FEATURES, HEAD_B, HEAD_W, model_part, uploaded_gradients
from fedplatform.config import ConfigError, ExperimentConfig, validate
from fedplatform.data import prepare
from fedplatform.errors import UserError
from fedplatform.models.feature_cache import build_feature_cache

FAST = {"local_epochs": 1, "augmentation": "none", "lr": 0.05, "num_features_per_class": 5,
        "match_epoch": 3, "crt_epoch": 2}


def digits_config(name="clip2fl", model="small_cnn_512", **algorithm):
    return ExperimentConfig.model_validate({
        "seed": 7,
        "data": {"dataset": "digits", "imbalance_factor": 10},
        "partition": {"scheme": "dirichlet", "num_clients": 4, "dirichlet_alpha": 0.5},
        "model": {"name": model},
        "clip": {"model": "fedplatform-tiny", "pretrained": None},
        "algorithm": {"name": name, **FAST, **algorithm},
        "clients_per_round": 4,
    })


@pytest.fixture(scope="module")
def dataset():
    cfg = digits_config()
    ds = prepare(cfg)
    build_feature_cache(cfg, ds, use_ray=False)
    return ds


def make_algo(cfg, ds):
    ctx = Context(cfg=cfg, num_classes=ds.num_classes, class_names=ds.class_names, image_shape=ds.image_shape,
                  norm_mean=ds.norm_mean, norm_std=ds.norm_std, train_class_counts=ds.train_class_counts,
                  device=torch.device("cpu"), dataset=ds)
    return get_algorithm(cfg.algorithm.name)(ctx)


def data(ds, cid):
    ids = ds.client_samples(cid) if cid >= 0 else ds.test_ids
    return ClientData(cid, torch.from_numpy(ds.pixels(ids)), torch.from_numpy(np.asarray(ds.labels[ids])), ids)


def run_rounds(algo, ds, rounds=2, clients=(0, 1)):
    state = algo.init_server_state(7)
    for r in range(1, rounds + 1):
        payload = algo.broadcast(state)
        updates = [algo.client_update(payload, data(ds, c), torch.Generator().manual_seed(100 * r + c))
                   for c in clients]
        state = algo.aggregate(state, updates, r)
    return state, updates


# ---------------------------------------------------------------------------- KD


def test_kd_is_t_squared_kl_teacher_to_student_hand_value():
    t = 3.0
    teacher = torch.tensor([[3 * math.log(2.0), 0.0]])  # softmax(q / T) = (2/3, 1/3)
    student = torch.tensor([[0.0, 0.0]])  # softmax(s / T) = (1/2, 1/2)
    forward = 2 / 3 * math.log((2 / 3) / 0.5) + 1 / 3 * math.log((1 / 3) / 0.5)
    reverse = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    value = kd_loss(student, teacher, t).item()
    assert value == pytest.approx(9 * forward, rel=1e-6)
    assert value != pytest.approx(9 * reverse, rel=1e-3)
    # batchmean: two identical rows give the same value
    assert kd_loss(student.repeat(2, 1), teacher.repeat(2, 1), t).item() == pytest.approx(value, rel=1e-6)


def test_kd_gradient_flows_only_into_the_student():
    s = torch.randn(3, 4, requires_grad=True)
    q = torch.randn(3, 4, requires_grad=True)
    kd_loss(s, q, 3.0).backward()
    assert s.grad is not None and q.grad is None


def test_kd_of_bf16_student_logits_is_taken_in_fp32():
    s, q = torch.randn(4, 10) * 5, torch.randn(4, 10) * 50
    low = s.bfloat16()
    value = kd_loss(low, q, 3.0)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(kd_loss(low.float(), q, 3.0).item(), rel=1e-6)


def test_teacher_logits_are_100_times_cosine_to_the_text_prototypes():
    e = torch.tensor([[3.0, 4.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(teacher_logits(e, text), torch.tensor([[60.0, 80.0]]))


# ---------------------------------------------------------------------------- config and bad input


def test_defaults_are_the_reference_settings():
    a = ExperimentConfig.model_validate({"algorithm": {"name": "clip2fl"}}).algorithm
    assert (a.local_epochs, a.lr, a.batch_size, a.num_features_per_class, a.match_epoch, a.lr_feature,
            a.crt_epoch, a.lr_net, a.batch_real, a.dis_metric, a.kd_weight, a.kd_temperature,
            a.contrast_weight, a.ins_temp, a.prompt_template) == (
        10, 0.1, 32, 100, 100, 0.1, 300, 0.01, 32, "ours", 1.0, 3.0, 0.001, 0.1, "a photo of a {}")
    assert (a.pcl_form, a.gml_form, a.real_gradient, a.gradient_weighting, a.use_feature_cache) == (
        "reference", "reference", "reference", "unweighted", True)


def test_fewer_than_one_feature_per_class_is_a_config_error():
    with pytest.raises(ConfigError, match="num_features_per_class"):
        validate({"algorithm": {"name": "creff", "num_features_per_class": 0}})


def test_clip_width_different_from_the_student_projection_names_both_widths(dataset):
    cfg = digits_config(model="small_cnn")  # 128-d features vs fedplatform-tiny's 512-d embeddings
    with pytest.raises(UserError, match=r"512-d embeddings.*128-d features"):
        make_algo(cfg, dataset)
    with pytest.raises(UserError, match=r"512-d embeddings.*128-d features"):
        get_algorithm("clip2fl").prepare(cfg, dataset)


def test_classes_without_names_are_refused():
    cfg = digits_config()
    with pytest.raises(UserError, match="class names"):
        check_clip2fl(cfg, [], 10, 512)
    with pytest.raises(UserError, match="class names"):
        check_clip2fl(cfg, ["a", ""] + [str(i) for i in range(8)], 10, 512)


def test_clip2fl_needs_a_clip_model(dataset):
    cfg = digits_config().model_copy(update={"clip": digits_config().clip.model_copy(update={"model": None})})
    with pytest.raises(UserError, match="clip.model"):
        make_algo(cfg, dataset)


# ---------------------------------------------------------------------------- contract


def test_state_holds_features_and_retrained_head_and_broadcast_omits_features(dataset):
    algo = make_algo(digits_config(), dataset)
    state = algo.init_server_state(7)
    assert state[FEATURES].shape == (10 * 5, 512) and state[HEAD_W].shape == (10, 512) and state[HEAD_B].shape == (10,)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    again = algo.init_server_state(7)
    assert all(torch.equal(state[k], again[k]) for k in state)
    payload = algo.broadcast(state)
    assert FEATURES not in payload and HEAD_W in payload and "classifier.weight" in payload


def test_upload_has_gradients_of_present_classes_only(dataset):
    algo = make_algo(digits_config(), dataset)
    payload = algo.broadcast(algo.init_server_state(7))
    d = data(dataset, 0)
    update = algo.client_update(payload, d, torch.Generator().manual_seed(1))
    grads, counts = uploaded_gradients(update.tensors)
    present = sorted(np.unique(d.labels.numpy()).tolist())
    assert sorted(grads) == present and counts == {}
    assert all(gw.shape == (10, 512) and gb.shape == (10,) for gw, gb in grads.values())
    assert set(model_part(update.tensors)) == set(model_part(payload))
    assert update.num_samples == len(d.labels)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16 student: the teacher stays at the cache's fp32
def test_cached_and_per_step_teacher_give_the_same_local_update(dataset, precision):
    cached = make_algo(digits_config(precision=precision), dataset)
    uncached = make_algo(digits_config(use_feature_cache=False, precision=precision), dataset)
    payload = cached.broadcast(cached.init_server_state(7))
    d = data(dataset, 1)
    a = cached.client_update(payload, d, torch.Generator().manual_seed(3))
    b = uncached.client_update(payload, d, torch.Generator().manual_seed(3))
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert torch.allclose(a.tensors[k].double(), b.tensors[k].double(), atol=1e-4), k
    assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], rel=1e-4)


def test_kd_changes_the_local_update(dataset):
    with_kd = make_algo(digits_config(), dataset)
    without = make_algo(digits_config(kd_weight=0.0), dataset)
    payload = with_kd.broadcast(with_kd.init_server_state(7))
    d = data(dataset, 2)
    a = with_kd.client_update(payload, d, torch.Generator().manual_seed(3))
    b = without.client_update(payload, d, torch.Generator().manual_seed(3))
    assert not torch.equal(a.tensors["classifier.weight"], b.tensors["classifier.weight"])


@pytest.mark.parametrize("name", ["clip2fl", "creff"])
def test_rounds_run_and_evaluation_reports_both_heads(dataset, name):
    algo = make_algo(digits_config(name), dataset)
    state, updates = run_rounds(algo, dataset)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert set(state) == set(algo.init_server_state(7))
    metrics = algo.evaluate(state, data(dataset, -1))
    for key in ("accuracy", "fedavg_head_accuracy", "many_shot_acc", "per_class_accuracy", "loss"):
        assert key in metrics
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["fedavg_head_accuracy"] <= 1
    assert set(algo.timings) == {"fedavg_s", "match_s", "retrain_s"}
    assert math.isfinite(algo.server_stats["gml"])
    assert math.isfinite(algo.server_stats["pcl"]) == (name == "clip2fl")


def test_creff_runs_with_the_original_256_wide_network(dataset):
    algo = make_algo(digits_config("creff", model="resnet8_creff"), dataset)
    state, _ = run_rounds(algo, dataset, rounds=1, clients=(0,))
    assert state[FEATURES].shape == (5 * 10, 256) and state[HEAD_W].shape == (10, 256)
    assert state["classifier.weight"].shape == (10, 256) and not any(k.startswith("add_mlp") for k in state)
    metrics = algo.evaluate(state, data(dataset, -1))
    assert 0 <= metrics["accuracy"] <= 1 and math.isfinite(metrics["loss"])


def test_clip2fl_refuses_the_256_wide_creff_network_against_a_512_wide_clip(dataset):
    with pytest.raises(UserError, match="256"):
        make_algo(digits_config("clip2fl", model="resnet8_creff"), dataset)


def test_aggregation_is_deterministic_given_state_updates_and_round(dataset):
    algo = make_algo(digits_config(), dataset)
    state = algo.init_server_state(7)
    payload = algo.broadcast(state)
    updates = [algo.client_update(payload, data(dataset, c), torch.Generator().manual_seed(c)) for c in (0, 3)]
    a = algo.aggregate(state, updates, 1)
    b = make_algo(digits_config(), dataset).aggregate(state, updates, 1)  # e.g. a resumed server
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[FEATURES], state[FEATURES])
    c = algo.aggregate(state, updates, 2)
    assert not torch.equal(a[HEAD_W], c[HEAD_W])  # a fresh classifier per round


def test_broadcast_model_keeps_the_fedavg_head(dataset):
    algo = make_algo(digits_config("creff"), dataset)
    state, _ = run_rounds(algo, dataset, rounds=1)
    payload = algo.broadcast(state)
    assert torch.equal(payload["classifier.weight"], state["classifier.weight"])
    assert not torch.equal(payload["classifier.weight"], state[HEAD_W])


def test_count_weighting_uploads_class_counts(dataset):
    algo = make_algo(digits_config("creff", gradient_weighting="by_count"), dataset)
    payload = algo.broadcast(algo.init_server_state(7))
    d = data(dataset, 0)
    update = algo.client_update(payload, d, torch.Generator().manual_seed(1))
    _, counts = uploaded_gradients(update.tensors)
    assert counts == {int(c): int(n) for c, n in zip(*np.unique(d.labels.numpy(), return_counts=True))}
