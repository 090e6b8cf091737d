"""CPU training-step cost of CIPA (micro, tiny) against nnU-Net's own planned 2D PlainConvUNet.

The baseline comes from a real nnU-Net plan: a raw dataset of random 2-channel PNGs is written to a temp dir and
nnU-Net's fingerprint extraction + ExperimentPlanner run on it; its 2d configuration gives the patch size, the batch
size and (via get_network_from_plans) the network. Every model then does one warm-up and one timed training step
(forward + CE loss over all deep-supervision outputs + backward) at that patch and batch, each in a fresh
subprocess; peak memory is VmHWM minus the RSS once the model and inputs exist. FLOPs: one forward under
torch.utils.flop_counter.FlopCounterMode (matmul/conv only; the selective scan's elementwise work is not counted).
Usage: python benchmarks/bench_network.py [--size 256] [--cases 20] [--steps 5] [--presets micro tiny tiny-no-scan]
The step time is the median of ``--steps`` timed steps; one more step runs under torch.profiler to split it into the
selective scan (its autograd Functions), matmul + convolution kernels (forward and backward) and the rest.
A preset with the suffix ``-no-scan`` runs with the CPU scan replaced by a no-op of the same interface (zero outputs
and gradients of the right shapes): everything else in the step still runs, so its step time is what CIPA would cost
with an infinitely fast scan kernel, a lower bound for any CPU scan implementation. The suffix ``-checkpointing``
turns on the network's activation checkpointing (its time cost against the same preset without).
``--load`` measures every model twice in its worker, quiet and then while a competing busy process (one core's
worth, started and stopped by the worker) runs, and reports the median, p90 and max step of each and the slowdown
(loaded median / quiet median); use ``--steps 20`` or more, slow steps under load come and go. The competitor runs
in a Linux session of its own, like a program started from another terminal; ``--load same-session`` starts it in
the worker's session (a background job of the same shell). The CIPA workers run with the CPU thread policy of
nnunetv2_cipa.ops.cpu_threads, as training does; ``GOMP_SPINCOUNT=300000`` (libgomp's own default, which the policy
leaves in force) measures them without it.
Prints a markdown table and writes benchmarks/results/bench_network.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_network.json"
DATASET_ID = 987


def plan_vanilla(workdir: Path, size: int, cases: int) -> dict:
    """Write a random 2-channel PNG dataset, run nnU-Net fingerprint + planning, return the 2d configuration."""
    from PIL import Image

    raw = workdir / "nnUNet_raw" / f"Dataset{DATASET_ID}_BenchCIPA"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(cases):
        for channel in range(2):
            image = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(image).save(raw / "imagesTr" / f"case_{i:03d}_{channel:04d}.png")
        label = (rng.random((size, size)) < 0.1).astype(np.uint8)
        Image.fromarray(label).save(raw / "labelsTr" / f"case_{i:03d}.png")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "rgb_to_0_1", "1": "rgb_to_0_1"}, "labels": {"background": 0, "tumour": 1},
        "numTraining": cases, "file_ending": ".png"}))
    os.environ["nnUNet_raw"] = str(workdir / "nnUNet_raw")
    os.environ["nnUNet_preprocessed"] = str(workdir / "nnUNet_preprocessed")
    os.environ["nnUNet_results"] = str(workdir / "nnUNet_results")
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    extract_fingerprints([DATASET_ID], num_processes=1, show_progress_bar=False, verbose=False)
    plan_experiments([DATASET_ID])
    plans_file = workdir / "nnUNet_preprocessed" / f"Dataset{DATASET_ID}_BenchCIPA" / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    return plans["configurations"]["2d"]


def build_model(name: str, config: dict):
    """``vanilla`` (planned PlainConvUNet, DS on) or a CIPA preset (DS on), with the planned patch size."""
    if name == "vanilla":
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        arch = config["architecture"]
        return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                      arch["_kw_requires_import"], 2, 2, allow_init=True, deep_supervision=True)
    from nnunetv2_cipa.network import CIPA

    network = CIPA(2, config["patch_size"], preset=name.removesuffix("-no-scan").removesuffix("-checkpointing"),
                   deep_supervision=True)
    network.activation_checkpointing = name.endswith("-checkpointing")
    return network


def install_no_op_scan() -> None:
    """Replace the numba scan's autograd Function in this process by one that does no scan work: zero outputs and
    zero gradients of the same shapes (their zero fills, about 50 ms of a CIPA-tiny step, are all it costs)."""
    import torch

    from nnunetv2_cipa.ops import cpu_scan

    class NoOpScan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, delta_raw, A_t, delta_bias, B, C, positions, u_stride, softplus):
            ctx.save_for_backward(u, delta_raw, A_t, delta_bias, B, C)
            return torch.zeros_like(u)

        @staticmethod
        def backward(ctx, gy):
            return (*(torch.zeros_like(t) for t in ctx.saved_tensors), None, None, None)

    cpu_scan.NumbaScan = NoOpScan


def rss_kib(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process in KiB. VmHWM belongs to this process's
    address space (ru_maxrss would carry the planning parent's peak across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def deep_supervision_loss(outputs, target):
    """Sum of the cross-entropies of every output (a tensor or the deep-supervision list) against ``target``
    (b, H, W), nearest-resized to each output's size."""
    import torch.nn.functional as F

    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return sum(F.cross_entropy(o.float(), F.interpolate(target[:, None].float(), o.shape[2:]).long()[:, 0])
               for o in outputs)


def training_step(model, x, target) -> None:
    deep_supervision_loss(model(x), target).backward()
    model.zero_grad(set_to_none=True)


SCAN_EVENTS = ("NumbaScan", "NumbaScanBackward", "_ChunkedScan", "_ChunkedScanBackward", "NoOpScan",
               "NoOpScanBackward")
GEMM_EVENTS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::mkldnn_convolution",
               "aten::convolution_backward", "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward")


def profile_split(model, x, target) -> dict:
    """One training step under torch.profiler: its wall time and the self CPU time of the selective-scan autograd
    Functions and of the matmul / convolution kernels (forward and backward)."""
    import torch

    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        training_step(model, x, target)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    return {"profiled_step_s": wall,
            "scan_s": sum(e.self_cpu_time_total for e in events if e.key in SCAN_EVENTS) / 1e6,
            "gemm_conv_s": sum(e.self_cpu_time_total for e in events if e.key in GEMM_EVENTS) / 1e6}


BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass"
AUTOGROUP = Path("/proc/self/autogroup")


def busy_process(own_session: bool) -> subprocess.Popen:
    """A competing process that keeps one core busy until killed or until this process ends. ``own_session``: in a
    session of its own, like a program started from another terminal (with Linux's autogroup scheduling each session
    gets an equal share of the CPUs, whatever its number of threads), with this session's autogroup priority."""
    if not own_session:
        return subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    nice = AUTOGROUP.read_text().split()[-1] if AUTOGROUP.exists() else None

    def same_priority() -> None:
        if nice is not None:
            try:
                AUTOGROUP.write_text(nice)
            except OSError:  # a higher priority than the default needs CAP_SYS_NICE
                pass

    return subprocess.Popen([sys.executable, "-c", BUSY_LOOP], start_new_session=True, preexec_fn=same_priority)


def timed_steps(model, x, target, steps: int) -> dict:
    """``steps`` training steps: their wall times, the median / p90 / max, the CPU time of this process (all its
    threads; spinning threads show up here) per step and the fraction of steps that ended with libgomp's short waits
    on (cpu_threads.short_waits)."""
    from nnunetv2_cipa.ops.cpu_threads import short_waits

    times, short, cpu_before = [], 0, resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        start = time.perf_counter()
        training_step(model, x, target)
        times.append(time.perf_counter() - start)
        short += short_waits()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    ranked = sorted(times)
    return {"step_s": statistics.median(times), "p90_s": ranked[round(0.9 * (len(ranked) - 1))], "max_s": ranked[-1],
            "cpu_per_step_s": cpu / steps, "short_waits_fraction": short / steps, "step_times_s": times}


def worker(name: str, config: dict, steps: int, load: str | None) -> dict:
    """Measure one model in this (fresh) process; with ``load`` (own-session / same-session) also while a busy
    process competes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if name.endswith("-no-scan"):
        install_no_op_scan()
    policy = None
    if name != "vanilla":
        from nnunetv2_cipa.ops.cpu_threads import apply_cpu_thread_policy

        policy = apply_cpu_thread_policy().waits
    torch.manual_seed(0)
    model = build_model(name, config).train()
    batch, patch = config["batch_size"], config["patch_size"]
    x = torch.rand(batch, 2, *patch)
    target = torch.randint(0, 2, (batch, *patch))
    before = rss_kib()  # model, inputs and libraries resident; the peak after this is the steps' working memory
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    training_step(model, x, target)  # warm-up (numba/oneDNN compilation, allocator growth)
    quiet = timed_steps(model, x, target, steps)
    peak = rss_kib("VmHWM")
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()), **quiet,
           **profile_split(model, x, target), "peak_rss_increase_mib": max(peak - before, 0) / 1024,
           "peak_rss_mib": peak / 1024, "forward_gflop": counter.get_total_flops() / 1e9, "thread_policy": policy,
           "torch_threads": torch.get_num_threads()}
    if load:
        competitor = busy_process(load == "own-session")
        try:
            time.sleep(0.5)  # the competitor running before the first timed step
            row["loaded"] = timed_steps(model, x, target, steps)
        finally:
            competitor.kill()
            competitor.wait()
        row["load_slowdown"] = row["loaded"]["step_s"] / row["step_s"]
    return row


def print_load_table(rows: list[dict], load: str) -> None:
    """Quiet vs. loaded step statistics per model (``--load``)."""
    print(f"| model | quiet step: median / p90 / max (s) | with 1 busy process ({load}): median / p90 / max (s) "
          "| slowdown (median) | CPU s per step, quiet / loaded | steps with short waits, quiet / loaded |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        q, loaded = r, r["loaded"]
        print(f"| {model_label(r['model'])} | {q['step_s']:.2f} / {q['p90_s']:.2f} / {q['max_s']:.2f} | "
              f"{loaded['step_s']:.2f} / {loaded['p90_s']:.2f} / {loaded['max_s']:.2f} | "
              f"{r['load_slowdown']:.2f}x | {q['cpu_per_step_s']:.2f} / {loaded['cpu_per_step_s']:.2f} | "
              f"{q['short_waits_fraction']:.0%} / {loaded['short_waits_fraction']:.0%} |")


def model_label(name: str) -> str:
    label = "nnU-Net PlainConvUNet" if name == "vanilla" else f"CIPA-{name}"
    return label.replace("-no-scan", ", no-op scan").replace("-checkpointing", ", activation checkpointing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="side of the random PNG images (default 256)")
    parser.add_argument("--cases", type=int, default=20, help="number of training cases to plan on")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per model (median reported)")
    parser.add_argument("--load", nargs="?", const="own-session", choices=["own-session", "same-session"],
                        help="also time the steps while a competing busy process runs, in a session of its own "
                             "(default) or in this one's (use --steps 20 or more)")
    parser.add_argument("--presets", nargs="+", default=["micro", "tiny", "tiny-no-scan"],
                        help="CIPA presets to measure; the suffix -no-scan replaces the scan by a no-op, "
                             "-checkpointing turns on activation checkpointing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.config), args.steps, args.load)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        config = plan_vanilla(Path(tmp), args.size, args.cases)
    config = {k: config[k] for k in ("patch_size", "batch_size", "architecture")}
    rows = []
    for name in ["vanilla", *args.presets]:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--config", json.dumps(config),
                               "--steps", str(args.steps), *(["--load", args.load] if args.load else [])],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"measured {name}: {rows[-1]['step_s']:.2f} s", file=sys.stderr)
    base = rows[0]
    for row in rows:
        row["step_ratio_vs_vanilla"] = row["step_s"] / base["step_s"]
        row["flop_ratio_vs_vanilla"] = row["forward_gflop"] / base["forward_gflop"]
    print(f"\nCPU training step, planned 2d patch {config['patch_size']}, batch {config['batch_size']} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads default)\n")
    print("| model | params | fwd GFLOP | step (s) | step / vanilla | profiled step: scan / matmul+conv / rest (s) "
          "| peak RSS +MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        label = model_label(r["model"])
        rest = r["profiled_step_s"] - r["scan_s"] - r["gemm_conv_s"]
        print(f"| {label} | {r['params'] / 1e6:.2f} M | {r['forward_gflop']:.1f} | {r['step_s']:.2f} | "
              f"{r['step_ratio_vs_vanilla']:.2f}x | {r['scan_s']:.2f} / {r['gemm_conv_s']:.2f} / {rest:.2f} | "
              f"{r['peak_rss_increase_mib']:.0f} |")
    if args.load:
        print()
        print_load_table(rows, args.load)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    import torch

    from nnunetv2_cipa.modules.linear import cpu_linear_backend
    from nnunetv2_cipa.ops.backends import resolve_backend

    env = {k: os.environ[k] for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                      "NUMBA_THREADING_LAYER", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
           if k in os.environ}
    backend, linear = resolve_backend(None, torch.device("cpu")), cpu_linear_backend()
    policy = next((r["thread_policy"] for r in rows if r["thread_policy"]), None)
    print(f"\nscan backend: {backend}; CIPA linear layers: {linear}; thread env: {env or 'default'}; "
          f"CIPA's OpenMP waits: {policy}")
    RESULTS.write_text(json.dumps({"patch_size": config["patch_size"], "batch_size": config["batch_size"],
                                   "machine": platform.platform(), "cpu_count": os.cpu_count(),
                                   "scan_backend": backend, "linear_backend": linear, "thread_env": env,
                                   "load": args.load,
                                   "rows": rows}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
