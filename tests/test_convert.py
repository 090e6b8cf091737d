"""PCLT20K -> nnU-Net converter: output files, dataset.json, patient-level splits, nnU-Net's integrity check, bad
input (rejected before anything appears, source untouched) and tolerated input variants."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_conversion.pclt20k import convert_pclt20k, patient_folds
from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.synthetic import generate_pclt20k_like

DATASET = "Dataset321_PCLT20K"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pclt") / "src"
    generate_pclt20k_like(root, patients=6, slices=3, size=48, test_patients=2, seed=11)
    return root


@pytest.fixture
def source(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "src"))


@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "raw"
    monkeypatch.setenv("nnUNet_raw", str(folder))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    return folder


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def gray(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L", path
        return np.asarray(image)


def check_output(out: Path, source: Path, folds: int = 5) -> None:
    splits_lists = {s: (source / f"{s}.txt").read_text().split() for s in ("train", "test")}
    for split, suffix in (("train", "Tr"), ("test", "Ts")):
        ids = splits_lists[split]
        assert sorted(p.name for p in (out / f"images{suffix}").iterdir()) == sorted(
            f"{i}_{c:04d}.png" for i in ids for c in (0, 1))
        assert sorted(p.name for p in (out / f"labels{suffix}").iterdir()) == sorted(f"{i}.png" for i in ids)
        for slice_id in ids:
            stem = source / slice_id.split("_")[0] / slice_id
            assert np.array_equal(gray(out / f"images{suffix}" / f"{slice_id}_0000.png"), gray(Path(f"{stem}_CT.png")))
            assert np.array_equal(gray(out / f"images{suffix}" / f"{slice_id}_0001.png"), gray(Path(f"{stem}_PET.png")))
            label = gray(out / f"labels{suffix}" / f"{slice_id}.png")
            assert set(np.unique(label)) <= {0, 1}
            assert np.array_equal(label, gray(Path(f"{stem}_mask.png")) // 255)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_roles"] == {"0": "CT", "1": "PET"}
    assert meta["labels"] == {"background": 0, "tumor": 1}
    assert meta["numTraining"] == len(splits_lists["train"]) and meta["file_ending"] == ".png"
    assert str(source) in meta["description"]
    splits = json.loads((out / "splits_final.json").read_text())
    assert len(splits) == folds
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == sorted(splits_lists["train"])                      # every slice validated exactly once
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == sorted(splits_lists["train"])
        assert {c.split("_")[0] for c in fold["train"]}.isdisjoint(c.split("_")[0] for c in fold["val"])


def test_api_output_and_nnunet_integrity(source, raw, tmp_path, monkeypatch, capsys):
    preprocessed = tmp_path / "pre"
    (preprocessed / DATASET).mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    before = tree_hash(source)
    out = convert_pclt20k(source, 321, num_processes=1)
    assert out == raw / DATASET and sorted(p.name for p in raw.iterdir()) == [DATASET]
    check_output(out, source)
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "rgb_to_0_1", "1": "rgb_to_0_1"}
    assert (preprocessed / DATASET / "splits_final.json").read_bytes() == (out / "splits_final.json").read_bytes()
    assert tree_hash(source) == before
    printed = capsys.readouterr().out
    assert "6 patients" in printed and "48x48" in printed and "with tumour" in printed

    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(out), num_processes=1)


def test_cli_parallel_ct_normalization_and_overwrite(source, raw):
    env = {**os.environ, "nnUNet_raw": str(raw)}
    command = [sys.executable, "-m", "nnunetv2_cipa.cli", "convert", str(source), "-d", "321", "-np", "2",
               "--normalization", "ct", "--folds", "3"]
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    check_output(raw / DATASET, source, folds=3)
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme
    names = json.loads((raw / DATASET / "dataset.json").read_text())["channel_names"]
    assert {get_normalization_scheme(n).__name__ for n in names.values()} == {"CTNormalization"}

    again = subprocess.run(command, capture_output=True, text=True, env=env)
    assert again.returncode == 1 and "already exists" in again.stderr and DATASET in again.stderr
    again = subprocess.run(command[:-2] + ["--overwrite"], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    assert len(json.loads((raw / DATASET / "splits_final.json").read_text())) == 5
    assert sorted(p.name for p in raw.iterdir()) == [DATASET]


def _break_missing(src, kind):
    path = src / "P0001" / f"P0001_000_{kind}.png"
    path.unlink()
    return path.name


def _break_size(src):
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(src / "P0002" / "P0002_001_PET.png")
    return "P0002_001_PET.png"


def _break_mask_values(src):
    mask = np.zeros((48, 48), np.uint8)
    mask[5:9, 5:9] = 128
    Image.fromarray(mask).save(src / "P0003" / "P0003_002_mask.png")
    return "P0003_002_mask.png"


def _break_unreadable(src):
    (src / "P0004" / "P0004_000_CT.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return "P0004_000_CT.png"


def _break_colour(src):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
        src / "P0005" / "P0005_001_CT.png")
    return "P0005_001_CT.png"


def _break_duplicate(src):
    with open(src / "train.txt", "a") as f:
        f.write("P0002_001\n")
    return "duplicate slice ID 'P0002_001'"


def _break_listed_without_files(src):
    with open(src / "test.txt", "a") as f:
        f.write("P0099_000\n")
    return "P0099_000_CT.png"


def _break_patient_in_both(src):
    test_ids = (src / "test.txt").read_text().split()
    (src / "test.txt").write_text("\n".join(test_ids[1:]) + "\n")
    with open(src / "train.txt", "a") as f:
        f.write(test_ids[0] + "\n")
    return f"patient(s) {test_ids[0].split('_')[0]} also appear"


BREAKERS = {"missing_pet": lambda s: _break_missing(s, "PET"), "missing_mask": lambda s: _break_missing(s, "mask"),
            "size_mismatch": _break_size, "mask_values": _break_mask_values, "unreadable_png": _break_unreadable,
            "colour_png": _break_colour, "duplicate_id": _break_duplicate,
            "listed_without_files": _break_listed_without_files, "patient_in_both": _break_patient_in_both}


@pytest.mark.parametrize("case, num_processes", [(case, 1) for case in BREAKERS]
                         + [("size_mismatch", 2), ("unreadable_png", 2)])   # errors raised inside worker processes
def test_bad_input_rejected_without_leftovers(source, raw, case, num_processes):
    expected = BREAKERS[case](source)
    before = tree_hash(source)
    with pytest.raises(InputError) as error:
        convert_pclt20k(source, 321, num_processes=num_processes)
    assert expected in str(error.value)
    assert not raw.exists() or list(raw.iterdir()) == []
    assert tree_hash(source) == before


def test_cli_bad_input_exits_1(source, raw):
    expected = _break_mask_values(source)
    run = subprocess.run([sys.executable, "-m", "nnunetv2_cipa.cli", "convert", str(source), "-d", "321", "-np", "1"],
                         capture_output=True, text=True, env={**os.environ, "nnUNet_raw": str(raw)})
    assert run.returncode == 1 and expected in run.stderr and "Traceback" not in run.stderr
    assert not raw.exists() or list(raw.iterdir()) == []


def test_setup_errors(source, raw, monkeypatch):
    with pytest.raises(InputError, match="cannot fill 7 folds"):
        convert_pclt20k(source, 321, folds=7)
    (raw / "Dataset321_Other").mkdir(parents=True)
    with pytest.raises(InputError, match="Dataset321_Other"):
        convert_pclt20k(source, 321)
    assert [p.name for p in raw.iterdir()] == ["Dataset321_Other"]
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(InputError, match="nnUNet_raw is not set"):
        convert_pclt20k(source, 322)


def test_tolerated_variants(source, raw):
    train = (source / "train.txt").read_text().split()
    (source / "train.txt").write_text("\r\n".join(["", f"  {train[0]}\t"] + train[1:] + ["", "   "]) + "\r\n")
    stem = source / "P0001" / "P0001_000"
    ct, pet, mask = (gray(Path(f"{stem}_{k}.png")) for k in ("CT", "PET", "mask"))
    Image.fromarray(np.stack([ct] * 3, -1)).save(f"{stem}_CT.png")
    Image.fromarray(np.dstack([pet] * 3 + [np.full_like(pet, 200)]), mode="RGBA").save(f"{stem}_PET.png")
    Image.fromarray(mask.astype(np.uint16) * 257).save(f"{stem}_mask.png")            # 16-bit 0/65535
    stem1 = source / "P0001" / "P0001_001"
    pet1 = gray(Path(f"{stem1}_PET.png"))
    Image.fromarray(pet1.astype(np.uint16)).save(f"{stem1}_PET.png")                   # 16-bit, max <= 255: kept
    Image.fromarray(gray(Path(f"{stem1}_mask.png")) // 255).save(f"{stem1}_mask.png")   # 0/1 mask
    out = convert_pclt20k(source, 321)
    assert np.array_equal(gray(out / "imagesTr" / "P0001_000_0000.png"), ct)
    assert np.array_equal(gray(out / "imagesTr" / "P0001_000_0001.png"), pet)
    assert np.array_equal(gray(out / "labelsTr" / "P0001_000.png"), mask // 255)
    assert np.array_equal(gray(out / "imagesTr" / "P0001_001_0001.png"), pet1)
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == len(train)


def test_16_bit_full_range_is_shifted(source, raw):
    stem = source / "P0002" / "P0002_000"
    ct = gray(Path(f"{stem}_CT.png"))
    Image.fromarray(ct.astype(np.uint16) * 256 + 255).save(f"{stem}_CT.png")
    out = convert_pclt20k(source, 321)
    assert np.array_equal(gray(out / "imagesTr" / "P0002_000_0000.png"), ct)


def test_exact_patient_ids_in_folds():
    cases = ["7_000", "7_001", "70_000", "70_001", "70_002", "8_000", "700_000"]
    splits = patient_folds(cases, 4, seed=0)
    assert {tuple(s["val"]) for s in splits} == {("7_000", "7_001"), ("70_000", "70_001", "70_002"), ("700_000",),
                                                  ("8_000",)}


def test_folds_are_balanced_and_seeded():
    cases = [f"p{p}_{s}" for p in range(23) for s in range(1 + p % 7)]
    splits = patient_folds(cases, 5, seed=1)
    sizes = [len(s["val"]) for s in splits]
    assert max(sizes) - min(sizes) <= 7
    assert patient_folds(cases, 5, seed=1) == splits
    assert patient_folds(cases, 5, seed=2) != splits
