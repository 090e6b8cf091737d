"""GPU checks and figures on a CUDA machine (docs/benchmarks.md "GPU"): scan backends, fp16 AMP training steps at the
planned patch size against nnU-Net's PlainConvUNet, torch-vs-cuda agreement, and the memory model at the real batch.

Four parts, each model / backend in its own subprocess (fresh CUDA memory statistics; this process never initialises
CUDA, so the free memory the workers see is what a trainer would see), with ``cudnn.benchmark`` on as in
``nnUNetv2_train``:
- **agreement**: ``directional_scan`` and ``selective_scan`` of every usable backend on the device against the
  sequential reference on the CPU (float32, values and all gradients, max error relative to the largest value);
- **scan**: forward + backward time (CUDA events, median) and peak device memory of ``directional_scan`` at CIPA-tiny's
  four encoder-stage shapes for the planned patch (4 x (P/4)^2 x 192 up to 4 x (P/32)^2 x 1536), per backend, and
  for a backend that reads the scan orders in place (triton; cpu) again through gathered copies ("triton
  (gathered)"), which shows whether its in-place layout is the faster one on this device;
- **network**: ``--iterations`` fp16-AMP training steps (autocast + GradScaler + SGD with nnU-Net's momentum, deep
  supervision CE) of the planned PlainConvUNet and of CIPA-tiny with each backend, on random data: median step time,
  peak device memory, whether every loss was finite, and the largest |logit| difference between the CIPA-tiny
  backends (float32 eval forward, same weights);
- **memory**: CIPA-tiny fp16-AMP training steps (AdamW, as the trainer) at the batch the memory model picks for this
  device out of ``--planned-batch`` (PCLT20K's plan: 12), and at ``--planned-batch`` with activation checkpointing:
  step time, peak allocated / reserved device memory of the first step (cuDNN's algorithm search, library handles)
  and of the later ones, the model's predicted peak and its error against the larger. Then the same on each
  smaller GPU of ``--emulate-gib`` (default 24 GB): the caching allocator is capped at that card's memory less its
  CUDA context (``torch.cuda.set_per_process_memory_fraction``), the batch is the model's choice for the card without
  and with checkpointing, and an out-of-memory error there is what a user of that card would get. When both GPU
  kernels are usable (mamba-ssm's and the triton backend's, whose memory models differ), the first two rows again
  on this device with the one auto does not pick.

The plan comes from nnU-Net's planner, which the GPU machine may lack: ``--write-plan FILE`` runs it here (as
bench_network does, 2-channel random PNGs of ``--size``) and ``--plan FILE`` reads it there. ``--device cpu --quick``
with a plan of small images (``--write-plan ... --size 64``) runs every code path on a CPU (torch backend, no AMP,
CIPA-micro, 2 repeats; the cpu backend in place of cuda) to test this script.
Usage: python benchmarks/bench_gpu.py --write-plan .gpu/plan.json [--size 512]
       python benchmarks/bench_gpu.py --plan .gpu/plan.json [--iterations 20] [--planned-batch 12] [--quick]
              [--emulate-gib 24 ...] [--device cuda] [--out DIR]
Prints markdown tables and writes bench_gpu.json to --out (default benchmarks/results), rewritten after every part
(agreement, memory, network, scan: in that order) so that a run stopped midway keeps the parts it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
STAGE_DIMS = (192, 384, 768, 1536)  # CIPA-tiny's SS2D d_inner per encoder stage (2 x 96, 192, 384, 768)


def scan_backends(device: str) -> list[str]:
    """The compiled backends for ``device`` first (cuda and triton, or cpu with numba) when usable, then torch."""
    from nnunetv2_cipa.ops.backends import BACKENDS, available_backends

    return [b for b in available_backends() if BACKENDS[b].device_type in (device, None) and b != "reference"]


def agreement(backend: str, device: str) -> dict:
    """Max error of ``backend`` on ``device`` against the CPU reference, relative to the reference's largest value."""
    import torch

    from bench_scan import make_directional_inputs, make_inputs, scan

    def run(op, inputs, target, name):
        moved = [t.detach().to(target).requires_grad_() for t in inputs]
        y = scan(moved, name, directional=op == "directional")
        weight = torch.cos(torch.arange(y.numel(), device=target, dtype=y.dtype)).view_as(y)
        grads = torch.autograd.grad((y * weight).sum(), moved)
        return [t.detach().cpu() for t in (y, *grads)]

    names = ("y", "u", "delta", "A", "B", "C", "D", "delta_bias")
    out = {}
    for op, make in (("directional", make_directional_inputs), ("selective", make_inputs)):
        inputs = make(2, 4 * 32, 256, 4)  # 16 x 16 map, 4 directions x 32 channels
        expected = run(op, inputs, "cpu", "reference")
        got = run(op, inputs, device, backend)
        out[op] = {n: float((g - e).abs().max() / e.abs().max().clamp_min(1e-30))
                   for n, g, e in zip(names, got, expected)}
    return out


def scan_timing(backend: str, device: str, patch: int, quick: bool, gather: bool) -> list[dict]:
    """fwd + bwd of directional_scan at CIPA-tiny's encoder-stage shapes (siamese batch 4), ``gather``: through
    gathered copies."""
    from bench_scan import make_directional_inputs, scan

    rows = []
    for stage, dim in enumerate(STAGE_DIMS):
        side = patch // (4 * 2 ** stage)
        inputs = [t.detach().to(device).requires_grad_() for t in make_directional_inputs(4, 4 * dim, side * side, 4)]

        def step():
            scan(inputs, backend, directional=True, gather=gather).sum().backward()

        seconds = timed(step, device, repeats=2 if quick else 10)["step_s"]
        rows.append({"shape": f"4 x {side}x{side} x {dim}", "seconds": seconds, **memory(device)})
    return rows


def timed(step, device: str, repeats: int) -> dict:
    """first_step_s: seconds of the warm-up call; step_s: median seconds of ``step`` after it (CUDA events on a GPU,
    with fresh peak-memory statistics). The warm-up includes one-off work (kernel compiles, the backends' checks,
    cuDNN's algorithm search, the backward thread's cuBLAS handle), whose memory on a GPU is first_step_peak_gib /
    first_step_reserved_gib."""
    import torch

    begin = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    result = {"first_step_s": time.perf_counter() - begin}
    if device == "cuda":
        result.update(first_step_peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                      first_step_reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30)
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
    return result | {"step_s": statistics.median(times)}


def memory(device: str) -> dict:
    import torch

    return {"peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30} if device == "cuda" else {}


def amp_training_step(model, optimizer, scaler, x, target, device: str, clip: float | None = None) -> float:
    """One fp16-autocast (CUDA only) step of the deep-supervision CE loss with GradScaler; returns the loss."""
    import torch

    from bench_network import deep_supervision_loss

    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
        loss = deep_supervision_loss(model(x), target)
    scaler.scale(loss).backward()
    if clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    return float(loss)


def network(name: str, backend: str | None, config: dict, device: str, iterations: int) -> dict:
    """fp16-AMP training steps (AMP only on CUDA) of ``name`` with the scan backend ``backend``; also the float32
    eval logits of a fixed input, saved for the cross-backend comparison."""
    import torch

    from bench_network import build_model

    if backend:
        os.environ["NNUNETV2_CIPA_SCAN_BACKEND"] = backend
    torch.manual_seed(0)
    model = build_model(name, config).to(device).train()
    batch, patch = config["batch_size"], config["patch_size"]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = torch.amp.GradScaler(device, enabled=device == "cuda")
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 2, *patch, generator=gen).to(device)
    target = (x[:, 1] > 0.7).long()  # a learnable target: bright PET
    losses = []

    def step():
        losses.append(amp_training_step(model, optimizer, scaler, x, target, device, clip=12))

    row = {"model": name, "backend": backend, **timed(step, device, repeats=iterations), **memory(device),
           "params": sum(p.numel() for p in model.parameters()), "losses_finite": all(map(math.isfinite, losses)),
           "first_loss": losses[0], "last_loss": losses[-1]}
    if name != "vanilla":
        torch.manual_seed(0)
        fresh = build_model(name, config).to(device).eval()
        with torch.no_grad():
            logits = fresh(torch.rand(1, 2, *patch, generator=gen).to(device))
        row["logits_file"] = str(Path(tempfile.gettempdir()) / f"bench_gpu_logits_{name}_{backend}.pt")
        torch.save((logits[0] if isinstance(logits, (list, tuple)) else logits).cpu(), row["logits_file"])
    return row


def emulate_gpu(memory_gib: float, device: str) -> int:
    """Cap the caching allocator at what a GPU of ``memory_gib`` GB leaves for tensors (its memory less the CUDA
    context, as in bench_memory's GPU table) and return that cap in bytes; only the cap's arithmetic on a CPU."""
    import torch

    from bench_memory import CUDA_CONTEXT_GIB

    cap = int((memory_gib - CUDA_CONTEXT_GIB) * 2 ** 30)
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        if cap >= total:
            raise ValueError(f"--emulate-gib {memory_gib}: not smaller than this GPU ({total / 2 ** 30:.1f} GiB)")
        torch.cuda.set_per_process_memory_fraction(cap / total)
    return cap


def memory_row(preset: str, config: dict, device: str, batch: int | None, planned: int, checkpointing: bool,
               iterations: int, memory_gib: float | None = None, backend: str | None = None) -> dict:
    """AMP training steps of CIPA ``preset`` at ``batch`` (None: the memory model's choice out of ``planned``)
    against the memory model's predicted peak, on this device or on an emulated GPU of ``memory_gib`` GB, with scan
    ``backend`` (None: auto's choice)."""
    import torch

    from nnunetv2_cipa.network import CIPA
    from nnunetv2_cipa.ops.backends import resolve_backend
    from nnunetv2_cipa.training.cipa_trainer import out_of_memory_text
    from nnunetv2_cipa.training.memory_model import (activation_bytes_per_sample, choose_batch_size,
                                                     scan_workspace_bytes, training_peak_bytes)

    patch = tuple(config["patch_size"])
    cap = emulate_gpu(memory_gib, device) if memory_gib is not None else None
    torch.manual_seed(0)
    model = CIPA(2, patch, preset=preset, deep_supervision=True).to(device).train()
    model.activation_checkpointing = checkpointing
    parameters = sum(p.numel() for p in model.parameters())
    backend = resolve_backend(backend, torch.device(device))
    os.environ["NNUNETV2_CIPA_SCAN_BACKEND"] = backend
    dtype = torch.float16 if device == "cuda" else torch.float32
    row = {"preset": preset, "backend": backend, "checkpointing": checkpointing, "planned_batch": planned,
           "gpu_gib": memory_gib}
    if batch is None:
        # free memory as the trainer sees it: before the network is on the device (an emulated card's is its cap)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        free = cap if cap is not None else torch.cuda.mem_get_info()[0] + weights if device == "cuda" else None
        # an emulated GPU's choice is a GPU's choice, also when this script is tested on a CPU
        chooser = torch.device("cuda" if cap is not None else device)
        choice = choose_batch_size(planned, chooser, preset, patch, parameters, backend, dtype, checkpointing,
                                   model.min_training_batch, free_bytes=free,
                                   device_name=f"{memory_gib:g} GB GPU" if cap is not None else None)
        batch, row["choice"] = choice.chosen, choice.reason
    per_sample = activation_bytes_per_sample(preset, patch, backend, dtype, checkpointing)
    predicted = training_peak_bytes(batch, parameters, per_sample, scan_workspace_bytes(backend, device))
    row.update(batch=batch, predicted_gib=predicted / 2 ** 30)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4)
    scaler = torch.amp.GradScaler(device, enabled=device == "cuda")
    x = torch.rand(batch, 2, *patch, device=device)
    target = (x[:, 1] > 0.7).long()

    def step():
        amp_training_step(model, optimizer, scaler, x, target, device)

    try:
        row.update(timed(step, device, repeats=iterations))
    except RuntimeError as e:  # the allocator's out-of-memory error, or cuBLAS / cuDNN failing to allocate
        row["out_of_memory"] = out_of_memory_text(e)
        if row["out_of_memory"] is None:
            raise
        return row
    if device == "cuda":
        row.update(peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                   reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30)
        # against the larger of the first step's peak and the later steps': a training must fit both
        row["prediction_error"] = row["predicted_gib"] / max(row["peak_gib"], row["first_step_peak_gib"]) - 1
    return row


def worker(args) -> dict:
    import torch

    config = json.loads(Path(args.plan).read_text())
    patch = config["patch_size"]
    torch.backends.cudnn.benchmark = args.device == "cuda"  # as nnU-Net's nnUNetv2_train sets it on a GPU
    if args.worker == "info":  # here, not in the parent: a CUDA context there would shrink the children's free memory
        return {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "backends": scan_backends(args.device)}
    if args.worker == "agreement":
        return agreement(args.backend, args.device)
    if args.worker in ("scan", "scan-gathered"):
        return {"rows": scan_timing(args.backend, args.device, patch[0], args.quick, args.worker == "scan-gathered")}
    if args.worker.startswith("memory"):
        preset = "micro" if args.quick else "tiny"
        checkpointing = args.worker == "memory-checkpointing"
        # on the device itself: the planned batch with checkpointing; on an emulated GPU: the model's choice
        batch = args.planned_batch if checkpointing and args.gpu_gib is None else None
        return memory_row(preset, config, args.device, batch, args.planned_batch, checkpointing, args.iterations,
                          args.gpu_gib, args.backend)
    return network(args.worker, args.backend, config, args.device, args.iterations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", help="2d configuration JSON written by --write-plan")
    parser.add_argument("--write-plan", help="run nnU-Net's planner (needs nnunetv2) and save the 2d configuration")
    parser.add_argument("--size", type=int, default=512, help="image side for --write-plan (default 512)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--iterations", type=int, default=20, help="timed AMP training steps per model")
    parser.add_argument("--planned-batch", type=int, default=12,
                        help="batch nnU-Net plans for PCLT20K at 512 x 512 (the memory rows' reference; default 12)")
    parser.add_argument("--emulate-gib", nargs="*", type=float, default=[24], metavar="GB",
                        help="memory rows also on these smaller GPUs, emulated by capping the allocator (default 24)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and models (tests this script on a CPU)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for bench_gpu.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--gpu-gib", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_plan:
        from bench_network import plan_vanilla

        with tempfile.TemporaryDirectory() as tmp:
            config = plan_vanilla(Path(tmp), args.size, 20)
        config = {k: config[k] for k in ("patch_size", "batch_size", "architecture")}
        Path(args.write_plan).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_plan).write_text(json.dumps(config, indent=2))
        print(f"wrote {args.write_plan}: patch {config['patch_size']}, batch {config['batch_size']}")
        return
    if not args.plan:
        parser.error("--plan (or --write-plan) is required")
    if args.worker:
        print(json.dumps(worker(args)))
        return

    def sub(worker_name, backend=None, gpu_gib=None):
        command = [sys.executable, __file__, "--plan", args.plan, "--device", args.device, "--worker", worker_name,
                   "--iterations", str(2 if args.quick else args.iterations), "--planned-batch",
                   str(args.planned_batch)] + (["--quick"] if args.quick else [])
        command += (["--backend", backend] if backend else []) + (["--gpu-gib", str(gpu_gib)] if gpu_gib else [])
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode:
            print(f"{worker_name} ({backend or gpu_gib or ''}) failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return {"error": proc.stderr[-3000:]}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    import torch  # never initialises CUDA in this process: the workers measure the GPU's free memory

    from nnunetv2_cipa.ops.backends import BACKENDS

    info = sub("info")
    if "error" in info:
        sys.exit("bench_gpu: could not query the device and its scan backends (see above)")
    backends = info["backends"]
    preset = "micro" if args.quick else "tiny"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": info["device"], "torch": torch.__version__, "backends": backends,
              "plan": json.loads(Path(args.plan).read_text())}

    def save(part, value):
        report[part] = value
        (out / "bench_gpu.json").write_text(json.dumps(report, indent=2))
        print(f"{part}: done", flush=True)

    save("agreement", {b: sub("agreement", b) for b in backends})
    # auto's backend on this card and the emulated ones; the other GPU kernel on this card (auto takes cuda before
    # triton; their memory models differ: the triton kernels keep no gathered copies)
    other_gpu_kernels = [b for b in ("cuda", "triton") if b in backends][1:]
    save("memory", [sub(name, gpu_gib=gib) for gib in (None, *args.emulate_gib)
                    for name in ("memory", "memory-checkpointing")]
         + [sub(name, backend=b) for b in other_gpu_kernels for name in ("memory", "memory-checkpointing")])
    network_rows = [sub("vanilla")] + [sub(preset, b) for b in backends]
    cipa = [r for r in network_rows if "logits_file" in r]
    if len(cipa) > 1:
        reference = torch.load(cipa[0]["logits_file"])
        for row in cipa[1:]:
            row["max_logit_diff_vs_" + cipa[0]["backend"]] = float((torch.load(row["logits_file"]) - reference)
                                                                   .abs().max())
    save("network", network_rows)
    save("scan", {b: sub("scan", b) for b in backends}
         | {f"{b} (gathered)": sub("scan-gathered", b) for b in backends if BACKENDS[b].directional_scan})
    print_tables(report)
    print(f"\nwrote {out / 'bench_gpu.json'}")


def peak(row: dict) -> str:
    return f"{row['peak_gib']:.2f} GiB" if "peak_gib" in row else "-"


def print_tables(report: dict) -> None:
    print(f"\n{report['device']}, torch {report['torch']}, scan backends {report['backends']}, plan patch "
          f"{report['plan']['patch_size']} batch {report['plan']['batch_size']}\n")
    print("| backend | op | max rel. error of y / worst gradient (name) |\n|---|---|---|")
    for backend, result in report["agreement"].items():
        for op, errors in result.items():
            if op == "error":
                print(f"| {backend} | - | failed |")
                continue
            worst = max((n for n in errors if n != "y"), key=errors.get)
            print(f"| {backend} | {op} | {errors['y']:.1e} / {errors[worst]:.1e} ({worst}) |")
    print("\n| backend | directional_scan shape | fwd+bwd | peak |\n|---|---|---:|---:|")
    for backend, result in report["scan"].items():
        for row in result.get("rows", []):
            print(f"| {backend} | {row['shape']} | {row['seconds'] * 1e3:.2f} ms | {peak(row)} |")
    print("\n| model | scan backend | first step | AMP step | peak | losses finite | first -> last loss | "
          "logits vs first backend |\n|---|---|---:|---:|---:|---|---|---:|")
    for row in report["network"]:
        if "error" in row:
            print("| failed | | | | | | | |")
            continue
        diff = next((f"{v:.1e}" for k, v in row.items() if k.startswith("max_logit_diff")), "-")
        print(f"| {row['model']} | {row['backend'] or '-'} | {row['first_step_s']:.1f} s | "
              f"{row['step_s'] * 1e3:.1f} ms | {peak(row)} | {row['losses_finite']} | {row['first_loss']:.3f} -> "
              f"{row['last_loss']:.3f} | {diff} |")
    print("\n| CIPA memory | GPU | backend | batch (planned) | checkpointing | AMP step | peak allocated / reserved "
          "(first step) | "
          "predicted | error |\n|---|---|---|---|---|---:|---:|---:|---:|")
    for row in report["memory"]:
        if "error" in row:
            print("| failed | | | | | | | | |")
            continue
        gpu = f"{row['gpu_gib']:g} GB (emulated)" if row["gpu_gib"] else "this one"
        step = "OOM" if "out_of_memory" in row else f"{row['step_s'] * 1e3:.0f} ms"
        measured = (f"{row['peak_gib']:.2f} / {row['reserved_gib']:.2f} GiB ({row['first_step_peak_gib']:.2f} / "
                    f"{row['first_step_reserved_gib']:.2f})" if "peak_gib" in row else "-")
        error = f"{row['prediction_error']:+.1%}" if "prediction_error" in row else "-"
        print(f"| {row['preset']} | {gpu} | {row['backend']} | {row['batch']} ({row['planned_batch']}) | "
              f"{'on' if row['checkpointing'] else 'off'} | {step} | {measured} | {row['predicted_gib']:.2f} GiB | "
              f"{error} |")


if __name__ == "__main__":
    main()
