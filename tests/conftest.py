"""Shared fixtures: an isolated nnU-Net environment, a small planned dataset built through the real CLI, and a small
PCLT20K-layout tree for the converter tests."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nnunetv2_cipa.paths import cli_environment
from nnunetv2_cipa.synthetic import generate_pclt20k_like

if not torch.cuda.is_available():  # the triton backend's kernels then run in Triton's interpreter, on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined, so before their import

BIN = Path(sys.executable).parent
DATASET_ID = 901
DATASET_NAME = f"Dataset{DATASET_ID:03d}_PCLT20K"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a slow test first, so that the test workers start on the long ones and finish together."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow_modules)


def run_cli(args: list[str], env: dict, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a console script from this environment (``nnUNetv2_*`` or ``nnunetv2_cipa``) and return its result."""
    result = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


@dataclass
class PlannedDataset:
    env: dict

    @property
    def raw(self) -> Path:
        return Path(self.env["nnUNet_raw"]) / DATASET_NAME

    @property
    def preprocessed(self) -> Path:
        return Path(self.env["nnUNet_preprocessed"]) / DATASET_NAME

    @property
    def results(self) -> Path:
        return Path(self.env["nnUNet_results"]) / DATASET_NAME

    def plans(self) -> dict:
        return json.loads((self.preprocessed / "nnUNetPlans.json").read_text())


def write_decompression_bomb_png(path: Path) -> None:
    """A valid PNG header of 30000 x 30000 pixels: over Pillow's decompression-bomb limit (not an OSError)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


def nnunet_env(root: Path) -> dict:
    """The library's CLI environment, pinned to 2 threads and no torch.compile (a small CPU machine)."""
    return dict(cli_environment(root), nnUNet_compile="false", OMP_NUM_THREADS="2")


@pytest.fixture(scope="session")
def planned_dataset(tmp_path_factory) -> PlannedDataset:
    """synth -> convert -> plan_and_preprocess (2d, verified), all through the console scripts."""
    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_env(root)
    source = root / "PCLT20K_synthetic"
    run_cli(["nnunetv2_cipa", "synth", str(source), "--patients", "10", "--slices", "4", "--size", "64",
             "--test-patients", "2", "--seed", "3"], env)
    run_cli(["nnunetv2_cipa", "convert", str(source), "-d", str(DATASET_ID), "--folds", "5", "-np", "2"], env)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "--verify_dataset_integrity",
             "-np", "2", "-npfp", "2"], env)
    return PlannedDataset(env=env)


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Path:
    """A small PCLT20K-layout tree (6 training + 2 test patients x 3 slices of 48 x 48); never modified."""
    root = tmp_path_factory.mktemp("pclt") / "src"
    generate_pclt20k_like(root, patients=6, slices=3, size=48, test_patients=2, seed=11)
    return root


@pytest.fixture
def source(pristine, tmp_path) -> Path:
    """A copy of ``pristine`` that a test may break."""
    return Path(shutil.copytree(pristine, tmp_path / "src"))


@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    """An empty nnUNet_raw (not created yet); nnUNet_preprocessed and nnUNet_results unset."""
    folder = tmp_path / "raw"
    monkeypatch.setenv("nnUNet_raw", str(folder))
    for name in ("nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)
    return folder
