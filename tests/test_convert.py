"""PCLT20K -> nnU-Net converter: output files, dataset.json, patient-level splits, nnU-Net's integrity check, bad
input (every problem reported in one run, nothing written, source untouched), tolerated variants, the 16-bit policy,
val.txt and test lists. Concurrency and crashes: tests/test_convert_safety.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_decompression_bomb_png
from nnunetv2_cipa.cli import main
from nnunetv2_cipa.conversion.pclt20k import convert_pclt20k, format_summary, patient_folds
from nnunetv2_cipa.errors import InputError

DATASET = "Dataset321_PCLT20K"
REPOSITORY = Path(__file__).parents[1]


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


def listed(source: Path, name: str) -> list[str]:
    return (source / name).read_text().split() if (source / name).is_file() else []


def check_output(out: Path, source: Path, folds: int = 5, train: list[str] | None = None,
                 test: list[str] | None = None) -> None:
    """``out`` is the complete conversion of ``source`` (train.txt / test.txt unless the lists are given)."""
    splits_lists = {"train": listed(source, "train.txt") if train is None else train,
                    "test": listed(source, "test.txt") if test is None else test}
    for split, suffix in (("train", "Tr"), ("test", "Ts")):
        ids = splits_lists[split]
        if not ids:
            assert not (out / f"images{suffix}").exists()
            continue
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
    assert meta["numTest"] == len(splits_lists["test"])
    assert str(source) in meta["description"]
    splits = json.loads((out / "splits_final.json").read_text())
    assert len(splits) == folds
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == sorted(splits_lists["train"])                      # every slice validated exactly once
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == sorted(splits_lists["train"])
        assert {c.split("_")[0] for c in fold["train"]}.isdisjoint(c.split("_")[0] for c in fold["val"])


def test_reconverting_a_planned_dataset_says_what_is_stale(source, raw, tmp_path, monkeypatch, capsys):
    """Once planned (nnU-Net's copy of the folds in nnUNet_preprocessed) and trained (nnUNet_results), a new
    conversion warns when the slices changed (re-preprocess) or only the folds (trained models are stale), and says
    nothing when it reproduces the same folds."""
    preprocessed, results = tmp_path / "pre", tmp_path / "results"
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    monkeypatch.setenv("nnUNet_results", str(results))
    assert convert_pclt20k(source, 321, num_processes=1).warnings == []  # not planned yet
    (preprocessed / DATASET).mkdir(parents=True)
    shutil.copy(raw / DATASET / "splits_final.json", preprocessed / DATASET)
    assert convert_pclt20k(source, 321, num_processes=1, overwrite=True).warnings == []  # the same folds again
    (results / DATASET / "nnUNetTrainerVanilla__nnUNetPlans__2d").mkdir(parents=True)  # never trained: not named
    (results / DATASET / "nnUNetTrainerCIPA__nnUNetPlans__2d" / "fold_0").mkdir(parents=True)
    (results / DATASET / "nnUNetTrainerCIPA__nnUNetPlans__2d" / "fold_0" / "checkpoint_latest.pth").write_bytes(b"")
    assert main(["convert", str(source), "-d", "321", "-np", "1", "--folds", "3", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {preprocessed / DATASET / 'splits_final.json'} now holds the new folds" in err
    assert (f"warning: models in {results / DATASET} (nnUNetTrainerCIPA__nnUNetPlans__2d) were trained before this "
            "conversion") in err
    train = listed(source, "train.txt")
    (source / "train.txt").write_text("".join(f"{c}\n" for c in train if c.split("_")[0] != train[0].split("_")[0]))
    warnings = convert_pclt20k(source, 321, num_processes=1, folds=3, overwrite=True).warnings
    assert warnings[0] == (f"{preprocessed / DATASET} holds nnU-Net's plan and preprocessed data of an earlier "
                           "conversion (0 training slices added, 3 removed): run `nnUNetv2_plan_and_preprocess -d 321` "
                           "again before training")
    assert len(warnings) == 2 and "were trained before this conversion" in warnings[1]
    # the same slices and folds, but another normalisation than the one nnU-Net preprocessed with
    shutil.copy(raw / DATASET / "splits_final.json", preprocessed / DATASET)
    shutil.copy(raw / DATASET / "dataset.json", preprocessed / DATASET)
    (preprocessed / DATASET / "splits_final.json").write_text("[1]")  # unreadable folds: nothing can be told apart
    assert "holds nnU-Net's plan" in convert_pclt20k(source, 321, num_processes=1, folds=3, overwrite=True).warnings[0]
    shutil.copy(raw / DATASET / "splits_final.json", preprocessed / DATASET)
    assert convert_pclt20k(source, 321, num_processes=1, folds=3, overwrite=True).warnings == []
    warnings = convert_pclt20k(source, 321, num_processes=1, folds=3, overwrite=True, normalization="ct").warnings
    assert warnings[0].startswith(f"{preprocessed / DATASET} holds nnU-Net's plan and preprocessed data of an earlier "
                                  "conversion (dataset.json's channel_names changed)")


def test_api_output_and_nnunet_integrity(source, raw, tmp_path, monkeypatch):
    preprocessed = tmp_path / "pre"
    (preprocessed / DATASET).mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    before = tree_hash(source)
    report = convert_pclt20k(source, 321, num_processes=1)
    out = report.folder
    assert out == raw / DATASET and sorted(p.name for p in raw.iterdir()) == [DATASET]
    check_output(out, source)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "rgb_to_0_1", "1": "rgb_to_0_1"}
    assert meta["source_bit_depth"]["CT"] == {"bits": 8, "right_shift": 0, "files_16_bit": 0}
    assert (preprocessed / DATASET / "splits_final.json").read_bytes() == (out / "splits_final.json").read_bytes()
    assert tree_hash(source) == before
    summary = format_summary(report)
    assert "6 patients" in summary and "48x48" in summary and "with tumour" in summary

    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(out), num_processes=1)


def test_cli_parallel_ct_normalization_and_overwrite(source, raw):
    env = {**os.environ, "nnUNet_raw": str(raw)}
    command = [sys.executable, "-m", "nnunetv2_cipa.cli", "convert", str(source), "-d", "321", "-np", "2",
               "--normalization", "ct", "--folds", "3"]
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "6 patients" in run.stdout
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
    assert oct((raw / DATASET).stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _break_missing(src, kind):
    path = src / "P0001" / f"P0001_000_{kind}.png"
    path.unlink()
    return path.name


def _break_size(src, slice_id="P0002_001"):
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(src / slice_id[:5] / f"{slice_id}_PET.png")
    return f"{slice_id}_PET.png: 48x32, but the CT and mask of {slice_id} are 48x48"


def _break_mask_values(src, patient="P0003", slice_no="002"):
    mask = np.zeros((48, 48), np.uint8)
    mask[5:9, 5:9] = 128
    Image.fromarray(mask).save(src / patient / f"{patient}_{slice_no}_mask.png")
    return f"{patient}_{slice_no}_mask.png"


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


def _break_listed_without_folder(src):
    with open(src / "test.txt", "a") as f:
        f.write("P0099_000\n")
    return "P0099: patient folder missing"


def _break_listed_without_files(src):
    with open(src / "train.txt", "a") as f:
        f.write("P0001_099\n")
    return "P0001_099_CT.png: missing"


def _break_patient_in_both(src):
    test_ids = (src / "test.txt").read_text().split()
    (src / "test.txt").write_text("\n".join(test_ids[1:]) + "\n")
    with open(src / "train.txt", "a") as f:
        f.write(test_ids[0] + "\n")
    return f"patient(s) {test_ids[0].split('_')[0]} also appear"


def _break_escaping_id(src):
    for kind in ("CT", "PET", "mask"):                  # files one level up: read by a converter that follows '..'
        shutil.copy(src / "P0001" / f"P0001_000_{kind}.png", src.parent / f".._x_{kind}.png")
    with open(src / "train.txt", "a") as f:
        f.write(".._x\n")
    return "'..' would be outside the source folder"


def _break_long_id(src):
    with open(src / "train.txt", "a") as f:
        f.write("P0001_" + "9" * 250 + "\n")
    return "is too long: its file names would be 265 bytes"


def _break_utf16_list(src):
    (src / "test.txt").write_bytes((src / "test.txt").read_text().encode("utf-16"))
    return "looks like UTF-16 text; save the list as UTF-8"


def _break_latin1_list(src):
    (src / "test.txt").write_bytes((src / "test.txt").read_text().encode() + "Patient\xe9_000\n".encode("latin-1"))
    return "is not UTF-8 (Latin-1 or Windows-1252 text?)"


def _break_val_list(src):
    (src / "val.txt").write_text("P0001_000\n")
    return "pass --val-list merge"


def _break_decompression_bomb(src):
    write_decompression_bomb_png(src / "P0006" / "P0006_002_PET.png")
    return "P0006_002_PET.png: unreadable PNG (DecompressionBombError"


BREAKERS = {"missing_pet": lambda s: _break_missing(s, "PET"), "missing_mask": lambda s: _break_missing(s, "mask"),
            "size_mismatch": _break_size, "mask_values": _break_mask_values, "unreadable_png": _break_unreadable,
            "colour_png": _break_colour, "duplicate_id": _break_duplicate,
            "listed_without_folder": _break_listed_without_folder,
            "listed_without_files": _break_listed_without_files, "patient_in_both": _break_patient_in_both,
            "escaping_id": _break_escaping_id, "long_id": _break_long_id, "utf16_list": _break_utf16_list,
            "latin1_list": _break_latin1_list, "val_list": _break_val_list,
            "decompression_bomb": _break_decompression_bomb}


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


@pytest.mark.parametrize("case", ["no lists", "no listed slice exists"])
def test_a_source_without_a_slice_to_convert_creates_no_nnunet_raw(source, raw, case):
    """With no slice to check, the error (every list or file problem) comes before nnUNet_raw is created."""
    (source / "test.txt").unlink()
    if case == "no lists":
        (source / "train.txt").unlink()
        expected = "train.txt: missing"
    else:
        (source / "train.txt").write_text("P0901_000\nP0902_000\n")
        expected = "P0901: patient folder missing"
    with pytest.raises(InputError, match=expected):
        convert_pclt20k(source, 321, num_processes=1)
    assert not raw.exists()


def test_patient_folders_no_list_names_are_reported(source, raw):
    train = listed(source, "train.txt")
    (source / "train.txt").write_text("".join(f"{c}\n" for c in train if not c.startswith("P0001_")))
    (source / "notes").mkdir()  # a folder without images is no patient
    report = convert_pclt20k(source, 321, num_processes=1)
    assert (f"note: 1 patient folder(s) in {source} hold slices that no list names, not converted: P0001"
            in format_summary(report))
    assert not any(c.startswith("P0001_") for c in report.train_ids)


def test_a_modality_at_another_resolution_throughout_is_summed_up(source, raw):
    """PET stored at another size in every slice of two patients: each slice named, plus one line for the pattern;
    a CT that differs in one slice only gets no summary line."""
    expected = [_break_size(source, f"P000{p}_00{s}") for p in (1, 2) for s in range(3)]
    Image.fromarray(np.zeros((48, 40), np.uint8)).save(source / "P0003" / "P0003_000_CT.png")
    with pytest.raises(InputError) as error:
        convert_pclt20k(source, 321, num_processes=1)
    message = str(error.value)
    assert all(e in message for e in expected)
    assert "P0003_000_CT.png: 40x48, but the PET and mask of P0003_000 are 48x48" in message
    assert message.count("slices have") == 1
    assert message.endswith("- 6 slices have PET 48x32, CT and mask 48x48: nnU-Net needs CT, PET and mask of a slice "
                            "on one pixel grid; resample the PET onto the CT and mask grid before converting")


def test_every_bad_file_reported_in_one_run_through_the_script(source, raw):
    """dataset_conversion/pclt20k.py (the CLI's convert) exits 1 naming all bad files: three bad masks, a case
    variant of a name, a missing file and an unreadable PNG, found in one run."""
    expected = [_break_mask_values(source, p, s) for p, s in (("P0001", "001"), ("P0003", "002"), ("P0007", "000"))]
    (source / "P0002" / "P0002_000_CT.png").rename(source / "P0002" / "P0002_000_ct.png")
    (source / "P0004" / "P0004_001_mask.png").rename(source / "P0004" / "P0004_001_Mask.PNG")
    expected += ["P0002_000_CT.png: missing (slice 'P0002_000' listed in", "found P0002_000_ct.png, whose name differs",
                 "P0004_001_mask.png: missing", "found P0004_001_Mask.PNG", _break_unreadable(source),
                 _break_missing(source, "PET")]
    line = len((source / "train.txt").read_text().splitlines()) + 1
    with (source / "train.txt").open("a") as train:  # a bad list line does not hide the bad files
        train.write("P0001-003\n")
    expected.append(f"{source / 'train.txt'}, line {line}: 'P0001-003' is not a slice ID")
    before = tree_hash(source)
    script = REPOSITORY / "dataset_conversion" / "pclt20k.py"
    run = subprocess.run([sys.executable, str(script), str(source), "-d", "321", "-np", "2"], capture_output=True,
                         text=True, env={**os.environ, "nnUNet_raw": str(raw)})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "8 problem(s) in the source; nothing was written" in run.stderr
    for text in expected:
        assert text in run.stderr
    assert list(raw.iterdir()) == [] and tree_hash(source) == before


def test_setup_errors(source, raw, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="cannot fill 7 folds"):
        convert_pclt20k(source, 321, folds=7)
    (raw / "Dataset321_Other").mkdir(parents=True)
    with pytest.raises(InputError, match="Dataset321_Other"):
        convert_pclt20k(source, 321)
    assert [p.name for p in raw.iterdir()] == ["Dataset321_Other"]
    for variable in ("nnUNet_preprocessed", "nnUNet_results"):     # the ID is taken there by another name
        folder = tmp_path / variable
        (folder / "Dataset322_Other").mkdir(parents=True)
        monkeypatch.setenv(variable, str(folder))
        with pytest.raises(InputError, match=f"Dataset322_Other \\({variable}\\)"):
            convert_pclt20k(source, 322)
        monkeypatch.delenv(variable)
    assert [p.name for p in raw.iterdir()] == ["Dataset321_Other"]
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(InputError, match="nnUNet_raw is not set"):
        convert_pclt20k(source, 322)


@pytest.mark.parametrize("case", ["raw_is_a_file", "raw_parent_is_a_file"])
def test_unusable_nnunet_raw_is_a_clean_error(source, tmp_path, monkeypatch, capsys, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    raw = blocker if case == "raw_is_a_file" else blocker / "raw"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    assert main(["convert", str(source), "-d", "321"]) == 1
    error = capsys.readouterr().err
    assert str(raw) in error and ("not a folder" in error or "cannot create" in error)


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
    Image.fromarray(pet1.astype(np.uint16)).save(f"{stem1}_PET.png")    # 16-bit, values <= 255 like the 8-bit ones
    Image.fromarray(gray(Path(f"{stem1}_mask.png")) // 255).save(f"{stem1}_mask.png")   # 0/1 mask
    out = convert_pclt20k(source, 321).folder
    assert np.array_equal(gray(out / "imagesTr" / "P0001_000_0000.png"), ct)
    assert np.array_equal(gray(out / "imagesTr" / "P0001_000_0001.png"), pet)
    assert np.array_equal(gray(out / "labelsTr" / "P0001_000.png"), mask // 255)
    assert np.array_equal(gray(out / "imagesTr" / "P0001_001_0001.png"), pet1)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == len(train)
    assert meta["source_bit_depth"]["PET"] == {"bits": 8, "right_shift": 0, "files_16_bit": 1}


def _all_pet_16_bit(source: Path, dark: str) -> dict[str, np.ndarray]:
    """Every PET as 12-bit values (8-bit x 16) in a 16-bit PNG, slice ``dark`` dimmed to at most 15 first;
    returns the 8-bit PET each output must hold."""
    expected = {}
    for path in sorted(source.glob("*/*_PET.png")):
        pet = gray(path)
        slice_id = path.name[: -len("_PET.png")]
        expected[slice_id] = pet // 17 if slice_id == dark else pet
        Image.fromarray(expected[slice_id].astype(np.uint16) * 16).save(path)
    return expected


def test_16_bit_scale_is_one_per_modality(source, raw):
    """A 12-bit PET gets 256 grey levels, and a dark slice (all values <= 255) the same scale as the others."""
    expected = _all_pet_16_bit(source, dark="P0002_000")
    report = convert_pclt20k(source, 321)
    for slice_id, pet in expected.items():
        split = "Ts" if slice_id in listed(source, "test.txt") else "Tr"
        assert np.array_equal(gray(report.folder / f"images{split}" / f"{slice_id}_0001.png"), pet), slice_id
    meta = json.loads((report.folder / "dataset.json").read_text())["source_bit_depth"]
    assert meta == {"policy": "shift", "CT": {"bits": 8, "right_shift": 0, "files_16_bit": 0},
                    "PET": {"bits": 12, "right_shift": 4, "files_16_bit": len(expected)}}
    assert "PET: 24 16-bit file(s), values within 12 bits, every PET slice shifted right by 4" in format_summary(report)


def test_16_bit_refused_by_policy_or_when_mixed_with_8_bit(source, raw):
    _all_pet_16_bit(source, dark="P0002_000")
    before = tree_hash(source)
    with pytest.raises(InputError, match=r"PET: 23 16-bit PNG\(s\) hold values above 255 .*--high-bit-depth shift"):
        convert_pclt20k(source, 321, high_bit_depth="refuse")
    assert tree_hash(source) == before
    ct = source / "P0003" / "P0003_001_CT.png"
    Image.fromarray(gray(ct).astype(np.uint16) * 256).save(ct)
    before = tree_hash(source)
    with pytest.raises(InputError, match=r"CT: 1 PNG\(s\) are 16-bit .*P0003_001_CT.png.* but 23 are 8-bit"):
        convert_pclt20k(source, 321)
    assert list(raw.iterdir()) == [] and tree_hash(source) == before


def test_val_list_merged_and_test_list_variants(source, raw):
    train, test = listed(source, "train.txt"), listed(source, "test.txt")
    (source / "train.txt").write_text("\n".join(train[:-3]) + "\n")
    (source / "val.txt").write_text("\n".join(train[-3:]) + "\n")
    (source / "test.txt").rename(source / "Test.txt")
    before = tree_hash(source)
    report = convert_pclt20k(source, 321, val_list="merge")
    check_output(report.folder, source, train=train[:-3] + train[-3:], test=test)
    summary = format_summary(report)
    assert f"merged 3 slices of 1 patients from {source / 'val.txt'} into the training set" in summary
    assert "read Test.txt as the test list (test.txt)" in summary
    assert tree_hash(source) == before

    (source / "Test.txt").unlink()
    before = tree_hash(source)
    report = convert_pclt20k(source, 321, val_list="merge", overwrite=True)
    check_output(report.folder, source, train=train, test=[])
    assert f"no test list ({source / 'test.txt'}): no test set (imagesTs / labelsTs) written" in format_summary(report)
    assert tree_hash(source) == before and sorted(p.name for p in raw.iterdir()) == [DATASET]

    (source / "test.txt").write_text("\n")
    report = convert_pclt20k(source, 321, val_list="merge", overwrite=True)
    check_output(report.folder, source, train=train, test=[])
    assert f"{source / 'test.txt'} lists no slice IDs: no test set (imagesTs / labelsTs) written" in \
        format_summary(report)


@pytest.mark.parametrize("special", ["fifo", "device"])
def test_a_split_list_that_is_no_regular_file_is_refused_at_once(source, raw, special):
    """A FIFO would block the read forever, /dev/zero never end."""
    (source / "test.txt").unlink()
    if special == "fifo":
        os.mkfifo(source / "test.txt")
    else:
        (source / "test.txt").symlink_to("/dev/zero")
    run = subprocess.run([sys.executable, "-m", "nnunetv2_cipa.cli", "convert", str(source), "-d", "321"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "nnUNet_raw": str(raw)})
    assert run.returncode == 1 and f"{source / 'test.txt'}: split file is not a regular file" in run.stderr
    assert list(raw.iterdir()) == []


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


def test_a_name_that_differs_only_in_its_unicode_form_gets_a_hint(source, raw):
    """A list typed on one system (decomposed é) against folders made on another (composed é) looks identical."""
    composed, decomposed = unicodedata.normalize("NFC", "Pé01"), unicodedata.normalize("NFD", "Pé01")
    (source / "P0001").rename(source / composed)
    for path in (source / composed).iterdir():
        path.rename(path.with_name(path.name.replace("P0001", composed)))
    train = (source / "train.txt").read_text().replace("P0001", decomposed)
    (source / "train.txt").write_text(train)
    with pytest.raises(InputError) as error:
        convert_pclt20k(source, 321)
    assert f"{source / decomposed}: patient folder missing" in str(error.value)
    assert f"found {composed}, whose name differs in case or in its Unicode form" in str(error.value)
