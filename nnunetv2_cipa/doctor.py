"""``nnunetv2_cipa doctor``: what this environment can and cannot do."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

from nnunetv2_cipa.paths import NNUNET_FOLDERS

PATH_VARIABLES = (*NNUNET_FOLDERS, "nnUNet_extTrainer")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def scan_backend_rows(info: dict, available: list[str]) -> list[tuple[str, str, bool]]:
    """Rows for ``scan_backend_report``'s ``info``: the backend in use and, on a GPU, whether mamba-ssm's fused
    kernel works (a problem row with the fix when it does not) and then whether the Triton kernels that take its
    place do (a problem row when they do not either, so that the slow torch scan runs)."""
    rows = [("scan backends", f"{', '.join(available)} (in use on {info['device']}: {info['backend']}; requested: "
                              f"{info['requested']})", True)]
    if not info["device"].startswith("cuda"):
        return rows + [("mamba-ssm", f"{info['mamba_ssm']} (used on CUDA only)", True)]
    rows.append(("GPU", str(info["gpu"]), True))
    problem, triton_problem = info["fused_kernel_problem"], info["triton_problem"]
    if problem is None:
        return rows + [("fused scan kernel", f"usable (mamba-ssm {info['mamba_ssm']})", True)]
    rows.append(("fused scan kernel", f"CUDA present but fused kernel unusable: {problem}. Fix: {info['fix']}", False))
    if triton_problem is None:
        return rows + [("Triton scan kernels", f"usable in its place (triton {info['triton']})", True)]
    fix = f". Fix: {info['triton_fix']}" if info["triton_fix"] else ""
    return rows + [("Triton scan kernels", f"unusable too: {triton_problem}{fix}", False)]


def collect_report() -> list[tuple[str, str, bool]]:
    """(item, value, ok) rows; ``ok`` False marks a problem the user has to fix."""
    import torch

    rows = [("python", platform.python_version(), True)]
    cuda = f", CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else ", no CUDA"
    rows.append(("torch", torch.__version__ + cuda, True))
    for dist in ("nnunetv2", "dynamic-network-architectures", "torchvision"):
        version = _version(dist)
        rows.append((dist, version, version != "not installed"))

    try:
        import timm.layers  # nnU-Net's trainer lookup imports it for every -tr but the default

        rows.append(("timm", timm.__version__, True))
    except Exception as e:  # an old timm, or the CUDA-torchvision trap on a CPU torch
        rows.append(("timm", f"{_version('timm')}: `import timm.layers` fails ({type(e).__name__}: {e}); nnU-Net's "
                             "trainer lookup will crash. Run `python -m nnunetv2_cipa.torchvision_fix install` on a "
                             "CPU-only machine, or install timm>=1.0,<1.0.23", False))

    from nnunetv2_cipa import torchvision_fix

    repaired = "active (torchvision's compiled ops are missing; schemas defined)" if torchvision_fix.is_active() \
        else "not needed" if torchvision_fix.pth_path().exists() else "not installed"
    rows.append(("CPU torchvision repair", repaired, True))

    from nnunetv2_cipa.ops.backend_report import scan_backend_report
    from nnunetv2_cipa.ops.backends import available_backends

    try:
        rows += scan_backend_rows(scan_backend_report(), available_backends())
    except ValueError as e:  # NNUNETV2_CIPA_SCAN_BACKEND names a backend that cannot run here
        rows.append(("scan backends", str(e), False))

    from nnunetv2_cipa.modules.linear import cpu_linear_backend

    try:
        linear = cpu_linear_backend()
        how = "1x1 convolutions on oneDNN" if linear == "onednn" else "torch matmul"
        rows.append(("CPU linear layers", f"{linear} ({how}; NNUNETV2_CIPA_CPU_LINEAR=onednn|blas)", True))
    except ValueError as e:
        rows.append(("CPU linear layers", str(e), False))

    rows += [path_variable_row(name) for name in PATH_VARIABLES]

    rows.append(trainer_row())
    return rows


def trainer_row() -> tuple[str, str, bool]:
    """Whether ``nnUNetv2_train -tr nnUNetTrainerCIPA`` finds the trainer: nnU-Net looks in nnUNet_extTrainer, so
    the class resolving in this process (which registers the folder) is not enough."""
    from nnunetv2_cipa.trainer_discovery import ENV_VAR, ext_trainer_path, find_trainer_class

    exported = [Path(p).resolve() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]  # before register()
    try:
        folder = ext_trainer_path()
        cls = find_trainer_class("nnUNetTrainerCIPA")
    except Exception as e:
        return "nnUNetTrainerCIPA", f"NOT discoverable: {type(e).__name__}: {e}", False
    if folder not in exported:
        return ("nnUNetTrainerCIPA", f"installed ({cls.__module__}), but nnU-Net's CLI will not find it: "
                                     f"export {ENV_VAR}=$(nnunetv2_cipa ext-path)", False)
    return "nnUNetTrainerCIPA", f"discoverable by nnU-Net's CLI ({cls.__module__})", True


def path_variable_row(name: str) -> tuple[str, str, bool]:
    """(name, value, ok) of a folder variable: unset is marked (nnU-Net's folders) but is no error; a value that is
    no folder (a file; for nnUNet_extTrainer also a missing one) is an error."""
    value = os.environ.get(name)
    if not value:
        return name, "not set", name == "nnUNet_extTrainer"
    if Path(value).exists() and not Path(value).is_dir():
        return name, f"{value}: not a folder", False
    if name == "nnUNet_extTrainer" and not Path(value).is_dir():
        return name, f"{value}: no such folder (export nnUNet_extTrainer=$(nnunetv2_cipa ext-path))", False
    return name, value, True


def run_doctor() -> int:
    """Print the report; exit status 1 if something is broken."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's lookup prints its search path
        rows = collect_report()
    width = max(len(item) for item, _, _ in rows)
    for item, value, ok in rows:
        print(f"{'  ' if ok else '! '}{item:<{width}}  {value}")
    return 0 if all(ok for item, _, ok in rows if item not in PATH_VARIABLES or os.environ.get(item)) else 1
