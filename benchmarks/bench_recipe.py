"""Training-recipe experiments on the synthetic PCLT20K-like data, through the stock nnU-Net CLI (CPU by default).

- ``lr``: nnUNetTrainerCIPA's AdamW peak learning rate (its warm-up + poly schedule), for a given preset;
- ``augmentation``: nnU-Net's default augmentation (rotation up to 180 degrees, scaling, mirroring on both axes,
  intensity transforms), the same without rotation, and the official CIPA augmentation (warp, horizontal flip,
  crop-resize), all on nnUNetTrainerCIPA otherwise.
Every run trains fold 0 of the demo-sized synthetic dataset (24 training + 6 test patients, 6 slices of 64 x 64) with
the demo's budget (30 epochs x 25 iterations, the planned batch), seeded, then predicts the test patients without
mirroring and scores them (pooled Dice as in the CIPA protocol, and mean patient Dice). The arms are generated
trainer subclasses in a temporary nnUNet_extTrainer folder; each changes one thing.
Usage: python benchmarks/bench_recipe.py lr [--preset micro] [--values 6e-5 2e-4 6e-4 2e-3] [--seeds 0 1]
       python benchmarks/bench_recipe.py augmentation [--preset micro] [--augmentations nnunet paper] [--seeds 0 1 2]
Prints a markdown table and writes benchmarks/results/bench_recipe_<experiment>_<preset>.json, rewritten after every
arm (a sweep stopped midway keeps its finished arms), with the CLI runs' output in
bench_recipe_<experiment>_<preset>.log beside it. ``--device cuda`` runs the arms on a GPU (a CIPA-tiny arm takes
about 18 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DATASET_ID = 989
DATASET = f"Dataset{DATASET_ID}_RecipeBench"
PRESET_TRAINERS = {"micro": "nnUNetTrainerCIPAMicro", "tiny": "nnUNetTrainerCIPA"}

TRAINER_MODULE = '''
import random

import numpy as np
import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

from nnunetv2_cipa.training.augmentation import official_augmentation
from nnunetv2_cipa.training.variants import DEMO_SCHEDULE, shorten_schedule, {base}


class RecipeArm({base}):
    seed = 0
    peak_lr = None
    augmentation = "nnunet"

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)
        shorten_schedule(self, **DEMO_SCHEDULE)
        if self.peak_lr is not None:
            self.initial_lr = self.peak_lr

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \\
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if self.augmentation == "nnunet_no_rotation":
            rotation = (0.0, 0.0)
        if self.augmentation == "paper":  # the official transforms work on the patch itself (nothing crops it back)
            rotation, dummy_2d, initial_patch_size = (0.0, 0.0), False, tuple(self.configuration_manager.patch_size)
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, *args, **kwargs):
        if self.augmentation != "paper":
            return super().get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, *args,
                                                   **kwargs)
        return ComposeTransforms(official_augmentation() + [DownsampleSegForDSTransform(deep_supervision_scales)])
'''
ARM = '''

class {name}(RecipeArm):
    seed = {seed}
    peak_lr = {lr}
    augmentation = "{augmentation}"
'''


AUGMENTATIONS = ("nnunet", "nnunet_no_rotation", "paper")


def arms(experiment: str, values, augmentations, seeds) -> list[dict]:
    if experiment == "lr":
        return [{"label": f"lr {v:g}", "lr": v, "augmentation": "nnunet", "seed": s} for v in values for s in seeds]
    return [{"label": a, "lr": None, "augmentation": a, "seed": s} for a in augmentations for s in seeds]


def run(command: list[str], env: dict, log: Path) -> None:
    with open(log, "a") as f:
        proc = subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed, see {log}")


def prepare(workdir: Path, env: dict, log: Path) -> None:
    from nnunetv2_cipa.demo import FULL

    source = workdir / "source"
    run(["nnunetv2_cipa", "synth", str(source), "--patients", str(FULL.patients), "--slices", str(FULL.slices),
         "--size", str(FULL.size), "--test-patients", str(FULL.test_patients)], env, log)
    run(["nnunetv2_cipa", "convert", str(source), "-d", str(DATASET_ID), "--name", "RecipeBench", "-np", "2"], env,
        log)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "2", "-npfp", "2"], env, log)


def score(gt_dir: Path, pred_dir: Path) -> dict:
    from nnunetv2_cipa.evaluation.metrics import evaluate_folders

    result = evaluate_folders(gt_dir, pred_dir)
    return {"test_dice_pooled": result["cipa_protocol"]["dice"], "test_patient_dice": result["summary"]["dice"]["mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("lr", "augmentation"))
    parser.add_argument("--preset", choices=sorted(PRESET_TRAINERS), default="micro")
    parser.add_argument("--values", nargs="+", type=float, default=[6e-5, 2e-4, 6e-4, 2e-3], help="peak lrs (lr)")
    parser.add_argument("--augmentations", nargs="+", choices=AUGMENTATIONS, default=list(AUGMENTATIONS),
                        help="arms of the augmentation experiment")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    from nnunetv2_cipa.paths import sigterm_as_interrupt
    from nnunetv2_cipa.paths import cli_environment

    rows = []
    results = RESULTS / f"bench_recipe_{args.experiment}_{args.preset}"  # .json, and .log for the CLI runs' output
    out = results.with_suffix(".json")
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory() as tmp:  # a kill removes the work folder too
        workdir = Path(tmp)
        env = dict(cli_environment(workdir), nnUNet_compile="false")
        RESULTS.mkdir(parents=True, exist_ok=True)
        log = results.with_suffix(".log")  # kept: a failed run names it
        log.write_text("")
        prepare(workdir, env, log)
        ext = workdir / "ext"
        ext.mkdir()
        module = TRAINER_MODULE.format(base=PRESET_TRAINERS[args.preset])
        runs = arms(args.experiment, args.values, args.augmentations, args.seeds)
        for i, arm in enumerate(runs):
            arm["trainer"] = f"RecipeArm{i}"
            module += ARM.format(name=arm["trainer"], seed=arm["seed"], lr=arm["lr"], augmentation=arm["augmentation"])
        (ext / "recipe_bench_trainers.py").write_text(module)
        env["nnUNet_extTrainer"] = f"{ext}:{env['nnUNet_extTrainer']}"
        raw = Path(env["nnUNet_raw"]) / DATASET
        for arm in runs:
            start = time.perf_counter()
            run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", arm["trainer"], "-device", args.device],
                dict(env, nnUNet_n_proc_DA="0") if args.device == "cpu" else env, log)
            pred = workdir / "pred" / arm["trainer"]
            run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID), "-c", "2d",
                 "-tr", arm["trainer"], "-f", "0", "-device", args.device, "-npp", "0", "-nps", "0", "--disable_tta"],
                env, log)
            summary = json.loads((Path(env["nnUNet_results"]) / DATASET / f"{arm['trainer']}__nnUNetPlans__2d"
                                  / "fold_0" / "validation" / "summary.json").read_text())
            seconds = time.perf_counter() - start
            rows.append({**arm, **score(raw / "labelsTs", pred),
                         "val_dice_per_case": summary["foreground_mean"]["Dice"], "seconds": seconds})
            out.write_text(json.dumps({"experiment": args.experiment, "preset": args.preset, "rows": rows}, indent=2))
            print(f"{arm['label']} seed {arm['seed']}: test Dice {rows[-1]['test_dice_pooled']:.3f}", file=sys.stderr)
    print(f"\n{args.experiment} experiment, CIPA-{args.preset}, demo budget, fold 0 of the synthetic data, seeds "
          f"{args.seeds}\n")
    print("| arm | test Dice, pooled (per seed) | mean | test patient Dice (mean) | fold-0 validation Dice (mean) |")
    print("|---|---|---:|---:|---:|")
    for label in dict.fromkeys(r["label"] for r in rows):
        group = [r for r in rows if r["label"] == label]
        pooled = [r["test_dice_pooled"] for r in group]
        print(f"| {label} | {', '.join(f'{d:.3f}' for d in pooled)} | {statistics.mean(pooled):.3f} | "
              f"{statistics.mean(r['test_patient_dice'] for r in group):.3f} | "
              f"{statistics.mean(r['val_dice_per_case'] for r in group):.3f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the work folder is removed, finished arms are in the JSON
        sys.exit(f"bench_recipe: stopped ({e or 'interrupted'})")
