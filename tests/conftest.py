import os

import pytest


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
