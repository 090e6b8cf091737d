"""PNG files as the converter, the evaluation and the report read and write them.

Every problem with a file (missing, unreadable, not a PNG, truncated, over Pillow's decompression-bomb limit, ...)
becomes an InputError that names the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nnunetv2_cipa.errors import InputError

PNG_COMPRESS_LEVEL = 1  # zlib level of the PNGs we write: fast, and nnU-Net reads them as well as smaller ones


def _decode(path: Path) -> tuple[np.ndarray, str]:
    """Pixels of a PNG as Pillow decodes them (palette images expanded to RGBA) and Pillow's mode."""
    if not path.is_file():  # a FIFO would block Pillow forever; a folder or device is no image either
        raise InputError(f"{path}: {'no such file' if not path.exists() else 'not a regular file'}")
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise InputError(f"{path}: not a PNG file (format {image.format})")
            mode = image.mode
            pixels = np.asarray(image.convert("RGBA") if mode == "P" else image)
    except InputError:
        raise
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise InputError(f"{path}: unreadable PNG ({type(e).__name__}: {e})") from e
    return pixels, mode


def read_gray_png(path: Path) -> tuple[np.ndarray, bool]:
    """(H, W) grayscale pixels, unscaled: uint8, or uint16 for a 16-bit file; and whether the file is plain 8-bit
    grayscale (then it can be copied as is). RGB/RGBA/LA with equal colour channels count as grayscale (alpha
    ignored); 1-bit images become 0/255."""
    pixels, mode = _decode(path)
    if pixels.ndim == 3:
        colour = pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., :1]
        if (colour != colour[..., :1]).any():
            raise InputError(f"{path}: colour image whose channels differ; expected grayscale")
        pixels = colour[..., 0]
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    elif pixels.dtype not in (np.uint8, np.uint16):
        if pixels.min() < 0 or pixels.max() > 65535:
            raise InputError(f"{path}: pixel values outside 0..65535 (mode {mode})")
        pixels = pixels.astype(np.uint16)
    return pixels, mode == "L"


def read_label_png(path: Path) -> np.ndarray:
    """(H, W) bool of a label PNG; InputError naming the file unless it is single-channel with values in {0, 1}."""
    pixels, mode = _decode(path)
    if pixels.ndim != 2:
        kind = "a palette PNG: save the label values as grayscale" if mode == "P" else f"mode {mode}"
        raise InputError(f"{path}: label PNG must be single-channel (H, W), got shape {pixels.shape} ({kind})")
    if pixels.dtype != bool and (pixels.max() > 1 or pixels.min() < 0):
        values = np.unique(pixels)
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise InputError(f"{path}: labels must be binary 0/1 (nnU-Net label PNG), found values [{shown}]")
    return pixels.astype(bool)


def write_png(path: Path, pixels: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> None:
    """Write (H, W) uint8 pixels as an 8-bit grayscale PNG; InputError naming the file if it cannot be written."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"write_png needs (H, W) uint8 pixels, got {pixels.dtype} {pixels.shape}")
    try:
        Image.fromarray(pixels).save(path, format="PNG", compress_level=compress_level)
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e})") from e
