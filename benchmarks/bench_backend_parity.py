"""CIPA forward + backward with every scan through one backend, against the same network on the ``reference``
backend (the sequential loop): the largest logit difference and, per parameter, the largest gradient difference
relative to the largest value of that gradient. Same weights, same input, float64 by default.

``--device cpu --backend triton`` runs the triton backend's kernels on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1 is set here before triton is imported, and the backend's row is made device-agnostic): slow
(minutes for CIPA-micro at 32 x 32), which is why this is a benchmark and not a test. On a GPU, ``--device cuda``
compares the GPU backend with the reference loop on the same GPU.
Parameters whose reference gradient is rounding noise (largest value below --noise, relative to the largest
gradient of the network; the convolution biases in front of BatchNorm, whose true gradient is 0) are listed apart.
Usage: python benchmarks/bench_backend_parity.py [--backend triton] [--device cpu] [--preset micro] [--patch 32]
       [--batch 2] [--dtype float64] [--json PATH]
Prints a markdown table and writes benchmarks/results/bench_backend_parity.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_backend_parity.json"


def logits_and_gradients(network, x, backend: str):
    """The logits of ``x`` (no deep supervision) and the gradient of a fixed weighting of them for every parameter
    that gets one."""
    import torch

    from nnunetv2_cipa.ops import backends

    os.environ[backends.ENV_VAR] = backend
    torch.manual_seed(1)  # the same drop-path draws in every run (the presets above micro drop paths in training)
    network.zero_grad(set_to_none=True)
    logits = network(x)
    weight = torch.cos(torch.arange(logits.numel(), dtype=logits.dtype, device=logits.device)).view_as(logits)
    (logits * weight).sum().backward()
    return logits.detach(), {name: p.grad.detach().clone() for name, p in network.named_parameters()
                             if p.grad is not None}  # the deep-supervision heads are unused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    parser.add_argument("--noise", type=float, default=1e-10)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.backend == "triton" and args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    from nnunetv2_cipa.network import CIPA
    from nnunetv2_cipa.ops import backends

    if args.backend == "triton" and args.device == "cpu":
        from nnunetv2_cipa.ops import triton_scan

        backends.BACKENDS["triton"] = backends.ScanBackend(
            None, lambda device: None, lambda *a: backends.scan_with_core(triton_scan.triton_selective_scan, *a),
            triton_scan.triton_directional_scan)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    network = CIPA(2, (args.patch, args.patch), preset=args.preset).to(args.device, dtype).train()
    x = torch.randn(args.batch, 2, args.patch, args.patch, device=args.device, dtype=dtype)
    begin = time.perf_counter()
    logits, grads = logits_and_gradients(network, x, args.backend)
    seconds = time.perf_counter() - begin
    ref_logits, ref_grads = logits_and_gradients(network, x, "reference")

    largest = max(g.abs().max().item() for g in ref_grads.values())
    errors, noise = {}, {}
    for name, expected in ref_grads.items():
        scale = expected.abs().max().item()
        difference = (grads[name] - expected).abs().max().item()
        if scale < args.noise * largest:
            noise[name] = {"reference_max": scale, "backend_max": grads[name].abs().max().item()}
        else:
            errors[name] = difference / scale
    worst = max(errors, key=errors.get)
    logit_error = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    print(f"CIPA-{args.preset}, {args.patch} x {args.patch}, batch {args.batch}, {args.dtype}, {args.device}: "
          f"{args.backend} against reference (commit {commit}; {args.backend} forward + backward {seconds:.0f} s)\n")
    print("| compared | largest relative difference |\n|---|---:|")
    print(f"| logits | {logit_error:.1e} |")
    print(f"| parameter gradients ({len(errors)}), worst: {worst} | {errors[worst]:.1e} |")
    if noise:
        largest_noise = max(max(v.values()) for v in noise.values())
        print(f"| parameters whose reference gradient is rounding noise ({len(noise)}; list in the JSON): largest "
              f"value on either side | {largest_noise:.1e} (absolute) |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "machine": platform.platform(), "commit": commit, "args": {k: str(v) for k, v in vars(args).items()},
        "seconds": seconds, "logits": logit_error, "gradients": errors, "noise": noise}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
