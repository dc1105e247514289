"""A local autoscaling Ray cluster for tests: Ray's fake multi-node provider, started on its own
ports and temp dir, stopped by killing only its own processes (never `ray stop`: other Ray
instances may share the machine). Fake GPUs are only resources: runs use runtime.device=cpu.

Not `ray.cluster_utils.AutoscalingCluster`: the wheel lacks the example config it builds on, and
its start() runs `ray stop --force`, which kills every Ray on the machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_config(gcs_address: str, head_cpus: float, worker_types: dict) -> dict:
    """A full cluster-launcher config for the fake provider (the wheel ships no example)."""
    return {
        "cluster_name": "fedplatform-test",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "upscaling_speed": 10.0,
        "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **{name: {"node_config": {}, **t} for name, t in worker_types.items()},
        },
    }


class FakeCluster:
    def __init__(self, tmp: Path, head_cpus: float, worker_types: dict):
        import ray._private.services as services

        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        # Short: Ray's unix sockets live under it, and socket paths are limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="fpray-", dir="/tmp")
        self.address = f"{services.get_node_ip_address()}:{_free_port()}"
        self.config = tmp / "cluster.yaml"
        self.config.write_text(yaml.safe_dump(launcher_config(self.address, head_cpus, worker_types)))
        env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        env.pop("RAY_ADDRESS", None)
        subprocess.run([RAY, "start", "--head", f"--port={self.address.rsplit(':', 1)[1]}",
                        f"--num-cpus={head_cpus:g}", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
                        f"--autoscaling-config={self.config}", "--include-dashboard=false",
                        "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
        self._wait_for_autoscaler()

    def _wait_for_autoscaler(self, timeout: float = 60.0) -> None:
        """Until the monitor has reported on its autoscaler's node types once (what fedplatform looks for)."""
        code = ("import json, time, ray; ray.init(logging_level='ERROR')\n"
                "from ray.experimental.internal_kv import _internal_kv_get\n"
                f"deadline = time.monotonic() + {timeout}\n"
                "while time.monotonic() < deadline:\n"
                "    s = _internal_kv_get('__autoscaling_status')\n"
                "    report = json.loads(s or '{}').get('autoscaler_report') or {}\n"
                "    if 'ray.head.default' in (report.get('active_nodes') or {}): break\n"
                "    time.sleep(0.5)\n"
                "else: raise SystemExit('the fake autoscaler never reported')\n")
        subprocess.run([sys.executable, "-c", code], env=self.env(), check=True, capture_output=True,
                       timeout=timeout + 60)

    def env(self, see_node_types: bool = True) -> dict:
        """Environment for a fedplatform process that drives this cluster (as on a `ray up` head,
        where ~/ray_bootstrap_config.yaml tells the node types)."""
        env = dict(os.environ, RAY_ADDRESS=self.address, RAY_AUTH_MODE="token")
        if see_node_types:
            env["FEDPLATFORM_CLUSTER_CONFIG"] = str(self.config)
        else:
            env["FEDPLATFORM_CLUSTER_CONFIG"] = str(self.tmp / "no-such-file.yaml")
        return env

    def nodes(self) -> list[dict]:
        """Resources of each live node, asked from a separate driver."""
        code = ("import json, ray; ray.init(logging_level='ERROR'); "
                "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))")
        out = subprocess.run([sys.executable, "-c", code], env=self.env(), capture_output=True, text=True,
                             check=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def _pids(self) -> list[int]:
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if self.temp_dir.encode() in cmdline:
                pids.append(int(pid))
        return pids

    def stop(self) -> None:
        """Only this cluster's processes: their command lines carry its temp dir. The GCS, raylet and
        monitor outlast SIGTERM (measured: still up after 10 s), so they get SIGKILL soon."""
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            for pid in self._pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while self._pids() and time.monotonic() < deadline:
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def fake_cluster(tmp: Path, head_cpus: float = 2, worker_types: dict | None = None):
    cluster = FakeCluster(tmp, head_cpus, worker_types or {
        "gpu_node": {"resources": {"CPU": 2, "GPU": 1}, "min_workers": 0, "max_workers": 2}})
    try:
        yield cluster
    finally:
        cluster.stop()


def run_cluster_script(code: str, *args: str, timeout: float) -> dict:
    """Run `code` in a fresh Python (a cluster of its own, beside the session's Ray) and return the
    JSON object it printed on its `RESULT ` line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))
