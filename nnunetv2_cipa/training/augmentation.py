"""The official CIPA training augmentation as batchgeneratorsv2 transforms (one sample, (C, H, W) image and seg).

In order, on CT, PET and the mask together:
1. with p = 0.5, a shift / scale / aspect warp about the image centre: scale s = 1 + U(-0.1, 0.1), aspect
   a = 1 + U(-0.1, 0.1), x scaled by s * sqrt(a) and y by s / sqrt(a), a shift of U(-0.1, 0.1) of the side in x and in
   y (rounded to whole pixels), no rotation, bilinear, zero outside;
2. with p = 0.5, a horizontal flip (the image's last axis): batchgeneratorsv2's ``MirrorTransform``;
3. with p = 0.5, a random square crop of side int(r * min(H, W)), r = U(0.7, 0.9), fully inside the image, resized
   back to H x W bicubically, image values clamped to [0, 1] (the official 8-bit resize saturates at 0 and 255,
   which are 0 and 1 after nnU-Net's RGBTo01Normalization; it also rounds to whole levels, which this does not);
4. the mask, interpolated as a float through 1 and 3, is re-binarised at 0.5.
Nothing else: no rotation, vertical flip, elastic deformation or intensity augmentation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, SegOnlyTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform

WARP_PROBABILITY, CROP_PROBABILITY = 0.5, 0.5  # the flip's 0.5 is MirrorTransform's own per-axis probability
SCALE_RANGE, ASPECT_RANGE, SHIFT_RANGE = (-0.1, 0.1), (-0.1, 0.1), (-0.1, 0.1)
CROP_SIDE_RANGE = (0.7, 0.9)
EIGHT_BIT_RANGE = (0.0, 1.0)  # 0 and 255 after RGBTo01Normalization's x / 255


def _resample(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """x (C, H, W) sampled at ``affine_grid(theta)`` (normalised output -> input coordinates), zeros outside."""
    grid = F.affine_grid(theta[None].to(torch.float32), [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None].to(torch.float32), grid, mode=mode, padding_mode="zeros", align_corners=False)[0]


class ShiftScaleAspectTransform(BasicTransform):
    """Official warp step (no rotation): image bilinear, segmentation interpolated as float (binarise afterwards)."""

    def __init__(self, scale_range=SCALE_RANGE, aspect_range=ASPECT_RANGE, shift_range=SHIFT_RANGE):
        super().__init__()
        self.scale_range, self.aspect_range, self.shift_range = scale_range, aspect_range, shift_range

    def get_parameters(self, **data_dict) -> dict:
        height, width = data_dict["image"].shape[-2:]
        scale = 1 + np.random.uniform(*self.scale_range)
        aspect = 1 + np.random.uniform(*self.aspect_range)
        shift_x = round(np.random.uniform(*self.shift_range) * width)
        shift_y = round(np.random.uniform(*self.shift_range) * height)
        scale_x, scale_y = scale * aspect ** 0.5, scale / aspect ** 0.5
        # output pixel p shows input pixel centre + (p - centre - shift) / scale, in affine_grid's [-1, 1] coordinates
        theta = torch.tensor([[1 / scale_x, 0.0, -2 * shift_x / (width * scale_x)],
                              [0.0, 1 / scale_y, -2 * shift_y / (height * scale_y)]], dtype=torch.float64)
        return {"theta": theta, "scale_x": scale_x, "scale_y": scale_y, "shift": (shift_y, shift_x)}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        return _resample(img, params["theta"], "bilinear").to(img.dtype)

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        return _resample(segmentation, params["theta"], "bilinear")


class SquareCropResizeTransform(BasicTransform):
    """Official crop step: a random square of side int(r * min(H, W)) inside the image, resized back bicubically,
    image values clamped to ``value_range`` (the 8-bit range, where bicubic overshoot saturates)."""

    def __init__(self, side_range=CROP_SIDE_RANGE, value_range=EIGHT_BIT_RANGE):
        super().__init__()
        self.side_range, self.value_range = side_range, value_range

    def get_parameters(self, **data_dict) -> dict:
        height, width = data_dict["image"].shape[-2:]
        side = int(min(height, width) * np.random.uniform(*self.side_range))
        top = np.random.randint(0, height - side + 1)
        left = np.random.randint(0, width - side + 1)
        return {"box": (top, left, side), "size": (height, width)}

    @staticmethod
    def _crop_resize(x: torch.Tensor, box, size) -> torch.Tensor:
        top, left, side = box
        crop = x[:, top:top + side, left:left + side].to(torch.float32)
        return F.interpolate(crop[None], size=size, mode="bicubic", align_corners=False)[0]

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        resized = self._crop_resize(img, params["box"], params["size"])
        return resized.clamp(*self.value_range).to(img.dtype)

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        return self._crop_resize(segmentation, params["box"], params["size"])


class BinarizeSegmentationTransform(SegOnlyTransform):
    """segmentation -> (segmentation > threshold) as int16 labels 0/1 (nnU-Net's label dtype)."""

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        return (segmentation > self.threshold).to(torch.int16)


def official_augmentation() -> list[BasicTransform]:
    """The four steps of the module docstring, after nnU-Net's padding label -1 is mapped to background (the official
    zero border)."""
    return [RemoveLabelTransform(-1, 0),
            RandomTransform(ShiftScaleAspectTransform(), apply_probability=WARP_PROBABILITY),
            MirrorTransform(allowed_axes=(1,)),
            RandomTransform(SquareCropResizeTransform(), apply_probability=CROP_PROBABILITY),
            BinarizeSegmentationTransform()]
