"""CIPA under torch.compile as nnUNetTrainerCIPA compiles it (``nnUNet_compile=true``): compile time, step time
against eager, and the agreement of outputs and gradients with eager and with a float64 copy of the network.

The settings are the trainer's (``nnunetv2_cipa.training.compile_settings``: static shapes, the scans eager).
Two phases, as nnU-Net runs them: ``train`` (train mode, deep supervision, forward + backward of a cross-entropy over
every output) and ``predict`` (eval mode, no deep supervision, batch 1, no_grad, as nnU-Net's predictor). On CUDA
both run under fp16 autocast, as nnU-Net does. "first call" is the compiled model's first step (tracing and code
generation; the graph variants it compiled are counted), "step" the median of the following ones.
Usage: python benchmarks/bench_compile.py [--preset micro] [--patch 64] [--batch 2] [--device cpu|cuda]
       [--compile-backend inductor|aot_eager] [--steps 5] [--json PATH] [--no-float64]
Prints a markdown table and writes benchmarks/results/bench_compile.json (or --json).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_network import deep_supervision_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_compile.json"


def seconds(fn, device: str) -> float:
    begin = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - begin


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float | None:
    """max |a - b| / max |b| over all paired tensors together (a per-tensor ratio would be noise over noise for the
    gradients that are zero in exact arithmetic, e.g. of conv biases before a BatchNorm); None for no tensors."""
    if not b:
        return None
    scale = max(y.double().abs().max() for y in b).clamp_min(1e-30)
    return max((x.double() - y.double()).abs().max() for x, y in zip(a, b)).div(scale).item()


def phase(name: str, network, compiled, x: torch.Tensor, target: torch.Tensor, device: str, steps: int,
          float64: bool = True) -> dict:
    """Eager vs compiled timings and agreement of one phase (``train`` or ``predict``); with ``float64`` both are also
    compared with a float64 copy of the network (its scans in float32 where the backend computes in float32, as
    mamba-ssm's), so that a difference between them reads against float32's own error (None without)."""
    from torch._dynamo.utils import counters

    training = name == "train"
    network.train(training)
    network.deep_supervision = training

    def run(model, inputs, autocast: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Outputs and parameter gradients (none when predicting) of ``model`` (a compiled one: of its network)."""
        owner = getattr(model, "_orig_mod", model)
        owner.zero_grad(set_to_none=True)
        context = torch.autocast("cuda", dtype=torch.float16) if autocast else contextlib.nullcontext()
        with context, torch.set_grad_enabled(training):
            outputs = model(inputs)
            outputs = outputs if isinstance(outputs, list) else [outputs]
            if training:
                deep_supervision_loss(outputs, target).backward()
        grads = [p.grad for p in owner.parameters() if p.grad is not None] if training else []
        return [o.detach() for o in outputs], grads

    amp = device == "cuda"  # nnU-Net's fp16 autocast on CUDA
    if float64:
        exact_network = copy.deepcopy(network).double()  # the same weights and BatchNorm statistics as now
        exact = run(exact_network, x.double(), autocast=False)
        del exact_network
    else:
        exact = ([], [])
    torch.manual_seed(0)
    reference = run(network, x, amp)
    graphs_before = counters["stats"]["unique_graphs"]
    torch.manual_seed(0)
    result = []
    first_call = seconds(lambda: result.extend(run(compiled, x, amp)), device)
    graphs = counters["stats"]["unique_graphs"] - graphs_before
    eager = statistics.median(seconds(lambda: run(network, x, amp), device) for _ in range(steps))
    step = statistics.median(seconds(lambda: run(compiled, x, amp), device) for _ in range(steps))
    return {"phase": name, "batch": x.shape[0], "first_call_s": first_call, "graphs_compiled": graphs,
            "eager_step_s": eager, "compiled_step_s": step, "speedup": eager / step,
            "output_difference": relative_difference(result[0], reference[0]),
            "gradient_difference": relative_difference(result[1], reference[1]),
            "eager_output_error": relative_difference(reference[0], exact[0]),
            "compiled_output_error": relative_difference(result[0], exact[0]),
            "eager_gradient_error": relative_difference(reference[1], exact[1]),
            "compiled_gradient_error": relative_difference(result[1], exact[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--no-float64", action="store_true",
                        help="skip the float64 comparison (its training step needs about twice float32's memory)")
    args = parser.parse_args()

    from nnunetv2_cipa.network import CIPA
    from nnunetv2_cipa.ops.backends import resolve_backend
    from nnunetv2_cipa.training.compile_settings import use_static_shape_compile

    settings = use_static_shape_compile()
    torch.manual_seed(0)
    network = CIPA(2, (args.patch, args.patch), preset=args.preset, deep_supervision=True).to(args.device)
    compiled = torch.compile(network, backend=args.compile_backend)
    x = torch.rand(args.batch, 2, args.patch, args.patch, device=args.device)
    target = (torch.rand(args.batch, args.patch, args.patch, device=args.device) > 0.9).long()
    rows = [phase("train", network, compiled, x, target, args.device, args.steps, not args.no_float64),
            phase("predict", network, compiled, x[:1], target[:1], args.device, args.steps, not args.no_float64)]

    print(f"\nCIPA-{args.preset} at {args.patch} x {args.patch} under torch.compile (backend {args.compile_backend}, "
          f"{args.device}, scan backend {resolve_backend(None, torch.device(args.device))}, torch "
          f"{torch.__version__}); {settings}\n")
    print("| phase | batch | first call (compile) | graphs compiled | eager step | compiled step | eager / compiled "
          "| compiled vs eager: outputs / gradients | vs float64, eager: outputs / gradients | vs float64, compiled: "
          "outputs / gradients |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def pair(r: dict, outputs: str, gradients: str) -> str:
        return " / ".join("-" if r[key] is None else f"{r[key]:.1e}" for key in (outputs, gradients))

    for r in rows:
        print(f"| {r['phase']} | {r['batch']} | {r['first_call_s']:.1f} s | {r['graphs_compiled']} | "
              f"{r['eager_step_s'] * 1e3:.1f} ms | {r['compiled_step_s'] * 1e3:.1f} ms | {r['speedup']:.2f}x | "
              f"{pair(r, 'output_difference', 'gradient_difference')} | "
              f"{pair(r, 'eager_output_error', 'eager_gradient_error')} | "
              f"{pair(r, 'compiled_output_error', 'compiled_gradient_error')} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                                     "device": args.device, "preset": args.preset, "patch": args.patch,
                                     "compile_backend": args.compile_backend, "settings": settings, "rows": rows},
                                    indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
