"""Time the PCLT20K -> nnU-Net conversion on a PCLT20K-sized synthetic tree (default 21,930 triples of 512x512).

Source tree: a pool of distinct synthetic slices is rendered once, PNG-encoded at zlib's default level (as exported
datasets usually are) and written under N slice IDs (about 36 slices per patient, ~20 % of patients in test.txt).
Usage: python benchmarks/bench_convert.py [--triples 21930] [--size 512] [-np 2] [--workdir DIR]
Prints a table and writes benchmarks/results/bench_convert.json. With fewer triples than 21,930 the full-size time
is extrapolated linearly from the measured throughput (marked as such).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from nnunetv2_cipa.conversion.pclt20k import convert_pclt20k
from nnunetv2_cipa.synthetic import generate_patient

FULL_SIZE = 21930
SLICES_PER_PATIENT = 36


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_source(root: Path, triples: int, size: int, pool_size: int = 48) -> int:
    """Write the PCLT20K-layout tree; returns its size in bytes."""
    pool = [s for i in range(pool_size // 8) for s in generate_patient(0, i, 8, size)]
    encoded = [{kind: png_bytes(getattr(s, attr)) for kind, attr in (("CT", "ct"), ("PET", "pet"), ("mask", "mask"))}
               for s in pool]
    patients = -(-triples // SLICES_PER_PATIENT)
    lists: dict[str, list[str]] = {"train": [], "test": []}
    total = 0
    for n in range(triples):
        patient = f"B{n // SLICES_PER_PATIENT:04d}"
        slice_id = f"{patient}_{n % SLICES_PER_PATIENT:03d}"
        if n % SLICES_PER_PATIENT == 0:
            (root / patient).mkdir(parents=True, exist_ok=True)
        for kind, data in encoded[n % len(encoded)].items():
            (root / patient / f"{slice_id}_{kind}.png").write_bytes(data)
            total += len(data)
        lists["test" if n // SLICES_PER_PATIENT >= patients * 0.8 else "train"].append(slice_id)
    for split, ids in lists.items():
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triples", type=int, default=FULL_SIZE)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("-np", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", help="scratch folder (default: a temporary folder, removed afterwards)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        start = time.perf_counter()
        source_bytes = write_source(work / "src", args.triples, args.size)
        generate_s = time.perf_counter() - start
        os.environ["nnUNet_raw"] = str(work / "raw")
        start = time.perf_counter()
        out = convert_pclt20k(work / "src", 999, name="Bench", num_processes=args.np, overwrite=True).folder
        convert_s = time.perf_counter() - start
        out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    per_triple_ms = 1000 * convert_s / args.triples
    full_s = convert_s if args.triples == FULL_SIZE else per_triple_ms * FULL_SIZE / 1000
    result = {"triples": args.triples, "size": args.size, "num_processes": args.np, "cpu_count": os.cpu_count(),
              "machine": platform.platform(), "source_GB": source_bytes / 1e9, "output_GB": out_bytes / 1e9,
              "write_source_s": generate_s, "convert_s": convert_s, "ms_per_triple": per_triple_ms,
              "full_pclt20k_s": full_s, "full_pclt20k_extrapolated": args.triples != FULL_SIZE}
    rows = [("triples", f"{args.triples} x {args.size}x{args.size}"), ("worker processes", str(args.np)),
            ("source size", f"{source_bytes / 1e9:.2f} GB"), ("output size", f"{out_bytes / 1e9:.2f} GB"),
            ("conversion time", f"{convert_s:.1f} s"), ("per triple", f"{per_triple_ms:.2f} ms"),
            ("full PCLT20K (21,930)", f"{full_s / 60:.1f} min" + (" (extrapolated)" if args.triples != FULL_SIZE
                                                                  else " (measured)"))]
    print("| quantity | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "bench_convert.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
