"""Metrics of nnunetv2_cipa.evaluation.metrics against hand-computed and brute-force references; the evaluate CLI."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from conftest import write_decompression_bomb_png
from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.evaluation.metrics import (NOTES, evaluate_folders, evaluate_listed, format_number, format_summary,
                                              hd95, hd95_paper_rule, list_label_pngs, slice_metrics,
                                              unmatched_component_area)


def brute_force_border(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour outside the mask (outside the image counts as background)."""
    padded = np.pad(mask, 1)
    interior = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def brute_force_hd95(pred: np.ndarray, gt: np.ndarray) -> float:
    a, b = np.argwhere(brute_force_border(pred)), np.argwhere(brute_force_border(gt))
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.hstack((d.min(1), d.min(0))), 95))


def blob_mask(rng, shape=(48, 40), blobs=3) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    mask = np.zeros(shape, bool)
    for _ in range(blobs):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(2, 9)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    return mask | (rng.random(shape) < 0.02)


@pytest.mark.parametrize("seed", range(8))
def test_hd95_matches_brute_force_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    pred, gt = blob_mask(rng), blob_mask(rng)
    assert hd95(pred, gt) == pytest.approx(brute_force_hd95(pred, gt), abs=1e-9)


def test_hd95_masks_touching_the_image_edge():
    pred = np.zeros((20, 20), bool)
    gt = np.zeros((20, 20), bool)
    pred[:6, :6] = True
    gt[0:10, 0:3] = True
    assert hd95(pred, gt) == pytest.approx(brute_force_hd95(pred, gt))


def test_empty_mask_rules():
    gt = np.zeros((9, 11), bool)
    gt[0, 0] = True
    empty = np.zeros_like(gt)
    centre_distance = math.hypot(9 // 2, 11 // 2)  # planted pixel at (4, 5)
    m = slice_metrics(empty, gt)
    assert math.isnan(m["hd95_px"])
    assert m["hd95_px_paper_rule"] == pytest.approx(centre_distance)
    assert m["dice"] == 0.0 and m["iou"] == 0.0 and m["fn"] == 1 and m["fn_area_px"] == 1
    m = slice_metrics(gt, empty)  # GT empty: the official script crashes; we plant the pixel in the GT
    assert math.isnan(m["hd95_px"]) and m["hd95_px_paper_rule"] == pytest.approx(centre_distance)
    assert m["fp_area_px"] == 1
    m = slice_metrics(empty, empty)
    assert math.isnan(m["dice"]) and math.isnan(m["iou"]) and math.isnan(m["hd95_px"])
    assert m["hd95_px_paper_rule"] == 0.0
    assert hd95_paper_rule(gt, gt) == 0.0


def test_unmatched_component_area_uses_8_connectivity():
    pred = np.zeros((10, 10), bool)
    gt = np.zeros((10, 10), bool)
    pred[1, 1] = pred[2, 2] = True          # diagonal pair: one 8-connected component touching GT at (2, 2)
    gt[2, 2] = True
    pred[6:8, 6:9] = True                   # 6-pixel FP component
    gt[0, 8] = gt[0, 9] = True              # 2-pixel FN component
    assert unmatched_component_area(pred, gt) == 6
    assert unmatched_component_area(gt, pred) == 2


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path):
    """Two patients: p1 has two slices (one with an empty prediction), p2 one slice with both masks empty."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    a_gt = np.zeros((8, 8), np.uint8)
    a_gt[2:6, 2:6] = 1                      # 16 px
    a_pred = np.zeros((8, 8), np.uint8)
    a_pred[2:6, 3:7] = 1                    # TP 12, FP 4, FN 4
    b_gt = np.zeros((8, 8), np.uint8)
    b_gt[0:2, 0:2] = 1                      # 4 px, prediction empty
    write_png(gt / "p1_000.png", a_gt)
    write_png(pred / "p1_000.png", a_pred)
    write_png(gt / "p1_001.png", b_gt)
    write_png(pred / "p1_001.png", np.zeros((8, 8)))
    write_png(gt / "p2_000.png", np.zeros((8, 8)))
    write_png(pred / "p2_000.png", np.zeros((8, 8)))
    (pred / "summary.json").write_text("{}")
    (pred / "p1_000.npz").write_bytes(b"not a png")
    return gt, pred


def test_pooled_versus_per_slice_and_patient_aggregation(folders):
    gt, pred = folders
    r = evaluate_folders(gt, pred)
    c = r["cipa_protocol"]
    tp, fp, fn, tn = 12, 4, 8, 3 * 64 - 24
    assert (c["tp"], c["fp"], c["fn"], c["tn"]) == (tp, fp, fn, tn)
    assert c["dice"] == pytest.approx(24 / 36) and c["iou"] == pytest.approx(12 / 24)
    assert c["balanced_accuracy"] == pytest.approx((12 / 20 + tn / (tn + 4)) / 2)
    assert c["n_slices"] == 3 and c["n_slices_hd95"] == 1 and c["n_slices_gt_empty"] == 1
    per_case = r["per_case"]
    assert per_case["p1_000"]["dice"] == pytest.approx(0.75)
    assert per_case["p1_001"]["dice"] == 0.0
    assert per_case["p2_000"]["dice"] is None and per_case["p2_000"]["hd95_px"] is None
    # per-slice mean Dice (0.375) differs from the pooled Dice (2/3): pooling is over pixels
    a_gt, a_pred = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a_gt[2:6, 2:6], a_pred[2:6, 3:7] = True, True
    assert per_case["p1_000"]["hd95_px"] == pytest.approx(brute_force_hd95(a_pred, a_gt))
    assert c["hd95_px"] == pytest.approx(per_case["p1_000"]["hd95_px"])
    paper = [per_case[k]["hd95_px_paper_rule"] for k in sorted(per_case)]
    planted = np.zeros((8, 8), bool)
    planted[4, 4] = True
    b_gt = np.zeros((8, 8), bool)
    b_gt[0:2, 0:2] = True
    assert paper[1] == pytest.approx(brute_force_hd95(planted, b_gt)) and paper[2] == 0.0
    assert c["hd95_px_paper_rule"] == pytest.approx(sum(paper) / 3)
    p1, p2 = r["per_patient"]["p1"], r["per_patient"]["p2"]
    assert p1["dice"] == pytest.approx(24 / 36) and p1["n_slices"] == 2 and p1["fn_area_px"] == 4
    assert p1["fp_area_px"] == 0
    assert p2["dice"] is None and p2["n_slices"] == 1
    # per patient a zero denominator is undefined, not 1.0 as in the pooled protocol: p2 has no tumour pixel and an
    # empty prediction, so neither its sensitivity (nor balanced accuracy) nor its precision counts in the summary
    assert p1["sensitivity"] == pytest.approx(12 / 20) and p1["precision"] == pytest.approx(12 / 16)
    assert p1["balanced_accuracy"] == pytest.approx((12 / 20 + (128 - 24) / (128 - 20)) / 2)
    assert p2["sensitivity"] is None and p2["balanced_accuracy"] is None and p2["precision"] is None
    assert p2["specificity"] == 1.0
    assert r["summary"]["sensitivity"]["n"] == 1 and r["summary"]["sensitivity"]["mean"] == pytest.approx(0.6)
    assert r["summary"]["dice"]["n"] == 1 and r["summary"]["dice"]["mean"] == pytest.approx(24 / 36)
    assert r["summary"]["n_slices"]["mean"] == pytest.approx(1.5)
    assert r["summary"]["n_slices"]["std"] == pytest.approx(np.std([2, 1], ddof=1))
    assert "Patients (1 of 2 with a Dice): Dice 0.6667" in format_summary(r)
    json.dumps(r, allow_nan=False)  # NaN written as null


def test_input_errors(tmp_path, folders):
    gt, pred = folders
    (pred / "p2_000.png").unlink()
    write_png(pred / "p9_000.png", np.zeros((8, 8)))
    with pytest.raises(InputError, match=r"p2_000.*p9_000"):
        evaluate_folders(gt, pred)
    (pred / "p9_000.png").unlink()
    with pytest.raises(InputError, match=r"lacks 1 of the 3 cases .*p2_000; pass --chill to score only the cases"):
        evaluate_folders(gt, pred)  # predictions of a subset of the cases
    subset = evaluate_listed(list_label_pngs(gt), list_label_pngs(pred), gt, pred, chill=True)
    assert subset["cipa_protocol"]["n_slices"] == 2 and "p2_000" not in subset["per_case"]
    write_png(pred / "p2_000.png", np.zeros((8, 9)))
    with pytest.raises(InputError, match="size mismatch.*p2_000"):
        evaluate_folders(gt, pred)
    write_png(pred / "p2_000.png", np.full((8, 8), 255))
    with pytest.raises(InputError, match=r"p2_000.png.*\[255\]"):
        evaluate_folders(gt, pred)
    palette = Image.fromarray(np.zeros((8, 8), np.uint8)).convert("P")
    palette.save(pred / "p2_000.png")
    with pytest.raises(InputError, match=r"p2_000.png: label PNG must be single-channel .*a palette PNG"):
        evaluate_folders(gt, pred)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no \\*.png"):
        evaluate_folders(gt, tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        evaluate_folders(tmp_path / "nowhere", pred)
    with pytest.raises(InputError, match="p1_000.png: not a folder"):
        evaluate_folders(gt, gt / "p1_000.png")


def run_cli(*args, python_options=()):
    return subprocess.run([sys.executable, *python_options, "-m", "nnunetv2_cipa", "evaluate", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_evaluate_cli(tmp_path, folders):
    """Also under ``python -OO`` (docstrings stripped: the metric rules must not live in one)."""
    gt, pred = folders
    out = tmp_path / "out" / "metrics.json"
    done = run_cli(gt, pred, "-o", out, python_options=("-OO",))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["cipa_protocol"]["dice"] == pytest.approx(24 / 36)
    assert set(result["per_patient"]) == {"p1", "p2"}
    assert result["notes"] == NOTES and "CIPA protocol" in NOTES and "Per patient" in NOTES
    assert "IoU" in done.stdout and result["warnings"] == [] and "WARNING" not in done.stderr

    done = run_cli(gt, pred, "-o", out, "--patient-sep", "#")  # names p1_000...: '#' matches nothing
    assert done.returncode == 0 and set(json.loads(out.read_text())["per_patient"]) == {"p1_000", "p1_001", "p2_000"}
    assert "evaluate WARNING: the patient separator '#' occurs in no case name (e.g. 'p1_000')" in done.stderr

    (pred / "p2_000.png").unlink()
    done = run_cli(gt, pred, "-o", out)
    assert done.returncode == 1 and "p2_000" in done.stderr and "Traceback" not in done.stderr

    write_png(pred / "p2_000.png", np.full((8, 8), 2))
    done = run_cli(gt, pred, "-o", out)
    assert done.returncode == 1 and "p2_000.png" in done.stderr and "[2]" in done.stderr


@pytest.mark.parametrize("case", ["output_is_a_folder", "output_under_a_file", "pred_is_gt", "bomb", "truncated"])
def test_evaluate_cli_clean_errors(tmp_path, folders, case):
    """Exit 1 naming the file and no traceback; a bad output location is found before any metric is computed
    (the prediction folder also holds an unreadable PNG: the output error comes first)."""
    gt, pred = folders
    out = tmp_path / "metrics.json"
    if case == "output_is_a_folder":
        out.mkdir()
        expected = f"{out}: output file is an existing folder"
    elif case == "output_under_a_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "metrics.json"
        expected = f"{out}: cannot write the output file: {tmp_path / 'file'} is not a folder"
    elif case == "pred_is_gt":
        pred = gt
        expected = f"{gt}: the prediction folder is the ground-truth folder"
    elif case == "bomb":
        write_decompression_bomb_png(pred / "p1_000.png")
        expected = f"{pred / 'p1_000.png'}: unreadable PNG (DecompressionBombError"
    else:
        (pred / "p1_000.png").write_bytes((pred / "p1_000.png").read_bytes()[:40])
        expected = f"{pred / 'p1_000.png'}: unreadable PNG"
    if case.startswith("output"):
        write_decompression_bomb_png(pred / "p1_001.png")
    done = run_cli(gt, pred, "-o", out)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert expected in done.stderr
    assert not out.is_file()


def test_parallel_evaluation_equals_serial(folders):
    gt, pred = folders
    assert evaluate_folders(gt, pred, num_workers=2) == evaluate_folders(gt, pred, num_workers=1)


@pytest.mark.parametrize("seed", range(4))
def test_slice_metrics_on_a_large_image_match_full_image_references(seed):
    rng = np.random.default_rng(100 + seed)
    pred, gt = np.zeros((200, 180), bool), np.zeros((200, 180), bool)
    pred[60:108, 20:60], gt[70:118, 30:70] = blob_mask(rng), blob_mask(rng)
    m = slice_metrics(pred, gt)
    assert m["hd95_px"] == pytest.approx(brute_force_hd95(pred, gt)) == m["hd95_px_paper_rule"]
    assert m["tp"] + m["fp"] + m["fn"] + m["tn"] == pred.size and m["tp"] == np.count_nonzero(pred & gt)
    labels, _ = ndimage.label(pred, structure=np.ones((3, 3)))
    touching = np.unique(labels[pred & gt])
    assert m["fp_area_px"] == np.count_nonzero(pred & ~np.isin(labels, touching))


def test_format_number_never_uses_an_exponent():
    assert [format_number(v) for v in (None, 0.123456, 1234.56, 12345.6, 3e7, 0.0)] == [
        "n/a", "0.1235", "1235", "12346", "30000000", "0"]
    assert [format_number(v) for v in (0.000123456, 1.234e-05, -4e-05)] == ["0.0001235", "0.00001234", "-0.00004"]
    assert format_number(3.2e-07, 3) == "0.00000032"  # small p-values


@pytest.mark.parametrize("case", ["an_input_png", "a_fifo"])
def test_evaluate_never_writes_over_an_input_or_a_special_file(tmp_path, folders, case):
    gt, pred = folders
    if case == "an_input_png":
        out = pred / "p1_000.png"
        expected = f"{out}: the metrics are JSON; a .png output could overwrite"
    else:
        out = tmp_path / "fifo"
        os.mkfifo(out)
        expected = f"{out}: output file exists and is not a regular file"
    before = out.read_bytes() if case == "an_input_png" else None
    done = run_cli(gt, pred, "-o", out)
    assert done.returncode == 1 and "Traceback" not in done.stderr and expected in done.stderr, done.stderr
    assert out.read_bytes() == before if case == "an_input_png" else stat.S_ISFIFO(out.stat().st_mode)
