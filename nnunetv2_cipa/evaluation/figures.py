"""Report figures (matplotlib Agg): per-patient Dice distributions and CT/PET/GT/prediction overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

GT_COLOUR = (0.1, 0.85, 0.2)
TP_COLOUR, FP_COLOUR, FN_COLOUR = (1.0, 0.9, 0.0), (0.95, 0.15, 0.15), (0.1, 0.75, 1.0)
DICE_DPI, EXAMPLES_DPI = 120, 110


def dice_figure_inches(n_trainers: int) -> tuple[float, float]:
    """(width, height) of the Dice-distribution figure; PNG pixels = inches x DICE_DPI."""
    return max(4.0, 1.8 * n_trainers + 1.5), 4.5


def examples_figure_inches(n_rows: int, n_trainers: int) -> tuple[float, float]:
    """(width, height) of the example figure (CT, PET, GT, one column per trainer); PNG pixels = x EXAMPLES_DPI."""
    return 2.6 * (3 + n_trainers), 2.9 * n_rows + 1.0


def plot_dice_distribution(dice_by_trainer: dict[str, list[float]], title: str, path: Path) -> None:
    """Box plot plus jittered points of per-patient Dice, one box per trainer."""
    names = list(dice_by_trainer)
    fig, ax = plt.subplots(figsize=dice_figure_inches(len(names)))
    rng = np.random.default_rng(0)
    data = [np.asarray(dice_by_trainer[n], dtype=float) for n in names]
    ax.boxplot(data, showfliers=False, widths=0.5, medianprops={"color": "black"})
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=14, alpha=0.6, zorder=3)
    ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={len(d)})" for n, d in zip(names, data)], fontsize=9,
                  rotation=15, ha="right", rotation_mode="anchor")  # long trainer names side by side
    ax.set_ylabel("Dice per patient (pooled over slices)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=DICE_DPI)
    plt.close(fig)


def _crop_window(masks: list[np.ndarray], min_side: int = 128) -> tuple[slice, slice]:
    """Square-ish window around the union of ``masks`` (H, W), padded, at least ``min_side`` px (clipped)."""
    union = np.logical_or.reduce(masks)
    shape = union.shape
    if not union.any():
        return slice(0, shape[0]), slice(0, shape[1])
    rows, cols = np.nonzero(union)
    windows = []
    for lo, hi, size in ((rows.min(), rows.max(), shape[0]), (cols.min(), cols.max(), shape[1])):
        side = min(size, max(min_side, 2 * (hi - lo + 1)))
        start = int(np.clip((lo + hi) // 2 - side // 2, 0, size - side))
        windows.append(slice(start, start + side))
    return windows[0], windows[1]


def _overlay(colours: list[tuple[np.ndarray, tuple[float, float, float]]]) -> np.ndarray:
    rgba = np.zeros((*colours[0][0].shape, 4))
    for mask, colour in colours:
        rgba[mask] = (*colour, 0.65)
    return rgba


def plot_examples(rows: list[dict], trainers: list[str], title: str, path: Path) -> None:
    """Grid: one row per example (keys label, case, ct, pet, gt, preds {trainer: mask}, dice {trainer: float|None});
    columns CT, PET, GT on CT, then each trainer's prediction on CT coloured TP / FP / FN; all (H, W) arrays are
    cropped to a window around the masks."""
    fig, axes = plt.subplots(len(rows), 3 + len(trainers), figsize=examples_figure_inches(len(rows), len(trainers)),
                             squeeze=False)
    for ax, name in zip(axes[0], ("CT", "PET", "ground truth", *trainers)):
        ax.set_title(name, fontsize=9)
    for axes_row, row in zip(axes, rows):
        window = _crop_window([row["gt"], *row["preds"].values()])
        ct, pet = row["ct"][window], row["pet"][window]
        gt = row["gt"][window]
        axes_row[0].imshow(ct, cmap="gray")
        axes_row[0].set_ylabel(f"{row['label']}\n{row['case']}", fontsize=9)
        axes_row[1].imshow(pet, cmap="hot")
        axes_row[2].imshow(ct, cmap="gray")
        axes_row[2].imshow(_overlay([(gt, GT_COLOUR)]))
        for ax, trainer in zip(axes_row[3:], trainers):
            pred = row["preds"][trainer][window]
            ax.imshow(ct, cmap="gray")
            ax.imshow(_overlay([(pred & gt, TP_COLOUR), (pred & ~gt, FP_COLOUR), (gt & ~pred, FN_COLOUR)]))
            dice = row["dice"][trainer]
            ax.set_xlabel(f"slice Dice {'n/a' if dice is None else f'{dice:.3f}'}", fontsize=8)
        for ax in axes_row:
            ax.set_xticks([])
            ax.set_yticks([])
    legend = [Patch(color=GT_COLOUR, label="ground truth"), Patch(color=TP_COLOUR, label="true positive"),
              Patch(color=FP_COLOUR, label="false positive"), Patch(color=FN_COLOUR, label="false negative")]
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=EXAMPLES_DPI)
    plt.close(fig)
