"""`raysim bench`: the in-process part of the JSON and table (a few client-steps, no Ray), and a light
package import."""

from __future__ import annotations

import json
import subprocess
import sys

from raysim.cli import main


def test_bench_cli_writes_the_in_process_json_fields(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    rc = main(["bench", "--workload", "tiny", "--skip-e2e", "--ks", "1,2", "--clients", "2", "--min-time", "0",
               "--json", str(out)])
    assert rc == 0
    got = json.loads(out.read_text())
    assert got["workload"] == "tiny" and got["device"] == "cpu"
    assert got["engines"]["peft"]["client_steps_per_s"] > 0
    assert set(got["engines"]["cohort"]["by_k"]) == {"1", "2"}
    assert got["engines"]["cohort"]["client_steps_per_s"] == max(got["engines"]["cohort"]["by_k"].values())
    assert got["floor_client_steps_per_s"] > 0
    assert "overhead_ratio" in got and got["overhead_ratio"] is None        # no end-to-end run was asked for
    assert got["e2e"] == {} and "startup_phases" not in got
    assert got["machine"]["cpu_count"] >= 1
    table = capsys.readouterr().out
    assert "engine cohort K=2" in table and "floor" in table


def test_importing_the_bench_and_report_packages_loads_neither_torch_nor_ray():
    code = ("import sys, raysim.bench, raysim.report; "
            "print(sorted(m for m in ('torch', 'ray', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
