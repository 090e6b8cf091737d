"""Time ``evaluate_folders`` on N synthetic 512x512 slice pairs, serial and with a process pool.

Prints a table and writes benchmarks/results/bench_evaluate.json. PCLT20K's test split is a few thousand slices.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from nnunetv2_cipa.evaluation.metrics import evaluate_folders

RESULTS = Path(__file__).parent / "results" / "bench_evaluate.json"


def write_pairs(gt_dir: Path, pred_dir: Path, n: int, size: int = 512) -> None:
    """Disc tumours; predictions shifted, every 10th empty, every 7th with a false-positive blob."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.integers(100, size - 100, 2)
        gt = ((yy - cy) ** 2 + (xx - cx) ** 2 < int(rng.integers(5, 60)) ** 2).astype(np.uint8)
        pred = np.roll(gt, int(rng.integers(-8, 9)), axis=1) if i % 10 else np.zeros_like(gt)
        if i % 7 == 0:
            pred[20:30, 20:40] = 1
        name = f"P{i // 40:04d}_{i % 40:03d}.png"
        Image.fromarray(gt).save(gt_dir / name, compress_level=1)
        Image.fromarray(pred).save(pred_dir / name, compress_level=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=4000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gt_dir, pred_dir = Path(tmp, "gt"), Path(tmp, "pred")
        gt_dir.mkdir(), pred_dir.mkdir()
        write_pairs(gt_dir, pred_dir, args.slices)
        for workers in (1, 2):
            start = time.perf_counter()
            result = evaluate_folders(gt_dir, pred_dir, num_workers=workers)
            seconds = time.perf_counter() - start
            rows.append({"slices": args.slices, "size": "512x512", "workers": workers, "seconds": round(seconds, 2),
                         "ms_per_slice": round(1000 * seconds / args.slices, 2),
                         "dice": round(result["cipa_protocol"]["dice"], 4)})
    print("| slices | size | workers | seconds | ms / slice | pooled Dice |\n|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['slices']} | {r['size']} | {r['workers']} | {r['seconds']} | {r['ms_per_slice']} | {r['dice']} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
