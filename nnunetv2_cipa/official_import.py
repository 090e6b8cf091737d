"""``nnunetv2_cipa import-official``: the authors' trained CIPA as an nnU-Net trained-model fold.

Writes ``$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG/fold_F/checkpoint_final.pth`` (what nnU-Net's predictor
and ``nnUNetv2_train -pretrained_weights`` read: network_weights, trainer_name, init_args,
inference_allowed_mirroring_axes), the import report ``official_import.json`` beside it, and the ``plans.json`` /
``dataset.json`` / ``dataset_fingerprint.json`` nnU-Net's trainer copies from ``$nnUNet_preprocessed/DatasetXXX``.
Everything is checked and converted in memory first; the files are written into a staging folder and renamed into
place, so an interrupted import leaves no partial fold.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import torch

from nnunetv2_cipa.checkpoint_file import check_checkpoint_path
from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.network import CIPA, OFFICIAL_INPUT_SCALE_SHIFT
from nnunetv2_cipa.official import (AUX_HEADS_PREFIX, OFFICIAL_CHECKPOINT, OfficialCheckpoint, OfficialWeights,
                                    load_official_weights, read_official_checkpoint)
from nnunetv2_cipa.paths import (check_output_file, output_folder, prefixed_staging_folder, read_json, replace_folder,
                                 required_folder, signals_held)

OFFICIAL_PATCH_SIZE = (512, 512)       # the official CRM is tied to 512x512 inputs
OFFICIAL_CHANNEL_ROLES = {"0": "CT", "1": "PET"}
DEFAULT_TRAINERS = ("nnUNetTrainerCIPA_paper", "nnUNetTrainerCIPA")  # the first one discoverable is the default
MIRROR_AXES_2D = (0, 1)
CHECKPOINT_FILE = "checkpoint_final.pth"
REPORT_FILE = "official_import.json"
STAGING_PREFIX = ".import-official-"  # + paths.staging_owner() + "_" + token
MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")
NOT_IN_OFFICIAL_MODEL = "not in the official model, unused at inference"


def check_official_plan(plans: dict, dataset_json: dict, configuration: str, plans_file: Path):
    """(PlansManager, ConfigurationManager of ``configuration``) if it can run the official model: a 512x512 2D
    patch, two input channels (_0000 = CT, _0001 = PET) both normalised by rgb_to_0_1, background + one label;
    InputError naming ``plans_file`` otherwise (also when nnU-Net cannot read the plans or dataset.json)."""
    try:
        return _check_official_plan(plans, dataset_json, configuration, plans_file)
    except InputError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
        raise InputError(f"{plans_file}: nnU-Net cannot read these plans (with dataset.json) for configuration "
                         f"{configuration!r} ({type(e).__name__}: {e}); re-run nnUNetv2_plan_and_preprocess") from e


def _check_official_plan(plans: dict, dataset_json: dict, configuration: str, plans_file: Path):
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_cipa.training.cipa_trainer import uses_rgb_to_0_1

    manager = PlansManager(plans)
    if configuration not in manager.available_configurations:
        raise InputError(f"{plans_file}: no configuration {configuration!r} "
                         f"(it has {manager.available_configurations})")
    config = manager.get_configuration(configuration)
    where = f"{plans_file}, configuration {configuration!r}"
    patch = tuple(int(s) for s in config.patch_size)
    if patch != OFFICIAL_PATCH_SIZE:
        raise InputError(f"{where}: patch size {'x'.join(map(str, patch))}; the official CIPA needs 512x512 (its "
                         "CRM is tied to it): convert 512x512 PET-CT slices and plan them with "
                         "nnUNetv2_plan_and_preprocess")
    channels = determine_num_input_channels(manager, config, dataset_json)
    if channels != 2:
        raise InputError(f"{where}: the dataset has {channels} input channels; the official CIPA needs exactly two "
                         "(_0000 = CT, _0001 = PET)")
    roles = dataset_json.get("channel_roles")
    if roles is not None and roles != OFFICIAL_CHANNEL_ROLES:
        raise InputError(f"{where}: dataset.json gives channel_roles {roles}; the official CIPA needs "
                         f"{OFFICIAL_CHANNEL_ROLES}")
    schemes = list(config.normalization_schemes)
    if not uses_rgb_to_0_1(schemes):
        raise InputError(f"{where}: normalisation {schemes}; the official CIPA needs rgb_to_0_1 (/255) for both "
                         "channels (nnunetv2_cipa convert's default)")
    labels = manager.get_label_manager(dataset_json)
    if labels.has_regions or labels.num_segmentation_heads != 2:
        raise InputError(f"{where}: labels {dataset_json.get('labels')}; the official CIPA segments one foreground "
                         "label (background 0, tumour 1)")
    return manager, config


def default_trainer() -> str:
    """The first of DEFAULT_TRAINERS that nnU-Net's trainer lookup finds."""
    for name in DEFAULT_TRAINERS[:-1]:
        try:
            _find_trainer(name)
            return name
        except InputError:
            continue
    return DEFAULT_TRAINERS[-1]


def _find_trainer(name: str) -> type:
    from nnunetv2_cipa.trainer_discovery import find_trainer_class

    if "__" in name:
        raise InputError(f"trainer {name!r}: nnU-Net trainer names cannot contain '__'")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's lookup prints every folder it searches
            return find_trainer_class(name)
    except RuntimeError as err:
        raise InputError(f"trainer {name!r}: not found by nnU-Net's trainer lookup") from err


def _parse_fold(fold: str | int) -> str | int:
    if str(fold) == "all":
        return "all"
    if not str(fold).isdigit():
        raise InputError(f"--fold {fold!r}: give a fold number or 'all'")
    return int(fold)


def import_official(checkpoint: str | Path, dataset: str | int, trainer: str | None = None,
                    plans: str = "nnUNetPlans", configuration: str = "2d", fold: str | int = "all",
                    overwrite: bool = False, tta: bool = False) -> dict:
    """Import the official checkpoint as fold ``fold`` of ``trainer`` (default: ``default_trainer()``) on
    ``dataset``'s planned ``configuration``; returns the load report (also stored as official_import.json).

    Mirroring test-time augmentation is off (the official single-pass protocol) unless ``tta``. Refuses (InputError)
    an unsuitable plan, a checkpoint that does not fit the trainer's network exactly, and an existing fold unless
    ``overwrite``.
    """
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    fold = _parse_fold(fold)
    check_checkpoint_path(Path(checkpoint), OFFICIAL_CHECKPOINT)  # before the plan: a missing file is named first
    preprocessed_root = required_folder("nnUNet_preprocessed")
    required_folder("nnUNet_results")
    try:
        dataset_name = maybe_convert_to_dataset_name(str(dataset))
    except (RuntimeError, ValueError) as err:
        raise InputError(f"dataset {dataset!r}: {err}") from err
    preprocessed = preprocessed_root / dataset_name
    plans_file, dataset_file = preprocessed / f"{plans}.json", preprocessed / "dataset.json"
    for path in (plans_file, dataset_file):
        if not path.is_file():
            raise InputError(f"{path}: no such file; run nnUNetv2_plan_and_preprocess -d {dataset} -c 2d first")
    plans_dict, dataset_json = read_json(plans_file, "an nnU-Net plans file", dict), \
        read_json(dataset_file, "an nnU-Net dataset.json", dict)
    plans_manager, config = check_official_plan(plans_dict, dataset_json, configuration, plans_file)
    trainer = trainer or default_trainer()
    trainer_class = _find_trainer(trainer)
    model_dir = Path(get_output_folder(dataset_name, trainer, plans, configuration))
    fold_dir = model_dir / f"fold_{fold}"
    if fold_dir.exists() and not overwrite:
        raise InputError(f"{fold_dir} exists; pass --overwrite to replace it")
    check_output_file(fold_dir / CHECKPOINT_FILE)  # a writable place, before the checkpoint is read
    for name, content in (("plans.json", plans_dict), ("dataset.json", dataset_json)):
        existing = model_dir / name
        if existing.is_file() and not overwrite \
                and read_json(existing, f"an nnU-Net {name}") != json.loads(json.dumps(content)):
            raise InputError(f"{existing} differs from the one {preprocessed} gives (the folds there were made "
                             "with other plans or data); pass --overwrite to replace it")

    official = read_official_checkpoint(checkpoint)
    network = _build_network(trainer_class, plans_manager, config, dataset_json)
    weights = load_official_weights(network, official.state, f"{official.path} ({trainer}'s network)")
    mirror_axes = MIRROR_AXES_2D if tta else None
    report = _report(official, weights, dataset_name, trainer, plans, configuration, fold, fold_dir, mirror_axes)
    state = {"network_weights": network.state_dict(), "trainer_name": trainer,
             "init_args": {"plans": plans_dict, "configuration": configuration, "fold": fold,
                           "dataset_json": dataset_json, "device": torch.device("cpu")},
             "inference_allowed_mirroring_axes": mirror_axes}
    _publish(model_dir, fold_dir.name, state, report,
             {"plans.json": plans_dict, "dataset.json": dataset_json}, preprocessed / "dataset_fingerprint.json",
             overwrite)
    return report


def _build_network(trainer_class: type, plans_manager, config, dataset_json: dict) -> CIPA:
    """The trainer's inference network, built as nnU-Net's predictor builds it (seeded: a repeated import gives
    the same weights for the tensors the official model lacks)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    num_inputs = determine_num_input_channels(plans_manager, config, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            network = trainer_class.build_network_architecture(plans_manager, config, num_inputs, num_outputs,
                                                               enable_deep_supervision=False)
        except (ValueError, InputError) as err:
            raise InputError(f"{trainer_class.__name__} cannot build its network for this plan: {err}") from err
    name = trainer_class.__name__
    if not isinstance(network, CIPA):
        raise InputError(f"{name} builds a {type(network).__name__}, not a CIPA network")
    if (network.input_scale, network.input_shift) != OFFICIAL_INPUT_SCALE_SHIFT or \
            (network.ct_channel, network.pet_channel) != (0, 1):
        raise InputError(f"{name}'s network does not take the official input: x*{network.input_scale}"
                         f"{network.input_shift:+} on channels CT={network.ct_channel}, PET={network.pet_channel} "
                         f"(needs x*3.2-1.6 on [0, 1] inputs, CT=0, PET=1)")
    return network.eval()


def _report(official: OfficialCheckpoint, weights: OfficialWeights, dataset: str, trainer: str, plans: str,
            configuration: str, fold, fold_dir: Path, mirror_axes) -> dict:
    return {
        "checkpoint": str(official.path.resolve()),
        "checkpoint_sha256": official.sha256,
        "checkpoint_layout": official.layout,
        "module_prefix_stripped": official.module_prefix,
        "dataset": dataset, "trainer": trainer, "plans": plans, "configuration": configuration, "fold": fold,
        "fold_folder": str(fold_dir),
        "official_tensors_mapped": weights.mapped,
        "parameters": weights.parameters,
        "stem": "official RGB kernel summed over its 3 input channels",
        "head": weights.head,
        "inference_allowed_mirroring_axes": list(mirror_axes) if mirror_axes else None,
        "mirroring": (f"on, axes {list(mirror_axes)} (test-time augmentation; the official protocol has none)"
                      if mirror_axes else "off: one pass per slice, the official protocol"),
        "not_in_official_model": {"tensors": weights.not_in_official_model,
                                  "parameters": weights.parameters_not_in_official_model,
                                  "use": NOT_IN_OFFICIAL_MODEL},
    }


def _publish(model_dir: Path, fold_name: str, state: dict, report: dict, model_json: dict[str, dict],
             fingerprint: Path, overwrite: bool) -> None:
    """Write the fold (and the model folder's json files) in a staging folder, then rename them into place; an
    existing fold is replaced only with ``overwrite``."""
    from batchgenerators.utilities.file_and_folder_operations import save_json

    parent = output_folder(model_dir.parent, "dataset results folder")
    staging = prefixed_staging_folder(parent, STAGING_PREFIX)
    try:
        new_model, new_fold = staging / model_dir.name, staging / model_dir.name / fold_name
        new_fold.mkdir(parents=True)
        torch.save(state, new_fold / CHECKPOINT_FILE)
        (new_fold / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        for name, content in model_json.items():
            save_json(content, str(new_model / name), sort_keys=False)
        if fingerprint.is_file():
            shutil.copyfile(fingerprint, new_model / "dataset_fingerprint.json")
        if not model_dir.exists():
            with contextlib.suppress(OSError):  # another import may create it meanwhile
                os.rename(new_model, model_dir)  # the whole model folder appears at once
                return
        fold_dir = model_dir / fold_name
        with signals_held():  # the json files and the fold change together
            for name in MODEL_FILES:
                if (new_model / name).exists():
                    os.replace(new_model / name, model_dir / name)
            if overwrite and os.path.lexists(fold_dir):
                replace_folder(new_fold, fold_dir)  # the old fold goes only once the new one is in place
            else:
                try:
                    os.rename(new_fold, fold_dir)
                except OSError as err:  # a concurrent import wrote it since the check
                    raise InputError(f"{fold_dir} appeared during the import; pass --overwrite to replace "
                                     "it") from err
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        raise InputError(f"{model_dir / fold_name}: cannot write the imported fold ({err}); no partial fold was "
                         "left") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def format_report(report: dict) -> str:
    """The load report as the lines ``nnunetv2_cipa import-official`` prints."""
    unused = report["not_in_official_model"]
    fold = report["fold"]
    return "\n".join([
        f"imported {report['checkpoint']} (sha256 {report['checkpoint_sha256']})",
        f"  into {report['fold_folder']}",
        f"  trainer {report['trainer']}, plans {report['plans']}, configuration {report['configuration']}",
        f"  {report['official_tensors_mapped']} official tensors mapped, each once; {report['parameters']:,} "
        "network parameters",
        f"  stem: {report['stem']}",
        f"  head: {report['head']}",
        f"  mirroring: {report['mirroring']}",
        f"  {NOT_IN_OFFICIAL_MODEL}: {len(unused['tensors'])} tensors ({unused['parameters']:,} parameters)"
        + (f" under {AUX_HEADS_PREFIX}*" if unused["tensors"] else ""),
        f"  report: {Path(report['fold_folder']) / REPORT_FILE}",
        f"predict: nnUNetv2_predict -i INPUT_DIR -o OUTPUT_DIR -d {report['dataset']} "
        f"-c {report['configuration']} -tr {report['trainer']} -p {report['plans']} -f {fold}",
    ])
