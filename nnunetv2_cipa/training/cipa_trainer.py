"""nnUNetTrainerCIPA: the CIPA network trained by the stock nnU-Net 2.8 pipeline.

What differs from nnU-Net's default trainer, and why (docs/recipes.md compares every item with the official code):
- network: ``CIPA`` (preset ``tiny``) built from ``configuration_manager.patch_size``; CT is input channel 0
  (``_0000``), PET channel 1 (``_0001``), the convention of ``nnunetv2_cipa convert``. With the default ``rgb_to_0_1``
  normalisation the network maps [0, 1] to the official [-1.6, 1.6] range itself.
- batch size: the planned one if it fits the GPU, else what fits by ``memory_model`` (env ``nnUNet_CIPA_batch_size``
  overrides); a reduced batch keeps the planned fraction of foreground-oversampled samples (probabilistic
  oversampling). ``accumulate_to_planned_batch`` keeps the planned batch instead, computed in micro-batches (under
  DDP as many on every GPU, for SyncBatchNorm).
- optimiser: AdamW (betas 0.9/0.999, weight decay 0.01 as in the official recipe) with no weight decay on norms,
  biases and SSM parameters (A_log, D, dt bias); every parameter is optimised (the official grouping froze 8.67 M).
- schedule: linear warm-up over ``warmup_epochs`` (at most a tenth of the epochs) then nnU-Net's polynomial decay;
  nnU-Net's epoch length is kept so CIPA and vanilla nnU-Net get the same number of iterations.
- deep supervision: on, with the network's auxiliary heads at its deep-supervision strides (4, 8, 16); targets are
  downsampled by nnU-Net to the same sizes; loss weights 1, 1/2, 1/4, 1/8 (normalised; unlike nnU-Net's default the
  last head is not zero-weighted, because its parameters would otherwise never train). Without deep supervision the
  auxiliary heads are frozen (so DDP needs no find_unused_parameters).
- training step: nnU-Net's (fp16 autocast + GradScaler on CUDA, gradient norm clipped at ``grad_clip_norm``), plus a
  stop with a clear message at the first non-finite loss, micro-batches when accumulating, and activation
  checkpointing when ``activation_checkpointing`` or env ``nnUNet_CIPA_checkpointing=1``. A step that runs out of
  GPU memory (torch's out-of-memory error, or cuBLAS / cuDNN failing to allocate) is retried in micro-batches of half
  the size (``oom_backoff``; not under DDP), so a memory model that is off costs speed, not the training.
  ``network_autocast`` (bf16 / float32 variants) fixes the network's own precision in training, validation and
  prediction alike.
- torch.compile: off unless ``nnUNet_compile`` is set to true (and, as in nnU-Net, never on CPU); then with static
  shapes (``compile_settings``), the selective scans running eagerly between compiled graphs.
- the scan backend, torch / CUDA / mamba-ssm versions and the GPU go into the training log.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnunetv2.preprocessing.normalization.default_normalization_schemes import RGBTo01Normalization
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_cipa.checkpoint_file import can_memory_map
from nnunetv2_cipa.modules.ss2d import TOKEN_MIXERS
from nnunetv2_cipa.network import CIPA, OFFICIAL_INPUT_SCALE_SHIFT
from nnunetv2_cipa.ops.backend_report import scan_backend_report
from nnunetv2_cipa.ops.backends import resolve_backend
from nnunetv2_cipa.training.compile_settings import compile_requested, use_static_shape_compile
from nnunetv2_cipa.training.distributed import reduce_across_processes
from nnunetv2_cipa.training.lr_schedule import WarmupPolyLRScheduler
from nnunetv2_cipa.training.memory_model import BATCH_SIZE_ENV_VAR, choose_batch_size
from nnunetv2_cipa.training.pretrained_encoder import imagenet_checkpoint_path, missing_checkpoint_message

CHECKPOINTING_ENV_VAR = "nnUNet_CIPA_checkpointing"


def unwrap(network: nn.Module) -> nn.Module:
    """The bare network inside DDP and/or torch.compile wrappers."""
    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def weight_decay_groups(network: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on weight matrices/kernels; none on biases, norms (ndim <= 1) and parameters
    marked ``_no_weight_decay`` (A_log, D, dt bias). Frozen parameters are left out."""
    decay, no_decay = [], []
    for param in network.parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or getattr(param, "_no_weight_decay", False):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_steps_to_cpu(optimizer: torch.optim.Optimizer) -> None:
    """Put the optimiser's per-parameter ``step`` counters back on the CPU, where a fresh AdamW keeps them. nnU-Net
    loads checkpoints onto the training device, and AdamW (neither fused nor capturable) reads a GPU step counter with
    ``.item()``: two host syncs per parameter tensor per step after a resume (about 1,600 for CIPA-tiny)."""
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.device.type != "cpu":
            state["step"] = step.to("cpu", copy=True)


def oversampled_fraction(batch_size: int, oversample_foreground_percent: float) -> float:
    """Fraction of a batch nnU-Net's data loader fills with foreground-centred samples (its last
    batch - round(batch * (1 - percent)) samples)."""
    return (batch_size - round(batch_size * (1 - oversample_foreground_percent))) / batch_size


def uses_rgb_to_0_1(normalization_schemes) -> bool:
    """Whether every channel is normalised by nnU-Net's RGBTo01Normalization (x / 255), the official input."""
    return all(s == RGBTo01Normalization.__name__ for s in normalization_schemes)


def micro_batch_count(n: int, micro_batch_size: int | None, min_batch: int) -> int:
    """Chunks of a batch of ``n``: as few as keep each within ``micro_batch_size`` (one when None), but none below
    ``min_batch`` samples unless the batch itself is."""
    return max(1, min(math.ceil(n / (micro_batch_size or n)), n // min_batch))


# device memory running out where the caching allocator does not see it: a library's own workspace or handle
# (cuBLAS, cuDNN) or a raw CUDA allocation, reported as RuntimeError rather than torch.OutOfMemoryError
OUT_OF_MEMORY_MARKERS = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA error: out of memory")


def out_of_memory_text(error: RuntimeError) -> str | None:
    """The first line of ``error``'s text when it says that device memory ran out, else None."""
    if isinstance(error, torch.OutOfMemoryError) or any(m in str(error) for m in OUT_OF_MEMORY_MARKERS):
        return str(error).strip().split("\n")[0]
    return None


class FiniteFlag:
    """Whether a loss is finite, copied to the host without waiting: ``result()`` waits only for the kernels queued
    before the copy (on a GPU the forward pass, while the backward queued after it keeps running)."""

    def __init__(self, loss: torch.Tensor):
        finite = torch.isfinite(loss)
        self._event = None
        if finite.device.type == "cuda":
            stream = torch.cuda.current_stream(finite.device)  # where the loss and the copy are queued
            finite = finite.to("cpu", non_blocking=True)  # into pinned memory
            self._event = torch.cuda.Event()
            self._event.record(stream)
        self._finite = finite

    def result(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        return bool(self._finite)


def scan_backend_log_line(device: torch.device) -> str:
    """One training-log line: the scan backend in use on ``device`` and the versions and GPU behind it."""
    r = scan_backend_report(device)
    gpu = f" ({r['gpu']})" if r["gpu"] else ""
    line = (f"Selective scan: backend {r['backend']} on {r['device']}{gpu} (requested {r['requested']}); "
            f"torch {r['torch']}, CUDA {r['cuda']}, mamba-ssm {r['mamba_ssm']}, triton {r['triton']}")
    if r["fused_kernel_problem"]:
        line += f"; mamba-ssm's fused kernel is unusable: {r['fused_kernel_problem']} (fix: {r['fix']})"
    if r["triton_problem"] and r["backend"] == "torch":
        line += f"; the Triton kernels are unusable: {r['triton_problem']}"
    return line


def memoryless_mixer_log_line(device: torch.device) -> str:
    """The training-log line of a network without selective scans (the no-Mamba control), with the versions and GPU
    of ``scan_backend_log_line``."""
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return (f"Token mixer: memoryless on {device}{gpu}, no selective scan (no scan backend is used); "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def emulated_bf16_warning(device: torch.device) -> str | None:
    """Why bfloat16 autocast is a slow path on ``device``: a GPU before compute capability 8.0 (V100, T4, ...) has no
    native bfloat16 and emulates it. None elsewhere."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return None
    return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no native bfloat16: "
            "bf16 autocast is emulated there, slower than fp16; nnUNetTrainerCIPA trains with fp16 autocast and loss "
            "scaling")


def env_flag(name: str) -> bool:
    """True for 1/true/yes, False when unset, empty or 0/false/no; ValueError otherwise."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("", "0", "false", "no"):
        return False
    raise ValueError(f"{name}={value!r}: expected 1/true/yes or 0/false/no")


class nnUNetTrainerCIPA(nnUNetTrainer):
    """CIPA (preset ``tiny``, faithful to the official sigma_tiny model) under nnU-Net's pipeline."""

    cipa_preset = "tiny"
    use_crm = True
    use_dcim = True
    token_mixer = "selective_scan"
    binary_logit = False  # one sigmoid logit served as the two-class logits [0, z] (the paper recipe)
    imagenet_encoder = False  # start the shared encoder from env nnUNet_CIPA_pretrained's VMamba checkpoint
    activation_checkpointing = False  # or env nnUNet_CIPA_checkpointing=1
    accumulate_to_planned_batch = False  # keep the planned batch on a small GPU, in micro-batches
    network_autocast: torch.dtype | None = None  # None: nnU-Net's fp16 autocast on CUDA; bf16 or float32: fixed
    grad_clip_norm: float | None = 12.0  # nnU-Net's
    oom_backoff = True  # a training step out of GPU memory is retried in micro-batches of half the size

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 6e-4  # CIPA-tiny's measured best (docs/recipes.md, "Learning rate")
        self.weight_decay = 1e-2
        self.warmup_epochs = 10
        self.micro_batch_size: int | None = None  # set when accumulating to the planned batch or backing off
        self.micro_batch_count: int | None = None  # under DDP when accumulating: chunks per step, equal on all GPUs
        self.iteration_in_epoch = 0
        self.imagenet_encoder_loaded = False
        self._restoring_checkpoint = False  # initialize() called by load_checkpoint (--c, --val): no ImageNet load
        if self.network_autocast is not None:
            self.grad_scaler = None  # loss scaling is for fp16 only

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """CIPA for ``configuration_manager.patch_size``; called on the class by nnU-Net's predictor as well, which
        compiles the result when nnUNet_compile is true: the static-shape settings are applied here for it."""
        patch_size = tuple(int(s) for s in configuration_manager.patch_size)
        if len(patch_size) != 2:
            raise ValueError(f"{cls.__name__} is a 2D network: use the '2d' configuration (patch size {patch_size})")
        if num_input_channels != 2:
            raise ValueError(f"{cls.__name__} needs 2 input channels (_0000 = CT, _0001 = PET), the dataset has "
                             f"{num_input_channels}")
        rgb_to_0_1 = uses_rgb_to_0_1(configuration_manager.normalization_schemes)
        scale, shift = OFFICIAL_INPUT_SCALE_SHIFT if rgb_to_0_1 else (1.0, 0.0)
        network = CIPA(num_classes=num_output_channels, patch_size=patch_size, preset=cls.cipa_preset,
                       in_channels=num_input_channels, ct_channel=0, pet_channel=1, use_crm=cls.use_crm,
                       use_dcim=cls.use_dcim, token_mixer=cls.token_mixer, deep_supervision=enable_deep_supervision,
                       binary_logit=cls.binary_logit, input_scale=scale, input_shift=shift,
                       autocast_dtype=cls.network_autocast)
        if compile_requested():
            use_static_shape_compile()
        if not enable_deep_supervision:
            network.decoder.aux_heads.requires_grad_(False)  # unused: kept only so that checkpoints load either way
        return network

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        return [[1.0, 1.0]] + [[1.0 / s, 1.0 / s] for s in unwrap(self.network).deep_supervision_strides]

    def _build_loss(self):
        loss = super()._build_loss()
        if isinstance(loss, DeepSupervisionWrapper):
            weights = np.array([1 / 2 ** i for i in range(len(loss.weight_factors))])
            loss.weight_factors = tuple(weights / weights.sum())
        return loss

    def _do_i_compile(self):
        return "nnUNet_compile" in os.environ and super()._do_i_compile()  # opt-in: off when unset

    def configure_optimizers(self):
        groups = weight_decay_groups(unwrap(self.network), self.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, betas=(0.9, 0.999), eps=1e-8)
        warmup = min(self.warmup_epochs, self.num_epochs // 10)  # short (debug) schedules get a shorter warm-up
        scheduler = WarmupPolyLRScheduler(optimizer, self.initial_lr, warmup, self.num_epochs)
        return optimizer, scheduler

    # ---- batch size, precision and checkpointing -------------------------------------------------------------

    def checkpointing_enabled(self) -> bool:
        """The class setting, or env nnUNet_CIPA_checkpointing=1."""
        return self.activation_checkpointing or self._config(env_flag, CHECKPOINTING_ENV_VAR)

    def training_autocast_dtype(self) -> torch.dtype:
        """Width of the stored activations: float16 under nnU-Net's CUDA autocast, else the network's own."""
        if self.network_autocast is not None:
            return self.network_autocast
        return torch.float16 if self.device.type == "cuda" else torch.float32

    def _config(self, read, *args, **kwargs):
        """A user setting read by ``read(*args, **kwargs)``; a bad value stops with its message instead of a
        traceback."""
        try:
            return read(*args, **kwargs)
        except ValueError as e:
            raise SystemExit(f"{self.__class__.__name__}: {e}") from e

    def _meta_network(self) -> CIPA:
        """This trainer's network on the meta device (nothing allocated): parameter count and smallest batch."""
        channels = determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)
        with torch.device("meta"):
            return self.build_network_architecture(self.plans_manager, self.configuration_manager, channels,
                                                   self.label_manager.num_segmentation_heads,
                                                   self.enable_deep_supervision)

    def _scan_backend(self) -> str | None:
        """The backend that runs this network's selective scans on its device; None for a token mixer that runs none
        (the memoryless one: neither a backend setting nor a missing kernel concerns it)."""
        if not TOKEN_MIXERS[self.token_mixer].runs_scans:
            return None
        return self._config(resolve_backend, None, self.device)

    def _free_device_bytes(self) -> int | None:
        """Free memory of this process's GPU; under DDP the least of all processes', so that every process picks
        the same batch (batch Dice all-gathers per-sample terms, and micro-batches must match for SyncBatchNorm).
        None on other devices."""
        if self.device.type != "cuda":
            return None
        if self.is_ddp:  # NCCL sets up its buffers on the GPU at the first collective: before reading what is free
            reduce_across_processes(0, dist.ReduceOp.SUM, self.device)
        free = torch.cuda.mem_get_info(self.device)[0]
        return reduce_across_processes(free, dist.ReduceOp.MIN, self.device) if self.is_ddp else free

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()  # the planned batch (per GPU under DDP)
        planned = self.batch_size
        network = self._meta_network()
        choice = self._config(choose_batch_size, planned, self.device, self.cipa_preset,
                              self.configuration_manager.patch_size, sum(p.numel() for p in network.parameters()),
                              self._scan_backend(), self.training_autocast_dtype(),
                              self.checkpointing_enabled(), network.min_training_batch, self._free_device_bytes(),
                              distributed=self.is_ddp)
        self.print_to_log_file(choice.log_line())
        if choice.chosen < network.min_training_batch and not self.accumulate_to_planned_batch:  # set by the env
            raise SystemExit(f"{self.__class__.__name__}: {BATCH_SIZE_ENV_VAR}={choice.chosen}: "
                             f"CIPA-{self.cipa_preset} at {'x'.join(map(str, self.configuration_manager.patch_size))} "
                             f"trains with at least {network.min_training_batch} samples per batch (its DCIM BatchNorm "
                             "sees one token per sample there)")
        if self.is_ddp and self.device.type == "cuda":
            self.print_to_log_file(f"DDP: every one of the {dist.get_world_size()} processes plans with the least "
                                   "free GPU memory among them")
        batch = planned if self.accumulate_to_planned_batch else choice.chosen
        if self.is_ddp and self.loss_gathers_samples_across_gpus():
            batch = self._equal_batch_on_every_gpu(batch)
        if self.accumulate_to_planned_batch:
            self.micro_batch_size = min(choice.chosen, batch)
            passes = ""
            if self.is_ddp:
                self.micro_batch_count = self._agree_on_micro_batch_count(batch, network.min_training_batch)
                passes = f", {self.micro_batch_count} forward passes per step on every GPU"
            kept = "the planned batch" if batch == planned else "a batch"
            self.print_to_log_file(f"Keeping {kept} of {batch}: gradients accumulated over micro-batches of "
                                   f"{self.micro_batch_size}{passes}")
        if batch != planned:
            fraction = oversampled_fraction(planned, self.oversample_foreground_percent)
            self.batch_size = batch
            self.oversample_foreground_percent, self.probabilistic_oversampling = fraction, True
            self.print_to_log_file(f"Foreground oversampling: each sample with probability {fraction:.3f}, the "
                                   f"fraction of the planned batch of {planned}")

    def loss_gathers_samples_across_gpus(self) -> bool:
        """Whether the training loss all-gathers per-sample terms from every GPU under DDP, in each forward pass (so
        that every GPU must pass the same number of samples): nnU-Net's batch Dice does."""
        return bool(self.configuration_manager.batch_dice)

    def _equal_batch_on_every_gpu(self, batch: int) -> int:
        """The least of the DDP processes' batches. nnU-Net splits the planned batch unevenly where the GPU count
        does not divide it (12 on 8 GPUs: 2, 2, 2, 2, 1, 1, 1, 1), and its batch Dice's all-gather of unequal
        batches aborts or hangs."""
        equal = reduce_across_processes(batch, dist.ReduceOp.MIN, self.device)
        if reduce_across_processes(batch, dist.ReduceOp.MAX, self.device) != equal:
            world = dist.get_world_size()
            self.print_to_log_file(
                f"DDP: nnU-Net's batch Dice gathers per-sample terms from every GPU, so every GPU trains the same "
                f"batch: {equal} per GPU, {equal * world} in all, as the planned {self.configuration_manager.batch_size} "
                f"does not split evenly over {world} GPUs")
        return equal

    def _agree_on_micro_batch_count(self, planned: int, min_batch: int) -> int:
        """Micro-batches per step under DDP, the same on every process: DCIM's SyncBatchNorm gathers statistics in
        each forward pass. With a loss that gathers nothing the shares of a batch may differ ([3, 2] for 5 on 2
        GPUs), so micro-batches of 2 would mean 2 passes on one GPU, 1 on the other, and a hang."""
        count = reduce_across_processes(micro_batch_count(planned, self.micro_batch_size, min_batch),
                                        dist.ReduceOp.MAX, self.device)
        most = reduce_across_processes(max(1, planned // min_batch), dist.ReduceOp.MIN, self.device)
        if count > most:
            total = self.configuration_manager.batch_size
            raise SystemExit(
                f"{self.__class__.__name__}: under DDP every GPU must run as many micro-batches per step as the others "
                f"(SyncBatchNorm), but nnU-Net splits the planned batch of {total} unevenly over "
                f"{dist.get_world_size()} GPUs, and micro-batches of {self.micro_batch_size} need {count} passes for the "
                f"largest share, more than the smallest share can be split into ({most}). Use a number of GPUs that "
                f"divides {total}, turn on activation checkpointing (-tr nnUNetTrainerCIPA_checkpointing or export "
                f"{CHECKPOINTING_ENV_VAR}=1: larger micro-batches fit), or train nnUNetTrainerCIPA (the batch that "
                "fits, without accumulation)")
        return count

    # ---- set-up and logging ----------------------------------------------------------------------------------

    def initialize(self):
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"{self.__class__.__name__}: nnU-Net trains on the GPU unless told otherwise, but torch "
                             f"{torch.__version__} sees no CUDA GPU: pass -device cpu to nnUNetv2_train, or install "
                             "a CUDA build of torch")
        if self._do_i_compile():
            self.print_to_log_file(use_static_shape_compile())
        super().initialize()
        network = unwrap(self.network)
        self.print_to_log_file(
            f"Network: CIPA-{self.cipa_preset} ({type(network).__module__}.{type(network).__name__}, "
            f"{sum(p.numel() for p in network.parameters()):,} parameters) at patch "
            f"{'x'.join(map(str, network.patch_size))}; the plan's network_class_name above is nnU-Net's U-Net, which "
            "this trainer does not build")
        network.activation_checkpointing = self.checkpointing_enabled()
        if network.activation_checkpointing:
            compiled = "; under torch.compile these stages run eagerly" if self._do_i_compile() else ""
            self.print_to_log_file("Activation checkpointing: on (every encoder, fusion and decoder stage is "
                                   f"recomputed in backward{compiled})")
        self.print_to_log_file(scan_backend_log_line(self.device) if TOKEN_MIXERS[self.token_mixer].runs_scans else
                               memoryless_mixer_log_line(self.device))
        if self.network_autocast == torch.bfloat16 and (warning := emulated_bf16_warning(self.device)):
            self.print_to_log_file(warning)
            print(f"nnunetv2_cipa WARNING: {warning}", file=sys.stderr, flush=True)
        if self.imagenet_encoder and not self._restoring_checkpoint:
            self._maybe_load_imagenet_encoder()

    def _maybe_load_imagenet_encoder(self) -> None:
        """Load the ImageNet encoder if nnUNet_CIPA_pretrained is set; a fresh training without it stops in
        on_train_start (``--val``, ``--c`` and prediction never read it: they load our own checkpoints)."""
        from nnunetv2_cipa.pretrained import load_vmamba_checkpoint

        path = self._config(imagenet_checkpoint_path)
        self.imagenet_encoder_loaded = path is not None
        if path is not None:
            report = load_vmamba_checkpoint(unwrap(self.network), path)
            self.print_to_log_file(f"Loaded the ImageNet VMamba encoder from {path.parent}/{report.summary()}")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's, plus the weights-only folds that ``nnunetv2_cipa import-official`` writes (no training state):
        loaded as a finished training, so ``--val`` validates it and ``--c`` trains no further."""
        self._restoring_checkpoint = True  # nnU-Net's load_checkpoint initializes an uninitialized trainer
        try:
            # memory-mapped: only the weights-only fold's tensors are read here (nnU-Net reads a full checkpoint)
            checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
                torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False,
                           mmap=can_memory_map(filename_or_checkpoint))
            if "optimizer_state" in checkpoint:
                super().load_checkpoint(filename_or_checkpoint)
            else:
                self._load_weights_only_fold(checkpoint)
        finally:
            self._restoring_checkpoint = False
        optimizer_steps_to_cpu(self.optimizer)

    def _load_weights_only_fold(self, checkpoint: dict) -> None:
        if not self.was_initialized:
            self.initialize()
        unwrap(self.network).load_state_dict(checkpoint["network_weights"])
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.current_epoch = self.num_epochs
        self.print_to_log_file(f"Loaded a weights-only fold ({checkpoint.get('trainer_name')}): no training state, "
                               "taken as a finished training")

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self.imagenet_encoder and self.current_epoch == 0 and not self.imagenet_encoder_loaded:
            raise SystemExit(f"{self.__class__.__name__}: {missing_checkpoint_message()}")
        super().on_train_start()

    def on_train_epoch_start(self):
        self.iteration_in_epoch = 0
        super().on_train_epoch_start()

    # ---- the training step -----------------------------------------------------------------------------------

    def _step_autocast(self):
        """nnU-Net's fp16 autocast on CUDA, unless the network fixes its own precision."""
        if self.device.type == "cuda" and self.network_autocast is None:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @property
    def min_training_batch(self) -> int:
        """The network's smallest trainable batch (after ``initialize``)."""
        return unwrap(self.network).min_training_batch

    def _micro_batch_count(self, n: int, micro_batch_size: int | None) -> int:
        """Chunks of a batch of ``n``: the count agreed under DDP, else ``micro_batch_count``."""
        if self.micro_batch_count is not None:
            return self.micro_batch_count
        return micro_batch_count(n, micro_batch_size, self.min_training_batch)

    def _largest_micro_batch(self, n: int, micro_batch_size: int | None) -> int:
        return math.ceil(n / self._micro_batch_count(n, micro_batch_size))

    def _micro_batches(self, data: torch.Tensor, target):
        """(data, target, weight) for each of the balanced chunks of ``data`` (B, C, H, W) and its target;
        weight = the chunk's share of the batch."""
        n = data.shape[0]
        for part in torch.arange(n).tensor_split(self._micro_batch_count(n, self.micro_batch_size)):
            part = slice(int(part[0]), int(part[-1]) + 1)
            chunk_target = [t[part] for t in target] if isinstance(target, list) else target[part]
            yield data[part], chunk_target, (part.stop - part.start) / n

    def _check_finite(self, loss: torch.Tensor, finite: FiniteFlag) -> None:
        """Raise FloatingPointError when the step's ``loss`` is not finite (``finite``: its FiniteFlag)."""
        if not finite.result():
            lr = self.optimizer.param_groups[0]["lr"]
            raise FloatingPointError(
                f"{self.__class__.__name__}: the training loss is {loss.item()} at epoch {self.current_epoch}, "
                f"iteration {self.iteration_in_epoch} (lr {lr:.3g}); training stopped before this step changed the "
                f"weights. Try the bf16 or float32 variant (nnUNetTrainerCIPA_bf16, _noAMP) or a lower learning rate")

    def _accumulate_gradients(self, data: torch.Tensor, target) -> tuple[torch.Tensor, FiniteFlag]:
        """Forward and backward of the batch in micro-batches; the gradients of the batch loss are left in .grad
        (scaled by the GradScaler when there is one). Under DDP only the last micro-batch's backward all-reduces
        them. Returns the loss and its FiniteFlag."""
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        chunks = list(self._micro_batches(data, target))
        for index, (data_part, target_part, weight) in enumerate(chunks):
            local = index < len(chunks) - 1 and isinstance(self.network, DistributedDataParallel)
            with self.network.no_sync() if local else contextlib.nullcontext():
                with self._step_autocast():
                    loss = self.loss(self.network(data_part), target_part) * weight
                total += loss.detach()
                if index == len(chunks) - 1:  # copied to the host while the GPU runs the last backward
                    finite = FiniteFlag(total)
                (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()
        return total, finite

    def _back_off(self, batch_size: int, error: str) -> None:
        """After an out-of-memory ``error`` in a step of ``batch_size`` samples: halve the micro-batch, or raise
        torch.OutOfMemoryError with what to do when that is not possible."""
        current = self._largest_micro_batch(batch_size, self.micro_batch_size)
        smaller = max(self.min_training_batch, current // 2)
        where = (f"{self.__class__.__name__}: out of GPU memory at epoch {self.current_epoch}, iteration "
                 f"{self.iteration_in_epoch}, in micro-batches of {current} of a batch of {batch_size} ({error})")
        if not self.oom_backoff:
            why = "oom_backoff is off"
        elif self.is_ddp:
            why = "not retried under DDP (every process must run the same micro-batches)"
        elif self._largest_micro_batch(batch_size, smaller) >= current:  # balanced chunks of >= min_training_batch
            why = f"{current} is the smallest micro-batch"
        else:
            why = None
        if why is not None:
            raise torch.OutOfMemoryError(
                f"{where}; {why}. Set a smaller batch (export {BATCH_SIZE_ENV_VAR}=N), turn on activation "
                f"checkpointing (-tr nnUNetTrainerCIPA_checkpointing or export {CHECKPOINTING_ENV_VAR}=1), or free "
                f"GPU memory")
        self.micro_batch_size = smaller
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        message = (f"{where}: retrying in micro-batches of {smaller}, with the gradients accumulated (the batch "
                   f"stays {batch_size}). To start with a batch that fits, set {BATCH_SIZE_ENV_VAR} or turn on "
                   "activation checkpointing")
        self.print_to_log_file(message)
        print(f"nnunetv2_cipa WARNING: {message}", file=sys.stderr, flush=True)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        while True:
            try:
                total, finite = self._accumulate_gradients(data, target)
                break
            except RuntimeError as e:  # torch.OutOfMemoryError is one
                error = out_of_memory_text(e)  # only the text: its frames hold the failed step's tensors
                if error is None:
                    raise
            self._back_off(data.shape[0], error)
        self._check_finite(total, finite)  # waits for the forward pass only: the backward is queued already
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.iteration_in_epoch += 1
        return {"loss": total.cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step, per micro-batch when accumulating (counts summed, loss averaged)."""
        if self.micro_batch_size is None:
            return super().validation_step(batch)
        parts = [(super(nnUNetTrainerCIPA, self).validation_step({"data": d, "target": t}), w)
                 for d, t, w in self._micro_batches(batch["data"], batch["target"])]
        merged = {key: sum(p[key] for p, _ in parts) for key in ("tp_hard", "fp_hard", "fn_hard")}
        merged["loss"] = sum(p["loss"] * w for p, w in parts)
        return merged
