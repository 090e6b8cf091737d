"""Importing the authors' trained CIPA: key mapping against the official key list, checkpoint layouts, errors, the
plan check, the written fold (nnU-Net's predictor loads it), no partial output on failure; then, through the real
CLI on 512x512 slices, prediction parity with the official forward pass and fine-tuning from the imported fold."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nnunetv2_cipa import cli
from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.network import CIPA
from nnunetv2_cipa.official import (AUX_HEADS_PREFIX, HEAD_KEY, STEM_KEY, load_official_weights, network_tensors,
                                    official_names, read_official_checkpoint)
from nnunetv2_cipa.official_import import (CHECKPOINT_FILE, NOT_IN_OFFICIAL_MODEL, REPORT_FILE,
                                           check_official_plan, default_trainer, import_official)
from nnunetv2_cipa.paths import staging_owner
from conftest import nnunet_env, run_cli
from official_fixture import fake_official_state, official_file_content, official_key_table, reference_network

DATASET = "Dataset950_Official"


@pytest.fixture(scope="module")
def official_state() -> dict[str, torch.Tensor]:
    return fake_official_state()


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory, official_state):
    path = tmp_path_factory.mktemp("official") / "CIPA.pth"
    torch.save(official_file_content(official_state), path)
    return path


def tiny(num_classes: int) -> CIPA:
    return CIPA(num_classes=num_classes, patch_size=(512, 512), preset="tiny")


@pytest.fixture(scope="module")
def softmax_network() -> CIPA:
    """nnUNetTrainerCIPA's inference network (two-class head), shared by the tests that must leave it untouched."""
    return tiny(2)


@pytest.mark.parametrize("num_classes", [1, 2])
def test_key_mapping_round_trip_on_the_official_key_list(num_classes):
    network = tiny(num_classes)
    mapping, absent = official_names(network)
    table = official_key_table()
    assert mapping == {key: ours for key, _, _, ours in table}  # every official key, each to its own tensor
    assert len(set(mapping.values())) == len(table)
    assert absent and all(name.startswith(AUX_HEADS_PREFIX) for name in absent)
    assert set(network_tensors(network)) == set(mapping.values()) | set(absent)
    assert set(network.state_dict()) >= set(network_tensors(network))  # aliases (DCIM conv blocks) excluded


@pytest.mark.parametrize("num_classes", [1, 2])
def test_official_weights_land_in_our_tensors(official_state, num_classes):
    network = tiny(num_classes)
    aux_before = {k: v.clone() for k, v in network.state_dict().items() if k.startswith(AUX_HEADS_PREFIX)}
    result = load_official_weights(network, official_state, "CIPA.pth")
    state = network.state_dict()
    assert result.mapped == len(official_key_table())
    assert result.not_in_official_model == sorted(aux_before, key=list(state).index)
    assert result.parameters == sum(p.numel() for p in network.parameters())
    for key, _, _, ours in official_key_table():
        value = official_state[key]
        if ours == STEM_KEY:
            value = value.sum(1, keepdim=True)
        if ours == HEAD_KEY and num_classes == 2:
            value = torch.cat([torch.zeros_like(value), value])
        assert torch.equal(state[ours], value), key
    assert torch.equal(state["dcim.0.ct_stem.convs.0.all_modules.1.running_var"],
                       official_state["backbone.region_patch.0.inner_convs.1.running_var"])
    assert all(torch.equal(state[k], v) for k, v in aux_before.items())
    head = official_state["decode_head.output.weight"]
    if num_classes == 2:  # argmax over [0, z] is sigmoid(z) > 0.5
        assert torch.equal(state[HEAD_KEY][0], torch.zeros_like(head[0]))
        assert "[0, z]" in result.head
    else:
        assert "copied" in result.head


@pytest.mark.parametrize("layout", ["wrapped", "bare", "prefixed", "wrapped_prefixed"])
def test_checkpoint_layouts(tmp_path, layout):
    state = {"backbone.vssm.outnorm0.weight": torch.randn(96), "decode_head.output.weight": torch.randn(1, 96, 1, 1)}
    stored = {f"module.{k}": v for k, v in state.items()} if "prefixed" in layout else state
    path = tmp_path / "CIPA.pth"
    torch.save(official_file_content(stored) if layout.startswith("wrapped") else stored, path)
    checkpoint = read_official_checkpoint(path)
    assert checkpoint.layout == ("wrapped" if layout.startswith("wrapped") else "bare")
    assert checkpoint.module_prefix == ("prefixed" in layout)
    assert checkpoint.state.keys() == state.keys()
    assert all(torch.equal(checkpoint.state[k], v) for k, v in state.items())
    assert len(checkpoint.sha256) == 64


def test_unreadable_checkpoints_are_refused(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_official_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(InputError, match=f"{tmp_path}: a folder, not a file"):
        read_official_checkpoint(tmp_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="garbage.pth: not a PyTorch checkpoint") as error:
        read_official_checkpoint(garbage)
    assert "weights_only" not in str(error.value)  # torch's advice to load it unchecked is not passed on
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(InputError, match="list.pth: expected"):
        read_official_checkpoint(listed)


def edited(state: dict, drop: str | None = None, add: str | None = None, reshape: str | None = None) -> dict:
    state = dict(state)
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    if reshape:
        state[reshape] = torch.zeros(7, *state[reshape].shape[1:])
    return state


@pytest.mark.parametrize("change, message", [
    ({"drop": "backbone.cross_mamba.2.channel_weights.mlp.3.A_logs"},
     r"1 missing: backbone\.cross_mamba\.2\.channel_weights\.mlp\.3\.A_logs"),
    ({"add": "backbone.vssm.layers.0.blocks.9.norm.weight"}, r"1 unexpected: backbone\.vssm\.layers\.0\.blocks\.9"),
    ({"reshape": "decode_head.layers_up.2.upsample.linear.weight"},
     r"1 with the wrong shape: decode_head\.layers_up\.2\.upsample\.linear\.weight 7x192 \(network needs 96x192 "
     r"for decoder\.stages\.1\.upsample\.linear\.weight\)"),
    ({"reshape": "decode_head.output.weight"},
     r"1 with the wrong shape: decode_head\.output\.weight 7x96x1x1 \(network needs 2x96x1x1"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_untouched(softmax_network, official_state, change, message):
    watched = [*list(official_names(softmax_network)[0].values())[:5], STEM_KEY, HEAD_KEY]  # the first copied
    before = {k: softmax_network.state_dict()[k].clone() for k in watched}
    with pytest.raises(InputError, match=r"CIPA\.pth does not fit the official CIPA network: " + message):
        load_official_weights(softmax_network, edited(official_state, **change), "CIPA.pth")
    after = softmax_network.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_network_unlike_the_official_one_is_refused(official_state):  # e.g. the noCRM ablation
    network = CIPA(num_classes=2, patch_size=(512, 512), preset="tiny", use_crm=False)
    with pytest.raises(InputError, match=r"unexpected: backbone\.cross_mamba\.0\."):
        load_official_weights(network, official_state, "CIPA.pth")


def planned(root, patch=(512, 512), channels: int = 2, normalization: str = "RGBTo01Normalization") -> tuple:
    """A preprocessed dataset folder with just what the import reads: plans, dataset.json, fingerprint."""
    schemes = [normalization] * channels
    plans = {"dataset_name": DATASET, "plans_name": "nnUNetPlans", "image_reader_writer": "NaturalImage2DIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "label_manager": "LabelManager",
             "configurations": {"2d": {
                 "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                 "patch_size": list(patch), "spacing": [1.0, 1.0], "normalization_schemes": schemes,
                 "use_mask_for_norm": [False] * channels, "architecture": {
                     "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                     "arch_kwargs": {}, "_kw_requires_import": []}}}}
    dataset_json = {"channel_names": {str(i): "rgb_to_0_1" for i in range(channels)},
                    "labels": {"background": 0, "tumor": 1}, "numTraining": 2, "file_ending": ".png"}
    folder = root / "nnUNet_preprocessed" / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    (folder / "dataset_fingerprint.json").write_text(json.dumps({"spacings": [[999.0, 1.0, 1.0]]}))
    return plans, dataset_json, folder / "nnUNetPlans.json"


@pytest.mark.parametrize("kwargs, message", [
    ({"patch": (256, 256)}, "patch size 256x256; the official CIPA needs 512x512"),
    ({"channels": 3}, "the dataset has 3 input channels; the official CIPA needs exactly two"),
    ({"normalization": "CTNormalization"}, "needs rgb_to_0_1"),
])
def test_the_plan_check_refuses_what_the_official_model_cannot_run(tmp_path, kwargs, message):
    plans, dataset_json, plans_file = planned(tmp_path, **kwargs)
    with pytest.raises(InputError, match=str(plans_file).replace("\\", "\\\\") + ".*" + message):
        check_official_plan(plans, dataset_json, "2d", plans_file)


def test_the_plan_check_refuses_swapped_channels_and_extra_labels(tmp_path):
    plans, dataset_json, plans_file = planned(tmp_path)
    check_official_plan(plans, dataset_json, "2d", plans_file)
    with pytest.raises(InputError, match="channel_roles"):
        check_official_plan(plans, dict(dataset_json, channel_roles={"0": "PET", "1": "CT"}), "2d", plans_file)
    with pytest.raises(InputError, match="one foreground label"):
        check_official_plan(plans, dict(dataset_json, labels={"background": 0, "a": 1, "b": 2}), "2d", plans_file)
    with pytest.raises(InputError, match="no configuration '3d_fullres'"):
        check_official_plan(plans, dataset_json, "3d_fullres", plans_file)


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir(exist_ok=True)
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("nnUNet_extTrainer", "")  # restored afterwards; the lookup registers our trainer folder
    return tmp_path


def leftovers(results) -> list[str]:
    return [p.name for p in (results / DATASET).iterdir() if p.name.startswith(".")]


def test_import_writes_a_fold_the_predictor_loads(nnunet_folders, official_checkpoint):
    """With nnUNetTrainerCIPA (two-class head; its own checkpoints mirror): the default trainer runs end to end
    below."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    plans, dataset_json, _ = planned(nnunet_folders)
    trainer = "nnUNetTrainerCIPA"
    report = import_official(official_checkpoint, "950", trainer=trainer)
    model_dir = nnunet_folders / "nnUNet_results" / DATASET / f"{trainer}__nnUNetPlans__2d"
    fold_dir = model_dir / "fold_all"
    assert sorted(p.name for p in model_dir.iterdir()) == ["dataset.json", "dataset_fingerprint.json", "fold_all",
                                                           "plans.json"]
    assert sorted(p.name for p in fold_dir.iterdir()) == [CHECKPOINT_FILE, REPORT_FILE]
    assert json.loads((model_dir / "plans.json").read_text()) == plans
    assert json.loads((model_dir / "dataset.json").read_text()) == dataset_json
    assert json.loads((fold_dir / REPORT_FILE).read_text()) == report
    assert report["trainer"] == trainer and report["fold"] == "all" and report["checkpoint_layout"] == "wrapped"
    assert "[0, z]" in report["head"]
    assert report["official_tensors_mapped"] == len(official_key_table())
    assert report["inference_allowed_mirroring_axes"] is None and report["mirroring"].startswith("off")
    assert report["not_in_official_model"]["use"] == NOT_IN_OFFICIAL_MODEL
    assert all(k.startswith(AUX_HEADS_PREFIX) for k in report["not_in_official_model"]["tensors"])
    checkpoint = torch.load(fold_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer and checkpoint["init_args"]["configuration"] == "2d"
    assert checkpoint["inference_allowed_mirroring_axes"] is None

    predictor = nnUNetPredictor(device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(str(model_dir), ("all",))  # strict load by nnU-Net
    assert predictor.allowed_mirroring_axes is None and predictor.trainer_name == trainer
    assert leftovers(nnunet_folders / "nnUNet_results") == []

    mtime = (fold_dir / CHECKPOINT_FILE).stat().st_mtime_ns
    with pytest.raises(InputError, match="fold_all exists; pass --overwrite"):
        import_official(official_checkpoint, "950", trainer=trainer)
    assert (fold_dir / CHECKPOINT_FILE).stat().st_mtime_ns == mtime
    # the staging folder of an import killed with SIGKILL is removed by the next import; a live process's is kept
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owners = [staging_owner(int(dead.stdout)), staging_owner(), f"{dead.stdout.strip()}_otherhost"]
    for owner in owners:
        (nnunet_folders / "nnUNet_results" / DATASET / f".import-official-{owner}_token" / "fold_all").mkdir(
            parents=True)
    report = import_official(official_checkpoint, DATASET, trainer=trainer, overwrite=True, tta=True)
    assert report["inference_allowed_mirroring_axes"] == [0, 1] and report["mirroring"].startswith("on")
    assert torch.load(fold_dir / CHECKPOINT_FILE, weights_only=False)["inference_allowed_mirroring_axes"] == (0, 1)
    assert sorted(p.name for p in model_dir.iterdir()) == ["dataset.json", "dataset_fingerprint.json", "fold_all",
                                                           "plans.json"]
    assert sorted(leftovers(nnunet_folders / "nnUNet_results")) == sorted(f".import-official-{o}_token"
                                                                          for o in owners[1:])


def test_a_failed_import_leaves_nothing_behind(nnunet_folders, official_checkpoint, monkeypatch):
    with pytest.raises(InputError, match=r"official checkpoint .*absent.pth: no such file"):  # before the plan
        import_official(nnunet_folders / "absent.pth", "950", trainer="nnUNetTrainerCIPA")
    planned(nnunet_folders)
    results = nnunet_folders / "nnUNet_results"
    bad = nnunet_folders / "partial.pth"
    torch.save({"model": {"backbone.vssm.outnorm0.weight": torch.zeros(96)}}, bad)
    with pytest.raises(InputError, match="partial.pth .*does not fit the official CIPA network: 847 missing"):
        import_official(bad, "950", trainer="nnUNetTrainerCIPA")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(InputError, match=r"fold_all: cannot write the imported fold \(\[Errno 28\] No space left on "
                                         r"device\); no partial fold was left"):
        import_official(official_checkpoint, "950", trainer="nnUNetTrainerCIPA")
    assert not (results / DATASET / "nnUNetTrainerCIPA__nnUNetPlans__2d").exists()
    assert leftovers(results) == []


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_an_overwrite_that_fails_mid_swap_keeps_a_complete_fold(nnunet_folders, official_checkpoint, monkeypatch,
                                                                atomic_exchange):
    """--overwrite never leaves the fold missing: with an atomic exchange the new fold is in place once the swap
    is done; without one, a failure between the two renames puts the old fold back."""
    from nnunetv2_cipa import official_import, paths

    planned(nnunet_folders)
    import_official(official_checkpoint, "950", trainer="nnUNetTrainerCIPA")
    fold_dir = nnunet_folders / "nnUNet_results" / DATASET / "nnUNetTrainerCIPA__nnUNetPlans__2d" / "fold_all"
    if not atomic_exchange:
        monkeypatch.setattr(paths, "exchange", lambda a, b: False)

    def interrupted_swap(staged, target):
        def interrupt():
            raise KeyboardInterrupt("SIGTERM")
        return paths.replace_folder(staged, target, on_swap=interrupt)

    monkeypatch.setattr(official_import, "replace_folder", interrupted_swap)
    with pytest.raises(KeyboardInterrupt):
        import_official(official_checkpoint, "950", trainer="nnUNetTrainerCIPA", overwrite=True, tta=True)
    mirroring = json.loads((fold_dir / REPORT_FILE).read_text())["inference_allowed_mirroring_axes"]
    assert mirroring == ([0, 1] if atomic_exchange else None)  # the new fold, or the old one back
    assert (fold_dir / CHECKPOINT_FILE).is_file() and leftovers(nnunet_folders / "nnUNet_results") == []


def test_cli_reports_a_bad_plan_without_traceback(nnunet_folders, official_checkpoint, capsys):
    planned(nnunet_folders, patch=(256, 256))
    assert cli.main(["import-official", str(official_checkpoint), "-d", "950", "-tr", "nnUNetTrainerCIPA"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nnunetv2_cipa import-official: error: ") and "patch size 256x256" in err
    assert not (nnunet_folders / "nnUNet_results" / DATASET).exists()


@pytest.mark.parametrize("plans_text, message", [
    ('{"configurations": {"2d', "not readable as an nnU-Net plans file"),
    ("[]", "not an nnU-Net plans file .*found list"),
    ("{}", "nnU-Net cannot read these plans .*KeyError"),
])
def test_cli_reports_a_broken_plans_file_without_traceback(nnunet_folders, official_checkpoint, capsys, plans_text,
                                                           message):
    _, _, plans_file = planned(nnunet_folders)
    plans_file.write_text(plans_text)
    assert cli.main(["import-official", str(official_checkpoint), "-d", "950", "-tr", "nnUNetTrainerCIPA"]) == 1
    err = capsys.readouterr().err
    assert re.search(f"^nnunetv2_cipa import-official: error: .*nnUNetPlans.json: {message}", err), err
    assert "Traceback" not in err and not (nnunet_folders / "nnUNet_results" / DATASET).exists()


OFFICIAL_ID = "952"


@pytest.fixture(scope="module")
def official_model(tmp_path_factory, official_checkpoint) -> tuple[dict, str]:
    """512x512 synthetic slices through the console scripts: synth -> convert -> plan -> import-official (default
    trainer). Returns the environment and import-official's output."""
    root = tmp_path_factory.mktemp("nnunet_official")
    env = nnunet_env(root)
    source = root / "PCLT20K_512"
    run_cli(["nnunetv2_cipa", "synth", str(source), "--patients", "2", "--slices", "2", "--size", "512",
             "--test-patients", "1", "--seed", "5"], env)
    run_cli(["nnunetv2_cipa", "convert", str(source), "-d", OFFICIAL_ID, "--folds", "2", "-np", "1"], env)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", OFFICIAL_ID, "-c", "2d", "-np", "1", "-npfp", "1"], env)
    output = run_cli(["nnunetv2_cipa", "import-official", str(official_checkpoint), "-d", OFFICIAL_ID], env).stdout
    return env, output


def imported_report(env: dict) -> dict:
    (path,) = Path(env["nnUNet_results"]).glob(f"Dataset{OFFICIAL_ID}_*/*/fold_all/{REPORT_FILE}")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_nnunet_predict_gives_the_official_segmentation(official_model, official_state, tmp_path, monkeypatch):
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    env, import_output = official_model
    report = imported_report(env)
    monkeypatch.setenv("nnUNet_extTrainer", env["nnUNet_extTrainer"])
    assert report["trainer"] == default_trainer()  # nnUNetTrainerCIPA_paper once it is discoverable
    assert report["checkpoint_sha256"] in import_output and NOT_IN_OFFICIAL_MODEL in import_output
    assert "mirroring: off" in import_output
    (images,) = Path(env["nnUNet_raw"]).glob(f"Dataset{OFFICIAL_ID}_*/imagesTs")
    cases = sorted(p.name[:-len("_0000.png")] for p in images.glob("*_0000.png"))
    assert len(cases) == 2
    output = tmp_path / "pred"
    run_cli(["nnUNetv2_predict", "-i", str(images), "-o", str(output), "-d", OFFICIAL_ID, "-c", "2d", "-tr",
             report["trainer"], "-f", "all", "-device", "cpu", "-npp", "0", "-nps", "0"], env)

    pngs = np.stack([[np.asarray(Image.open(images / f"{case}_{c:04d}.png")) for c in (0, 1)] for case in cases])
    foreground = (pngs > 0).any(axis=1)  # nnU-Net crops a case to its nonzero box: a full box keeps the input as is
    assert all(f[0].any() and f[-1].any() and f[:, 0].any() and f[:, -1].any() for f in foreground)
    official_input = torch.from_numpy(pngs.astype(np.float32) / 255 * 3.2 - 1.6)  # channels CT, PET: model(ct, pet)
    network = reference_network(official_state)
    with torch.no_grad():  # one slice at a time, as pred.py and nnU-Net's predictor run it
        logits = np.stack([network(image[None])[0, 0].numpy() for image in official_input])
    # nnU-Net's sliding window sums Gaussian-weighted logits in float16 (weights 10 at the centre, ~1e-6 at the
    # rim of the 512x512 tile): where z * weight rounds to 0 there, its label is background whatever the sign of z
    gaussian = compute_gaussian((512, 512), sigma_scale=1. / 8, value_scaling_factor=10, device=torch.device("cpu"))
    for case, z in zip(cases, logits):
        rounded_away = ((torch.from_numpy(z) * gaussian.float()).half() == 0).numpy()
        assert rounded_away.mean() < 1e-3
        official = 1 / (1 + np.exp(-z)) > 0.5
        assert 0.05 < official.mean() < 0.95  # both labels occur, so agreement means something
        labels = np.asarray(Image.open(output / f"{case}.png"))
        disagree = (labels != (official & ~rounded_away)) & (np.abs(z) >= 1e-4)
        assert not disagree.any(), f"{case}: {disagree.sum()} pixels differ from sigmoid(logit) > 0.5"


@pytest.mark.slow
def test_fine_tuning_starts_from_the_imported_weights(official_model, monkeypatch):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.run.run_training import get_trainer_from_args

    env, _ = official_model
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(name, env[name])
    report = imported_report(env)
    checkpoint = Path(report["fold_folder"]) / CHECKPOINT_FILE
    imported = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    trainer = get_trainer_from_args(OFFICIAL_ID, "2d", 0, report["trainer"], device=torch.device("cpu"))
    trainer.initialize()  # what nnUNetv2_train -pretrained_weights does before loading
    assert not torch.equal(trainer.network.state_dict()[HEAD_KEY], imported[HEAD_KEY])
    load_pretrained_weights(trainer.network, str(checkpoint))
    loaded = trainer.network.state_dict()
    assert loaded.keys() == imported.keys()
    assert all(torch.equal(loaded[k], imported[k]) for k in loaded)


@pytest.mark.slow
def test_nnunet_train_validates_an_imported_fold(official_model, monkeypatch):
    """An imported fold holds weights, no training state: nnUNetv2_train --val validates it (nnU-Net alone fails on
    the missing state), and loading it is a finished training (--c trains no further)."""
    from nnunetv2.run.run_training import get_trainer_from_args

    env, _ = official_model
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(name, env[name])
    report = imported_report(env)
    fold_dir = Path(report["fold_folder"])
    trainer = get_trainer_from_args(OFFICIAL_ID, "2d", "all", report["trainer"], device=torch.device("cpu"))
    trainer.load_checkpoint(str(fold_dir / CHECKPOINT_FILE))
    imported = torch.load(fold_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=False)["network_weights"]
    loaded = trainer.network.state_dict()
    assert all(torch.equal(loaded[k], imported[k]) for k in imported) and loaded.keys() == imported.keys()
    assert trainer.current_epoch == trainer.num_epochs and trainer.inference_allowed_mirroring_axes is None

    run_cli(["nnUNetv2_train", OFFICIAL_ID, "2d", "all", "-tr", report["trainer"], "-device", "cpu", "--val"],
            dict(env, nnUNet_def_n_proc="1"))
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 4 and summary["foreground_mean"]["Dice"] is not None

    run_cli(["nnUNetv2_train", OFFICIAL_ID, "2d", "all", "-tr", report["trainer"], "-device", "cpu", "--c"],
            dict(env, nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0"))
    final = torch.load(fold_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    assert final["current_epoch"] == trainer.num_epochs and "optimizer_state" in final  # a full checkpoint now
    assert all(torch.equal(final["network_weights"][k], imported[k]) for k in imported)
