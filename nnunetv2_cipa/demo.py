"""``nnunetv2_cipa demo``: synthetic PCLT20K-like data -> nnU-Net -> CIPA vs vanilla nnU-Net -> comparison report.

Every stage runs the real console scripts (what a user would type) in a subprocess with the nnU-Net folders inside
the work directory; each stage's full output goes to ``WORKDIR/logs/``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nnunetv2_cipa.errors import StageFailed
from nnunetv2_cipa.paths import cli_environment, output_folder

DATASET_ID = 990
DATASET_SHORT_NAME = "PCLT20Ksynthetic"
DATASET_NAME = f"Dataset{DATASET_ID}_{DATASET_SHORT_NAME}"
_ECHO = re.compile(r"^(.*(Epoch \d+|train_loss|val_loss|Pseudo dice|Epoch time|Mean Validation Dice).*)$")


@dataclass(frozen=True)
class DemoSettings:
    """Data size and the two trainers compared (same plans, split, schedule and iterations)."""

    patients: int
    test_patients: int
    slices: int
    size: int
    cipa_trainer: str
    vanilla_trainer: str


FULL = DemoSettings(patients=24, test_patients=6, slices=6, size=64, cipa_trainer="nnUNetTrainerCIPAMicro_demo",
                    vanilla_trainer="nnUNetTrainerVanilla_demo")
QUICK = DemoSettings(patients=8, test_patients=3, slices=3, size=64, cipa_trainer="nnUNetTrainerCIPA_debug",
                     vanilla_trainer="nnUNetTrainerVanilla_debug")


class DemoRunner:
    """Runs the stages, echoing progress, with one log file per stage."""

    def __init__(self, workdir: Path):
        self.workdir = output_folder(workdir, "work directory")
        self.logs = output_folder(workdir / "logs", "log folder")
        self.env = cli_environment(workdir)
        self.start = time.time()
        self.step = 0

    def stage(self, title: str, log_name: str, command: list[str], extra_env: dict | None = None) -> None:
        self.step += 1
        print(f"\n[{self.step}] {title}  (t={time.time() - self.start:.0f}s)", flush=True)
        log_file = self.logs / f"{self.step:02d}_{log_name}.log"
        executable = str(Path(sys.executable).parent / command[0])
        with open(log_file, "w") as log, subprocess.Popen([executable, *command[1:]], stdout=subprocess.PIPE,
                                                          stderr=subprocess.STDOUT, text=True,
                                                          env=dict(self.env, **(extra_env or {}))) as process:
            for line in process.stdout:
                log.write(line)
                if _ECHO.match(line.strip()):
                    print("    " + line.strip(), flush=True)
        if process.returncode != 0:
            tail = "".join(log_file.read_text().splitlines(keepends=True)[-25:])
            raise StageFailed(f"demo stage '{title}' failed (exit {process.returncode}); log: {log_file}\n{tail}")
        print(f"    done; log: {log_file}", flush=True)


def run_demo(workdir: str | Path = "demo_workdir", quick: bool = False) -> Path:
    """Run the whole demo; returns the report folder."""
    import torch

    settings = QUICK if quick else FULL
    workdir = Path(workdir).resolve()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runner = DemoRunner(workdir)
    source = workdir / "PCLT20K_synthetic"
    report_dir = workdir / "report"
    print(f"nnunetv2-cipa demo ({'quick' if quick else 'full'}) in {workdir} on {device}")
    print(f"comparing {settings.cipa_trainer} with {settings.vanilla_trainer} on fold 0 of a patient-level split")

    runner.stage("Generating a synthetic PCLT20K-like dataset", "synth",
                 ["nnunetv2_cipa", "synth", str(source), "--patients", str(settings.patients), "--slices",
                  str(settings.slices), "--size", str(settings.size), "--test-patients", str(settings.test_patients),
                  "--overwrite"])
    runner.stage("Converting it to an nnU-Net raw dataset with patient-level folds", "convert",
                 ["nnunetv2_cipa", "convert", str(source), "-d", str(DATASET_ID), "--name", DATASET_SHORT_NAME,
                  "--overwrite", "-np", "2"])
    runner.stage("nnU-Net planning and preprocessing (2d)", "plan",
                 ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "--verify_dataset_integrity",
                  "-np", "2", "-npfp", "2"])
    predictions = []
    for trainer in (settings.cipa_trainer, settings.vanilla_trainer):
        runner.stage(f"Training {trainer} (fold 0)", f"train_{trainer}",
                     ["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer, "-device", device, "--npz"],
                     extra_env={"nnUNet_n_proc_DA": "0"} if device == "cpu" else None)
        output = workdir / "predictions" / trainer
        runner.stage(f"Predicting the test patients with {trainer}", f"predict_{trainer}",
                     ["nnUNetv2_predict", "-i", str(workdir / "nnUNet_raw" / DATASET_NAME / "imagesTs"), "-o",
                      str(output), "-d", str(DATASET_ID), "-c", "2d", "-tr", trainer, "-f", "0", "-device", device,
                      "-npp", "0", "-nps", "0"])
        predictions.append(str(output))
    runner.stage("Comparing CIPA with vanilla nnU-Net", "compare",
                 ["nnunetv2_cipa", "compare", "-d", str(DATASET_ID), "-tr", settings.cipa_trainer,
                  settings.vanilla_trainer, "-f", "0", "--test", *predictions, "-o", str(report_dir),
                  "--time-inference"])

    print(f"\nDemo finished in {time.time() - runner.start:.0f} s. Report: {report_dir / 'report.md'}")
    print(headline_table(report_dir / "report.json", settings))
    return report_dir


def headline_table(report_json: Path, settings: DemoSettings) -> str:
    """Test-set Dice of both trainers, next to what an empty prediction would score."""
    report = json.loads(report_json.read_text())
    lines = ["", "| trainer | test Dice (pooled) | test IoU (pooled) | patient Dice mean |", "|---|---|---|---|"]
    for trainer in (settings.cipa_trainer, settings.vanilla_trainer):
        metrics = report["splits"]["test"]["results"][trainer]
        protocol, summary = metrics["cipa_protocol"], metrics["summary"]
        lines.append(f"| {trainer} | {protocol['dice']:.3f} | {protocol['iou']:.3f} | {summary['dice']['mean']:.3f} |")
    lines.append("| (empty prediction) | 0.000 | 0.000 | 0.000 |")
    return "\n".join(lines)
