"""raysim.runner's Ray lifecycle: the local instance a run starts is stopped completely."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STOP = """
import json, os, psutil, ray
from raysim.runner import stop_ray

ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
monitor = ray._private.worker._global_node.all_processes["monitor"][0].process
children = psutil.Process().children(recursive=True)
seen, shutdown = {}, ray.shutdown
def spy(*args, **kwargs):                       # what ray.shutdown finds when stop_ray calls it
    seen["monitor_alive"] = monitor.poll() is None
    return shutdown(*args, **kwargs)
ray.shutdown = spy
stop_ray()
gone, alive = psutil.wait_procs(children, timeout=20)
print(json.dumps({"alive": [p.pid for p in alive], "children": len(children), "monitor_rc": monitor.returncode,
                  "initialized": ray.is_initialized(), **seen}))
"""


def run_script(script: str, tmp_path) -> dict:
    """Run `script` in a fresh Python (its own Ray) and return the JSON of its last output line."""
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_stop_ray_leaves_no_ray_process_and_kills_the_monitor_outright(tmp_path):
    out = run_script(STOP, tmp_path)
    assert out["children"] >= 3 and out["alive"] == []        # raylet, GCS, monitor, ...: all gone
    # the monitor ignores SIGTERM: killed before ray.shutdown, which would wait a 1 s grace period for it
    assert out["monitor_alive"] is False and out["monitor_rc"] == -9
    assert out["initialized"] is False


LEAN = """
import json, psutil, ray
from types import SimpleNamespace
from ray._private.node import Node
import ray._private.utils as ray_utils
from raysim.runner import start_ray, stop_ray

def ray_names():
    return (Node.start_api_server, Node.start_monitor, Node.start_log_monitor, ray_utils.get_dashboard_dependency_error)

before = ray_names()
cfg = SimpleNamespace(resources=SimpleNamespace(num_workers=1, cpus_per_worker=1))
started = start_ray(None, cfg)
processes = sorted(ray._private.worker._global_node.all_processes)
raylet = [p for p in psutil.Process().children(recursive=True) if p.name() == "raylet"][0]
agent = [a for a in raylet.cmdline() if a.startswith("--dashboard_agent_command=")][0]
square = ray.remote(lambda x: x * x)
result = ray.get(square.remote(7))
children = psutil.Process().children(recursive=True)
stop_ray()
gone, alive = psutil.wait_procs(children, timeout=20)
print(json.dumps({"started": started, "processes": processes, "result": result, "alive": [p.pid for p in alive],
                  "agent_minimal": "--minimal" in agent.split(), "restored": ray_names() == before}))
"""


def test_a_private_local_ray_starts_lean_and_still_runs_tasks(tmp_path):
    out = run_script(LEAN, tmp_path)
    assert out["started"] is True and out["result"] == 49
    # no dashboard, autoscaler monitor or (quiet run: nothing forwards worker output) log monitor
    assert not {"dashboard", "monitor", "log_monitor"} & set(out["processes"])
    assert {"gcs_server", "raylet"} <= set(out["processes"])
    assert out["agent_minimal"] is True                  # the raylet's dashboard agent runs without HTTP server
    assert out["restored"] is True and out["alive"] == []                    # Ray's node class as it was
