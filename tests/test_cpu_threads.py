"""The CPU thread policy (ops.cpu_threads), run in fresh processes since the policy is process-wide: idle OpenMP
threads stop spinning while busy processes compete, numba's kernels start no pool of their own, a user's wait policy
and torch's thread count hold; without GNU OpenMP (macOS, Windows) the runtime's own policy, set up in process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from nnunetv2_cipa.ops.cpu_threads import PARK_LOOKS, PARK_WAIT, PROBE_S, park_next

needs_linux_smp = pytest.mark.skipif(
    importlib.util.find_spec("numba") is None or not os.path.exists("/proc/self/schedstat")
    or len(os.sched_getaffinity(0)) < 2, reason="needs numba, Linux scheduler statistics and 2 CPUs")

COMMON = """
import json, os, resource, subprocess, sys, time
import torch
from nnunetv2_cipa.ops import cpu_threads
from nnunetv2_cipa.ops.selective_scan import selective_scan

def threads():
    return len(os.listdir("/proc/self/task"))

def scan():
    u = torch.randn(2, 32, 64, requires_grad=True)
    selective_scan(u, torch.rand(2, 32, 64), -torch.rand(32, 4), torch.randn(2, 2, 4, 64),
                   torch.randn(2, 2, 4, 64), backend="cpu").sum().backward()

x = torch.ones(1 << 16)
"""

UNDER_LOAD = COMMON + """
def idle_cpu_ms():  # CPU time per 10 ms gap after a short parallel region
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = usage.ru_utime + usage.ru_stime
    for _ in range(40):
        x.add_(1)
        time.sleep(0.01)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime - start) / 40 * 1e3

policy = cpu_threads.apply_cpu_thread_policy()
scan()
loop = "import os\\nparent = os.getppid()\\nwhile os.getppid() == parent:\\n    pass"
busy = [subprocess.Popen([sys.executable, "-c", loop]) for _ in os.sched_getaffinity(0)]
try:
    deadline = time.perf_counter() + 30
    while not cpu_threads.short_waits() and time.perf_counter() < deadline:
        for _ in range(100):
            x.add_(1)  # our team at work, competing with the busy processes
    parked = cpu_threads.short_waits()
    idle = idle_cpu_ms()
finally:
    for process in busy:
        process.kill()
print(json.dumps({"adaptive": policy.adaptive, "parked": parked, "idle_cpu_ms": idle}))
"""

USER_SETTINGS = COMMON + """
torch.set_num_threads(1)
scan()  # numba's OpenMP launch sets the pool to NUMBA_NUM_THREADS (2 or more) threads
kept = torch.get_num_threads()
torch.set_num_threads(2)
x.add_(1)  # torch's pool now has its worker thread
before = threads()
scan()
import numba
print(json.dumps({"policy": cpu_threads.apply_cpu_thread_policy().waits, "torch_threads": kept,
                  "new_threads": threads() - before, "layer": numba.threading_layer()}))
"""


def run_probe(script: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                          "NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY")}
    result = subprocess.run([sys.executable, "-c", script], env={**clean, **env}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_park_next_decisions():
    over, under = PARK_WAIT + 0.2, PARK_WAIT - 0.2
    assert not park_next(False, [over] * (PARK_LOOKS - 1), 0.0)  # one high look is not yet competition
    assert park_next(False, [under] + [over] * PARK_LOOKS, 0.0)
    assert not park_next(False, [over] * (PARK_LOOKS - 1) + [under], 0.0)
    assert park_next(True, [], PROBE_S - 0.1) and not park_next(True, [], PROBE_S)  # released for a new look


def test_policy_without_gnu_openmp_or_sched_getaffinity(monkeypatch):
    """macOS and Windows have neither torch's libgomp nor os.sched_getaffinity: the policy is the runtime's own and
    asks for neither (it is process-wide: the test's own is put back afterwards)."""
    from nnunetv2_cipa.ops import cpu_threads

    monkeypatch.setattr(cpu_threads, "_policy", None)
    monkeypatch.setattr(cpu_threads, "torch_libgomp", lambda: None)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    policy = cpu_threads.apply_cpu_thread_policy()
    assert policy.openmp is None and not policy.adaptive and "runtime's own" in policy.waits


@needs_linux_smp
def test_idle_openmp_threads_sleep_while_busy_processes_compete():
    probe = run_probe(UNDER_LOAD)
    if not probe["adaptive"]:
        pytest.skip("torch does not run on GNU OpenMP here")
    assert probe["parked"]
    # libgomp's default spin (300,000 rounds) burns milliseconds of CPU after every region; 100 rounds do not
    assert probe["idle_cpu_ms"] < 1.0, probe


@needs_linux_smp
def test_user_wait_policy_thread_count_and_one_pool():
    probe = run_probe(USER_SETTINGS, GOMP_SPINCOUNT="300000")
    assert probe["policy"] == "as set by GOMP_SPINCOUNT=300000"
    assert probe["torch_threads"] == 1  # numba's launch did not change it
    assert probe["layer"] == "omp" and probe["new_threads"] == 0  # the kernels ran on torch's OpenMP pool
