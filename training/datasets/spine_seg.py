"""Training slices for `spine-seg`: sagittal slices on a working grid (1 mm unless a training asks
for another) with one class map each.

The network learns five classes; levels are named afterwards by anatomy (count up from S1), so
the network never learns "L3 is in the middle of the image". Phantom studies label everything;
real cases label one kind of structure, and all that a case does not label is IGNORE (left out of
the loss), not background.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from training.datasets.real_lumbar import RealCase
from training.phantom.anatomy import LABEL_VALUES

CLASSES = ("background", "vertebral_body", "S1", "disc", "canal")
IGNORE = 255
# Partial knowledge: the class is unknown but it is certainly not this one (254 - class index).
NOT_BODY, NOT_DISC = 254 - 1, 254 - 3
GRID_MM = 1.0
# Inference averages the class probabilities over working grids a tenth finer and coarser as well
# (inside the training's 0.85-1.2 scale augmentation): on three held-out folds it raised real disc
# Dice by 0.008-0.013 and phantom disc Dice by 0.007-0.010 against the 1 mm grid alone.
TEST_TIME_SCALES = (0.9, 1.0, 1.1)
PHANTOM_DATA_VERSION = 2  # part of the training cache's name: raise it when the phantom changes (2: S1/S2 remnant disc)

_PHANTOM_LUT = np.zeros(256, dtype=np.uint8)
for _name in ("T12", "L1", "L2", "L3", "L4", "L5"):
    _PHANTOM_LUT[LABEL_VALUES[_name]] = 1
_PHANTOM_LUT[LABEL_VALUES["S1"]] = 2
for _name in ("T12/L1", "L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"):
    _PHANTOM_LUT[LABEL_VALUES[_name]] = 3
_PHANTOM_LUT[LABEL_VALUES["canal"]] = 4


def phantom_classes(labels: np.ndarray) -> np.ndarray:
    """Phantom label values -> training classes (the sacrum below S1 is background)."""
    return _PHANTOM_LUT[labels]


def real_classes(case: RealCase, beyond_ends: bool = False, run_rows: bool = False,
                 s1: np.ndarray | None = None) -> np.ndarray:
    """[SI, AP, LR] classes of a real case: its labelled kind, known background, IGNORE elsewhere,
    and between two labelled neighbours (the disc between two bodies, the body between two discs)
    NOT_BODY or NOT_DISC: what lies there is unlabelled, but certainly not the labelled kind.
    With `run_rows`, the same for every unlabelled voxel in the rows inside the labelled run;
    with `s1` (a mask, see s1_below_l5), S1 there.

    VB1 does not say which bodies it labels; its lowest may be S1, so that one is IGNORE too."""
    cls = np.full(case.labels.shape, IGNORE, dtype=np.uint8)
    cls[case.known()] = 0
    kind = 1 if case.kind == "vertebral_body" else 3
    between = _between_neighbours(case.labels) | (_beyond_the_ends(case) if beyond_ends else False)
    if run_rows:
        between = between | _inside_the_run(case.labels)
    cls[between & (cls == IGNORE)] = NOT_BODY if kind == 1 else NOT_DISC
    if s1 is not None:
        cls[s1] = CLASSES.index("S1")
    cls[case.labels > 0] = kind
    if case.dataset == "VB1":
        cls[case.labels == case.labels.max()] = IGNORE
    return cls


S1_MIN_SHARE = 0.2  # of L5's voxels: smaller bone below L5 is a sliver, an iliac wing or noise
S1_BELOW = (0.35, 1.8)  # S1's centre below L5's, in L5's heights (the sacrum tilts back: S1's centre may be close)


def s1_below_l5(case: RealCase, classes: np.ndarray) -> np.ndarray:
    """S1 in a real case that labels L5, from a trained network's classes ([SI, AP, LR]): the
    largest unlabelled bone (body or S1 class) just below L5 and not touching it (the L5/S1 disc
    lies between), at least a fifth of L5's size. No real case labels the sacrum, so without this
    a network learns S1 from the phantom alone and rarely marks it on a real scan (naming then
    rests on fallbacks). Empty where there is no such bone (the field of view ends above S1) or L5
    is not labelled."""
    none = np.zeros(case.labels.shape, dtype=bool)
    if not case.names or case.names[-1] != "L5":
        return none
    l5 = case.labels == len(case.names)
    rows = np.nonzero(l5.any(axis=(1, 2)))[0]
    height = rows.max() - rows.min() + 1
    centre = np.array(ndimage.center_of_mass(l5))
    bone = np.isin(classes, (CLASSES.index("vertebral_body"), CLASSES.index("S1"))) & (case.labels == 0)
    parts, n = ndimage.label(bone & ~ndimage.binary_dilation(l5, iterations=2))
    if n == 0:
        return none
    sizes = ndimage.sum_labels(bone, parts, range(1, n + 1))
    best, best_size = 0, S1_MIN_SHARE * l5.sum()
    for i, (size, at) in enumerate(zip(sizes, ndimage.center_of_mass(bone, parts, range(1, n + 1))), start=1):
        below, forward = at[0] - centre[0], at[1] - centre[1]
        if size >= best_size and S1_BELOW[0] * height <= below <= S1_BELOW[1] * height and abs(forward) <= height:
            best, best_size = i, size
    return parts == best if best else none


def _beyond_the_ends(case: RealCase) -> np.ndarray:
    """Where the level names say what lies just beyond the labelled run: below L5 come the L5/S1
    disc and S1 (neither is a lumbar body: S1 has its own class), below the L5/S1 disc comes S1,
    above the L1/L2 disc comes L1 (not a disc). A band as tall as the last structure, in its columns."""
    out = np.zeros(case.labels.shape, dtype=bool)
    rows = np.arange(case.labels.shape[0])[:, None, None]
    ends = []
    if case.names and case.names[-1] in ("L5", "L5/S1"):
        ends.append((len(case.names), 1))  # (label, direction: 1 = below)
    if case.names and case.names[0] == "L1/L2":
        ends.append((1, -1))
    for label, direction in ends:
        m = case.labels == label
        height = int(m.any(axis=(1, 2)).sum())
        edge = np.where(m, rows, -1).max(axis=0) if direction == 1 else np.where(m, rows, case.labels.shape[0]).min(axis=0)
        has = m.any(axis=0)
        if direction == 1:
            out |= has[None] & (rows > edge[None]) & (rows <= edge[None] + height)
        else:
            out |= has[None] & (rows < edge[None]) & (rows >= edge[None] - height)
    return out


def _inside_the_run(labels: np.ndarray) -> np.ndarray:
    """The rows from the top of the second labelled structure to the bottom of the second-to-last,
    in every column and sagittal slice. Every structure of the labelled kind there is labelled (an
    unlabelled neighbour such as T12 or S1 lies beyond the first or last one, even where endplates
    are tilted), so an unlabelled voxel there - prevertebral tissue, posterior elements, the canal,
    a slice lateral to the spine - is certainly not of that kind."""
    out = np.zeros(labels.shape, dtype=bool)
    n = int(labels.max())
    if n >= 3:
        top = np.nonzero((labels == 2).any(axis=(1, 2)))[0].min()
        bottom = np.nonzero((labels == n - 1).any(axis=(1, 2)))[0].max()
        out[top:bottom + 1] = True
    return out


def _between_neighbours(labels: np.ndarray) -> np.ndarray:
    """Per sagittal slice and image column, the rows strictly between structure k and k+1
    (labels are ordered superior to inferior), where both are present in that column."""
    out = np.zeros(labels.shape, dtype=bool)
    rows = np.arange(labels.shape[0])[:, None, None]
    for k in range(1, int(labels.max())):
        upper, lower = labels == k, labels == k + 1
        has = upper.any(axis=0) & lower.any(axis=0)
        bottom = np.where(upper, rows, -1).max(axis=0)  # last row of k per (AP, LR) column
        top = np.where(lower, rows, labels.shape[0]).min(axis=0)  # first row of k+1
        out |= has[None] & (rows > bottom[None]) & (rows < top[None])
    return out


FOV_END_MM = (-5, 35)  # where a cut field of view ends, from S1's highest row in the slice (see end_field_of_view)


def end_field_of_view(image: np.ndarray, target: np.ndarray, rng: np.random.Generator,
                      grid: float = GRID_MM) -> tuple[np.ndarray, np.ndarray]:
    """A phantom slice whose field of view ends inside S1, as real sagittal series do: the phantom
    always shows the whole sacrum, while in the real VB3 cases the lowest row of L5 lies 6-45 mm
    (median 22) above the image's lower edge, so S1 is a sliver or missing. Rows below a level
    drawn from FOV_END_MM become what lies outside an image in training: 0, IGNORE. Slices
    without S1 are returned unchanged. Rows run inferior, `grid` mm apart."""
    rows = np.nonzero((target == CLASSES.index("S1")).any(axis=1))[0]
    if not len(rows):
        return image, target
    edge = max(int(rows.min()) + round(int(rng.integers(FOV_END_MM[0], FOV_END_MM[1] + 1)) / grid), 1)
    image, target = image.copy(), target.copy()
    image[..., edge:, :] = 0
    target[edge:] = IGNORE
    return image, target


def normalise(volume: np.ndarray) -> np.ndarray:
    """Per-volume intensity scaling to [0, 1] between the 0.5th and 99.5th percentiles (scanners and
    collectors scale intensities arbitrarily)."""
    v = volume.astype(np.float32)
    lo, hi = np.percentile(v, [0.5, 99.5])
    return np.clip((v - lo) / max(float(hi - lo), 1e-6), 0, 1).astype(np.float32)


def to_grid(image: np.ndarray, spacing: tuple[float, float], order: int, grid: float = GRID_MM) -> np.ndarray:
    """A 2-D slice resampled from its (row, column) spacing to `grid` mm pixels."""
    zoom = (spacing[0] / grid, spacing[1] / grid)
    if np.allclose(zoom, 1):
        return image
    return ndimage.zoom(image, zoom, order=order, mode="nearest", grid_mode=True)


def with_context(slices: np.ndarray, context: int, which: slice = slice(None)) -> np.ndarray:
    """[slice, row, col] -> [slice, 2 * context + 1, row, col] for the slices `which`: each slice with
    its neighbours on either side (repeated at the ends), the input of a 2.5-D network."""
    k = np.arange(len(slices))[which]
    return slices[np.clip(k[:, None] + np.arange(-context, context + 1)[None], 0, len(slices) - 1)]


@dataclass
class Slices:
    images: list[np.ndarray]  # float32 [rows, cols] (2-D) or [channel, rows, cols] (2.5-D) on the working grid, normalised
    targets: list[np.ndarray]  # uint8 classes, IGNORE where unknown
    origin: list[str]  # "phantom:<seed>:<contrast>" or "real:<case id>"

    def extend(self, other: "Slices") -> None:
        self.images += other.images
        self.targets += other.targets
        self.origin += other.origin


def phantom_slices(seed: int, contrasts: tuple[str, ...] = ("T2", "T1", "STIR"), context: int = 0,
                   grid: float = GRID_MM) -> Slices:
    """Every sagittal series of one phantom study, rendered in memory (no DICOM written), on a
    `grid` mm working grid; with `context`, each slice comes with that many neighbours on either side."""
    from training.datasets.phantom import phantom_series
    from training.phantom.generator import PhantomOptions

    out = Slices([], [], [])
    for s in phantom_series(seed, PhantomOptions(contrasts=contrasts, max_matrix=384)):
        classes = phantom_classes(s.labels)
        resampled = np.stack([to_grid(p, s.spacing, order=1, grid=grid) for p in normalise(s.pixels)])
        images = with_context(resampled, context) if context else resampled
        for k in range(len(s.pixels)):
            out.images.append(images[k])
            out.targets.append(to_grid(classes[k], s.spacing, order=0, grid=grid))
            out.origin.append(f"phantom:{seed}:{s.contrast}")
    return out


LATERAL_SLICES = 5  # with `run_rows`: unlabelled slices either side of the labelled ones (2 mm apart)


def real_slices(case: RealCase, context: int = 0, beyond_ends: bool = False, run_rows: bool = False,
                s1: np.ndarray | None = None, grid: float = GRID_MM) -> Slices:
    """The sagittal slices of a real case that hold labels, on a `grid` mm working grid; with
    `run_rows`, also the slices just lateral to them, which teach what is not a body or disc; with
    `s1`, S1 there (see s1_below_l5)."""
    spacing = case.spacing_mm[:2]
    image = np.stack([to_grid(s, spacing, order=1, grid=grid)  # [LR, SI, AP]: sagittal slices first
                      for s in np.moveaxis(normalise(case.image), 2, 0)])
    images = with_context(image, context) if context else image
    classes = real_classes(case, beyond_ends, run_rows, s1)
    slices = np.nonzero((case.labels > 0).any(axis=(0, 1)))[0]
    if run_rows:
        slices = np.arange(max(slices.min() - LATERAL_SLICES, 0), min(slices.max() + LATERAL_SLICES + 1, len(image)))
    out = Slices([], [], [])
    for k in slices:
        out.images.append(np.ascontiguousarray(images[k]))
        out.targets.append(np.ascontiguousarray(to_grid(classes[:, :, k], spacing, order=0, grid=grid)))
        out.origin.append(f"real:{case.case_id}")
    return out


def save(slices: Slices, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, origin=np.array(slices.origin),
                        **{f"image_{i}": im for i, im in enumerate(slices.images)},
                        **{f"target_{i}": t for i, t in enumerate(slices.targets)})


def load(path: Path) -> Slices:
    z = np.load(path)
    n = len(z["origin"])
    return Slices([z[f"image_{i}"] for i in range(n)], [z[f"target_{i}"] for i in range(n)], [str(o) for o in z["origin"]])
