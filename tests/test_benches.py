"""Every benchmark still runs against today's code, in its smallest form (its figures are read elsewhere: here
only that it completes and prints its report). A protocol change that a bench's scripted clients do not follow
shows up here, not at the next measurement."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SMALL = {
    "bench_relay": ["--rounds", "1", "--messages", "300", "--warmup", "50", "--window", "50", "--rate", "200",
                    "--duration", "0.2"],
    "bench_e2e": ["--rounds", "1", "--messages", "200", "--rate", "200", "--duration", "0.2"],
    "bench_load": ["--rounds", "1", "--clients", "6", "--duration", "0.5", "--window", "20"],
    "bench_files": ["--rounds", "1", "--size-mib", "1"],
    "bench_load_memory": ["--clients", "20", "--rounds", "1", "--settle", "0.2"],
    "bench_devices": ["--rounds", "1", "--messages", "100"],
    "bench_rooms": ["--rounds", "1", "--members", "6", "--messages", "5", "--rate", "50"],
    "bench_cluster": ["--workers", "1", "--procs", "1", "--pairs", "1", "--warmup", "0.2", "--duration", "0.5"],
}


@pytest.mark.parametrize("bench", sorted(SMALL))
def test_the_benchmark_runs_and_reports(bench):
    if bench == "bench_cluster" and shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs it)")
    done = subprocess.run([sys.executable, f"bench/{bench}.py", *SMALL[bench], "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert isinstance(report, dict), done.stdout[-2000:]
    if bench == "bench_files":  # the held row (on by default) ran both its legs
        assert report["held"]["upload_s"] > 0 and report["held"]["fetch_s"] > 0, report
