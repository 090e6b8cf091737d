"""CPU cost of the selective scan: forward + backward time and peak memory per backend, against mambapy's pscan.

Shapes are CIPA's SS2D scans (batch 2, dim = 4 directions x 2C, N = 16, B/C grouped per direction) at L = 1024, 4096,
16384, plus small ungrouped shapes (dim 64 / 128, L = 1024) where the sequential reference is also timed. Every
(shape, method) runs in a fresh subprocess: one warm-up on a tiny input (numba loads or compiles its kernels there),
then `repeats` timed forward + backward passes (median reported); peak memory is ru_maxrss after the timed passes minus
ru_maxrss before them. pscan is wrapped the way mambapy's mamba.py builds its selective scan (exp(delta A) and
delta B u materialised as (B, L, D, N)); cells whose estimated memory exceeds --max-gb are skipped with a note.
``cpu`` gets u, delta as contiguous (B, dim, L) tensors (the kernel then copies them channels-innermost); ``cpu-cl``
gets them as views of channels-innermost memory. ``cpu-dir`` is ``directional_scan``, the op SS2D calls: the groups
are the 4 cross-scan orders of one shared (B, L, dim / 4) map (L = side**2), summed back in position order (1 order
for the ungrouped rows); the same number of state updates, without the 4 per-direction copies.
Usage: python benchmarks/bench_scan.py [--quick] [--max-gb 16]
Prints a markdown table and writes benchmarks/results/bench_scan.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_scan.json"
N_STATE = 16
# (batch, dim, L, groups, repeats)
SMALL = [(2, 64, 1024, 1, 5), (2, 128, 1024, 1, 5)]
CIPA = [(2, dim, length, 4, {1024: 5, 4096: 3, 16384: 1}[length])
        for length in (1024, 4096, 16384) for dim in (768, 1536)]
QUICK = SMALL + [(2, 768, 1024, 4, 3), (2, 768, 4096, 4, 1)]
METHODS = ("cpu", "cpu-cl", "cpu-dir", "torch", "pscan", "reference")
PSCAN_TENSORS = 8  # (B, L, D, N) float32 tensors alive at pscan's peak (forward inputs, states, backward buffers)


def make_inputs(batch, dim, length, groups, seed=0):
    """float32 u, delta, A, B, C, D, delta_bias with SS2D's shapes, contiguous, all requiring grad."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    shape_bc = (batch, groups, N_STATE, length)
    tensors = (torch.randn(batch, dim, length, generator=gen), torch.randn(batch, dim, length, generator=gen) * 0.5,
               -torch.arange(1, N_STATE + 1.0).repeat(dim, 1), torch.randn(*shape_bc, generator=gen),
               torch.randn(*shape_bc, generator=gen), torch.ones(dim), torch.rand(dim, generator=gen) * 0.1)
    return [t.requires_grad_() for t in tensors]


def make_directional_inputs(batch, dim, length, groups, seed=0):
    """``make_inputs`` rearranged for directional_scan: u (b, L, dim / groups), the first group's channels, shared by
    the groups; delta (groups, b, L, d); B, C (b, L, groups, N); all requiring grad."""
    u, delta, A, B, C, D, bias = (t.detach() for t in make_inputs(batch, dim, length, groups, seed))
    per_group = dim // groups
    tensors = (u[:, :per_group].transpose(1, 2), delta.unflatten(1, (groups, per_group)).permute(1, 0, 3, 2), A,
               B.permute(0, 3, 1, 2), C.permute(0, 3, 1, 2), D, bias)
    return [t.contiguous().requires_grad_() for t in tensors]


def directional_positions(length, groups, device="cpu"):
    """The 4 cross-scan orders of a square map of L positions, or the plain order for one group (cached per
    device, so repeated calls pass the same tensor)."""
    from nnunetv2_cipa.modules.ss2d import cross_scan_positions, sequence_positions

    if groups == 1:
        return sequence_positions(length, device)
    side = round(length ** 0.5)
    return cross_scan_positions(side, side, device)


def scan(inputs, backend, directional, gather=False):
    """directional_scan of ``make_directional_inputs`` over their cross-scan orders (``gather``: through gathered
    copies, see directional_scan), or selective_scan of ``make_inputs``; with softplus, delta bias and D, as SS2D
    calls them."""
    from nnunetv2_cipa.ops.directional_scan import directional_scan
    from nnunetv2_cipa.ops.selective_scan import selective_scan

    u, delta, A, B, C, D, bias = inputs
    if directional:
        positions = directional_positions(B.shape[1], B.shape[2], u.device)
        return directional_scan(u, delta, A, B, C, positions, D=D, delta_bias=bias, delta_softplus=True,
                                backend=backend, gather=gather)
    return selective_scan(u, delta, A, B, C, D=D, delta_bias=bias, delta_softplus=True, backend=backend)


def pscan_selective_scan(u, delta, A, B, C, D, delta_bias):
    """mambapy's selective scan (mamba.py) around pscan, grouped B/C: (b, d, L) -> (b, d, L)."""
    import torch.nn.functional as F
    from mambapy.pscan import pscan

    batch, dim, length = u.shape
    groups = B.shape[1]
    x = u.transpose(1, 2)  # (b, L, d)
    dt = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)
    delta_a = (dt.unsqueeze(-1) * A).exp()  # (b, L, d, N)
    dt_g = dt.reshape(batch, length, groups, dim // groups, 1)
    B_l = B.permute(0, 3, 1, 2).unsqueeze(3)  # (b, L, G, 1, N)
    C_l = C.permute(0, 3, 1, 2).unsqueeze(-1)  # (b, L, G, N, 1)
    bx = (dt_g * B_l * x.reshape(batch, length, groups, dim // groups, 1)).reshape(batch, length, dim, N_STATE)
    hs = pscan(delta_a, bx).reshape(batch, length, groups, dim // groups, N_STATE)
    y = (hs @ C_l).reshape(batch, length, dim) + D * x
    return y.transpose(1, 2)


def run_case(method, batch, dim, length, groups, repeats):
    """Runs in the subprocess: warm-up, timed passes; returns median seconds and peak MB over the baseline."""
    import torch

    def step(inputs):
        y = pscan_selective_scan(*inputs) if method == "pscan" else scan(inputs, backend, method == "cpu-dir")
        y.sum().backward()

    def prepare(inputs):
        if method == "cpu-cl":  # u, delta: (B, dim, L) views of (B, L, dim) memory
            inputs[:2] = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in inputs[:2]]
        return inputs

    backend = "cpu" if method in ("cpu-cl", "cpu-dir") else method
    make = make_directional_inputs if method == "cpu-dir" else make_inputs
    step(prepare(make(1, 16 * groups, 64, groups)))
    inputs = prepare(make(batch, dim, length, groups))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        for t in inputs:
            t.grad = None
        start = time.perf_counter()
        step(inputs)
        times.append(time.perf_counter() - start)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    return {"seconds": statistics.median(times), "peak_mb": peak_mb, "repeats": repeats,
            "threads": torch.get_num_threads()}


def skip_reason(method, batch, dim, length, max_gb):
    if method == "reference" and length > 1024:
        return "reference: L > 1024 too slow"
    if method.startswith("cpu"):
        from nnunetv2_cipa.ops.backends import available_backends

        if "cpu" not in available_backends():
            return "numba missing"
    if method == "pscan" and PSCAN_TENSORS * batch * length * dim * N_STATE * 4 / 2**30 > max_gb:
        return f"pscan: est. {PSCAN_TENSORS * batch * length * dim * N_STATE * 4 / 2**30:.0f} GB > {max_gb:g} GB"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and dim 768 up to L = 4096 only")
    parser.add_argument("--max-gb", type=float, default=16.0, help="skip pscan cells estimated above this")
    # subprocess entry: method batch dim L groups repeats
    parser.add_argument("--case", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        method, *numbers = args.case
        print(json.dumps(run_case(method, *map(int, numbers))))
        return
    rows = []
    for batch, dim, length, groups, repeats in QUICK if args.quick else SMALL + CIPA:
        row = {"batch": batch, "dim": dim, "L": length, "groups": groups, "N": N_STATE}
        for method in METHODS:
            reason = skip_reason(method, batch, dim, length, args.max_gb)
            if reason is None:
                cmd = [sys.executable, __file__, "--case", method, *map(str, (batch, dim, length, groups, repeats))]
                done = subprocess.run(cmd, capture_output=True, text=True)
                reason = None if done.returncode == 0 else f"failed: {done.stderr.strip().splitlines()[-1:]}"
            row[method] = {"skipped": reason} if reason else json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{batch}x{dim}x{length} {method}: {row[method]}", file=sys.stderr, flush=True)
        rows.append(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=1))
    print(markdown_table(rows))


def markdown_table(rows) -> str:
    def cell(entry):
        if "skipped" in entry:
            return f"skipped ({entry['skipped']})"
        return f"{entry['seconds'] * 1e3:.1f} ms / {entry['peak_mb']:.0f} MB"

    def ratio(row, a, b, key):
        ok = all("seconds" in row[m] for m in (a, b))
        return f"{row[b][key] / max(row[a][key], 1e-9):.1f}x" if ok else "-"

    lines = ["| B x dim x L (groups) | " + " | ".join(f"{m} fwd+bwd / peak" for m in METHODS)
             + " | pscan / cpu time | pscan / cpu mem | reference / cpu time |", "|" + "---|" * (len(METHODS) + 4)]
    for row in rows:
        lines.append(f"| {row['batch']} x {row['dim']} x {row['L']} ({row['groups']}) | "
                     + " | ".join(cell(row[m]) for m in METHODS)
                     + f" | {ratio(row, 'cpu', 'pscan', 'seconds')} | {ratio(row, 'cpu', 'pscan', 'peak_mb')}"
                     + f" | {ratio(row, 'cpu', 'reference', 'seconds')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
