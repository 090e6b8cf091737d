"""Trainer behaviour beyond the network: batch size from the memory model, precision variants, the stop at a
non-finite loss, gradient accumulation, activation checkpointing, and the paper-recipe trainer's settings."""

from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest
import torch

from nnunetv2_cipa.network import CIPA, PRESETS
from nnunetv2_cipa.training import cipa_trainer
from nnunetv2_cipa.training.cipa_trainer import emulated_bf16_warning, oversampled_fraction, unwrap
from nnunetv2_cipa.training.loss import BCEAndSoftDiceLoss
from nnunetv2_cipa.training.lr_schedule import PerIterationCosineLRScheduler
from nnunetv2_cipa.training.memory_model import (BATCH_SIZE_ENV_VAR, activation_bytes_per_sample,
                                                 choose_batch_size, fitting_batch_size, scan_workspace_bytes,
                                                 training_state_bytes)
from nnunetv2_cipa.trainer_discovery import find_trainer_class
from nnunetv2_cipa.training.paper_trainer import official_parameter_groups

from test_trainer import ds_targets, make_trainer, nnunet_paths  # noqa: F401 (fixture)

GIB = 2 ** 30


def batch(trainer, n: int = 2, foreground: float = 0.3, seed: int = 0) -> dict:
    """A random batch in nnU-Net's layout for ``trainer`` (deep-supervision targets when it uses them)."""
    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.rand(n, 2, *patch, generator=generator)
    target = (torch.rand(n, 1, *patch, generator=generator) < foreground).float()
    scales = trainer._get_deep_supervision_scales()
    return {"data": data, "target": ds_targets(target, scales) if scales else target}


def test_oversampled_fraction_is_the_data_loaders():
    assert oversampled_fraction(12, 0.33) == pytest.approx(4 / 12)  # samples 8..11 of a batch of 12
    assert oversampled_fraction(2, 0.33) == 0.5 and oversampled_fraction(1, 0.33) == 0.0


def test_choose_batch_size_caps_the_planned_batch_by_free_memory(monkeypatch):
    monkeypatch.delenv(BATCH_SIZE_ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    per_sample = activation_bytes_per_sample("micro", (512, 512), "torch", torch.float16, False)
    free = (training_state_bytes(10 ** 6) + scan_workspace_bytes("torch", "cuda") + 3.5 * per_sample) / 0.9
    choice = choose_batch_size(12, cuda, "micro", (512, 512), 10 ** 6, "torch", torch.float16, False,
                               free_bytes=int(free), device_name="Test GPU")
    assert choice.chosen == 3 and choice.planned == 12 and "Test GPU" in choice.reason and "3 fit" in choice.reason
    assert choice.log_line().startswith("CIPA batch size: planned 12, using 3 (")
    roomy = choose_batch_size(12, cuda, "micro", (512, 512), 10 ** 6, "cuda", torch.float16, False,
                              free_bytes=100 * GIB, device_name="Big GPU")
    assert roomy.chosen == 12  # never above the planned batch
    tiny = choose_batch_size(12, cuda, "micro", (512, 512), 10 ** 6, "cuda", torch.float16, False,
                             free_bytes=GIB // 100, device_name="Small GPU")
    assert tiny.chosen == 1 and "may not fit" in tiny.reason
    assert choose_batch_size(12, cuda, "micro", (512, 512), 10 ** 6, "cuda", torch.float16, False, min_batch=2,
                             free_bytes=GIB // 100, device_name="Small GPU").chosen == 2
    assert choose_batch_size(12, torch.device("cpu"), "micro", (512, 512), 0, "cpu", torch.float32, False).chosen == 12


def test_ddp_gradient_buckets_are_part_of_the_training_state(monkeypatch):
    """Under DDP every float32 gradient also sits in an all-reduce bucket: 4 more bytes per parameter, which can
    cost a sample where the memory is tight."""
    monkeypatch.delenv(BATCH_SIZE_ENV_VAR, raising=False)
    parameters = 5 * 10 ** 7  # DDP's buckets: 200 MB, most of a CIPA-micro sample at 512 x 512 under fp16 (237 MB)
    assert training_state_bytes(parameters, distributed=True) - training_state_bytes(parameters) == 4 * parameters
    per_sample = activation_bytes_per_sample("micro", (512, 512), "cuda", torch.float16, False)
    free = int((training_state_bytes(parameters) + 3.1 * per_sample) / 0.9)
    single, ddp = (choose_batch_size(12, torch.device("cuda"), "micro", (512, 512), parameters, "cuda", torch.float16,
                                     False, free_bytes=free, device_name="Test GPU", distributed=distributed)
                   for distributed in (False, True))
    assert (single.chosen, ddp.chosen) == (3, 2) and "DDP buckets" in ddp.reason and "DDP" not in single.reason


def test_batch_size_env_override_wins_and_is_checked(monkeypatch):
    monkeypatch.setenv(BATCH_SIZE_ENV_VAR, "5")
    choice = choose_batch_size(12, torch.device("cuda"), "tiny", (512, 512), 10 ** 6, "cuda", torch.float16, False,
                               free_bytes=GIB, device_name="Test GPU")
    assert choice.chosen == 5 and BATCH_SIZE_ENV_VAR in choice.reason
    monkeypatch.setenv(BATCH_SIZE_ENV_VAR, "zero")
    with pytest.raises(ValueError, match="positive integer"):
        choose_batch_size(12, torch.device("cpu"), "tiny", (512, 512), 0, "cpu", torch.float32, False)


def test_memory_model_rejects_unknown_inputs():
    with pytest.raises(ValueError, match="scan backend"):
        activation_bytes_per_sample("tiny", (512, 512), "numpy", torch.float32, False)
    with pytest.raises(ValueError, match="activation dtype"):
        activation_bytes_per_sample("tiny", (512, 512), "cuda", torch.int8, False)
    assert fitting_batch_size(GIB, 10 ** 9, 1) == 0  # the training state alone exceeds the memory
    with pytest.raises(ValueError, match="no measured memory coefficient for preset 'huge' with the triton scan"):
        activation_bytes_per_sample("huge", (512, 512), "triton", torch.float32, False)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_has_a_gpu_memory_model(preset, backend):
    """Every preset can choose its batch on a GPU with either compiled kernel (gathered scan orders for cuda, in
    place for triton): both activation widths, with and without checkpointing; checkpointing always saves memory,
    16-bit saves some without it and costs at most 7% more with it (CIPA-micro, gathered: where only the stages'
    inputs are kept, autocast's 16-bit copies and the float32 LayerNorm inputs outweigh what 2 bytes save)."""
    per_sample = {(dtype, ckpt): activation_bytes_per_sample(preset, (512, 512), backend, dtype, ckpt)
                  for dtype in (torch.float32, torch.float16) for ckpt in (False, True)}
    for dtype in (torch.float32, torch.float16):
        assert per_sample[dtype, True] < per_sample[dtype, False]
    assert per_sample[torch.float16, False] < per_sample[torch.float32, False]
    assert per_sample[torch.float16, True] <= per_sample[torch.float32, True] * 1.07


def test_trainer_applies_the_choice_to_batch_and_oversampling(nnunet_paths, monkeypatch):
    """A reduced batch keeps the planned batch's fraction of foreground samples; the log states both batches."""
    trainer = make_trainer("nnUNetTrainerCIPA", nnunet_paths, patch_size=(256, 256))  # trains at batch 1
    planned = trainer.configuration_manager.batch_size
    monkeypatch.setenv(BATCH_SIZE_ENV_VAR, "1")
    with pytest.raises(SystemExit, match="CIPA-tiny at 64x64 trains with at least 2 samples per batch"):
        make_trainer("nnUNetTrainerCIPA", nnunet_paths)._set_batch_size_and_oversample()
    trainer._set_batch_size_and_oversample()
    assert trainer.batch_size == 1 and trainer.probabilistic_oversampling
    assert trainer.oversample_foreground_percent == pytest.approx(oversampled_fraction(planned, 0.33))
    log = open(trainer.log_file).read()
    assert f"CIPA batch size: planned {planned}, using 1 (set by {BATCH_SIZE_ENV_VAR})" in log

    accumulating = make_trainer("nnUNetTrainerCIPA_accumulate", nnunet_paths, patch_size=(256, 256))
    accumulating._set_batch_size_and_oversample()
    assert accumulating.batch_size == planned and accumulating.micro_batch_size == 1
    small = make_trainer("nnUNetTrainerCIPA_accumulate", nnunet_paths)  # 64x64: micro-batches of at least 2
    small._set_batch_size_and_oversample()
    chunks = cipa_trainer.micro_batch_count(planned, small.micro_batch_size, min_batch=2)
    assert small.batch_size == planned and small.micro_batch_size == 1 and planned // chunks >= 2
    assert not accumulating.probabilistic_oversampling
    monkeypatch.setenv(BATCH_SIZE_ENV_VAR, "-3")
    with pytest.raises(SystemExit, match="positive integer"):
        make_trainer("nnUNetTrainerCIPA", nnunet_paths)._set_batch_size_and_oversample()


def test_trainer_on_a_faked_gpu_uses_the_memory_model(nnunet_paths, monkeypatch):
    """The device's free memory drives the choice (faked: the test machine has no GPU)."""
    monkeypatch.delenv(BATCH_SIZE_ENV_VAR, raising=False)
    trainer = make_trainer("nnUNetTrainerCIPA", nnunet_paths, patch_size=(512, 512))
    trainer.device = torch.device("cuda")
    parameters = sum(p.numel() for p in trainer._meta_network().parameters())
    per_sample = activation_bytes_per_sample("tiny", (512, 512), "torch", torch.float16, False)
    free = int((training_state_bytes(parameters) + scan_workspace_bytes("torch", "cuda") + 2.5 * per_sample) / 0.9)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(cipa_trainer, "resolve_backend", lambda backend, device: "torch")
    trainer._set_batch_size_and_oversample()
    assert trainer.batch_size == 2
    assert "Fake GPU" in open(trainer.log_file).read()


def test_no_mamba_control_takes_the_in_place_figures_on_every_backend(nnunet_paths, monkeypatch):
    """The memoryless mixer runs no scan (backend None): nothing is gathered and there is no scan workspace.
    nnUNetTrainerCIPA_noMamba chooses its batch by those figures, also where CIPA's scans would run on the torch
    backend (the same free memory gives it more samples), and logs that it runs no scans."""
    monkeypatch.delenv(BATCH_SIZE_ENV_VAR, raising=False)
    in_place = activation_bytes_per_sample("tiny", (512, 512), "triton", torch.float16, False)
    assert activation_bytes_per_sample("tiny", (512, 512), None, torch.float16, False) == in_place
    assert scan_workspace_bytes(None, "cuda") == 0 < scan_workspace_bytes("torch", "cuda")
    assert activation_bytes_per_sample("tiny", (512, 512), "torch", torch.float16, False) > in_place

    trainers = {name: make_trainer(name, nnunet_paths, patch_size=(512, 512))
                for name in ("nnUNetTrainerCIPA", "nnUNetTrainerCIPA_noMamba")}
    parameters = sum(p.numel() for p in trainers["nnUNetTrainerCIPA"]._meta_network().parameters())
    free = int((training_state_bytes(parameters) + 2.5 * in_place) / 0.9)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(cipa_trainer, "resolve_backend", lambda backend, device: "torch")
    for trainer in trainers.values():
        trainer.device = torch.device("cuda")
        trainer._set_batch_size_and_oversample()
    assert (trainers["nnUNetTrainerCIPA"].batch_size, trainers["nnUNetTrainerCIPA_noMamba"].batch_size) == (1, 2)
    log = open(trainers["nnUNetTrainerCIPA_noMamba"].log_file).read()
    assert "CIPA-tiny at 512x512, no selective scans, 16-bit activations" in log and "scan workspace" not in log


def test_no_mamba_control_needs_no_scan_backend(nnunet_paths, monkeypatch, capfd):
    """A network without selective scans neither resolves nor reports a scan backend: a backend setting that
    cannot run here, or a missing kernel, stops or warns CIPA, not the no-Mamba control."""
    monkeypatch.setenv("NNUNETV2_CIPA_SCAN_BACKEND", "cuda")  # cannot run on this CPU
    with pytest.raises(SystemExit, match="backend 'cuda' cannot run on cpu"):
        make_trainer("nnUNetTrainerCIPA", nnunet_paths)._set_batch_size_and_oversample()
    control = make_trainer("nnUNetTrainerCIPA_noMamba", nnunet_paths)
    control.initialize()
    log = open(control.log_file).read()
    assert "Token mixer: memoryless on cpu, no selective scan" in log and "Selective scan:" not in log
    assert "WARNING" not in capfd.readouterr().err


def test_meta_network_matches_the_real_network(nnunet_paths):
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    trainer.initialize()
    meta = trainer._meta_network()
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in trainer.network.parameters())
    assert meta.min_training_batch == 2  # 64 x 64: one PET token per channel at the deepest stage


def test_min_training_batch():
    assert CIPA(2, (64, 64), preset="micro").min_training_batch == 2
    assert CIPA(2, (64, 64), preset="micro", use_dcim=False).min_training_batch == 1
    with torch.device("meta"):
        assert CIPA(2, (256, 256), preset="tiny").min_training_batch == 1


def test_training_log_names_batch_and_scan_backend(nnunet_paths):
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    trainer.initialize()
    log = open(trainer.log_file).read()
    assert "CIPA batch size: planned" in log
    assert "Selective scan: backend cpu on cpu" in log and f"torch {torch.__version__}" in log
    network = trainer.network
    assert (f"Network: CIPA-micro (nnunetv2_cipa.network.CIPA, {sum(p.numel() for p in network.parameters()):,} "
            f"parameters) at patch {'x'.join(map(str, network.patch_size))}") in log


class StepOnGpu(torch.Tensor):
    """A step counter as nnU-Net's load_checkpoint leaves it on a GPU (map_location = the training device)."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results of its ops are plain tensors

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_resume_keeps_adamw_step_counters_on_the_cpu(nnunet_paths, tmp_path):
    """After --c on a GPU AdamW's step counters would stay on the GPU, and AdamW reads them with .item() for every
    parameter tensor at every step; the trainer moves them back, values unchanged."""
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    trainer.initialize()
    trainer.train_step(batch(trainer))
    trainer.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    for state in checkpoint["optimizer_state"]["state"].values():
        state["step"] = state["step"].as_subclass(StepOnGpu)
    torch.save(checkpoint, tmp_path / "on_gpu.pth")
    resumed = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    resumed.load_checkpoint(str(tmp_path / "on_gpu.pth"))
    steps = [state["step"] for state in resumed.optimizer.state.values()]
    assert steps and all(type(step) is torch.Tensor and step.device.type == "cpu" and step.item() == 1
                         for step in steps)


@pytest.mark.parametrize("capability, slow", [((7, 0), True), ((7, 5), True), ((8, 0), False), ((9, 0), False)])
def test_bf16_on_a_gpu_without_native_bf16_is_named_a_slow_path(monkeypatch, capability, slow):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla V100")
    warning = emulated_bf16_warning(torch.device("cuda", 0))
    assert (warning is not None) == slow
    if slow:
        assert warning.startswith(f"Tesla V100 (compute capability {capability[0]}.{capability[1]}) has no native")
    assert emulated_bf16_warning(torch.device("cpu")) is None


@pytest.mark.parametrize("name, dtype", [("nnUNetTrainerCIPA_bf16", torch.bfloat16),
                                         ("nnUNetTrainerCIPA_noAMP", torch.float32)])
def test_precision_variants_build_and_step(name, dtype, nnunet_paths):
    trainer = make_trainer(name, nnunet_paths)
    trainer.initialize()
    assert trainer.grad_scaler is None and unwrap(trainer.network).autocast_dtype == dtype
    seen, loss_inputs = [], []
    hook = unwrap(trainer.network).decoder.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss_hook = trainer.loss.register_forward_pre_hook(lambda m, args: loss_inputs.append({o.dtype for o in args[0]}))
    before = [p.detach().clone() for p in trainer.network.parameters()]
    loss = trainer.train_step(batch(trainer))["loss"]
    hook.remove(), loss_hook.remove()
    assert np.isfinite(loss) and seen == [dtype]
    assert loss_inputs == [{torch.float32}]  # cross-entropy and Dice on float32 logits, not bf16 ones
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_finite_flag_reads_the_loss_it_was_made_from(device):
    """On CUDA each loss is computed behind a kernel that keeps the GPU busy: a flag read without waiting for the
    copy would find the pinned buffer not yet written."""
    values = [0.25, float("nan"), float("inf"), -float("inf"), 3e38]
    flags = []
    for value in values:
        loss = torch.tensor(value, device=device)
        if device == "cuda":
            torch.cuda._sleep(10 ** 8)
        flags.append(cipa_trainer.FiniteFlag(loss * 1))
    assert [flag.result() for flag in flags] == [True, False, False, False, True]


def test_non_finite_loss_stops_before_the_weights_change(nnunet_paths):
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    trainer.initialize()
    trainer.current_epoch, trainer.iteration_in_epoch = 3, 7
    bad = batch(trainer)
    bad["data"][0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in trainer.network.parameters()]
    with pytest.raises(FloatingPointError, match="loss is nan at epoch 3, iteration 7"):
        trainer.train_step(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))


def test_accumulated_micro_batches_give_the_weighted_gradient(nnunet_paths):
    """train_step over micro-batches of 2 = the gradient of the batch-size-weighted sum of the chunk losses."""
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    trainer.initialize()
    trainer.micro_batch_size = 2
    trainer.grad_clip_norm = None
    data = batch(trainer, n=4)
    reference = copy.deepcopy(unwrap(trainer.network))
    torch.manual_seed(0)  # DropPath / dropout randomness: none in micro, but keep both runs on the same stream
    trainer.optimizer.step = lambda: None  # keep the weights: compare gradients
    trainer.train_step(data)
    total = 0.0
    for i in (0, 2):
        part = [t[i:i + 2] for t in data["target"]]
        total = total + trainer.loss(reference(data["data"][i:i + 2]), part) * 0.5
    total.backward()
    for ours, ref in zip(trainer.network.parameters(), reference.parameters()):
        if ref.grad is not None:
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n, micro, smallest, sizes", [(4, None, 1, [4]), (12, 5, 1, [4, 4, 4]), (7, 3, 2, [3, 2, 2]),
                                                      (3, 1, 2, [3]), (12, 11, 2, [6, 6])])
def test_micro_batches_are_balanced_and_never_below_the_smallest_batch(n, micro, smallest, sizes, nnunet_paths):
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    trainer.micro_batch_size, trainer.network = micro, types.SimpleNamespace(min_training_batch=smallest)
    data = torch.arange(n).view(n, 1, 1, 1)
    chunks = list(trainer._micro_batches(data, [data.clone()]))
    assert [len(d) for d, _, _ in chunks] == sizes
    assert torch.cat([d for d, _, _ in chunks]).flatten().tolist() == list(range(n))
    assert all(torch.equal(d, t[0]) for d, t, _ in chunks) and sum(w for _, _, w in chunks) == pytest.approx(1)


def test_micro_batches_under_ddp_all_reduce_once_per_step(nnunet_paths):
    """With DDP (gloo, one process) a step in micro-batches all-reduces the gradients once, in the last backward, and
    gives the gradients of the same step without DDP."""
    import torch.distributed as dist

    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    trainer.initialize()
    trainer.grad_clip_norm, trainer.micro_batch_size = None, 2
    trainer.optimizer.step = lambda: None  # keep the weights: compare gradients
    data = batch(trainer, n=4)
    trainer.train_step(copy.deepcopy(data))
    plain = [None if p.grad is None else p.grad.clone() for p in trainer.network.parameters()]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trainer.network = torch.nn.parallel.DistributedDataParallel(trainer.network)
        reductions = []

        def count(state, bucket):
            reductions.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        trainer.network.register_comm_hook(None, count)
        trainer.train_step(copy.deepcopy(data))
    finally:
        dist.destroy_process_group()
    assert reductions and len(reductions) == len(set(reductions))  # every bucket once: one synchronised backward
    for ours, expected in zip(trainer.network.module.parameters(), plain):
        if expected is not None:
            torch.testing.assert_close(ours.grad, expected, rtol=1e-5, atol=1e-7)


def fail_once_out_of_memory(network, call: int, error: RuntimeError | None = None):
    """Make ``network``'s forward raise ``error`` (default: the caching allocator's out-of-memory error) on its
    ``call``-th call (1-based), once."""
    forward, calls = network.forward, []

    def failing(x):
        calls.append(x.shape[0])
        if len(calls) == call:
            raise error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore detail")
        return forward(x)

    network.forward = failing
    return calls


def test_out_of_memory_step_is_retried_in_smaller_micro_batches(nnunet_paths, capsys):
    """An OOM in the second micro-batch of 4 (the first one's gradients already accumulated) -> the step is redone in
    micro-batches of 2 and leaves exactly the gradients of a clean run in micro-batches of 2; the log and stderr
    say so, once."""
    trainers = [make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths) for _ in range(2)]
    for trainer, micro in zip(trainers, (4, 2)):
        trainer.initialize()
        trainer.micro_batch_size, trainer.grad_clip_norm = micro, None
        trainer.optimizer.step = lambda: None  # keep the weights: compare gradients
    unwrap(trainers[1].network).load_state_dict(unwrap(trainers[0].network).state_dict())
    calls = fail_once_out_of_memory(trainers[0].network, call=2)
    data = batch(trainers[0], n=8)
    losses = [trainer.train_step(copy.deepcopy(data))["loss"] for trainer in trainers]
    assert calls == [4, 4, 2, 2, 2, 2] and trainers[0].micro_batch_size == 2
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for ours, clean in zip(trainers[0].network.parameters(), trainers[1].network.parameters()):
        if clean.grad is not None:
            torch.testing.assert_close(ours.grad, clean.grad, rtol=1e-5, atol=1e-7)
    expected = ("out of GPU memory at epoch 0, iteration 0, in micro-batches of 4 of a batch of 8 (CUDA out of "
                "memory. Tried to allocate 9.00 GiB): retrying in micro-batches of 2")
    assert expected in open(trainers[0].log_file).read()
    assert capsys.readouterr().err.count(expected) == 1
    trainers[0].train_step(copy.deepcopy(data))  # later steps start at the smaller micro-batch
    assert calls[6:] == [2, 2, 2, 2]


@pytest.mark.parametrize("error, retried", [
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
    ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported", True),
    ("mat1 and mat2 shapes cannot be multiplied (8x3 and 4x5)", False)])
def test_library_allocation_failures_are_retried_like_out_of_memory(error, retried, nnunet_paths):
    """cuBLAS / cuDNN handles and workspaces, and raw CUDA allocations, fail with a RuntimeError, not torch's
    OutOfMemoryError: retried in smaller micro-batches as well; any other RuntimeError propagates unchanged."""
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    trainer.initialize()
    calls = fail_once_out_of_memory(trainer.network, call=1, error=RuntimeError(error))
    if retried:
        trainer.train_step(batch(trainer, n=4))
        assert calls == [4, 2, 2] and trainer.micro_batch_size == 2
        assert f"({error.splitlines()[0]}): retrying in micro-batches of 2" in open(trainer.log_file).read()
    else:
        with pytest.raises(RuntimeError, match=r"^mat1 and mat2 shapes cannot be multiplied"):
            trainer.train_step(batch(trainer, n=4))
        assert calls == [4] and trainer.micro_batch_size is None


@pytest.mark.parametrize("setting, why", [("smallest", "2 is the smallest micro-batch"),
                                          ("odd", "3 is the smallest micro-batch"),  # 5 = 3 + 2: no smaller split
                                          ("ddp", "not retried under DDP"), ("off", "oom_backoff is off")])
def test_out_of_memory_that_cannot_be_retried_stops_with_the_fix(setting, why, nnunet_paths):
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    trainer.initialize()
    assert trainer.min_training_batch == 2  # micro at the debug plan's patch: DCIM's BatchNorm needs 2
    trainer.micro_batch_size = 2 if setting in ("smallest", "odd") else None
    trainer.is_ddp = setting == "ddp"
    trainer.oom_backoff = setting != "off"
    fail_once_out_of_memory(trainer.network, call=1)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    with pytest.raises(torch.OutOfMemoryError, match=why) as raised:
        trainer.train_step(batch(trainer, n={"smallest": 2, "odd": 5}.get(setting, 4)))
    assert "Tried to allocate 9.00 GiB" in str(raised.value) and "nnUNet_CIPA_batch_size" in str(raised.value)
    assert "nnUNetTrainerCIPA_checkpointing" in str(raised.value)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))


def test_cuda_device_without_cuda_stops_with_the_fix(nnunet_paths, monkeypatch):
    """nnUNetv2_train without -device cpu on a machine whose torch has no CUDA: one clear message before anything
    (the scan backend's fallback warnings included) is set up."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    trainer.device = torch.device("cuda", 0)
    with pytest.raises(SystemExit, match="sees no CUDA GPU: pass -device cpu to nnUNetv2_train"):
        trainer.initialize()
    assert not trainer.was_initialized


def test_unknown_scan_backend_stops_with_its_message(nnunet_paths, monkeypatch):
    monkeypatch.setenv("NNUNETV2_CIPA_SCAN_BACKEND", "bogus")
    with pytest.raises(SystemExit, match="nnUNetTrainerCIPA_debug: .*bogus"):
        make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths).initialize()


def test_checkpointing_env_var_turns_it_on(nnunet_paths, monkeypatch):
    monkeypatch.setenv("nnUNet_CIPA_checkpointing", "1")
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    trainer.initialize()
    assert unwrap(trainer.network).activation_checkpointing
    assert "Activation checkpointing: on" in open(trainer.log_file).read()
    monkeypatch.setenv("nnUNet_CIPA_checkpointing", "maybe")
    with pytest.raises(SystemExit, match="nnUNet_CIPA_checkpointing"):
        make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths).initialize()


def test_paper_trainer_settings(nnunet_paths):
    trainer = make_trainer("nnUNetTrainerCIPA_paper_debug", nnunet_paths)
    trainer.initialize()
    train_cases, val_cases = trainer.do_split()
    assert trainer.batch_size == 4 and trainer.configuration_manager.batch_size == 4
    assert trainer.num_iterations_per_epoch == len(train_cases) // 4
    assert trainer.num_val_iterations_per_epoch == -(-len(val_cases) // 4)
    assert trainer.enable_deep_supervision is False and trainer.grad_clip_norm is None
    assert isinstance(trainer.loss, BCEAndSoftDiceLoss)
    assert isinstance(trainer.lr_scheduler, PerIterationCosineLRScheduler)
    assert trainer.lr_scheduler.total_steps == trainer.num_epochs * trainer.num_iterations_per_epoch
    assert trainer.optimizer.defaults["lr"] == 6e-5 and trainer.optimizer.defaults["betas"] == (0.9, 0.999)
    assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] is None
    assert trainer.inference_allowed_mirroring_axes is None
    network = unwrap(trainer.network)
    assert network.binary_logit and not any(p.requires_grad for p in network.decoder.aux_heads.parameters())
    trainer.lr_scheduler.step(0)
    lr0 = trainer.optimizer.param_groups[0]["lr"]
    trainer.train_step(batch(trainer, n=4))
    lr1 = trainer.optimizer.param_groups[0]["lr"]
    assert lr1 == pytest.approx(trainer.lr_scheduler.lr_at(1)) and lr1 < lr0


def test_paper_trainer_refuses_to_train_on_other_normalisations(nnunet_paths):
    """The recipe's inputs are x / 255 (RGBTo01Normalization): on another plan the network would skip the official
    rescaling and the crop step would clamp at 0..1. Building the trainer (as --val does) still works."""
    plans = copy.deepcopy(nnunet_paths.plans())
    plans["configurations"]["2d"]["normalization_schemes"] = ["CTNormalization", "RGBTo01Normalization"]
    plans["continue_training"] = False
    dataset_json = json.loads((nnunet_paths.preprocessed / "dataset.json").read_text())
    trainer = find_trainer_class("nnUNetTrainerCIPA_paper_debug")(plans=plans, configuration="2d", fold=0,
                                                                  dataset_json=dataset_json, device=torch.device("cpu"))
    with pytest.raises(SystemExit, match=r"normalises with CTNormalization, RGBTo01Normalization.*"
                                         r"--normalization rgb --overwrite.*nnUNetv2_plan_and_preprocess"):
        trainer.on_train_start()
    assert not trainer.was_initialized  # refused before building anything


def test_paper_trainer_keeps_the_plans_batch_in_the_plans(nnunet_paths):
    trainer = make_trainer("nnUNetTrainerCIPA_paper_debug", nnunet_paths)
    planned = trainer.plans_manager.plans["configurations"]["2d"]["batch_size"]
    assert trainer.plans_manager.get_configuration("2d").batch_size == planned  # plans.json stays as planned
    trainer._set_batch_size_and_oversample()
    log = open(trainer.log_file).read()
    assert f"Paper recipe: batch 4 in place of the plan's {planned}" in log and "CIPA batch size: planned 4" in log


def test_official_parameter_groups_leave_out_the_ssm_parameters():
    """The official optimiser misses 8,673,024 parameters of CIPA-tiny with one output (built on the meta device)."""
    with torch.device("meta"):
        network = CIPA(2, (512, 512), preset="tiny", binary_logit=True)
    groups, left_out = official_parameter_groups(network, 0.01)
    assert sum(p.numel() for p in left_out) == 8_673_024
    names = {n.rsplit(".", 1)[-1] for n, p in network.named_parameters() if any(p is q for q in left_out)}
    assert names == {"x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds", "scale1", "scale2"}
    grouped = sum(p.numel() for g in groups for p in g["params"])
    assert grouped + sum(p.numel() for p in left_out) == sum(p.numel() for p in network.parameters())


def test_documented_gpu_batches():
    """The batches docs/usage.md ("Batch size and GPU memory") gives CIPA-tiny at 512 x 512 on common GPUs."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_memory import gpu_batch_table, gpu_batch_table_lines

    rows = gpu_batch_table()
    table = {(row["gpu_gib"], backend): tuple(row[backend].values()) for row in rows for backend in ("cuda", "triton")}
    assert {gib: table[gib, "cuda"] for gib, _ in table} == {
        16: (2, 8, 2), 24: (4, 12, 3), 40: (7, 12, 6), 48: (9, 12, 7), 80: (12, 12, 12), 141: (12, 12, 12)}
    assert {gib: table[gib, "triton"] for gib, _ in table} == {  # in place: no gathered copies kept
        16: (3, 12, 3), 24: (5, 12, 4), 40: (9, 12, 8), 48: (11, 12, 9), 80: (12, 12, 12), 141: (12, 12, 12)}
    documented = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    assert all(line in documented for line in gpu_batch_table_lines(rows))
