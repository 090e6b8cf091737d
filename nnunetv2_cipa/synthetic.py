"""Synthetic PCLT20K-like PET-CT phantoms (thorax slices) in the PCLT20K file layout.

The task is multi-modal by construction:
* tumours are soft-tissue nodules in the lungs that are PET-hot;
* benign nodules look the same on CT but are PET-cold;
* physiological uptake (myocardium, inflamed mediastinal nodes, brown fat) is PET-hot but not tumour.
The mask marks only tumours. PET is blurred, noisy and slightly mis-registered against CT and mask.

Layout written (as the official CIPA loader expects): ``<out>/<patient>/<patient>_<slice:03d>_{CT,PET,mask}.png``
(8-bit grayscale, mask 0/255) plus ``train.txt`` / ``test.txt`` with patient-disjoint slice IDs, and
``synthetic.json`` (the summary; it also marks the folder as synth's, the only kind that overwrite replaces).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, shift

from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.paths import StagedFolder, check_output_file
from nnunetv2_cipa.png_io import write_png

SUMMARY_FILE = "synthetic.json"
MAX_SIZE = 4096  # pixels per side

# 8-bit intensities of the (already windowed) CT and of the (already SUV-clipped) PET.
CT_LUNG, CT_FAT, CT_SOFT, CT_NODULE, CT_HEART, CT_BONE, CT_VESSEL = 14, 72, 104, 128, 118, 232, 112
PET_LUNG, PET_BODY, PET_MARROW, PET_BENIGN, PET_BLOOD = 6, 24, 44, 24, 55


@dataclass
class Nodule:
    """A lung nodule (normalised units: fractions of the image side). kind: 'tumor' or 'benign'."""
    kind: str
    cy: float
    cx: float
    radius: float                     # largest in-plane radius
    z_start: int                      # first slice showing it
    z_stop: int                       # one past the last slice
    lobes: tuple[float, float, float, float]  # shape harmonics (a2, phase2, a3, phase3)
    uptake: float                     # PET value inside (hot for tumours, body level for benign)

    def radius_at(self, z: int) -> float:
        """In-plane radius on slice z (0 outside [z_start, z_stop)): grows then shrinks like a real volume."""
        if not self.z_start <= z < self.z_stop:
            return 0.0
        t = (z - self.z_start + 0.5) / (self.z_stop - self.z_start)
        return self.radius * (0.6 + 0.4 * math.sin(math.pi * t))


@dataclass
class HotSite:
    """Physiological PET uptake outside the lungs (inflamed node, brown fat): CT shows ordinary soft tissue."""
    cy: float
    cx: float
    radius: float
    uptake: float
    z_start: int
    z_stop: int


@dataclass
class PatientAnatomy:
    """Per-patient geometry shared by all slices of that patient."""
    size: int
    slices: int
    body: tuple[float, float, float, float]                 # cy, cx, ry, rx
    lungs: list[tuple[float, float, float, float]]          # per lung: cy, cx, ry, rx
    heart: tuple[float, float, float]                       # cy, cx, largest radius
    heart_uptake: float
    spine: tuple[float, float, float]                       # cy, cx, radius of the vertebral body
    rib_phase: float
    vessels: np.ndarray                                      # (V, 4): cy, cx, dy/slice, dx/slice
    pet_shift: tuple[float, float]                          # mis-registration in pixels (dy, dx)
    nodules: list[Nodule] = field(default_factory=list)
    hot_sites: list[HotSite] = field(default_factory=list)


@dataclass
class SyntheticSlice:
    """One rendered slice: ct, pet (H, W) uint8; mask (H, W) uint8 0/255; per-object ground truth (H, W) bool."""
    ct: np.ndarray
    pet: np.ndarray
    mask: np.ndarray
    tumor: np.ndarray
    benign: np.ndarray
    physiological: np.ndarray


def _ellipse(yy, xx, cy, cx, ry, rx) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _nodule_mask(yy, xx, nodule: Nodule, radius: float) -> np.ndarray:
    dy, dx = yy - nodule.cy, xx - nodule.cx
    angle = np.arctan2(dy, dx)
    a2, p2, a3, p3 = nodule.lobes
    boundary = radius * (1.0 + a2 * np.cos(2 * angle + p2) + a3 * np.cos(3 * angle + p3))
    return dy * dy + dx * dx <= boundary * boundary


def _heart_radius(anatomy: PatientAnatomy, z: int) -> float:
    """The heart appears in every slice, larger towards the caudal end of the stack."""
    return anatomy.heart[2] * (0.7 + 0.3 * (z + 0.5) / anatomy.slices)


def _place_nodule(rng: np.random.Generator, anatomy: PatientAnatomy, radius: float) -> tuple[float, float] | None:
    """A centre inside a lung, clear of the heart and of other nodules, or None after 100 tries."""
    hy, hx, hr = anatomy.heart
    for _ in range(100):
        cy, cx, ry, rx = anatomy.lungs[rng.integers(len(anatomy.lungs))]
        reach = max(0.25, 1.0 - 1.1 * radius / min(ry, rx))   # keep most of the nodule inside the lung
        r, a = math.sqrt(rng.random()), rng.random() * 2 * math.pi
        y, x = cy + reach * r * ry * math.sin(a), cx + reach * r * rx * math.cos(a)
        if math.hypot(y - hy, x - hx) < hr + radius * 1.3:
            continue
        if all(math.hypot(y - n.cy, x - n.cx) > 1.3 * (radius + n.radius) + 0.03 for n in anatomy.nodules):
            return y, x
    return None


def sample_patient(rng: np.random.Generator, slices: int, size: int, tumor_free_fraction: float = 0.2
                   ) -> PatientAnatomy:
    """Random anatomy: body, lungs, heart, spine, vessels, 1-2 tumours, 1-2 benign nodules, 0-2 hot sites.
    About ``tumor_free_fraction`` of the slices (in expectation) show no tumour."""
    j = lambda s: 1.0 + rng.uniform(-s, s)  # noqa: E731 - small multiplicative jitter
    body = (0.52, 0.5, 0.33 * j(0.06), 0.44 * j(0.06))
    lung_ry, lung_rx = 0.21 * j(0.08), 0.15 * j(0.08)
    lungs = [(0.47, 0.5 - 0.2 * j(0.04), lung_ry, lung_rx), (0.47, 0.5 + 0.2 * j(0.04), lung_ry * j(0.05), lung_rx)]
    anatomy = PatientAnatomy(
        size=size, slices=slices, body=body, lungs=lungs,
        heart=(0.56, 0.55 * j(0.03), 0.095 * j(0.1)), heart_uptake=rng.uniform(150, 215),
        spine=(0.76, 0.5, 0.055 * j(0.1)), rib_phase=rng.uniform(0, 2 * math.pi),
        vessels=np.column_stack([rng.uniform(0.3, 0.65, 14), rng.uniform(0.2, 0.8, 14),
                                 rng.normal(0, 0.006, 14), rng.normal(0, 0.006, 14)]),
        pet_shift=tuple(float(v) for v in np.clip(rng.normal(0, 0.008 * size, 2), -0.02 * size, 0.02 * size)))

    def lobes() -> tuple[float, float, float, float]:
        return (rng.uniform(0, 0.12), rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.08), rng.uniform(0, 2 * math.pi))

    n_tumor_slices = min(slices, max(1, math.floor(slices * (1.0 - tumor_free_fraction) + rng.random())))
    z0 = int(rng.integers(0, slices - n_tumor_slices + 1))
    for k in range(1 + int(rng.random() < 0.3)):
        radius = rng.uniform(0.06, 0.1) if k == 0 else rng.uniform(0.05, 0.08)
        centre = _place_nodule(rng, anatomy, radius)
        if centre is None:
            continue
        start = z0 if k == 0 else int(rng.integers(z0, z0 + n_tumor_slices))
        stop = z0 + n_tumor_slices if k == 0 else int(rng.integers(start + 1, z0 + n_tumor_slices + 1))
        anatomy.nodules.append(Nodule("tumor", *centre, radius, start, stop, lobes(), rng.uniform(140, 235)))
    for _ in range(1 + int(rng.random() < 0.5)):
        radius = rng.uniform(0.05, 0.09)
        centre = _place_nodule(rng, anatomy, radius)
        if centre is None:
            continue
        start = int(rng.integers(0, slices))
        stop = int(rng.integers(start + 1, slices + 1))
        anatomy.nodules.append(Nodule("benign", *centre, radius, start, stop, lobes(), PET_BENIGN))
    for _ in range(int(rng.integers(0, 3))):
        cy, cx = (rng.uniform(0.3, 0.42), rng.uniform(0.44, 0.56)) if rng.random() < 0.6 else \
            (rng.uniform(0.24, 0.3), rng.choice([0.2, 0.8]))   # mediastinal node or supraclavicular brown fat
        start = int(rng.integers(0, slices))
        anatomy.hot_sites.append(HotSite(cy, cx, rng.uniform(0.025, 0.045), rng.uniform(120, 210), start,
                                         int(rng.integers(start + 1, slices + 1))))
    return anatomy


def render_slice(anatomy: PatientAnatomy, z: int, rng: np.random.Generator) -> SyntheticSlice:
    """Render slice z of a patient: CT, PET, tumour mask and per-object ground truth, all (size, size)."""
    n = anatomy.size
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    yy, xx = coords[:, None], coords[None, :]

    body = _ellipse(yy, xx, *anatomy.body)
    inner = _ellipse(yy, xx, anatomy.body[0], anatomy.body[1], anatomy.body[2] * 0.9, anatomy.body[3] * 0.92)
    hy, hx, _ = anatomy.heart
    hr = _heart_radius(anatomy, z)
    heart = _ellipse(yy, xx, hy, hx, hr * 0.9, hr)
    lungs = np.zeros((n, n), bool)
    for lung in anatomy.lungs:
        lungs |= _ellipse(yy, xx, *lung)
    lungs &= ~_ellipse(yy, xx, hy, hx, hr * 1.05, hr * 1.15)
    sy, sx, sr = anatomy.spine
    spine = _ellipse(yy, xx, sy, sx, sr, sr * 1.1)
    canal = _ellipse(yy, xx, sy + sr * 1.6, sx, sr * 0.45, sr * 0.45)
    angle = np.arctan2(yy - anatomy.body[0], xx - anatomy.body[1])
    rib_ring = _ellipse(yy, xx, anatomy.body[0], anatomy.body[1], anatomy.body[2] * 0.95, anatomy.body[3] * 0.96) \
        & ~_ellipse(yy, xx, anatomy.body[0], anatomy.body[1], anatomy.body[2] * 0.88, anatomy.body[3] * 0.9)
    ribs = rib_ring & (np.cos(14 * angle + anatomy.rib_phase + 0.4 * z) > 0.35)

    ct = np.zeros((n, n), np.float32)
    ct[body] = CT_FAT
    ct[inner] = CT_SOFT
    ct[lungs] = CT_LUNG
    ct[heart] = CT_HEART
    ct[ribs | spine] = CT_BONE
    ct[canal] = CT_SOFT
    for vy, vx, dy, dx in anatomy.vessels:
        vessel = _ellipse(yy, xx, vy + dy * z, vx + dx * z, 0.012, 0.012) & lungs
        ct[vessel] = CT_VESSEL

    pet = np.zeros((n, n), np.float32)
    pet[body] = PET_BODY
    pet[lungs] = PET_LUNG
    pet[spine] = PET_MARROW
    pet[heart] = PET_BLOOD
    myocardium = heart & ~_ellipse(yy, xx, hy, hx, hr * 0.55, hr * 0.6)
    pet[myocardium] = anatomy.heart_uptake
    physiological = myocardium.copy()
    for site in anatomy.hot_sites:
        if site.z_start <= z < site.z_stop:
            hot = _ellipse(yy, xx, site.cy, site.cx, site.radius, site.radius) & inner & ~lungs
            pet[hot] = site.uptake
            physiological |= hot

    tumor = np.zeros((n, n), bool)
    benign = np.zeros((n, n), bool)
    for nodule in anatomy.nodules:
        radius = nodule.radius_at(z)
        if radius == 0.0:
            continue
        region = _nodule_mask(yy, xx, nodule, radius)
        ct[region] = CT_NODULE
        pet[region] = nodule.uptake
        (tumor if nodule.kind == "tumor" else benign)[region] = True

    ct = gaussian_filter(ct, 0.5) + rng.normal(0.0, 5.0, (n, n)).astype(np.float32)
    pet = gaussian_filter(pet, 0.02 * n)
    pet = shift(pet, anatomy.pet_shift, order=1, mode="nearest")
    pet += rng.normal(0.0, 1.0, (n, n)).astype(np.float32) * (2.0 + 0.08 * pet)
    to_u8 = lambda a: np.clip(np.rint(a), 0, 255).astype(np.uint8)  # noqa: E731
    return SyntheticSlice(ct=to_u8(ct), pet=to_u8(pet), mask=tumor.astype(np.uint8) * 255, tumor=tumor,
                          benign=benign, physiological=physiological)


def patient_id(index: int, total: int) -> str:
    """'P0001'-style ID (no underscore: PCLT20K takes the patient as the part before the first underscore)."""
    return f"P{index + 1:0{max(4, len(str(total)))}d}"


def generate_patient(seed: int, index: int, slices: int, size: int, tumor_free_fraction: float = 0.2
                     ) -> list[SyntheticSlice]:
    """All slices of patient ``index``; deterministic in (seed, index), independent of other patients."""
    rng = np.random.default_rng([seed, index])
    anatomy = sample_patient(rng, slices, size, tumor_free_fraction)
    return [render_slice(anatomy, z, rng) for z in range(slices)]


@dataclass(frozen=True)
class PatientTask:
    """Pool task: write patient ``index`` (ID ``patient``) of the dataset of ``seed`` into ``out_dir/patient``."""
    out_dir: Path
    seed: int
    patient: str
    index: int
    slices: int
    size: int
    tumor_free_fraction: float


def _write_patient(task: PatientTask) -> dict:
    folder = task.out_dir / task.patient
    folder.mkdir()
    counts = {"tumor": 0, "benign": 0, "physiological": 0}
    for z, sl in enumerate(generate_patient(task.seed, task.index, task.slices, task.size, task.tumor_free_fraction)):
        stem = f"{task.patient}_{z:03d}"
        for kind, pixels in (("CT", sl.ct), ("PET", sl.pet), ("mask", sl.mask)):
            write_png(folder / f"{stem}_{kind}.png", pixels)
        for kind in counts:
            counts[kind] += bool(getattr(sl, kind).any())
    return {"patient": task.patient, "tumor_slices": counts["tumor"], "slices_with": counts}  # mask == tumour


def generate_pclt20k_like(out_dir, patients: int = 20, slices: int = 8, size: int = 128, test_patients: int = 4,
                          seed: int = 0, tumor_free_fraction: float = 0.2, num_processes: int = 1,
                          overwrite: bool = False) -> dict:
    """Write ``patients`` training and ``test_patients`` test patients of ``slices`` slices each, ``size`` x ``size``
    pixels, into ``out_dir`` in the PCLT20K layout. Returns a JSON-serialisable summary."""
    for name, value, low, high in (("patients", patients, 1, None), ("slices", slices, 1, None),
                                   ("size", size, 32, MAX_SIZE), ("test_patients", test_patients, 0, None),
                                   ("num_processes", num_processes, 1, None)):
        if int(value) != value or value < low or (high is not None and value > high):
            raise InputError(f"{name} must be an integer >= {low}{f' and <= {high}' if high else ''}, got {value!r}")
    if not 0.0 <= tumor_free_fraction < 1.0:
        raise InputError(f"tumor_free_fraction must be in [0, 1), got {tumor_free_fraction!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(f"{out_dir}: exists and is not an empty folder (overwrite replaces a dataset synth "
                             "wrote)")
        if not (out_dir / SUMMARY_FILE).is_file():
            raise InputError(f"{out_dir}: holds no {SUMMARY_FILE}, so this version of synth did not write it; "
                             "overwrite replaces only a dataset synth wrote: choose a new or empty folder, or remove "
                             "this one yourself")
    StagedFolder.check_replaceable(out_dir, "output folder")
    dataset = StagedFolder(out_dir)
    try:
        with dataset as folder:
            results = _write_patients(folder, patients + test_patients, seed, slices, size, tumor_free_fraction,
                                      num_processes)
            splits = {"train": results[:patients], "test": results[patients:]}
            summary: dict = {"out_dir": str(out_dir), "size": size, "seed": seed, "slices_per_patient": slices,
                             "tumor_free_fraction": tumor_free_fraction}
            for split, rows in splits.items():
                (folder / f"{split}.txt").write_text(
                    "".join(f"{r['patient']}_{z:03d}\n" for r in rows for z in range(slices)))
                summary[split] = {"patients": len(rows), "slices": len(rows) * slices,
                                  "tumor_slices": sum(r["tumor_slices"] for r in rows)}
            summary["tumor_slice_fraction"] = round(sum(r["tumor_slices"] for r in results) /
                                                    (len(results) * slices), 4)
            summary["slices_with"] = {k: sum(r["slices_with"][k] for r in results) for k in results[0]["slices_with"]}
            # without out_dir: the same seed and options give the same bytes wherever they are written
            (folder / SUMMARY_FILE).write_text(json.dumps({k: v for k, v in summary.items() if k != "out_dir"},
                                                          indent=2))
    except OSError as e:
        raise InputError(f"{out_dir}: cannot write the synthetic dataset ({e.strerror or e})") from e
    if dataset.notes:
        summary["notes"] = dataset.notes
    return summary


def _write_patients(folder: Path, total: int, seed: int, slices: int, size: int, tumor_free_fraction: float,
                    num_processes: int) -> list[dict]:
    """Write ``total`` patients into ``folder``; their summaries in patient order."""
    tasks = [PatientTask(folder, seed, patient_id(i, total), i, slices, size, tumor_free_fraction)
             for i in range(total)]
    if num_processes == 1:
        return [_write_patient(t) for t in tasks]
    with ProcessPoolExecutor(num_processes) as pool:
        return list(pool.map(_write_patient, tasks))


def check_figure_file(path) -> Path:
    """``path`` if matplotlib can save a figure there (format from the suffix, a writable place); else InputError."""
    from matplotlib.figure import Figure

    path = check_output_file(path)
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise InputError(f"{path}: cannot draw a figure in format {path.suffix or '(no suffix)'!r}; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    return path


def save_example_figure(path, seed: int = 0, size: int = 128) -> Path:
    """CT | PET | mask | overlay for three slices of one patient: a tumour, a benign nodule, physiological uptake."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for index in range(100):
        stack = generate_patient(seed, index, 8, size)
        tumor = next((s for s in stack if s.tumor.any()), None)
        benign = next((s for s in stack if s.benign.any() and not s.tumor.any()), None)
        if tumor is not None and benign is not None:
            break
    else:
        raise RuntimeError(f"no patient among the first 100 of seed {seed} shows a tumour and a lone benign nodule")
    rows = [("tumour: CT nodule + PET-hot -> mask", tumor), ("benign nodule: CT-visible, PET-cold -> no mask", benign),
            ("heart / hot sites: PET-hot, not tumour",
             max((s for s in stack if s is not tumor and s is not benign), key=lambda s: s.physiological.sum()))]
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.7 * len(rows)))
    for (title, sl), ax in zip(rows, axes):
        overlay = np.stack([sl.ct] * 3, -1).astype(np.float32) / 255
        for region, colour in ((sl.tumor, (1, 0, 0)), (sl.benign, (0, 0.8, 1)), (sl.physiological, (1, 0.8, 0))):
            overlay[region] = 0.5 * overlay[region] + 0.5 * np.asarray(colour)
        for a, image, name in zip(ax, (sl.ct, sl.pet, sl.mask, overlay), ("CT", "PET", "mask", "objects")):
            a.imshow(image, cmap=None if image.ndim == 3 else ("hot" if name == "PET" else "gray"))
            a.set_axis_off()
            a.set_title(name, fontsize=9)
        ax[0].text(-0.05, 0.5, title, transform=ax[0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle("synthetic PCLT20K-like slices (overlay: red tumour, cyan benign, yellow physiological uptake)",
                 fontsize=9)
    fig.tight_layout()
    path = check_figure_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=64)
    except OSError as e:
        raise InputError(f"{path}: cannot write the figure ({e.strerror or e})") from e
    finally:
        plt.close(fig)
    return path
