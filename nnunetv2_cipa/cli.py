"""``nnunetv2_cipa`` console script: argument parsing only; every subcommand calls a library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nnunetv2_cipa.errors import InputError, StageFailed


def _cmd_doctor(args) -> int:
    from nnunetv2_cipa.doctor import run_doctor

    return run_doctor()


def _cmd_ext_path(args) -> int:
    from nnunetv2_cipa.trainer_discovery import ext_trainer_path

    print(ext_trainer_path())
    return 0


def _cmd_synth(args) -> int:
    from nnunetv2_cipa.synthetic import check_figure_file, generate_pclt20k_like, save_example_figure

    if args.example_figure:
        check_figure_file(args.example_figure)  # before the dataset is written
    summary = generate_pclt20k_like(args.out_dir, patients=args.patients, slices=args.slices, size=args.size,
                                    test_patients=args.test_patients, seed=args.seed, overwrite=args.overwrite)
    if args.example_figure:
        summary["example_figure"] = str(save_example_figure(args.example_figure, seed=args.seed, size=args.size))
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_convert(args) -> int:
    from nnunetv2_cipa.conversion.pclt20k import convert_pclt20k, format_summary

    report = convert_pclt20k(args.source, args.dataset_id, name=args.name, folds=args.folds, seed=args.seed,
                             num_processes=args.np, overwrite=args.overwrite, normalization=args.normalization,
                             high_bit_depth=args.high_bit_depth, val_list=args.val_list)
    print(format_summary(report))
    for warning in report.warnings:
        print(f"nnunetv2_cipa convert: warning: {warning}", file=sys.stderr)
    return 0


def _cmd_evaluate(args) -> int:
    from nnunetv2_cipa.evaluation.metrics import evaluate_listed, format_summary, list_label_pngs
    from nnunetv2_cipa.paths import check_output_file, write_text_atomically

    # each an existing folder of PNGs: checked before the output location they give
    gt, pred = list_label_pngs(args.gt_dir), list_label_pngs(args.pred_dir)
    output = check_output_file(args.output or Path(args.pred_dir) / "metrics_cipa.json")  # before any work
    if output.suffix.lower() == ".png":
        raise InputError(f"{output}: the metrics are JSON; a .png output could overwrite, or later be read as, a "
                         "label PNG: choose a .json file")
    result = evaluate_listed(gt, pred, args.gt_dir, args.pred_dir, patient_sep=args.patient_sep, chill=args.chill)
    write_text_atomically(output, json.dumps(result, indent=2, allow_nan=False))
    for warning in result["warnings"]:
        print(f"nnunetv2_cipa evaluate WARNING: {warning}", file=sys.stderr)
    print(format_summary(result))
    print(f"metrics written to {output}")
    return 0


def _cmd_compare(args) -> int:
    from nnunetv2_cipa.evaluation.compare import compare_trainers

    report = compare_trainers(args.dataset, args.trainers, args.output, configuration=args.configuration,
                              plans=args.plans[0] if len(args.plans) == 1 else args.plans,
                              folds=tuple(args.folds), test_predictions=args.test,
                              patient_sep=args.patient_sep, time_inference=args.time_inference)
    for warning in report["warnings"]:
        print(f"nnunetv2_cipa compare WARNING: {warning}", file=sys.stderr)
    print(f"report written to {Path(args.output) / 'report.md'}")
    return 0


def _cmd_demo(args) -> int:
    from nnunetv2_cipa.demo import run_demo

    run_demo(args.workdir, quick=args.quick)
    return 0


def _cmd_import_official(args) -> int:
    from nnunetv2_cipa.official_import import format_report, import_official

    report = import_official(args.checkpoint, args.dataset, trainer=args.trainer, plans=args.plans,
                             configuration=args.configuration, fold=args.fold, overwrite=args.overwrite,
                             tta=args.tta)
    print(format_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2_cipa", description="CIPA for nnU-Net v2 (PET-CT segmentation)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="report versions, scan backends and nnU-Net environment variables")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("ext-path", help="print the folder to export as nnUNet_extTrainer")
    p.set_defaults(func=_cmd_ext_path)

    p = sub.add_parser("synth", help="write a synthetic PCLT20K-like dataset")
    p.add_argument("out_dir")
    p.add_argument("--patients", type=int, default=20, help="training patients (default 20)")
    p.add_argument("--slices", type=int, default=8, help="slices per patient (default 8)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels, 32 to 4096 (default 128)")
    p.add_argument("--test-patients", type=int, default=4, help="test patients (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an OUT_DIR that synth wrote before (one holding synthetic.json)")
    p.add_argument("--example-figure", metavar="PNG", help="also draw CT, PET, mask and objects of three example "
                   "slices (same --seed and --size) into PNG; the defaults give docs/figures/synthetic_example.png")
    p.set_defaults(func=_cmd_synth)

    from nnunetv2_cipa.conversion import BIT_DEPTH_POLICIES, VAL_LIST_POLICIES

    p = sub.add_parser("convert", help="convert PCLT20K (or the same layout) into an nnU-Net raw dataset")
    p.add_argument("source", metavar="PCLT20K_DIR")
    p.add_argument("-d", dest="dataset_id", type=int, required=True, help="nnU-Net dataset ID")
    p.add_argument("--name", default="PCLT20K", help="dataset name (default PCLT20K)")
    p.add_argument("--folds", type=int, default=5, help="number of patient-level folds (default 5)")
    p.add_argument("--seed", type=int, default=12345, help="seed of the fold assignment (default 12345)")
    p.add_argument("-np", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="worker processes (default: the CPU count, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.add_argument("--normalization", choices=("rgb", "ct"), default="rgb",
                   help="rgb: fixed /255 (rgb_to_0_1, default); ct: nnU-Net's CT scheme")
    p.add_argument("--high-bit-depth", choices=BIT_DEPTH_POLICIES, default="shift",
                   help="16-bit CT/PET PNGs: shift (default) maps every slice of a modality to 8 bits with one right "
                        "shift from the dataset-wide bit depth; refuse rejects values above 255")
    p.add_argument("--val-list", choices=VAL_LIST_POLICIES, default="refuse",
                   help="a val.txt (valid.txt, validation.txt) beside train.txt: refuse (default) stops with an "
                        "error; merge converts its slices as training slices (nnU-Net validates on the patient-level "
                        "folds)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("evaluate", help="CIPA-protocol and patient-level metrics of a prediction folder")
    p.add_argument("gt_dir")
    p.add_argument("pred_dir")
    p.add_argument("-o", dest="output", help="output JSON (default PRED_DIR/metrics_cipa.json)")
    p.add_argument("--patient-sep", default="_", help="separator after the patient ID in case names (default _)")
    p.add_argument("--chill", action="store_true",
                   help="score only the cases PRED_DIR holds (e.g. one fold's validation predictions against "
                        "labelsTr), as nnUNetv2_evaluate_folder --chill")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("compare", help="compare trainers on nnU-Net cross-validation (and test) predictions")
    p.add_argument("-d", dest="dataset", required=True, help="dataset ID or name")
    p.add_argument("-tr", dest="trainers", nargs="+", required=True, help="two or more trainer names")
    p.add_argument("-c", dest="configuration", default="2d", help="nnU-Net configuration (default 2d)")
    p.add_argument("-p", dest="plans", nargs="+", default=["nnUNetPlans"],
                   help="plans identifier for every trainer, or one per trainer in -tr order (default nnUNetPlans)")
    p.add_argument("-f", dest="folds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                   help="cross-validation folds to score (default 0 1 2 3 4)")
    p.add_argument("--test", nargs="+", help="test-set prediction folders, one per trainer, in -tr order")
    p.add_argument("-o", dest="output", required=True, help="report folder")
    p.add_argument("--patient-sep", default="_", help="separator after the patient ID in case names (default _)")
    p.add_argument("--time-inference", action="store_true",
                   help="also measure inference time per slice with nnU-Net's predictor (loads each checkpoint)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("demo", help="synthetic data -> nnU-Net -> CIPA vs vanilla nnU-Net -> report")
    p.add_argument("--workdir", default="demo_workdir",
                   help="folder for data, results and report (default demo_workdir)")
    p.add_argument("--quick", action="store_true", help="debug trainers, under 3 minutes on CPU")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("import-official", help="the authors' trained CIPA checkpoint as an nnU-Net trained-model fold")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="the official CIPA.pth (or a bare state dict)")
    p.add_argument("-d", dest="dataset", required=True, help="planned dataset ID or name (512x512, CT + PET)")
    p.add_argument("-tr", dest="trainer", help="trainer to record (default: nnUNetTrainerCIPA_paper if it is "
                   "available, else nnUNetTrainerCIPA)")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-c", dest="configuration", default="2d", help="nnU-Net configuration (default 2d)")
    p.add_argument("--fold", default="all", help="fold folder to write (default all: predict with -f all)")
    p.add_argument("--tta", action="store_true",
                   help="let nnUNetv2_predict mirror (test-time augmentation; the official protocol has none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing fold folder")
    p.set_defaults(func=_cmd_import_official)
    return parser


# commands whose output appears whole or not at all (staged, then renamed into place)
STAGED_OUTPUT_COMMANDS = ("synth", "convert", "evaluate", "compare", "import-official")


def main(argv: list[str] | None = None) -> int:
    from nnunetv2_cipa.paths import Terminated, sigterm_as_interrupt

    args = build_parser().parse_args(argv)
    try:
        if args.command not in STAGED_OUTPUT_COMMANDS:
            return args.func(args)
        with sigterm_as_interrupt():  # SIGTERM unwinds like Ctrl-C: the staging folders are removed on the way out
            return args.func(args)
    except (InputError, StageFailed) as e:
        print(f"nnunetv2_cipa {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if args.command not in STAGED_OUTPUT_COMMANDS:
            raise
        print(f"nnunetv2_cipa {args.command}: interrupted ({str(e) or 'SIGINT'}); no partial output was left",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
