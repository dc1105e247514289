from pathlib import Path

import pytest

from fedplatform.config import ConfigError, load_config, parse_value
from fedplatform.errors import UserError

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
BENCHMARK_PIPELINES = Path(__file__).resolve().parents[1] / "benchmarks" / "pipelines"


def error_of(tmp_path, text="name: test\n", overrides=()):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, list(overrides))
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, UserError)
    return msg


def test_unknown_key_names_it_and_the_allowed_keys(tmp_path):
    msg = error_of(tmp_path, "data:\n  imbalance: 10\n")
    assert msg.startswith("unknown key 'data.imbalance'") and "imbalance_factor" in msg


def test_a_key_of_another_algorithm_names_the_algorithm_whose_keys_are_listed(tmp_path):
    msg = error_of(tmp_path, "algorithm:\n  name: fedavg\n  augmentation: none\n", ["algorithm.name=fedclip"])
    assert msg.startswith("unknown key 'algorithm.augmentation'; allowed keys for algorithm.name=fedclip: ")
    assert "use_feature_cache" in msg


def test_imbalance_factor_below_one(tmp_path):
    assert "data.imbalance_factor=0.5" in error_of(tmp_path, overrides=["data.imbalance_factor=0.5"])


@pytest.mark.parametrize("alpha", ["0", "-1"])
def test_dirichlet_alpha_must_be_positive(tmp_path, alpha):
    assert f"partition.dirichlet_alpha={alpha}" in error_of(tmp_path, overrides=[f"partition.dirichlet_alpha={alpha}"])


def test_unknown_algorithm_lists_the_known_ones(tmp_path):
    msg = error_of(tmp_path, "algorithm:\n  name: fedsgd\n")
    assert "algorithm.name='fedsgd' is not a known algorithm" in msg and "fedavg" in msg and "fedprox" in msg


def test_clients_per_round_cannot_exceed_num_clients(tmp_path):
    msg = error_of(tmp_path, overrides=["partition.num_clients=4", "clients_per_round=5"])
    assert msg.startswith("clients_per_round=5 exceeds partition.num_clients=4")


def test_a_server_in_the_driver_cannot_ask_for_a_gpu(tmp_path):
    msg = error_of(tmp_path, overrides=["runtime.server_process=driver", "runtime.server_resources.num_gpus=0.5"])
    assert "runtime.server_process=driver cannot take runtime.server_resources.num_gpus=0.5" in msg


def test_set_without_equals_sign(tmp_path):
    assert "expected KEY=VALUE" in error_of(tmp_path, overrides=["seed"])


def test_set_types_values_like_yaml():
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("0.05") == 0.05
    assert parse_value("true") is True and parse_value("false") is False
    assert parse_value("[0.5, 0.25, 0.25]") == [0.5, 0.25, 0.25]
    assert parse_value("./data/cifar10") == "./data/cifar10"


def test_set_overrides_are_typed_in_the_config(tmp_path):
    cfg = load_config(PIPELINES / "quickstart.yaml", [
        "seed=11", "data.imbalance_factor=50", "data.download=true",
        "partition.split_fractions=[0.5,0.25,0.25]", "algorithm.lr=0.01", "data.root=/tmp/x"])
    assert cfg.seed == 11 and cfg.data.imbalance_factor == 50.0 and cfg.data.download is True
    assert cfg.partition.split_fractions == (0.5, 0.25, 0.25) and cfg.algorithm.lr == 0.01
    assert cfg.data.root == "/tmp/x"


def test_a_wrongly_typed_value_is_one_line(tmp_path):
    msg = error_of(tmp_path, overrides=["partition.num_clients=many"])
    assert msg.startswith("partition.num_clients='many' is invalid")


@pytest.mark.parametrize("path", sorted([*PIPELINES.glob("*.yaml"), *BENCHMARK_PIPELINES.glob("*.yaml")]),
                         ids=lambda p: p.name)
def test_shipped_pipelines_are_valid(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_flower_twins_carry_the_flower_anchor_workloads():
    """../shared/bench/flower: digits FedAvg and the engine-overhead run (benchmarks/flower_twins.py)."""
    d = load_config(BENCHMARK_PIPELINES / "flower_twin_digits.yaml")
    assert (d.seed, d.data.dataset, d.data.imbalance_factor, d.data.test_fraction, d.partition.scheme,
            d.partition.num_clients, d.clients_per_round, d.rounds, d.model.name) == \
        (0, "digits", 1, 0.2, "iid", 100, 10, 50, "mlp")
    a = d.algorithm
    assert (a.name, a.local_epochs, a.lr, a.batch_size, a.augmentation, a.server_optimizer) == \
        ("fedavg", 1, 0.05, 10, "none", None)
    o = load_config(BENCHMARK_PIPELINES / "flower_twin_overhead.yaml")
    assert (o.partition.num_clients, o.clients_per_round, o.rounds, o.algorithm.name, o.algorithm.work_s) == \
        (20, 8, 10, "synthetic", 0.05)
    for cfg in (d, o):
        rt = cfg.runtime
        assert (rt.num_client_actors, rt.client_resources.num_cpus, rt.client_resources.num_gpus) == (2, 1, 0)


def test_pipelines_carry_the_reference_settings():
    c10 = load_config(PIPELINES / "clip2fl_cifar10_lt.yaml")
    settings = (c10.seed, c10.data.imbalance_factor, c10.partition.scheme, c10.partition.num_clients,
                c10.partition.dirichlet_alpha, c10.clients_per_round, c10.rounds)
    assert settings == (7, 100, "clip2fl_reference", 20, 0.5, 8, 200)
    for name in ("clip2fl_cifar10_lt", "clip2fl_cifar100_lt", "creff_cifar10_lt", "fedavg_cifar10_lt",
                 "fedprox_cifar10_lt"):  # the reference's fixed long-tail seed, whatever --set seed=...
        assert load_config(PIPELINES / f"{name}.yaml", ["seed=3"]).data.longtail_seed == 7
    pacs = load_config(PIPELINES / "fedclip_pacs.yaml")
    assert (pacs.seed, pacs.data.test_domain, pacs.partition.num_clients, pacs.partition.split_fractions) == \
        (0, "art_painting", 3, (0.6, 0.2, 0.2))


def test_yaml_anchors_and_merge_keys_still_work(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("algorithm:\n  <<: {lr: 0.2, local_epochs: 1}\n"
                 "  lr: 0.3\nrounds: &r 3\nclients_per_round: *r\n")
    cfg = load_config(f)
    assert (cfg.algorithm.lr, cfg.algorithm.local_epochs, cfg.rounds, cfg.clients_per_round) == (0.3, 1, 3, 3)


def test_a_duplicate_key_in_a_set_value_is_an_error():
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        parse_value("{a: 1, a: 2}")


def _fresh(code: str) -> str:
    """stdout of `code` run in a new interpreter (nothing imported or registered yet)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_validating_every_builtin_algorithm_imports_no_torch():
    out = _fresh("import sys\nfrom fedplatform.algorithms import BUILTIN_ALGORITHMS\nfrom fedplatform.config import validate\n"
                 "names = [validate({'algorithm': {'name': n}}).algorithm.name for n in BUILTIN_ALGORITHMS]\n"
                 "print(names, 'torch' in sys.modules)")
    assert out.strip() == "['fedavg', 'fedprox', 'synthetic', 'fedclip', 'creff', 'clip2fl'] False"


def test_each_builtin_algorithm_registers_the_config_it_is_validated_with():
    from fedplatform.algorithms import BUILTIN_ALGORITHMS, get_algorithm
    from fedplatform.config import ALGORITHM_CONFIGS, algorithm_config

    for name in BUILTIN_ALGORITHMS:
        config = algorithm_config(name)
        assert get_algorithm(name).name == name and ALGORITHM_CONFIGS[name] is config
        assert f"{config.__module__}:{config.__qualname__}" == BUILTIN_ALGORITHMS[name]


def test_a_plugin_cannot_take_a_builtin_name_not_yet_asked_for():
    out = _fresh("from pydantic import BaseModel\nfrom fedplatform.config import register_algorithm_config\n"
                 "class Mine(BaseModel): pass\n"
                 "try: register_algorithm_config('creff', Mine)\nexcept ValueError as e: print(e)")
    assert out.strip() == "algorithm 'creff' already has a config (fedplatform.algorithms.creff_config.CReFFConfig)"
