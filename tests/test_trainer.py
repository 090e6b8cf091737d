"""Trainer-level tests: every trainer's network from a real generated plans file, optimiser groups, schedule,
deep supervision wiring, a CPU bf16 train step, DDP requirements."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_cipa.training.cipa_trainer import nnUNetTrainerCIPA, unwrap, weight_decay_groups
from nnunetv2_cipa.trainer_discovery import find_trainer_class
from nnunetv2_cipa.training.lr_schedule import WarmupPolyLRScheduler
from nnunetv2_cipa.training.pretrained_encoder import PRETRAINED_ENV_VAR

from test_setup import ALL_TRAINERS

# the pretrained trainers build the same networks as their bases; their checkpoint handling is tested below
CIPA_TRAINERS = [t for t in ALL_TRAINERS if "CIPA" in t and "pretrained" not in t]
MICRO_TRAINERS = ("nnUNetTrainerCIPAMicro", "nnUNetTrainerCIPA_debug", "nnUNetTrainerCIPAMicro_demo",
                  "nnUNetTrainerCIPA_paper_debug")


def plans_with_patch(planned_dataset, patch_size) -> dict:
    plans = copy.deepcopy(planned_dataset.plans())
    plans["configurations"]["2d"]["patch_size"] = list(patch_size)
    return plans


@pytest.fixture
def nnunet_paths(planned_dataset, monkeypatch):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, planned_dataset.env[name])
    monkeypatch.setenv("nnUNet_CIPA_pretrained", "")
    return planned_dataset


def make_trainer(name: str, planned_dataset, patch_size=None):
    plans = plans_with_patch(planned_dataset, patch_size) if patch_size else planned_dataset.plans()
    plans["continue_training"] = False
    dataset_json = json.loads((planned_dataset.preprocessed / "dataset.json").read_text())
    return find_trainer_class(name)(plans=plans, configuration="2d", fold=0, dataset_json=dataset_json,
                                    device=torch.device("cpu"))


def ds_targets(target: torch.Tensor, scales) -> list[torch.Tensor]:
    """nnU-Net's own DownsampleSegForDSTransform applied to each (1, H, W) label map of a (B, 1, H, W) batch."""
    transform = DownsampleSegForDSTransform(ds_scales=scales)
    per_sample = [transform(segmentation=t)["segmentation"] for t in target]
    return [torch.stack(level) for level in zip(*per_sample)]


@pytest.mark.parametrize("patch_size", [None, (80, 112)], ids=["planned", "80x112"])
@pytest.mark.parametrize("name", CIPA_TRAINERS)
def test_network_from_real_plans(name, patch_size, nnunet_paths):
    """Built on the class exactly as nnU-Net's predictor does, for the planned and a non-square patch size."""
    plans = plans_with_patch(nnunet_paths, patch_size) if patch_size else nnunet_paths.plans()
    manager = PlansManager(plans)
    configuration = manager.get_configuration("2d")
    cls = find_trainer_class(name)
    network = cls.build_network_architecture(manager, configuration, 2, 2, enable_deep_supervision=False)
    assert type(network).__name__ == "CIPA"
    if name in MICRO_TRAINERS:
        x = torch.rand(2, 2, *configuration.patch_size)
        with torch.no_grad():
            assert network(x).shape == (2, 2, *configuration.patch_size)
    names = {n.split(".")[0] for n, _ in network.named_parameters()}
    assert ("crm" in names) == cls.use_crm and ("dcim" in names) == cls.use_dcim
    assert any(n.endswith("A_logs") for n, _ in network.named_parameters()) == (cls.token_mixer == "selective_scan")
    assert network.decoder.head.weight.shape[0] == (1 if cls.binary_logit else 2)


@pytest.mark.parametrize("patch_size", [None, (80, 112)], ids=["planned", "80x112"])
def test_debug_trainer_train_step_with_deep_supervision(patch_size, nnunet_paths):
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths, patch_size)
    trainer.initialize()
    trainer.set_deep_supervision_enabled(True)
    scales = trainer._get_deep_supervision_scales()
    assert scales == [[1.0, 1.0], [0.25, 0.25], [0.125, 0.125], [0.0625, 0.0625]]
    assert np.isclose(sum(trainer.loss.weight_factors), 1) and all(w > 0 for w in trainer.loss.weight_factors)
    patch = trainer.configuration_manager.patch_size
    data = torch.rand(2, 2, *patch)
    target = (torch.rand(2, 1, *patch) > 0.7).float()
    outputs = trainer.network(data)
    assert [tuple(o.shape[2:]) for o in outputs] == [tuple(t.shape[2:]) for t in ds_targets(target, scales)]
    before = [p.detach().clone() for p in trainer.network.parameters()]
    loss = trainer.train_step({"data": data, "target": ds_targets(target, scales)})["loss"]
    assert np.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))

    trainer.set_deep_supervision_enabled(False)  # what validation and the predictor see
    with torch.no_grad():
        assert trainer.network(data).shape == (2, 2, *patch)


def test_cpu_bf16_autocast_train_step_is_finite(nnunet_paths):
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    trainer.initialize()
    trainer.set_deep_supervision_enabled(True)
    patch = trainer.configuration_manager.patch_size
    data, target = torch.rand(2, 2, *patch), (torch.rand(2, 1, *patch) > 0.7).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.loss(trainer.network(data), ds_targets(target, trainer._get_deep_supervision_scales()))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in trainer.network.parameters() if p.grad is not None)


def test_optimizer_groups_cover_every_parameter_once(nnunet_paths):
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    trainer.initialize()
    network = unwrap(trainer.network)
    decay, no_decay = trainer.optimizer.param_groups
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert decay["weight_decay"] == trainer.weight_decay and no_decay["weight_decay"] == 0
    ids_decay, ids_no = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert not ids_decay & ids_no and ids_decay | ids_no == {id(p) for p in network.parameters()}
    for name, param in network.named_parameters():
        if name.endswith(("A_logs", ".Ds")) or getattr(param, "_no_weight_decay", False) or param.ndim <= 1:
            assert id(param) in ids_no, name
    assert any(name.endswith("A_logs") for name, _ in network.named_parameters())


def test_weight_decay_groups_respect_the_marker():
    layer = torch.nn.Linear(3, 4)
    marked = torch.nn.Parameter(torch.zeros(4, 4))
    marked._no_weight_decay = True
    layer.register_parameter("marked", marked)
    decay, no_decay = weight_decay_groups(layer, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 2


def test_warmup_poly_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupPolyLRScheduler(optimizer, 1e-3, warmup_steps=10, max_steps=110)
    lrs = [scheduler.lr_at(step) for step in range(110)]
    assert np.allclose(lrs[:10], 1e-4 * np.arange(1, 11))
    assert np.isclose(lrs[10], 1e-3) and lrs[-1] < 1e-4 and all(np.diff(lrs[10:]) < 0)
    scheduler.step(42)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduler.lr_at(42))
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupPolyLRScheduler(optimizer, 1e-3, warmup_steps=5, max_steps=5)


def test_compile_only_on_opt_in(nnunet_paths, monkeypatch):
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    monkeypatch.delenv("nnUNet_compile", raising=False)
    assert trainer._do_i_compile() is False


def test_pretrained_trainer_needs_the_checkpoint_only_to_start_training(nnunet_paths, monkeypatch, tmp_path):
    """--val, --c and prediction load our own checkpoints: only a fresh training needs nnUNet_CIPA_pretrained."""
    monkeypatch.delenv(PRETRAINED_ENV_VAR, raising=False)
    trainer = make_trainer("nnUNetTrainerCIPA_pretrained", nnunet_paths)  # constructing it needs nothing
    trainer.initialize()
    assert trainer.imagenet_encoder_loaded is False
    with pytest.raises(SystemExit, match=PRETRAINED_ENV_VAR):
        trainer.on_train_start()
    checkpoint = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(checkpoint))
    monkeypatch.setenv(PRETRAINED_ENV_VAR, str(tmp_path / "missing.pth"))
    with pytest.raises(SystemExit, match="missing.pth: no such file"):
        make_trainer("nnUNetTrainerCIPA_paper_pretrained", nnunet_paths).initialize()
    resumed = make_trainer("nnUNetTrainerCIPA_pretrained", nnunet_paths)
    resumed.load_checkpoint(str(checkpoint))  # --c / --val: the variable still names a file that is gone
    assert resumed.was_initialized and resumed.imagenet_encoder_loaded is False
    saved, restored = trainer.network.state_dict(), resumed.network.state_dict()
    assert all(torch.equal(saved[key], restored[key]) for key in saved)


def start_ddp(worker, world_size: int, *args) -> list:
    """``worker(rank, world_size, port, *args, queue)`` in ``world_size`` spawned processes; what each put on the
    queue, sorted."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(worker, nprocs=world_size, join=True, start_method="spawn",
                       args=(world_size, port, *args, queue))
    return sorted(queue.get() for _ in range(world_size))


def _ddp_worker(rank: int, world_size: int, port: int, plans: dict, trainer: str, deep_supervision: bool,
                queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    manager = PlansManager(plans)
    configuration = manager.get_configuration("2d")
    network = find_trainer_class(trainer).build_network_architecture(manager, configuration, 2, 2, deep_supervision)
    ddp = torch.nn.parallel.DistributedDataParallel(network)  # find_unused_parameters=False, as in nnU-Net
    patch = configuration.patch_size
    for _ in range(2):  # DDP reports unused parameters on the iteration after they were missed
        outputs = ddp(torch.rand(2, 2, *patch))
        sum(o.float().mean() for o in (outputs if deep_supervision else [outputs])).backward()
    trained = [p for p in network.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trained)
    queue.put((rank, sum(float(p.grad.abs().sum()) for p in trained)))
    dist.destroy_process_group()


@pytest.mark.parametrize("trainer, deep_supervision", [("nnUNetTrainerCIPA_debug", True),
                                                       ("nnUNetTrainerCIPA_paper_debug", False)])
def test_ddp_two_processes_no_unused_parameters(nnunet_paths, trainer, deep_supervision):
    """nnU-Net wraps the network in DDP without find_unused_parameters: every trained parameter must get a gradient
    (without deep supervision the auxiliary heads are frozen; run with gloo on CPU, nnU-Net's own -num_gpus path
    needs CUDA)."""
    grads = dict(start_ddp(_ddp_worker, 2, nnunet_paths.plans(), trainer, deep_supervision))
    assert set(grads) == {0, 1} and all(g > 0 for g in grads.values())


def _batch_choice_worker(rank: int, world_size: int, port: int, plans: dict, dataset_json: dict, free_gib: list,
                         queue) -> None:
    """Under DDP on faked GPUs with ``free_gib[rank]`` GiB free: the batch nnUNetTrainerCIPA chooses, and the paper
    trainer's batch and iterations per epoch."""
    import torch.distributed as dist

    from nnunetv2_cipa.training import cipa_trainer
    from nnunetv2_cipa.training.paper_trainer import nnUNetTrainerCIPA_paper_debug

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.cuda.mem_get_info = lambda device: (int(free_gib[rank] * 2 ** 30), 80 * 2 ** 30)
    torch.cuda.get_device_name = lambda device: f"Fake GPU {rank}"
    cipa_trainer.resolve_backend = lambda backend, device: "torch"
    trainers = {cls.__name__: cls(plans=copy.deepcopy(plans), configuration="2d", fold=0, dataset_json=dataset_json)
                for cls in (nnUNetTrainerCIPA, nnUNetTrainerCIPA_paper_debug)}
    for trainer in trainers.values():
        assert trainer.is_ddp and trainer.device.type == "cuda"  # nnU-Net's DDP always trains on a GPU
        trainer._set_batch_size_and_oversample()
    paper = trainers["nnUNetTrainerCIPA_paper_debug"]
    paper.network = paper._meta_network()
    paper.configure_optimizers()
    queue.put((rank, trainers["nnUNetTrainerCIPA"].batch_size, paper.batch_size, paper.num_iterations_per_epoch))
    dist.destroy_process_group()


def free_gib_for(samples: float, plans: dict) -> float:
    """Free GPU memory in which the memory model fits ``samples`` (rounded down) samples of nnUNetTrainerCIPA at the
    plans' patch size (torch scan, fp16 activations)."""
    from nnunetv2_cipa.training.memory_model import (USABLE_FRACTION, activation_bytes_per_sample,
                                                     scan_workspace_bytes, training_state_bytes)

    manager = PlansManager(plans)
    with torch.device("meta"):
        network = nnUNetTrainerCIPA.build_network_architecture(manager, manager.get_configuration("2d"), 2, 2, True)
    per_sample = activation_bytes_per_sample("tiny", manager.get_configuration("2d").patch_size, "torch",
                                             torch.float16, False)
    fixed = training_state_bytes(sum(p.numel() for p in network.parameters())) + scan_workspace_bytes("torch", "cuda")
    return (fixed + samples * per_sample) / USABLE_FRACTION / 2 ** 30


def test_ddp_processes_agree_on_batch_and_epoch_length(nnunet_paths):
    """Three DDP processes (gloo): nnUNetTrainerCIPA plans every process's batch with the least free GPU memory
    (process 1 has room for one sample of the 12 planned, 4 per process: all take 1), and the paper recipe's global batch of 4,
    split [2, 1, 1] by nnU-Net, gives every process the same number of iterations (else the longer ones wait for
    an all-reduce that never comes)."""
    plans = plans_with_patch(nnunet_paths, (256, 256))  # one sample trains (a batch of 1 at the debug plan's patch
    plans["configurations"]["2d"]["batch_size"] = 12    # would give DCIM's BatchNorm a single value per channel)
    plans["continue_training"] = False  # what nnU-Net's entry point adds to the plans
    dataset_json = json.loads((nnunet_paths.preprocessed / "dataset.json").read_text())
    results = start_ddp(_batch_choice_worker, 3, plans, dataset_json, [60.0, free_gib_for(1.5, plans), 60.0])
    train_cases = len(json.loads((nnunet_paths.preprocessed / "splits_final.json").read_text())[0]["train"])
    assert [r[1] for r in results] == [1, 1, 1]  # not 4 / 1 / 4
    assert [r[2] for r in results] == [2, 1, 1]
    assert [r[3] for r in results] == [max(1, train_cases // 4)] * 3


def _batch_split_worker(rank: int, world_size: int, port: int, plans: dict, dataset_json: dict, cases: list,
                        queue) -> None:
    """Under DDP on faked GPUs, for each (trainer, planned global batch, free GiB, batch Dice) in ``cases``: the
    trainer's batch on this GPU and its micro-batch sizes per step, after its loss ran forward and backward on them
    (the real collectives), or the message it stops with."""
    import torch.distributed as dist

    from nnunetv2_cipa.training import cipa_trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.cuda.get_device_name = lambda device: f"Fake GPU {rank}"
    cipa_trainer.resolve_backend = lambda backend, device: "torch"
    outcomes = []
    for name, global_batch, free_gib, batch_dice in cases:
        torch.cuda.mem_get_info = lambda device, free=free_gib: (int(free * 2 ** 30), 80 * 2 ** 30)
        case_plans = copy.deepcopy(plans)
        case_plans["configurations"]["2d"].update(batch_size=global_batch, batch_dice=batch_dice)
        trainer = find_trainer_class(name)(plans=case_plans, configuration="2d", fold=0, dataset_json=dataset_json)
        try:
            trainer._set_batch_size_and_oversample()
        except SystemExit as e:
            outcomes.append(str(e))
        else:
            trainer.network = trainer._meta_network()
            logits = torch.rand(trainer.batch_size, 2, 8, 8, requires_grad=True)
            target = (torch.rand(trainer.batch_size, 1, 8, 8) > 0.5).float()
            trainer.enable_deep_supervision = False
            loss = trainer._build_loss()  # nnU-Net's: its batch Dice all-gathers under DDP, as in a training step
            chunks = list(trainer._micro_batches(logits, target))
            sum(loss(part, part_target) * weight for part, part_target, weight in chunks).backward()
            outcomes.append((trainer.batch_size, [len(part) for part, _, _ in chunks]))
    queue.put((rank, outcomes))
    dist.destroy_process_group()


def test_ddp_batches_fit_the_collectives_of_every_forward_pass(nnunet_paths):
    """Two GPUs, nnU-Net's split of an odd batch uneven ([3, 2] for 5, [2, 1] for 3). nnU-Net's batch Dice
    all-gathers per-sample terms in every forward pass (unequal batches abort the gloo processes), so with it every
    GPU trains the same batch, accumulating or not. DCIM's SyncBatchNorm gathers in every forward pass too, so with a
    loss that gathers nothing the shares may differ but the number of micro-batches may not: 2 on both GPUs for
    micro-batches of 2 ([2, 1] and [1, 1], not [2, 1] and [2]); where the smaller share cannot be split that often
    (micro-batches of 1 for [2, 1]) the trainer stops with what to do instead of hanging."""
    plans = plans_with_patch(nnunet_paths, (256, 256))
    plans["continue_training"] = False
    dataset_json = json.loads((nnunet_paths.preprocessed / "dataset.json").read_text())
    two, one, plenty = free_gib_for(2.5, plans), free_gib_for(1.5, plans), 60.0
    cases = [("nnUNetTrainerCIPA", 5, plenty, True), ("nnUNetTrainerCIPA_accumulate", 5, two, True),
             ("nnUNetTrainerCIPA_accumulate", 5, two, False), ("nnUNetTrainerCIPA_accumulate", 3, one, False)]
    (_, outcomes_0), (_, outcomes_1) = start_ddp(_batch_split_worker, 2, plans, dataset_json, cases)
    assert outcomes_0[:3] == [(2, [2]), (2, [2]), (3, [2, 1])]
    assert outcomes_1[:3] == [(2, [2]), (2, [2]), (2, [1, 1])]
    stop = outcomes_0[3]
    assert stop == outcomes_1[3]
    assert "splits the planned batch of 3 unevenly over 2 GPUs" in stop and "need 2 passes" in stop
    assert "Use a number of GPUs that divides 3" in stop


def test_sync_batchnorm_conversion_covers_dcim(nnunet_paths):
    """Under DDP nnU-Net converts BatchNorm to SyncBatchNorm; only DCIM's conv stacks have BatchNorm."""
    manager = PlansManager(nnunet_paths.plans())
    network = nnUNetTrainerCIPA.build_network_architecture(manager, manager.get_configuration("2d"), 2, 2, True)
    bn_names = [n for n, m in network.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn_names and all(n.startswith("dcim.") for n in bn_names)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    assert all(isinstance(m, torch.nn.SyncBatchNorm) for n, m in converted.named_modules() if n in bn_names)
