"""Pieces of the official CIPA training recipe: loss, per-iteration cosine schedule, augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from nnunetv2_cipa.training.augmentation import (BinarizeSegmentationTransform, ShiftScaleAspectTransform,
                                                 SquareCropResizeTransform, official_augmentation)
from nnunetv2_cipa.training.loss import BCEAndSoftDiceLoss
from nnunetv2_cipa.training.lr_schedule import PerIterationCosineLRScheduler


def reference_loss(z: np.ndarray, y: np.ndarray, smooth: float = 1.0) -> float:
    """BCE-with-logits (mean over every pixel) + 1 - mean over samples of the per-sample soft Dice."""
    bce = np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))
    p = 1 / (1 + np.exp(-z))
    dice = [(2 * (p[b] * y[b]).sum() + smooth) / (p[b].sum() + y[b].sum() + smooth) for b in range(len(z))]
    return float(bce + 1 - np.mean(dice))


def test_loss_equals_an_independent_bce_plus_per_sample_dice():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (3, 1, 17, 23))
    y = (rng.random((3, 1, 17, 23)) < 0.3).astype(np.float64)
    y[2] = 0  # a sample without tumour: its Dice is smooth / (sum p + smooth)
    output = torch.cat([torch.zeros(3, 1, 17, 23, dtype=torch.float64), torch.from_numpy(z)], 1)
    loss = BCEAndSoftDiceLoss()(output, torch.from_numpy(y))
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(reference_loss(z, y), rel=1e-12)


def test_loss_rejects_a_softmax_head_or_mismatched_shapes():
    with pytest.raises(ValueError, match="expected output"):
        BCEAndSoftDiceLoss()(torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="expected output"):
        BCEAndSoftDiceLoss()(torch.zeros(2, 2, 8, 8), torch.zeros(2, 1, 8, 4))


def cosine(epochs=5, iterations=20, warmup=0):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return PerIterationCosineLRScheduler(optimizer, 6e-5, epochs, iterations, warmup_epochs=warmup), optimizer


def test_cosine_schedule_values():
    scheduler, optimizer = cosine()
    total = scheduler.total_steps
    assert total == 100
    factor = lambda t: (1 + math.cos(math.pi * t / total)) / 2 * (1 - 1e-6) + 1e-6  # noqa: E731
    for t in (0, 1, total // 2, total - 1):
        assert scheduler.lr_at(t) == pytest.approx(6e-5 * factor(t), rel=1e-12)
    assert scheduler.lr_at(0) == pytest.approx(6e-5) and scheduler.lr_at(total // 2) == pytest.approx(3e-5, rel=1e-5)
    assert 0 < scheduler.lr_at(total - 1) < 6e-5 * 1e-3


def test_cosine_schedule_steps_per_iteration_and_resumes_at_epoch_starts():
    scheduler, optimizer = cosine()
    scheduler.step(0)  # nnU-Net, at the start of epoch 0
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step_iteration()
    assert lrs == [pytest.approx(scheduler.lr_at(t)) for t in range(20)]
    scheduler.step(3)  # resuming at epoch 3 (nnUNetv2_train --c)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduler.lr_at(60))


def test_cosine_schedule_warm_up_is_linear_from_1e_3():
    scheduler, _ = cosine(epochs=10, iterations=10, warmup=5)
    assert scheduler.lr_at(0) == pytest.approx(6e-5 * 1e-3)
    assert scheduler.lr_at(25) == pytest.approx(6e-5 * (1e-3 + (1 - 1e-3) * 0.5))
    assert scheduler.lr_at(50) == pytest.approx(6e-5)
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine(epochs=5, warmup=5)


def sample(size=(64, 64), seed=0):
    """(2, H, W) image with distinct content and a (1, H, W) 0/1 label."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.random((2, *size)).astype(np.float32))
    seg = torch.zeros(1, *size, dtype=torch.int16)
    seg[0, 20:40, 10:30] = 1
    return image, seg


def test_warp_scales_and_shifts_without_rotation():
    np.random.seed(1)
    transform = ShiftScaleAspectTransform()
    for _ in range(200):
        params = transform.get_parameters(image=torch.zeros(2, 64, 80))
        theta = params["theta"]
        assert theta[0, 1] == 0 and theta[1, 0] == 0  # no rotation or shear
        assert 0.9 * 0.9 ** 0.5 <= params["scale_x"] <= 1.1 * 1.1 ** 0.5
        assert abs(params["shift"][0]) <= 0.1 * 64 and abs(params["shift"][1]) <= 0.1 * 80
        assert 0.9 - 1e-9 <= params["scale_x"] / params["scale_y"] <= 1.1 + 1e-9  # the aspect factor
    image = torch.zeros(1, 64, 64)
    image[0, 32, :] = 1.0  # a horizontal line stays horizontal (its rows are contiguous)
    out = transform(image=image, segmentation=torch.zeros(1, 64, 64))["image"]
    rows = torch.nonzero(out[0].amax(1) > 0.05).flatten()
    assert len(rows) <= 3 and (rows.diff() == 1).all()


def test_warp_identity_parameters_reproduce_the_input():
    image, seg = sample()
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    transform = ShiftScaleAspectTransform()
    torch.testing.assert_close(transform._apply_to_image(image, theta=theta), image, atol=1e-5, rtol=0)
    shifted = transform._apply_to_segmentation(seg, theta=torch.tensor([[1.0, 0, -2 * 5 / 64], [0, 1.0, 0]]))
    assert torch.equal(shifted[0, 20:40, 15:35] > 0.5, torch.ones(20, 20, dtype=torch.bool))  # 5 pixels to the right


def test_crop_side_is_70_to_90_percent_and_inside_the_image():
    np.random.seed(2)
    transform = SquareCropResizeTransform()
    sides = []
    for _ in range(500):
        top, left, side = transform.get_parameters(image=torch.zeros(2, 100, 120))["box"]
        sides.append(side)
        assert top >= 0 and left >= 0 and top + side <= 100 and left + side <= 120
    assert min(sides) >= 70 and max(sides) <= 90 and max(sides) - min(sides) > 15
    image, seg = sample()
    out = transform(image=image, segmentation=seg.float())
    assert out["image"].shape == image.shape and out["segmentation"].shape == seg.shape


def test_crop_resize_saturates_at_the_8_bit_range_only():
    """As the official bicubic resize of 8-bit images: overshoot at an edge stays inside 0..255 (here 0..1, after
    x / 255), and is cut only there."""
    image = torch.full((2, 64, 64), 50 / 255)
    image[0, :, 32:] = 200 / 255  # a step from 50 to 200 in CT
    image[1, :, 32:] = 1.0  # a step from 50 to 255 in PET
    out = SquareCropResizeTransform()._apply_to_image(image, box=(0, 0, 48), size=(64, 64))
    assert out[0].min() < 50 / 255 - 0.02 and out[0].max() > 200 / 255 + 0.02  # bicubic overshoot kept
    assert out[1].max() == 1.0 and out.min() >= 0.0  # saturated at 255


def test_flip_is_horizontal_only_and_each_step_has_probability_one_half():
    torch.manual_seed(0)
    np.random.seed(0)
    warp, flip, crop, binarize = official_augmentation()[1:]
    assert isinstance(flip, MirrorTransform) and flip.allowed_axes == (1,)
    assert isinstance(binarize, BinarizeSegmentationTransform)
    n = 4000
    for step in (warp, crop):
        assert isinstance(step, RandomTransform)
        rate = np.mean([step.get_parameters()["apply_transform"] for _ in range(n)])
        assert abs(rate - 0.5) < 0.03
    flips = [flip.get_parameters()["axes"] for _ in range(n)]
    assert all(axes in ([], [1]) for axes in flips)
    assert abs(np.mean([axes == [1] for axes in flips]) - 0.5) < 0.03
    image, _ = sample()
    flipped = flip._apply_to_image(image, axes=[1])
    torch.testing.assert_close(flipped, image.flip(-1))  # columns reversed: a left-right flip


def test_whole_pipeline_keeps_masks_binary_and_shapes():
    torch.manual_seed(3)
    np.random.seed(3)
    pipeline = ComposeTransforms(official_augmentation())
    for seed in range(30):
        image, seg = sample(seed=seed)
        seg[0, :2] = -1  # nnU-Net's padding label becomes background
        out = pipeline(image=image, segmentation=seg)
        assert out["image"].shape == (2, 64, 64) and out["image"].dtype == torch.float32
        assert out["segmentation"].dtype == torch.int16
        assert set(torch.unique(out["segmentation"]).tolist()) <= {0, 1}
