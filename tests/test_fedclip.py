import math

import numpy as np
import pytest
import torch

from fedclip_helpers import DOMAINS, domain_config, make_domain_folders
from fedplatform.algorithms import ClientData, Context, get_algorithm
from fedplatform.algorithms.fedclip import contrastive_loss
from fedplatform.config import ExperimentConfig
from fedplatform.data import prepare
from fedplatform.models.adapters import AttentionAdapter
from fedplatform.models.feature_cache import build_feature_cache


def make_algo(cfg, ds):
    ctx = Context(cfg=cfg, num_classes=ds.num_classes, class_names=ds.class_names, image_shape=ds.image_shape,
                  norm_mean=ds.norm_mean, norm_std=ds.norm_std, train_class_counts=ds.train_class_counts,
                  device=torch.device("cpu"), dataset=ds)
    return get_algorithm(cfg.algorithm.name)(ctx)


def data(ds, cid, split="train"):
    ids = ds.client_samples(cid, split) if cid >= 0 else ds.test_ids
    return ClientData(cid, None, torch.from_numpy(np.asarray(ds.labels[ids])), ids)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_domain_folders(tmp_path_factory.mktemp("fedclip") / "pacs_like")


def prepared(cfg):
    ds = prepare(cfg)
    if cfg.algorithm.use_feature_cache:
        build_feature_cache(cfg, ds, use_ray=False)
    return ds


def run_rounds(cfg, ds, rounds=2):
    algo = make_algo(cfg, ds)
    state = algo.init_server_state(cfg.seed)
    for r in range(rounds):
        payload = algo.broadcast(state)
        updates = [algo.client_update(payload, data(ds, c), torch.Generator().manual_seed(100 * r + c))
                   for c in ds.client_ids]
        state = algo.aggregate(state, updates, r)
    return algo, state, updates


def test_adapter_shape_and_parameter_count():
    adapter = AttentionAdapter(512)
    assert sum(p.numel() for p in adapter.parameters()) == 2 * (512 * 512 + 512) == 525_312
    assert sum(p.numel() for p in AttentionAdapter(768).parameters()) == 1_181_184
    v = torch.randn(5, 512)
    f = adapter(v)
    assert f.shape == (5, 512) and torch.allclose(f.norm(dim=1), torch.ones(5), atol=1e-5)
    gate = adapter.gate(v).detach()
    assert torch.allclose(gate.sum(1), torch.ones(5), atol=1e-5)
    assert abs(float((512 * gate).mean()) - 1) < 1e-4  # starts near a uniform gate = zero-shot CLIP


def test_adapter_is_all_that_is_communicated_vs_the_whole_vit_b_32():
    import open_clip

    import fedplatform.models.clip  # noqa: F401

    whole = sum(p.numel() for p in open_clip.create_model("ViT-B-32").parameters())
    adapter = sum(p.numel() for p in AttentionAdapter(512).parameters())
    assert (whole, adapter) == (151_277_313, 525_312)
    assert round(whole / adapter, 1) == 288.0


def test_symmetric_in_batch_loss_matches_a_hand_computed_example():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.6, 0.8], [0.8, 0.6]])  # text feature of each sample's own class
    # S = 100 F T^T = [[60, 80], [80, 60]]; image->text rows and text->image rows both lose 20
    softplus = lambda x: math.log1p(math.exp(x))  # CE of the right logit being x below the other
    expected = 0.5 * (softplus(20) + softplus(20))  # each CE: the mean of two rows, both softplus(20)
    assert float(contrastive_loss(f, t, 100.0)) == pytest.approx(expected, rel=1e-6)
    t2 = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # at scale 10: S = [[10, 6], [0, 8]]
    i2t = (softplus(-4) + softplus(-8)) / 2  # rows of S
    t2i = (softplus(-10) + softplus(-2)) / 2  # rows of S^T = [[10, 0], [6, 8]]
    assert float(contrastive_loss(f, t2, 10.0)) == pytest.approx(0.5 * (i2t + t2i), rel=1e-5)


def test_state_payload_and_update_hold_only_the_adapter(root):
    cfg = domain_config(root)
    ds = prepared(cfg)
    algo, state, updates = run_rounds(cfg, ds, rounds=1)
    assert sorted(state) == ["attention.0.bias", "attention.0.weight", "attention.2.bias", "attention.2.weight"]
    assert sum(v.numel() for v in updates[0].tensors.values()) == 525_312
    assert updates[0].metrics["local_steps"] == 3  # 10 train samples, batch 4: 4 + 4 + 2


def test_cached_and_uncached_training_give_the_same_adapter(root):
    cached_cfg = domain_config(root)
    uncached_cfg = domain_config(root, use_feature_cache=False)
    ds = prepared(cached_cfg)
    _, cached, _ = run_rounds(cached_cfg, ds)
    _, uncached, _ = run_rounds(uncached_cfg, ds)
    init = make_algo(cached_cfg, ds).init_server_state(0)
    for k in cached:
        assert not torch.equal(cached[k], init[k])  # it trained
        torch.testing.assert_close(cached[k], uncached[k], rtol=1e-5, atol=1e-6)


def test_leave_one_domain_out_metrics(root):
    cfg = domain_config(root, test_domain="art")
    ds = prepared(cfg)
    algo, state, _ = run_rounds(cfg, ds, rounds=1)
    test = algo.evaluate(state, data(ds, -1))
    assert 0 <= test["accuracy"] <= 1 and test["domain/art/test_acc"] == test["accuracy"]
    assert test["adapter_weight_norm"] > 0 and 0 < test["gate_entropy"] <= math.log(512) + 1e-6
    clients = {c: {s: data(ds, c, s) for s in algo.client_eval_splits} for c in ds.client_ids}
    m = algo.evaluate_clients(state, clients)
    for d in DOMAINS[1:]:
        assert 0 <= m[f"domain/{d}/test_acc"] <= 1 and f"domain/{d}/val_acc" in m
    assert m["in_federation_acc"] == pytest.approx(np.mean([m[f"domain/{d}/test_acc"] for d in DOMAINS[1:]]))
    assert m["val_accuracy"] == pytest.approx(np.mean([m[f"domain/{d}/val_acc"] for d in DOMAINS[1:]]))


def test_train_split_accuracy_is_the_global_adapter_on_each_local_train_split(root):
    cfg = domain_config(root, test_domain="art")
    ds = prepared(cfg)
    algo, state, _ = run_rounds(cfg, ds, rounds=1)
    assert algo.client_eval_splits == ("train", "val", "test")  # the server passes the train split too
    m = algo.evaluate_clients(state, {c: {s: data(ds, c, s) for s in algo.client_eval_splits} for c in ds.client_ids})
    adapter = algo.working_adapter(state).eval()
    expected = []
    for c, d in zip(ds.client_ids, DOMAINS[1:]):  # argmax_k cos(f, t_k) over the client's 10 train images
        train = data(ds, c)
        with torch.no_grad():
            pred = (adapter(algo.image_embeddings(train.sample_ids)) @ algo.text.t()).argmax(1)
        expected.append(float((pred == train.labels).float().mean()))
        assert m[f"domain/{d}/train_acc"] == pytest.approx(expected[-1])
    assert m["train_accuracy"] == pytest.approx(np.mean(expected)) and 0 <= m["train_accuracy"] <= 1


def test_several_held_out_domains_are_scored_each_and_averaged(root):
    single_cfg, cfg = domain_config(root, test_domain="art"), domain_config(root, test_domain=["art", "sketch"])
    single, ds = prepared(single_cfg), prepared(cfg)
    assert [ds.domain_names[d] for d in np.unique(ds.domains[ds.test_ids])] == ["art", "sketch"]
    assert len(ds.client_ids) == 2  # cartoon, photo: the same splits as with art alone held out
    for c in ds.client_ids:
        for split in ("train", "val", "test"):
            assert np.array_equal(ds.client_samples(c, split), single.client_samples(c, split))
    algo, state, _ = run_rounds(cfg, ds, rounds=1)
    m = algo.evaluate(state, data(ds, -1))
    for d in ("art", "sketch"):  # each domain's accuracy as if it were the only test set
        ids = ds.test_ids[ds.domains[ds.test_ids] == ds.domain_names.index(d)]
        alone = ClientData(-1, None, torch.from_numpy(np.asarray(ds.labels[ids])), ids)
        assert m[f"domain/{d}/test_acc"] == algo.evaluate(state, alone)["accuracy"]
    assert m["accuracy"] == pytest.approx((m["domain/art/test_acc"] + m["domain/sketch/test_acc"]) / 2)


@pytest.mark.parametrize("test_domain, message", [
    (["art", "art"], "must name each held-out domain once"),
    ([], "must name each held-out domain once"),
])
def test_a_repeated_or_empty_held_out_list_is_a_config_error(root, test_domain, message):
    from fedplatform.config import ConfigError, validate

    raw = domain_config(root).model_dump(mode="json")
    raw["data"]["test_domain"] = test_domain
    with pytest.raises(ConfigError, match=message):
        validate(raw)


@pytest.mark.parametrize("test_domain, message", [
    (["art", "paintings"], "data.test_domain='paintings' is not a domain of this dataset; choose one of: art, "),
    (list(DOMAINS), "holds out every domain of this dataset"),
])
def test_unknown_or_all_held_out_domains_are_one_line_errors(root, test_domain, message):
    from fedplatform.errors import UserError

    raw = domain_config(root, test_domain=["art"]).model_dump(mode="json")
    raw["data"]["test_domain"] = test_domain
    raw["partition"]["num_clients"] = max(1, len(DOMAINS) - len(test_domain))
    raw["clients_per_round"] = raw["partition"]["num_clients"]
    with pytest.raises(UserError, match=message):
        prepare(ExperimentConfig.model_validate(raw))


def test_all_domains_participating_works(root):
    cfg = domain_config(root, test_domain=None)
    ds = prepared(cfg)
    assert len(ds.test_ids) == 0 and len(ds.client_ids) == 4
    algo, state, _ = run_rounds(cfg, ds, rounds=1)
    clients = {c: {"val": data(ds, c, "val"), "test": data(ds, c, "test")} for c in ds.client_ids}
    m = algo.evaluate_clients(state, clients)
    assert all(f"domain/{d}/test_acc" in m for d in DOMAINS)


def test_uniform_and_sample_weighted_aggregation(root):
    cfg = domain_config(root)
    algo = make_algo(cfg, prepared(cfg))
    from fedplatform.algorithms import ClientUpdate

    ups = [ClientUpdate(0, 1, {"w": torch.tensor([0.0])}, {}), ClientUpdate(1, 3, {"w": torch.tensor([4.0])}, {})]
    assert float(algo.aggregate({}, ups, 0)["w"]) == 2.0
    algo.cfg = algo.cfg.model_copy(update={"aggregation": "sample_weighted"})
    assert float(algo.aggregate({}, ups, 0)["w"]) == 3.0


def test_works_on_a_dirichlet_partition_of_digits():
    cfg = ExperimentConfig.model_validate({
        "seed": 1, "data": {"dataset": "digits"}, "partition": {"num_clients": 3, "dirichlet_alpha": 1.0},
        "clients_per_round": 3, "clip": {"model": "fedplatform-tiny", "pretrained": None},
        "algorithm": {"name": "fedclip", "loss": "all_classes"}})
    ds = prepared(cfg)
    algo, state, updates = run_rounds(cfg, ds, rounds=1)
    assert all(np.isfinite(u.metrics["train_loss"]) for u in updates)
    assert 0 <= algo.evaluate(state, data(ds, -1))["accuracy"] <= 1


def test_fedclip_needs_a_clip_model():
    from fedplatform.errors import UserError

    cfg = ExperimentConfig.model_validate({"algorithm": {"name": "fedclip"}})
    with pytest.raises(UserError, match="needs clip.model"):
        get_algorithm("fedclip").prepare(cfg, None)
