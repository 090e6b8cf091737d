"""The environment the README's set-up produces: console scripts, the CPU torchvision repair, trainer lookup."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN, nnunet_env, run_cli
from nnunetv2_cipa import torchvision_fix
from nnunetv2_cipa.trainer_discovery import ext_trainer_path, find_trainer_class

ALL_TRAINERS = ("nnUNetTrainerCIPA", "nnUNetTrainerCIPA_noCRM", "nnUNetTrainerCIPA_noDCIM", "nnUNetTrainerCIPA_noMamba",
                "nnUNetTrainerCIPA_pretrained", "nnUNetTrainerCIPA_bf16", "nnUNetTrainerCIPA_noAMP",
                "nnUNetTrainerCIPA_checkpointing", "nnUNetTrainerCIPA_accumulate", "nnUNetTrainerCIPA_paper",
                "nnUNetTrainerCIPA_paper_pretrained", "nnUNetTrainerCIPA_paper_frozenSSM",
                "nnUNetTrainerCIPA_paper_debug", "nnUNetTrainerCIPAMicro", "nnUNetTrainerCIPA_debug",
                "nnUNetTrainerVanilla_debug", "nnUNetTrainerCIPAMicro_demo", "nnUNetTrainerVanilla_demo")


def test_timm_imports_in_a_fresh_interpreter():
    """`import timm.layers` is what nnU-Net's trainer lookup needs; on CPU torch it only works with the repair."""
    result = subprocess.run([sys.executable, "-c", "import torchvision, timm.layers; print('ok')"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_repair_is_active_exactly_where_torchvision_lacks_its_ops_and_idempotent():
    """Needed with a CPU torch and PyPI's CUDA torchvision; a no-op next to a matching torchvision (e.g. torch
    2.14.1 / torchvision 0.29.1, both CUDA builds), where the .pth may be missing."""
    import torchvision.extension

    ops_loaded = torchvision.extension._has_ops()
    if not ops_loaded:
        assert torchvision_fix.pth_path().exists(), "run `python -m nnunetv2_cipa.torchvision_fix install`"
    assert torchvision_fix.is_active() == (not ops_loaded)
    before = list(sys.meta_path)
    torchvision_fix.install_hook()  # torchvision already imported in this process: must not add anything
    assert sys.meta_path == before


def test_stock_nnunet_train_finds_a_non_default_trainer(tmp_path):
    """The real nnUNetv2_train script resolves nnUNetTrainer_1epoch (imports every built-in trainer module, hence
    timm); it then fails only because dataset 999 does not exist."""
    env = {"PATH": str(BIN), "nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path),
           "nnUNet_results": str(tmp_path), "HOME": str(tmp_path)}
    result = run_cli(["nnUNetv2_train", "999", "2d", "0", "-tr", "nnUNetTrainer_1epoch", "-device", "cpu"], env,
                     check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "torchvision::nms" not in output and "Could not find requested nnunet trainer" not in output
    assert "Could not find a dataset with the ID 999" in output


@pytest.mark.parametrize("name", ALL_TRAINERS)
def test_every_trainer_is_discoverable_and_pickles_by_reference(name):
    cls = find_trainer_class(name)
    assert cls.__name__ == name and "__" not in name
    assert cls.__module__.startswith("nnunetv2_cipa.training.")
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_ext_path_and_doctor_commands(tmp_path):
    assert run_cli(["nnunetv2_cipa", "ext-path"], {"PATH": str(BIN)}).stdout.strip() == str(ext_trainer_path())
    assert (ext_trainer_path() / "nnunetv2_cipa_trainers.py").is_file()
    result = run_cli(["nnunetv2_cipa", "doctor"], nnunet_env(tmp_path))
    for expected in ("torch", "nnunetv2", "dynamic-network-architectures", "timm", "scan backends", "CPU linear layers",
                     "nnUNet_raw", "nnUNetTrainerCIPA"):
        assert expected in result.stdout
    assert "discoverable" in result.stdout and "NOT discoverable" not in result.stdout


def test_doctor_trainer_row_reads_the_exported_folder_as_nnunet_does(monkeypatch):
    """A trailing slash still names the folder; a broken install is a problem row, not a traceback."""
    from nnunetv2_cipa import doctor, trainer_discovery

    monkeypatch.setenv("nnUNet_extTrainer", f"{ext_trainer_path()}/")
    assert doctor.trainer_row()[2] is True

    def not_installed():
        raise RuntimeError("nnunetv2_cipa.ext_trainers is not installed; reinstall nnunetv2-cipa")

    monkeypatch.setattr(trainer_discovery, "ext_trainer_path", not_installed)
    _, value, ok = doctor.trainer_row()
    assert not ok and value == ("NOT discoverable: RuntimeError: nnunetv2_cipa.ext_trainers is not installed; "
                                "reinstall nnunetv2-cipa")


def test_doctor_fails_when_the_cli_cannot_find_the_trainers(tmp_path):
    """Without nnUNet_extTrainer the classes resolve in-process, but nnUNetv2_train -tr nnUNetTrainerCIPA fails."""
    env = {k: v for k, v in nnunet_env(tmp_path).items() if k != "nnUNet_extTrainer"}
    result = run_cli(["nnunetv2_cipa", "doctor"], env, check=False)
    assert result.returncode == 1
    assert "! nnUNetTrainerCIPA" in result.stdout
    assert "export nnUNet_extTrainer=$(nnunetv2_cipa ext-path)" in result.stdout


def test_wheel_ships_the_trainer_folder(tmp_path):
    """A wheel install (not only an editable one) has the nnUNet_extTrainer folder and resolves it."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(Path(__file__).parents[1])], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("nnunetv2_cipa-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    code = ("from nnunetv2_cipa.trainer_discovery import ext_trainer_path, find_trainer_class; "
            "print(ext_trainer_path()); print(find_trainer_class('nnUNetTrainerCIPA').__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == str(tmp_path / "site" / "nnunetv2_cipa" / "ext_trainers")
    assert lines[-1] == "nnunetv2_cipa.training.cipa_trainer"


def test_doctor_flags_folder_variables_that_name_no_folder(tmp_path, monkeypatch):
    from nnunetv2_cipa.doctor import path_variable_row

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "file"))
    monkeypatch.setenv("nnUNet_extTrainer", str(tmp_path / "absent"))
    monkeypatch.delenv("nnUNet_results", raising=False)
    assert path_variable_row("nnUNet_raw") == ("nnUNet_raw", f"{tmp_path / 'file'}: not a folder", False)
    assert path_variable_row("nnUNet_extTrainer")[2] is False and "no such folder" in path_variable_row(
        "nnUNet_extTrainer")[1]
    assert path_variable_row("nnUNet_results") == ("nnUNet_results", "not set", False)  # marked, not an error
    env = {**nnunet_env(tmp_path), "nnUNet_raw": str(tmp_path / "file")}
    result = run_cli(["nnunetv2_cipa", "doctor"], env, check=False)
    assert result.returncode == 1 and "! nnUNet_raw" in result.stdout
