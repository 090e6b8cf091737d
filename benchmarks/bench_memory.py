"""Per-sample training memory of CIPA and of nnU-Net's planned PlainConvUNet, measured on CPU, against the memory
model that the CIPA trainers use to choose their batch size (nnunetv2_cipa/training/memory_model.py).

Each cell is one forward + backward of a deep-supervision loss (cross-entropy over every output) in a fresh process,
at batch sizes b1 < b2: per-sample bytes = (peak(b2) - peak(b1)) / (b2 - b1), so the weights, their gradients and
the libraries cancel out. Peak = VmHWM after a warm-up step and a reset of the high-water mark (/proc/self/clear_refs),
minus the resident memory before the step; glibc is told to return every freed block of 64 KiB or more to the
system (MALLOC_MMAP_THRESHOLD_=65536), so the resident memory follows the live tensors.
16-bit rows run under CPU bfloat16 autocast, whose lower-precision op list (matmul, convolution, linear) matches
CUDA's fp16 autocast, with LayerNorm run in float32 as CUDA's autocast runs it (its float32 list; CPU autocast
would leave it in bfloat16, 2 bytes where CUDA saves 4): the same tensors are stored as on a GPU.
``--checkpointing on`` sets the network's ``activation_checkpointing``. Scan backends: ``cpu`` reads the map in
place; ``cpu-gathered`` runs the numba kernel behind the gathered path that the ``cuda`` (mamba-ssm) and ``torch``
backends take (the four scan orders copied and kept for backward, plus the kernel's chunk states), at CPU speed;
``torch`` is the pure-PyTorch scan itself (slow). ``--variants`` measures the trainer variants' networks too
(``noCRM``, ``noDCIM``: the memory model gives them the full network's coefficients; ``noMamba``: the in-place ones).
Usage: python benchmarks/bench_memory.py [--models tiny micro vanilla] [--sizes 256 512] [--backends cpu cpu-gathered]
       [--dtypes float32 bfloat16] [--checkpointing off on] [--variants full noCRM noDCIM noMamba] [--batches 1 2]
       [--json PATH]
       python benchmarks/bench_memory.py --gpu-table   (the batch the model gives CIPA-tiny on common GPUs)
Prints markdown tables and writes benchmarks/results/bench_memory.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from itertools import product
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_network import deep_supervision_loss, model_label, plan_vanilla, rss_kib  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_memory.json"
CIPA_MODELS = ("tiny", "small", "base", "micro")
GPU_MEMORY_GIB = (16, 24, 40, 48, 80, 141)  # common cards; free memory = this - CUDA_CONTEXT_GIB
CUDA_CONTEXT_GIB = 0.6  # the CUDA context, cuBLAS / cuDNN handles: not free for tensors
PLANNED_BATCH = 12  # nnU-Net's 2d plan for PCLT20K (512 x 512)
# CIPA's constructor arguments of the ablation trainers (nnUNetTrainerCIPA_<name>)
VARIANTS = {"full": {}, "noCRM": {"use_crm": False}, "noDCIM": {"use_dcim": False},
            "noMamba": {"token_mixer": "memoryless"}}


def build(model: str, size: int, vanilla_config: dict | None, checkpointing: bool, variant: str = "full"):
    """CIPA preset ``model`` as ``variant`` (deep supervision on) or the planned PlainConvUNet for ``size`` x
    ``size``."""
    if model == "vanilla":
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        arch = vanilla_config["architecture"]
        return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                      2, 2, allow_init=True, deep_supervision=True)
    from nnunetv2_cipa.network import CIPA

    network = CIPA(2, (size, size), preset=model, deep_supervision=True, **VARIANTS[variant])
    network.activation_checkpointing = checkpointing
    return network


def use_gathered_cpu_scan() -> None:
    """Make directional_scan gather the scan orders for the numba selective scan, as it does for cuda and torch."""
    import dataclasses

    from nnunetv2_cipa.ops import backends

    backends.BACKENDS["cpu"] = dataclasses.replace(backends.BACKENDS["cpu"], directional_scan=None)


def float32_layer_norms_under_autocast() -> None:
    """Make LayerNorm run in float32 under CPU autocast, as CUDA's autocast runs it: CIPA's one op on CUDA's
    float32 list that CPU autocast leaves in bfloat16 (the others it calls, exp and softplus, run inside the
    selective scan, in float32 either way)."""
    import torch
    import torch.nn.functional as F

    layer_norm = F.layer_norm

    def cuda_autocast_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        if torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return layer_norm(x.float(), normalized_shape, weight, bias, eps)
        return layer_norm(x, normalized_shape, weight, bias, eps)

    F.layer_norm = cuda_autocast_layer_norm


def worker(cell: dict) -> dict:
    """Peak working memory of one training step, measured in this (fresh) process."""
    import torch

    if cell["backend"] == "cpu-gathered":
        use_gathered_cpu_scan()
    if cell["dtype"] == "bfloat16":
        float32_layer_norms_under_autocast()

    torch.manual_seed(0)
    size, batch = cell["size"], cell["batch"]
    network = build(cell["model"], size, cell.get("vanilla_config"), cell["checkpointing"],
                    cell.get("variant", "full")).train()
    x = torch.rand(batch, 2, size, size)
    target = torch.randint(0, 2, (batch, size, size))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cell["dtype"] == "bfloat16")

    def step():
        with autocast:
            loss = deep_supervision_loss(network(x), target)
        loss.backward()
        network.zero_grad(set_to_none=True)

    step()  # warm-up: kernel compilation, allocator and thread-pool set-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = rss_kib()
    start = time.perf_counter()
    step()
    return {"peak_bytes": (rss_kib("VmHWM") - before) * 1024, "step_s": time.perf_counter() - start,
            "params": sum(p.numel() for p in network.parameters())}


def run_cell(cell: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               NNUNETV2_CIPA_SCAN_BACKEND=cell["backend"].removesuffix("-gathered"))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cell)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_memory worker failed for {cell}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(models, sizes, backends, dtypes, checkpointing, batches, variants=("full",)) -> list[dict]:
    """Every combination (vanilla: one backend, no checkpointing, no variants); per-sample bytes and the model's
    prediction."""
    from nnunetv2_cipa.modules.ss2d import TOKEN_MIXERS
    from nnunetv2_cipa.training.memory_model import activation_bytes_per_sample

    vanilla_configs = {}
    if "vanilla" in models:
        for size in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                vanilla_configs[size] = plan_vanilla(Path(tmp), size, cases=20)
    b1, b2 = batches
    rows = []
    for model, size, backend, dtype, ckpt, variant in product(models, sizes, backends, dtypes, checkpointing,
                                                              variants):
        if model == "vanilla" and (backend != backends[0] or ckpt or variant != variants[0]):
            continue
        cell = {"model": model, "size": size, "backend": backend, "dtype": dtype, "checkpointing": ckpt,
                "variant": "full" if model == "vanilla" else variant}
        if model == "vanilla":
            cell["vanilla_config"] = {"architecture": vanilla_configs[size]["architecture"]}
        peaks = [run_cell(dict(cell, batch=b)) for b in (b1, b2)]
        per_sample = (peaks[1]["peak_bytes"] - peaks[0]["peak_bytes"]) / (b2 - b1)
        row = {k: v for k, v in cell.items() if k != "vanilla_config"}
        row.update(per_sample_bytes=per_sample, bytes_per_pixel=per_sample / size ** 2,
                   peak_bytes={b: p["peak_bytes"] for b, p in zip((b1, b2), peaks)},
                   step_s={b: p["step_s"] for b, p in zip((b1, b2), peaks)}, params=peaks[0]["params"])
        if model in CIPA_MODELS:
            try:
                scans = TOKEN_MIXERS[VARIANTS[variant].get("token_mixer", "selective_scan")].runs_scans
                model_backend = ("cpu" if backend == "cpu" else "cuda") if scans else None
                predicted = activation_bytes_per_sample(model, (size, size), model_backend, dtype, ckpt)
                row.update(predicted_bytes=predicted, prediction_error=predicted / per_sample - 1)
            except ValueError as e:  # no coefficient for this preset (yet)
                row["prediction_note"] = str(e)
        if model == "vanilla":
            row["planned_batch_size"] = vanilla_configs[size]["batch_size"]
        rows.append(row)
        print(f"measured {row['model']} {row['variant']} {size} {backend} {dtype} ckpt={ckpt}: "
              f"{per_sample / 2 ** 30:.3f} GiB/sample", file=sys.stderr)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| model | patch | scan backend | activations | checkpointing | per sample (GiB) | bytes / pixel "
          "| model's prediction (GiB) | error |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        label = model_label(r["model"]) + ("" if r["variant"] == "full" else f" {r['variant']}")
        backend = "-" if r["model"] == "vanilla" else r["backend"]
        predicted = "-" if "predicted_bytes" not in r else f"{r['predicted_bytes'] / 2 ** 30:.3f}"
        error = "-" if "prediction_error" not in r else f"{r['prediction_error']:+.1%}"
        dtype = "16-bit (bf16 autocast)" if r["dtype"] == "bfloat16" else "float32"
        print(f"| {label} | {r['size']}x{r['size']} | {backend} | {dtype} | {'on' if r['checkpointing'] else 'off'} "
              f"| {r['per_sample_bytes'] / 2 ** 30:.3f} | {r['bytes_per_pixel']:.0f} | {predicted} | {error} |")


GPU_TABLE_BACKENDS = ("cuda", "triton")  # mamba-ssm's kernel (gathered scan orders), this package's (in place)
GPU_TABLE_SETTINGS = (("fp16", "float16", False), ("fp16_checkpointing", "float16", True),
                      ("float32", "float32", False))


def gpu_batch_table(preset: str = "tiny", patch=(512, 512)) -> list[dict]:
    """The batch the memory model gives CIPA-``preset`` out of nnU-Net's planned 12 on each of GPU_MEMORY_GIB, per
    GPU scan backend (GPU_TABLE_BACKENDS), under fp16 autocast without and with activation checkpointing, and in
    float32: rows {"gpu_gib", backend: {setting: batch}}."""
    import torch

    from nnunetv2_cipa.network import CIPA
    from nnunetv2_cipa.training.memory_model import choose_batch_size

    with torch.device("meta"):
        network = CIPA(2, patch, preset=preset, deep_supervision=True)
    parameters = sum(p.numel() for p in network.parameters())
    rows = []
    for gib in GPU_MEMORY_GIB:
        free = int((gib - CUDA_CONTEXT_GIB) * 2 ** 30)
        row = {"gpu_gib": gib}
        for backend in GPU_TABLE_BACKENDS:
            row[backend] = {label: choose_batch_size(PLANNED_BATCH, torch.device("cuda"), preset, patch, parameters,
                                                     backend, getattr(torch, dtype), checkpointing,
                                                     network.min_training_batch, free_bytes=free,
                                                     device_name=f"{gib} GB GPU").chosen
                            for label, dtype, checkpointing in GPU_TABLE_SETTINGS}
        rows.append(row)
    return rows


def gpu_batch_table_lines(rows: list[dict]) -> list[str]:
    """The markdown rows of the table (cells "cuda / triton"), as docs/usage.md prints them."""
    return [f"| {r['gpu_gib']} GB | "
            + " | ".join(" / ".join(str(r[backend][label]) for backend in GPU_TABLE_BACKENDS)
                         for label, _, _ in GPU_TABLE_SETTINGS) + " |" for r in rows]


def print_gpu_batch_table(rows: list[dict]) -> None:
    print(f"\nBatch of CIPA-tiny at 512 x 512 (planned {PLANNED_BATCH}) by the memory model, scan backend "
          f"{' / '.join(GPU_TABLE_BACKENDS)}, free memory = GPU memory - {CUDA_CONTEXT_GIB} GiB\n")
    print("| GPU memory | fp16 AMP (nnUNetTrainerCIPA, _bf16) | fp16 AMP + activation checkpointing | "
          "float32 (_noAMP) |")
    print("|---|---:|---:|---:|")
    print("\n".join(gpu_batch_table_lines(rows)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "micro", "vanilla"],
                        choices=[*CIPA_MODELS, "vanilla"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--backends", nargs="+", default=["cpu", "cpu-gathered"],
                        choices=["cpu", "cpu-gathered", "torch"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--variants", nargs="+", default=["full"], choices=list(VARIANTS))
    parser.add_argument("--batches", nargs=2, type=int, default=[1, 2], metavar=("B1", "B2"))
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--gpu-table", action="store_true", help="only print the GPU batch table of the memory model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.gpu_table:
        print_gpu_batch_table(gpu_batch_table())
        return
    if not args.batches[0] < args.batches[1]:
        parser.error("--batches needs B1 < B2")
    rows = measure(args.models, args.sizes, args.backends, args.dtypes, [c == "on" for c in args.checkpointing],
                   args.batches, args.variants)
    print(f"\nPer-sample training memory on CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores), batches {args.batches[0]} and {args.batches[1]}\n")
    print_table(rows)
    table = gpu_batch_table()
    print_gpu_batch_table(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": platform.platform(), "batches": args.batches, "rows": rows,
                                     "gpu_batch_table": table}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
