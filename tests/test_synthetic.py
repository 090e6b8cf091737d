"""Synthetic PCLT20K-like generator: layout, determinism, and the multi-modal property (CT alone or PET alone is not
enough to find the tumour)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.paths import staging_owner
from nnunetv2_cipa.synthetic import generate_patient, generate_pclt20k_like


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_summary(tmp_path):
    """The layout, and a summary whose every count is what the files (and the generator's ground truth) hold."""
    summary = generate_pclt20k_like(tmp_path / "data", patients=3, slices=4, size=64, test_patients=2, seed=1)
    root = tmp_path / "data"
    assert json.loads(json.dumps(summary)) == summary
    assert sorted(p.name for p in root.iterdir()) == ["P0001", "P0002", "P0003", "P0004", "P0005", "synthetic.json",
                                                      "test.txt", "train.txt"]
    written = {}
    for split in ("train", "test"):
        ids = (root / f"{split}.txt").read_text().splitlines()
        tumour_slices = 0
        for slice_id in ids:
            patient, slice_no = slice_id.split("_")
            assert patient.startswith("P") and len(slice_no) == 3
            arrays = {}
            for kind in ("CT", "PET", "mask"):
                with Image.open(root / patient / f"{slice_id}_{kind}.png") as image:
                    assert image.mode == "L" and image.size == (64, 64)
                    arrays[kind] = np.asarray(image)
            assert set(np.unique(arrays["mask"])) <= {0, 255}
            tumour_slices += bool(arrays["mask"].any())
        written[split] = {"patients": len({i.split("_")[0] for i in ids}), "slices": len(ids),
                          "tumor_slices": tumour_slices}
    assert sum(1 for _ in root.glob("*/*.png")) == 3 * 20
    assert summary["train"] == written["train"] == {"patients": 3, "slices": 12,
                                                    "tumor_slices": written["train"]["tumor_slices"]}
    assert summary["test"] == written["test"] and written["test"]["slices"] == 8
    assert {i.split("_")[0] for i in (root / "train.txt").read_text().split()}.isdisjoint(
        i.split("_")[0] for i in (root / "test.txt").read_text().split())
    tumour = written["train"]["tumor_slices"] + written["test"]["tumor_slices"]
    assert summary["tumor_slice_fraction"] == round(tumour / 20, 4)
    truth = [s for index in range(5) for s in generate_patient(seed=1, index=index, slices=4, size=64)]
    assert summary["slices_with"] == {kind: sum(bool(getattr(s, kind).any()) for s in truth)
                                      for kind in ("tumor", "benign", "physiological")}
    assert summary["slices_with"]["tumor"] == tumour
    assert {k: summary[k] for k in ("out_dir", "size", "seed", "slices_per_patient")} == {
        "out_dir": str(root), "size": 64, "seed": 1, "slices_per_patient": 4}


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    kwargs = dict(patients=2, slices=3, size=48, test_patients=1)
    generate_pclt20k_like(tmp_path / "a", seed=5, **kwargs)
    generate_pclt20k_like(tmp_path / "b", seed=5, num_processes=2, **kwargs)
    generate_pclt20k_like(tmp_path / "c", seed=6, **kwargs)
    a, b, c = (tree_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a if k.endswith("_CT.png")) == 9


def test_benign_nodules_are_ct_visible_and_pet_cold_and_hot_sites_are_not_tumour():
    benign_seen = hot_outside_mask_seen = 0
    for index in range(6):
        for sl in generate_patient(seed=0, index=index, slices=6, size=128):
            ct, pet = sl.ct.astype(float), sl.pet.astype(float)
            assert np.array_equal(sl.mask > 0, sl.tumor)
            if sl.tumor.any():
                assert pet[sl.tumor].mean() > 90             # tumours are PET-hot
                assert ct[sl.tumor].mean() > 100              # and soft tissue on CT
            if sl.benign.any():
                assert not (sl.mask > 0)[sl.benign].any()
                assert ct[sl.benign].mean() > 100             # CT: same look as a tumour ...
                assert pet[sl.benign].mean() < 60             # ... but PET-cold
                benign_seen += 1
            hot = sl.physiological & (sl.mask == 0)
            if hot.sum() > 20 and pet[hot].mean() > 90:
                hot_outside_mask_seen += 1
    assert benign_seen > 0 and hot_outside_mask_seen > 0


def test_tumour_grows_and_shrinks_and_has_learnable_size():
    for index in range(4):
        areas = np.array([s.tumor.sum() for s in generate_patient(seed=3, index=index, slices=9, size=128)])
        present = np.flatnonzero(areas)
        assert present.size > 0 and np.all(np.diff(present) == 1)    # one contiguous run of slices
        assert np.sqrt(areas[present].max() / np.pi) / 128 > 0.04    # radius >= 4 % of the image
        if present.size >= 3:
            assert areas[present].max() > max(areas[present[0]], areas[present[-1]])


def test_tumour_free_fraction_parameter(tmp_path):
    fractions = []
    for fraction in (0.0, 0.5):
        summary = generate_pclt20k_like(tmp_path / str(fraction), patients=30, slices=10, size=32, test_patients=0,
                                        tumor_free_fraction=fraction)
        fractions.append(summary["tumor_slice_fraction"])
    assert fractions[0] == 1.0
    assert 0.4 < fractions[1] < 0.6


@pytest.mark.parametrize("kwargs, word", [(dict(patients=0), "patients"), (dict(size=8), "size"),
                                          (dict(slices=1.5), "slices"), (dict(tumor_free_fraction=1.0), "fraction")])
def test_bad_arguments(tmp_path, kwargs, word):
    with pytest.raises(InputError, match=word):
        generate_pclt20k_like(tmp_path / "x", **kwargs)


def test_refuses_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not an empty folder"):
        generate_pclt20k_like(tmp_path, patients=1, slices=1, size=32, test_patients=0)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_cli_synth(tmp_path):
    run = subprocess.run([sys.executable, "-m", "nnunetv2_cipa.cli", "synth", str(tmp_path / "d"), "--patients", "2",
                          "--slices", "2", "--size", "32", "--test-patients", "1", "--seed", "3"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["test"]["slices"] == 2
    assert len((tmp_path / "d" / "train.txt").read_text().splitlines()) == 4


def test_cli_synth_example_figure_reproduces_the_readme_figure(tmp_path):
    """``synth --example-figure`` with the default --seed and --size draws docs/figures/synthetic_example.png."""
    figure = tmp_path / "figure.png"
    run = subprocess.run([sys.executable, "-m", "nnunetv2_cipa.cli", "synth", str(tmp_path / "d"), "--patients", "1",
                          "--slices", "1", "--test-patients", "0", "--example-figure", str(figure)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["example_figure"] == str(figure)
    readme_figure = Path(__file__).parents[1] / "docs" / "figures" / "synthetic_example.png"
    with Image.open(figure) as new, Image.open(readme_figure) as old:
        assert new.size == old.size == (640, 518)
        assert np.array_equal(np.asarray(new), np.asarray(old))


def test_overwrite_replaces_a_previous_dataset_as_a_whole(tmp_path):
    out = tmp_path / "d"
    generate_pclt20k_like(out, patients=3, slices=1, size=32, test_patients=1, seed=1)
    summary = generate_pclt20k_like(out, patients=1, slices=2, size=32, test_patients=1, seed=2, overwrite=True)
    patients = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(patients) == 2 and summary["train"]["slices"] == 2 and "notes" not in summary
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["synthetic.json", "test.txt", "train.txt"]
    assert json.loads((out / "synthetic.json").read_text()) == {k: v for k, v in summary.items() if k != "out_dir"}
    assert (out / "train.txt").read_text().split() == [f"{patients[0]}_000", f"{patients[0]}_001"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no staging folder left


def test_the_staging_folders_of_killed_runs_are_removed_by_the_next(tmp_path):
    """A SIGKILLed synth (or compare, or convert) leaves its hidden staging folder; the next run writing the same
    folder removes those of dead processes on this host, never a live process's or another host's (or container's)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # a dead process here; a live one; dead PIDs of other hosts, one whose tag extends this host's
    owners = [staging_owner(int(dead.stdout)), staging_owner(), f"{dead.stdout.strip()}_otherhost",
              f"{staging_owner(int(dead.stdout))}1"]
    for owner in owners:
        (tmp_path / f".d.tmp-{owner}_token" / "P0001").mkdir(parents=True)
    generate_pclt20k_like(tmp_path / "d", patients=1, slices=1, size=32, test_patients=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", *(f".d.tmp-{o}_token" for o in owners[1:])])


def test_overwrite_refuses_a_folder_synth_did_not_write(tmp_path):
    (tmp_path / "data" / "P0001").mkdir(parents=True)
    (tmp_path / "data" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="data: holds no synthetic.json, so this version of synth did not write it"):
        generate_pclt20k_like(tmp_path / "data", patients=1, slices=1, size=32, test_patients=0, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["P0001", "notes.txt"]
    (tmp_path / "a_file").write_text("")
    with pytest.raises(InputError, match="a_file: exists and is not a folder"):
        generate_pclt20k_like(tmp_path / "a_file", patients=1, slices=1, size=32, test_patients=0, overwrite=True)
    with pytest.raises(InputError, match="size must be an integer >= 32 and <= 4096, got 100000"):
        generate_pclt20k_like(tmp_path / "new", patients=1, slices=1, size=100_000, test_patients=0)
    assert not (tmp_path / "new").exists()


def test_cli_synth_checks_the_figure_path_before_writing(tmp_path):
    run = subprocess.run([sys.executable, "-m", "nnunetv2_cipa.cli", "synth", str(tmp_path / "d"), "--patients", "1",
                          "--slices", "1", "--size", "32", "--example-figure", str(tmp_path / "figure.xyz")],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"{tmp_path / 'figure.xyz'}: cannot draw a figure in format '.xyz'; use one of" in run.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum, code, why", [(signal.SIGTERM, 143, "terminated by signal 15"),
                                               (signal.SIGINT, 130, "SIGINT")])
def test_a_terminated_synth_leaves_nothing(tmp_path, signum, code, why):
    # tests started in the background by a non-interactive shell (as CI may start them) ignore SIGINT, and a child
    # inherits that: give the CLI the disposition it has under a terminal
    process = subprocess.Popen([sys.executable, "-m", "nnunetv2_cipa.cli", "synth", str(tmp_path / "d"),
                                "--patients", "400", "--slices", "8", "--size", "64"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".d.tmp-") and any(p.iterdir()) for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code and f"synth: interrupted ({why}); no partial output" in err
    assert list(tmp_path.iterdir()) == []
