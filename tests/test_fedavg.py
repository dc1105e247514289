import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fedplatform.algorithms import ClientData, ClientUpdate, Context, get_algorithm
from fedplatform.algorithms.base import classification_metrics
from fedplatform.algorithms.fedavg import FedAvg, sgd_step
from fedplatform.algorithms.fedprox import FedProx
from fedplatform.config import ExperimentConfig
from fedplatform.errors import UserError


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    """sklearn digits as uint8 [n, 8, 8, 1] images, split 80/20 with a fixed permutation."""
    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    train, test = order[:cut], order[cut:]
    mean, std = (images[train] / 255).mean(), (images[train] / 255).std()
    return {
        "train": (torch.from_numpy(images[train]), torch.from_numpy(d.target[train]).long()),
        "test": (torch.from_numpy(images[test]), torch.from_numpy(d.target[test]).long()),
        "norm": ((float(mean),), (float(std),)),
        "counts": np.bincount(d.target[train], minlength=10),
    }


def make_algorithm(digits, name="fedavg", model="small_cnn", image_shape=(8, 8, 1), **algorithm):
    algorithm = {"local_epochs": 1, "lr": 0.05, "batch_size": 32, "augmentation": "none", **algorithm}
    cfg = ExperimentConfig.model_validate(
        {"model": {"name": model}, "algorithm": {"name": name, **algorithm},
         "partition": {"num_clients": 5}, "clients_per_round": 5}
    )
    mean, std = digits["norm"] if image_shape[-1] == 1 else ((0.5,) * 3, (0.25,) * 3)
    ctx = Context(cfg=cfg, num_classes=10, class_names=[str(c) for c in range(10)], image_shape=image_shape,
                  norm_mean=mean, norm_std=std, train_class_counts=digits["counts"], device=torch.device("cpu"))
    return get_algorithm(name)(ctx)


def client(digits, client_id=0, n=200):
    images, labels = digits["train"]
    rows = slice(client_id * n, (client_id + 1) * n)
    return ClientData(client_id, images[rows], labels[rows])


def train_once(digits, payload, name="fedavg", seed=4, **algorithm):
    """One client update of client 0 from `payload` by a fresh algorithm instance."""
    algo = make_algorithm(digits, name, **algorithm)
    return algo.client_update(payload, client(digits), torch.Generator().manual_seed(seed))


def distance(a, b, keys=None):
    keys = keys if keys is not None else [k for k in a if a[k].is_floating_point()]
    return sum(((a[k] - b[k]).double() ** 2).sum() for k in keys).sqrt().item()


# ---------------------------------------------------------------------------- registry and state


def test_registry_resolves_names_and_rejects_unknown_ones_listing_the_known():
    assert get_algorithm("fedavg") is FedAvg and get_algorithm("fedprox") is FedProx
    with pytest.raises(UserError) as err:
        get_algorithm("scaffold")
    assert "'scaffold'" in str(err.value) and "fedavg" in str(err.value) and "fedprox" in str(err.value)


def test_init_server_state_depends_on_the_seed_alone_and_leaves_the_global_rng(digits):
    algo = make_algorithm(digits)
    before = torch.get_rng_state()
    a, b, c = algo.init_server_state(1), algo.init_server_state(1), algo.init_server_state(2)
    assert torch.equal(torch.get_rng_state(), before)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert {"classifier.weight", "body.1.running_mean", "body.1.num_batches_tracked"} <= set(a)


# ---------------------------------------------------------------------------- aggregation


def test_aggregate_is_the_sample_weighted_mean_of_every_float_entry_bn_stats_included(digits):
    algo = make_algorithm(digits)
    template = algo.init_server_state(0)
    gen = torch.Generator().manual_seed(0)

    def random_state():
        return {k: torch.rand(v.shape, generator=gen) if v.is_floating_point() else v for k, v in template.items()}

    states = [random_state() for _ in range(3)]
    sizes = [10, 30, 60]
    updates = [ClientUpdate(i, n, s, {"train_loss": 0.0}) for i, (n, s) in enumerate(zip(sizes, states))]
    out = algo.aggregate(template, updates, round=1)
    for key in ("body.0.weight", "body.1.running_mean", "body.1.running_var", "classifier.bias"):
        expected = 0.1 * states[0][key].double() + 0.3 * states[1][key].double() + 0.6 * states[2][key].double()
        assert out[key].dtype == torch.float32
        assert torch.allclose(out[key].double(), expected, atol=1e-6)


def test_aggregate_keeps_the_first_clients_integer_buffers(digits):
    algo = make_algorithm(digits)
    template = algo.init_server_state(0)
    updates = []
    for cid, batches in ((2, 7), (5, 40)):
        state = {k: v.clone() for k, v in template.items()}
        state["body.1.num_batches_tracked"] = torch.tensor(batches)
        updates.append(ClientUpdate(cid, 100, state, {"train_loss": 0.0}))
    out = algo.aggregate(template, updates, round=1)
    assert out["body.1.num_batches_tracked"].dtype == torch.int64
    assert out["body.1.num_batches_tracked"].item() == 7


# ---------------------------------------------------------------------------- client update


def test_client_update_is_bit_identical_for_the_same_generator_seed_on_any_actor(digits):
    payload = make_algorithm(digits).init_server_state(0)
    actor_a = make_algorithm(digits, augmentation="per_sample")
    actor_b = make_algorithm(digits, augmentation="per_sample")
    actor_b.client_update(payload, client(digits, 3), torch.Generator().manual_seed(99))  # b has a history, a not
    torch.manual_seed(1)
    a = actor_a.client_update(payload, client(digits, 0), torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    b = actor_b.client_update(payload, client(digits, 0), torch.Generator().manual_seed(5))
    assert a.metrics == b.metrics and a.num_samples == b.num_samples == 200
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    c = actor_a.client_update(payload, client(digits, 0), torch.Generator().manual_seed(6))
    assert any(not torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


def test_sgd_step_is_torch_optim_sgd_bit_for_bit():
    def net():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10),
                                    torch.nn.Linear(10, 10))
        model[3].requires_grad_(False)  # frozen: no gradient, left alone by both
        return model

    x, y = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10
    ours, theirs = net(), net()
    optimizer = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    params = [p for p in ours.parameters() if p.requires_grad]
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(theirs(x), y).backward()
        optimizer.step()
        for p in params:
            p.grad = None
        torch.nn.functional.cross_entropy(ours(x), y).backward()
        sgd_step(params, 0.05)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


def test_a_client_update_does_not_import_torch_dynamo():
    """torch.optim imports torch._dynamo (1.3 s of CPU) when an optimizer is made: not in a FedAvg client."""
    code = ("import sys, torch; from tests.test_fedavg import digits, train_once, make_algorithm; "
            "d = digits.__wrapped__(); train_once(d, make_algorithm(d).init_server_state(0)); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_client_update_returns_cpu_state_and_leaves_payload_and_global_rng_untouched(digits):
    algo = make_algorithm(digits)
    payload = algo.init_server_state(0)
    snapshot = {k: v.clone() for k, v in payload.items()}
    before = torch.get_rng_state()
    update = algo.client_update(payload, client(digits), torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(payload[k], snapshot[k]) for k in payload)
    assert update.tensors.keys() == payload.keys()
    assert all(t.device.type == "cpu" for t in update.tensors.values())
    # 200 samples, batch 32, last partial batch kept: 7 BN updates per epoch
    assert update.tensors["body.1.num_batches_tracked"].item() == 7
    assert np.isfinite(update.metrics["train_loss"])


def test_resnet8_client_update_runs_with_reference_augmentation(digits):
    algo = make_algorithm(digits, model="resnet8", image_shape=(32, 32, 3), augmentation="reference", batch_size=8)
    gen = torch.Generator().manual_seed(0)
    data = ClientData(0, torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8, generator=gen),
                      torch.randint(0, 10, (12,), generator=gen))
    payload = algo.init_server_state(0)
    update = algo.client_update(payload, data, torch.Generator().manual_seed(0))
    assert update.tensors["layer3.0.downsample.1.num_batches_tracked"].item() == 2
    assert distance(update.tensors, payload) > 0


def test_fedavg_learns_digits_through_the_contract(digits):
    """Five iid clients, all sampled every round, no Ray: the engine's loop in miniature."""
    algo = make_algorithm(digits, local_epochs=2)
    state = algo.init_server_state(7)
    images, labels = digits["train"]
    shards = np.array_split(np.random.default_rng(7).permutation(len(labels)), 5)
    clients = [ClientData(cid, images[rows], labels[rows]) for cid, rows in enumerate(shards)]
    chance = algo.evaluate(state, ClientData(-1, *digits["test"]))["accuracy"]
    for round in range(1, 4):
        payload = algo.broadcast(state)
        updates = [algo.client_update(payload, c, torch.Generator().manual_seed(1000 * round + c.client_id))
                   for c in clients]
        state = algo.aggregate(state, updates, round)
    metrics = algo.evaluate(state, ClientData(-1, *digits["test"]))
    assert chance < 0.3 and metrics["accuracy"] > 0.8
    assert len(metrics["per_class_accuracy"]) == 10 and metrics["loss"] > 0
    assert metrics == algo.evaluate(state, ClientData(-1, *digits["test"]))  # evaluation is deterministic


def test_bf16_local_training_is_reproducible_close_to_fp32_and_keeps_fp32_state(digits):
    payload = make_algorithm(digits).init_server_state(0)
    fp32 = train_once(digits, payload, local_epochs=2)
    bf16 = train_once(digits, payload, local_epochs=2, precision="bf16")
    again = train_once(digits, payload, local_epochs=2, precision="bf16")
    assert all(torch.equal(bf16.tensors[k], again.tensors[k]) for k in bf16.tensors)
    assert all(bf16.tensors[k].dtype == payload[k].dtype for k in payload)
    moved, gap = distance(fp32.tensors, payload), distance(bf16.tensors, fp32.tensors)
    assert 0 < gap < 0.1 * moved  # bf16 rounding changes the update, slightly
    assert abs(bf16.metrics["train_loss"] - fp32.metrics["train_loss"]) < 0.05 * fp32.metrics["train_loss"]


def test_bf16_on_a_gpu_without_bfloat16_is_one_clear_error(digits, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    algo = make_algorithm(digits, precision="bf16")
    ctx = dataclasses.replace(algo.ctx, device=torch.device("cuda", 0))
    with pytest.raises(UserError, match="precision=bf16 needs a GPU with bfloat16 support .*Tesla V100 has none"):
        FedAvg(ctx)


def test_unknown_precision_is_rejected_naming_the_choices():
    with pytest.raises(Exception, match="fp32.*bf16|bf16.*fp32"):
        ExperimentConfig.model_validate({"algorithm": {"name": "fedavg", "precision": "fp16"}})


# ---------------------------------------------------------------------------- FedProx


def test_fedprox_with_mu_zero_equals_fedavg_exactly(digits):
    payload = make_algorithm(digits).init_server_state(0)
    avg, prox = train_once(digits, payload, "fedavg"), train_once(digits, payload, "fedprox", mu=0.0)
    assert all(torch.equal(avg.tensors[k], prox.tensors[k]) for k in avg.tensors)
    assert avg.metrics == prox.metrics


def test_fedprox_keeps_the_local_model_closer_to_the_global_weights(digits):
    algo = make_algorithm(digits)
    payload = algo.init_server_state(0)
    weights = [name for name, _ in algo.build_model().named_parameters()]  # BN running stats are not pulled
    gaps = [distance(train_once(digits, payload, "fedprox", mu=mu, local_epochs=3).tensors, payload, weights)
            for mu in (0.0, 1.0, 5.0)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.6 * gaps[0]


# ---------------------------------------------------------------------------- metrics


def test_classification_metrics_on_a_hand_example():
    # train counts: class 0 many (>100), 1 and 2 medium (100 and 20 are inclusive), 3 few (<20)
    counts = np.array([101, 100, 20, 19])
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 3, 3])
    preds = np.array([0, 0, 0, 1, 1, 0, 2, 3, 0])
    m = classification_metrics(preds, labels, counts, loss=1.5)
    assert m["accuracy"] == pytest.approx(6 / 9)
    assert m["per_class_accuracy"] == pytest.approx([0.75, 0.5, 1.0, 0.5])
    assert m["many_shot_acc"] == pytest.approx(0.75)
    assert m["medium_shot_acc"] == pytest.approx(0.75)  # mean of the class accuracies 0.5 and 1.0
    assert m["few_shot_acc"] == pytest.approx(0.5)
    assert m["loss"] == 1.5


def test_classification_metrics_omits_groups_without_classes():
    m = classification_metrics(np.array([0, 1]), np.array([0, 1]), np.array([500, 300]))
    assert m["accuracy"] == 1.0 and "many_shot_acc" in m
    assert "medium_shot_acc" not in m and "few_shot_acc" not in m and "loss" not in m
