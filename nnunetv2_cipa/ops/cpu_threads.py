"""How the CPU path shares the cores: one OpenMP pool for torch and the numba kernels, whose idle threads stop
spinning while other processes compete for the CPUs.

torch's Linux wheels run their parallel regions on GNU OpenMP (libgomp). An idle libgomp thread spins up to 300,000
times (milliseconds) before it sleeps: between regions and at each region's closing barrier. A CIPA training step
runs over a thousand short regions. On a quiet machine the spin is what makes them fast (always waiting passively is
much slower there: every region then wakes sleeping threads); when another process competes for the cores, a
spinning thread keeps the CPU that the thread it waits for needs, and a region can cost a scheduler time slice
instead of microseconds (docs/benchmarks.md, "CPU training under load"). So the waits follow the load.

libgomp reads OMP_WAIT_POLICY / GOMP_SPINCOUNT once, when torch is imported, but by its documented rule it spins
only 100 times whenever it manages more threads than there are CPUs. :func:`apply_cpu_thread_policy` starts a
watcher thread that looks, every PERIOD_S, at how long this process's threads were runnable but waiting for a CPU
(/proc/self/task/*/schedstat). With libgomp spinning that is near zero unless a process of our priority competes;
after PARK_LOOKS looks over PARK_WAIT the watcher parks one OpenMP team of (CPUs + 1) sleeping threads, which makes
libgomp's waits short. Sleeping threads wait for a CPU on every wake-up, so while parked the measure says nothing:
after PROBE_S the team is released for a new look. Thread counts, and so results, never change. A user's own
OMP_WAIT_POLICY or GOMP_SPINCOUNT is left in force.

numba's ``omp`` threading layer runs its kernels on the libgomp already loaded (torch's), i.e. on torch's pool; the
policy makes numba try that layer first (``tbb`` would start a second pool) unless NUMBA_THREADING_LAYER or
NUMBA_THREADING_LAYER_PRIORITY is set.
"""

from __future__ import annotations

import collections
import ctypes
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numba
import torch

USER_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
USER_NUMBA_VARIABLES = ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY")
NUMBA_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
PERIOD_S = 0.25  # between two looks
PARK_WAIT = 0.3  # CPU-seconds per second our threads waited for a CPU, with libgomp spinning, that park the team ...
PARK_LOOKS = 2  # ... when that many looks in a row exceed it
PROBE_S = 8.0  # time parked before the next looks with libgomp spinning


@dataclass(frozen=True)
class CpuThreadPolicy:
    """What :func:`apply_cpu_thread_policy` found. openmp: the file of torch's libgomp (None: another runtime, or no
    OpenMP); waits: how idle OpenMP threads wait, in words; adaptive: a watcher switches libgomp's short waits on
    and off (the state now: :func:`short_waits`)."""

    openmp: str | None
    waits: str
    adaptive: bool


def torch_libgomp() -> Path | None:
    """The GNU OpenMP library torch's parallel regions run on (Linux), None for another runtime (Intel / LLVM
    OpenMP, macOS, Windows) or a build without OpenMP."""
    if "OpenMP" not in torch.__config__.parallel_info() or not Path("/proc/self/maps").exists():
        return None
    torch_lib = Path(torch.__file__).parent / "lib"
    mapped = {Path(line.split()[-1]) for line in Path("/proc/self/maps").read_text().splitlines()
              if "libgomp" in line.rsplit("/", 1)[-1]}
    return min(mapped, key=lambda path: (path.parent != torch_lib, str(path)), default=None)


def runqueue_wait_s(skip: int) -> float:
    """Seconds this process's threads (but thread ``skip``) have spent runnable, waiting for a CPU."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != skip:
            try:
                total += int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[1])
            except (OSError, IndexError):  # the thread ended meanwhile
                pass
    return total / 1e9


def park_next(parked: bool, waits: list[float], parked_s: float) -> bool:
    """Whether the team should be parked after a look: ``waits`` the CPU-seconds per second our threads waited for a
    CPU in the looks since the last switch (newest last), ``parked_s`` the time parked so far. With libgomp
    spinning, PARK_LOOKS looks in a row over PARK_WAIT park; parked, the team is released after PROBE_S."""
    if parked:
        return parked_s < PROBE_S
    return len(waits) >= PARK_LOOKS and min(waits[-PARK_LOOKS:]) > PARK_WAIT


class ParkedTeam:
    """One OpenMP region of ``threads`` threads on ``library``, opened by its own thread and held open, asleep,
    until :meth:`release`: while it exists libgomp manages more threads than there are CPUs."""

    _no_op = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda data: None)  # the region's body

    def __init__(self, library: Path, threads: int):
        self._gomp = ctypes.CDLL(str(library))
        self._gomp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self.threads = threads
        self._release = threading.Event()
        started = threading.Event()
        self._thread = threading.Thread(target=self._hold, args=(started,), name="openmp-parked-team", daemon=True)
        self._thread.start()
        started.wait()

    def _hold(self, started: threading.Event) -> None:
        self._gomp.GOMP_parallel(ctypes.cast(self._no_op, ctypes.c_void_p), None, self.threads, 0)
        started.set()
        self._release.wait()  # returning ends the thread; libgomp then ends the team's threads

    def release(self) -> None:
        self._release.set()
        self._thread.join()


class _Watcher:
    """The thread that parks and releases the team as competing processes come and go."""

    def __init__(self, library: Path, cpus: int):
        self.library, self.cpus = library, cpus
        self.team: ParkedTeam | None = None
        self.switches = 0
        threading.Thread(target=self._run, name="openmp-wait-watcher", daemon=True).start()

    def _run(self) -> None:
        me = threading.get_native_id()
        before, start = runqueue_wait_s(me), time.perf_counter()
        switched, waits = start, collections.deque(maxlen=PARK_LOOKS)
        while True:
            time.sleep(PERIOD_S)
            now, end = runqueue_wait_s(me), time.perf_counter()
            waits.append((now - before) / (end - start))
            parked = self.team is not None
            if park_next(parked, list(waits), end - switched) != parked:
                if parked:
                    self.team.release()
                    self.team = None
                else:
                    self.team = ParkedTeam(self.library, self.cpus + 1)
                self.switches += 1
                waits.clear()
                now, end = runqueue_wait_s(me), time.perf_counter()
                switched = end
            before, start = now, end


_lock = threading.Lock()
_policy: CpuThreadPolicy | None = None
_watcher: _Watcher | None = None


def _prefer_numba_omp_layer() -> None:
    """numba's threading layer: torch's OpenMP pool first, unless the user chose one or numba already started."""
    from numba.np.ufunc import parallel

    if not parallel._is_initialized and not any(v in os.environ for v in USER_NUMBA_VARIABLES):
        numba.config.THREADING_LAYER_PRIORITY = list(NUMBA_LAYER_PRIORITY)


def apply_cpu_thread_policy() -> CpuThreadPolicy:
    """Once per process (later calls return the first result): numba's kernels on torch's OpenMP pool, and idle
    libgomp threads that spin only briefly while processes of our priority compete for the CPUs. Call it before the
    first numba kernel runs for the layer choice to take effect (the CPU scan calls it itself)."""
    global _policy, _watcher
    if _policy is not None:
        return _policy
    with _lock:
        if _policy is not None:
            return _policy
        library = torch_libgomp()
        if library is not None:  # elsewhere numba's omp layer would load a second OpenMP runtime next to torch's
            _prefer_numba_omp_layer()
        user = [f"{v}={os.environ[v]}" for v in USER_WAIT_VARIABLES if v in os.environ]
        if library is None:  # also every system without sched_getaffinity (macOS, Windows)
            _policy = CpuThreadPolicy(None, "not GNU OpenMP: the runtime's own wait policy", False)
        elif user:
            _policy = CpuThreadPolicy(str(library), f"as set by {', '.join(user)}", False)
        elif (cpus := len(os.sched_getaffinity(0))) < 2 or not Path("/proc/self/schedstat").exists():
            _policy = CpuThreadPolicy(str(library), "libgomp's own (one CPU, or no per-thread scheduler data)", False)
        else:
            _watcher = _Watcher(library, cpus)
            _policy = CpuThreadPolicy(str(library), "libgomp's spin; 100 spins while a competing process makes our "
                                                    "threads wait for the CPUs", True)
        return _policy


def short_waits() -> bool:
    """Whether libgomp's idle threads spin only briefly right now (the team is parked)."""
    return _watcher is not None and _watcher.team is not None


def switches() -> int:
    """How often the watcher has parked or released the team so far."""
    return 0 if _watcher is None else _watcher.switches
