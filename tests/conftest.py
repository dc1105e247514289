import os

import pytest

# The files that take longest (--durations, 2 cores) start first: with two xdist workers taking
# whole files in collection order, the short ones then fill in and both workers end together.
LONGEST_FIRST = ("test_sweep.py", "test_autoscaling.py", "test_cli_run.py", "test_storage.py", "test_clip_runs.py",
                 "test_partial_participation.py", "test_plugins.py", "test_server_opt.py", "test_report.py",
                 "test_multinode.py", "test_replicate.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(scope="session", autouse=True)
def _isolated_data_cache(tmp_path_factory):
    """Prepared data go to a session temp dir, never to ~/.cache/fedplatform."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDPLATFORM_CACHE", str(tmp_path_factory.mktemp("fedplatform-cache")))
        yield


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole test session (4 logical CPUs: a server and 3 client actors)."""
    import ray

    from fedplatform.runtime.actors import FAULT_ENV

    fault_file = tmp_path_factory.mktemp("faults") / "fault.json"
    os.environ[FAULT_ENV] = str(fault_file)  # before ray.init: workers inherit the environment
    if not ray.is_initialized():
        # "local": our own Ray, never one a `ray start` elsewhere on this machine left behind
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
    yield {"fault_file": fault_file}
    ray.shutdown()
