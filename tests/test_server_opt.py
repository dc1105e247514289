"""algorithm.server_optimizer: FedAvgM, FedAdam and FedYogi (Reddi et al. 2021) on hand-computed
numbers, their config errors, and a resumed run that equals the uninterrupted one."""
from __future__ import annotations

import pytest
import torch

from fedplatform.algorithms.server_opt import PREFIX, ServerOptimizer
from fedplatform.config import ConfigError, validate
from fedplatform.errors import UserError

# ---------------------------------------------------------------------------- hand-computed two rounds
# One trainable parameter w, a BatchNorm float buffer and its integer counter. Global w_0 = [1, -2];
# the clients' averages are [3, -2.25] in round 1 and [2, -1.5] in round 2.
W0 = [1.0, -2.0]
AVERAGES = [[3.0, -2.25], [2.0, -1.5]]
RUNNING_MEAN = [[0.5], [0.25]]
COUNTER = [4, 5]


def two_rounds(optimizer: dict) -> list[dict[str, torch.Tensor]]:
    """The server states after rounds 1 and 2."""
    opt = ServerOptimizer(validate({"algorithm": {"server_optimizer": optimizer}}).algorithm.server_optimizer, {"w"})
    model = {"w": torch.tensor(W0), "bn.running_mean": torch.tensor([0.0]), "bn.num_batches_tracked": torch.tensor(3)}
    state = {**model, **opt.initial_state(model)}
    states = []
    for average, mean, count in zip(AVERAGES, RUNNING_MEAN, COUNTER):
        state = opt.step(state, {"w": torch.tensor(average), "bn.running_mean": torch.tensor(mean),
                                 "bn.num_batches_tracked": torch.tensor(count)})
        states.append(state)
    return states


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-6, atol=0)


def test_buffers_take_the_plain_average_and_only_parameters_get_moments():
    for optimizer in ("fedavgm", "fedadam", "fedyogi"):
        for state, mean, count in zip(two_rounds({"name": optimizer}), RUNNING_MEAN, COUNTER):
            assert torch.equal(state["bn.running_mean"], torch.tensor(mean))
            assert torch.equal(state["bn.num_batches_tracked"], torch.tensor(count))
            moments = {k for k in state if k.startswith(PREFIX)}
            assert moments == ({f"{PREFIX}momentum.w"} if optimizer == "fedavgm" else {f"{PREFIX}m.w", f"{PREFIX}v.w"})


def test_fedavgm_on_a_hand_computed_example():
    # lr 0.5, momentum 0.5, v_0 = 0.
    # round 1: delta = [3, -2.25] - [1, -2] = [2, -0.25]; v = [2, -0.25]; w = [1, -2] + 0.5 v = [2, -2.125]
    # round 2: delta = [2, -1.5] - [2, -2.125] = [0, 0.625]; v = 0.5 [2, -0.25] + delta = [1, 0.5];
    #          w = [2, -2.125] + 0.5 [1, 0.5] = [2.5, -1.875]
    first, second = two_rounds({"name": "fedavgm", "lr": 0.5, "momentum": 0.5})
    assert torch.equal(first["w"], torch.tensor([2.0, -2.125]))
    assert torch.equal(first[f"{PREFIX}momentum.w"], torch.tensor([2.0, -0.25]))
    assert torch.equal(second["w"], torch.tensor([2.5, -1.875]))
    assert torch.equal(second[f"{PREFIX}momentum.w"], torch.tensor([1.0, 0.5]))


def test_fedadam_on_a_hand_computed_example():
    # lr 0.5, beta1 0.5, beta2 0.75, tau 0.5: m_0 = 0, v_0 = tau^2 = 0.25.
    # round 1: delta = [2, -0.25]; m = 0.5 delta = [1, -0.125];
    #          v = 0.75 * 0.25 + 0.25 * [4, 0.0625] = [1.1875, 0.203125];
    #          w = [1, -2] + 0.5 m / (sqrt(v) + 0.5) = [1 + 0.5 / 1.589725, -2 - 0.0625 / 0.950694]
    first, second = two_rounds({"name": "fedadam", "lr": 0.5, "beta1": 0.5, "beta2": 0.75, "tau": 0.5})
    close(first[f"{PREFIX}m.w"], [1.0, -0.125])
    close(first[f"{PREFIX}v.w"], [1.1875, 0.203125])
    close(first["w"], [1.3145198591, -2.0657414541])
    # round 2: delta = [2, -1.5] - w_1 = [0.6854801409, 0.5657414541]; m = 0.5 m + 0.5 delta
    #          = [0.8427400704, 0.2203707270]; v = 0.75 v + 0.25 delta^2 = [1.0080957559, 0.2323595982];
    #          w = w_1 + 0.5 m / (sqrt(v) + 0.5)
    close(second[f"{PREFIX}m.w"], [0.8427400704, 0.2203707270])
    close(second[f"{PREFIX}v.w"], [1.0080957559, 0.2323595982])
    close(second["w"], [1.5946787074, -1.9535406187])


def test_fedyogi_on_a_hand_computed_example():
    # As FedAdam, but v = v - 0.25 delta^2 sign(v - delta^2): it grows where delta^2 > v, shrinks elsewhere.
    # round 1: delta^2 = [4, 0.0625] vs v_0 = 0.25: v = [0.25 + 1, 0.25 - 0.015625] = [1.25, 0.234375];
    #          m = [1, -0.125]; w = [1 + 0.5 / (sqrt(1.25) + 0.5), -2 - 0.0625 / (sqrt(0.234375) + 0.5)]
    first, second = two_rounds({"name": "fedyogi", "lr": 0.5, "beta1": 0.5, "beta2": 0.75, "tau": 0.5})
    close(first[f"{PREFIX}v.w"], [1.25, 0.234375])
    close(first["w"], [1.3090169944, -2.0635083269])
    # round 2: delta = [0.6909830056, 0.5635083269], delta^2 = [0.4774575141, 0.3175415344]:
    #          v = [1.25 - 0.1193643785, 0.234375 + 0.0793853836] = [1.1306356215, 0.3137604086];
    #          m = [0.8454915028, 0.2192541634]; w = w_1 + 0.5 m / (sqrt(v) + 0.5)
    close(second[f"{PREFIX}m.w"], [0.8454915028, 0.2192541634])
    close(second[f"{PREFIX}v.w"], [1.1306356215, 0.3137604086])
    close(second["w"], [1.5794334838, -1.9601005219])


def test_defaults_are_flowers():
    algo = validate({"algorithm": {"name": "fedprox", "server_optimizer": "fedyogi"}}).algorithm
    assert algo.server_optimizer.model_dump() == {"name": "fedyogi", "lr": 0.01, "beta1": 0.9, "beta2": 0.99,
                                                  "tau": 1e-3}
    assert validate({"algorithm": {"server_optimizer": {"name": "fedadam"}}}).algorithm.server_optimizer.lr == 0.1
    assert validate({"algorithm": {"server_optimizer": "fedavgm"}}).algorithm.server_optimizer.model_dump() == {
        "name": "fedavgm", "lr": 1.0, "momentum": 0.9}
    assert validate({}).algorithm.server_optimizer is None


# ---------------------------------------------------------------------------- config errors


def config_error(algorithm: dict) -> str:
    with pytest.raises(ConfigError) as err:
        validate({"algorithm": algorithm})
    assert "\n" not in str(err.value) and isinstance(err.value, UserError)
    return str(err.value)


def test_an_unknown_server_optimizer_names_the_valid_ones():
    assert config_error({"server_optimizer": "adam"}) == (
        "algorithm.server_optimizer.name='adam' is not a known server optimizer; choose one of fedavgm, fedadam, fedyogi")
    assert config_error({"server_optimizer": {"lr": 0.1}}) == (
        "algorithm.server_optimizer needs a name; choose one of fedavgm, fedadam, fedyogi")


def test_a_key_of_another_server_optimizer_lists_the_keys_of_the_chosen_one():
    assert config_error({"server_optimizer": {"name": "fedadam", "momentum": 0.9}}) == (
        "unknown key 'algorithm.server_optimizer.momentum'; allowed keys for "
        "algorithm.server_optimizer.name=fedadam: beta1, beta2, lr, name, tau")
    assert config_error({"server_optimizer": {"name": "fedyogi", "beta2": 1}}).startswith(
        "algorithm.server_optimizer.beta2=1 is invalid")


def test_algorithms_beyond_the_fedavg_family_reject_a_server_optimizer():
    msg = config_error({"name": "creff", "server_optimizer": "fedadam"})
    assert msg.startswith("unknown key 'algorithm.server_optimizer'; allowed keys for algorithm.name=creff: ")


# ---------------------------------------------------------------------------- a run, resumed


@pytest.mark.usefixtures("ray_session")
def test_a_resumed_fedadam_run_equals_the_uninterrupted_run(tmp_path):
    from fedplatform.experiment import run_experiment
    from fedplatform.runtime.checkpoint import load

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = validate({
        "name": "srvopt", "seed": 3,
        "data": {"dataset": "digits", "imbalance_factor": 10, "cache_dir": str(tmp_path / "cache")},
        "partition": {"scheme": "dirichlet", "num_clients": 10, "dirichlet_alpha": 0.5, "min_client_size": 10},
        "model": {"name": "small_cnn"},
        "algorithm": {"name": "fedavg", "local_epochs": 1, "lr": 0.05, "batch_size": 64, "augmentation": "none",
                      "server_optimizer": {"name": "fedadam", "lr": 0.01}},
        "rounds": 3, "clients_per_round": 4,
        "runtime": {"num_client_actors": 2, "storage": str(tmp_path / "runs")},
        "tracking": {"experiment": "srvopt"},
    })
    whole = run_experiment(cfg, tracking_uri=uri, progress=False)
    first = run_experiment(cfg.model_copy(update={"rounds": 2}), tracking_uri=uri, progress=False)
    _, middle = load(first.run_dir)
    assert any(k.startswith(f"{PREFIX}v.") and not torch.all(v == 1e-4) for k, v in middle.items())
    resumed = run_experiment(cfg, tracking_uri=uri, resume=first.run_id, progress=False)
    (_, expected), (_, state) = load(whole.run_dir), load(resumed.run_dir)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert [h["accuracy"] for h in resumed.history] == [h["accuracy"] for h in whole.history]
