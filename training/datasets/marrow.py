"""Training crops for `marrow`: one square crop per vertebral body and sagittal series, centred on
the body, on the slice through its middle with a neighbour on either side as three channels (the
three-channel input a ConvNeXt expects, and a little through-plane context).

The crop is found from a label mask: the phantom's exact one in training, the `spine-seg`
segmentation at inference, so the same function serves both."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from training.datasets.spine_seg import normalise

CLASSES = ("normal", "modic1", "modic2", "modic3", "lesion")  # training/phantom/pathology.py MARROW_TYPES
LEVELS = ("L1", "L2", "L3", "L4", "L5", "S1")
CROP_VERSION = 2  # part of the crop cache's name: raise it when crops change (2: standardised)
CROP = 64  # pixels a side
MARGIN = 1.3  # crop side / the body's larger extent on its middle slice


def standardise(crops: np.ndarray) -> np.ndarray:
    """Each crop to zero mean and unit variance (over its three channels): the marrow signal is
    judged against the crop's own range, whatever the series' scaling."""
    axes = tuple(range(crops.ndim - 3, crops.ndim))
    mean, std = crops.mean(axis=axes, keepdims=True), crops.std(axis=axes, keepdims=True)
    return ((crops - mean) / np.maximum(std, 1e-6)).astype(np.float32)


def vertebra_crop(volume: np.ndarray, mask: np.ndarray, spacing: tuple[float, float], margin: float = MARGIN,
                  shift: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, int, np.ndarray]:
    """(crop [3, CROP, CROP], its middle slice k, the crop's sample points [2, CROP, CROP] as (row, col)
    on slice k) of one body. `volume` is normalised [slice, row, col]; `mask` the body's voxels.
    `shift` moves the centre by that fraction of the side (training jitter)."""
    areas = mask.sum(axis=(1, 2))
    k = int(np.argmax(areas))
    rows, cols = np.nonzero(mask[k])
    h_mm = (rows.max() - rows.min() + 1) * spacing[0]
    w_mm = (cols.max() - cols.min() + 1) * spacing[1]
    side = margin * max(h_mm, w_mm)
    centre = np.array([rows.mean(), cols.mean()]) + np.array(shift) * side / np.array(spacing)
    offsets = (np.arange(CROP) + 0.5) / CROP * side - side / 2
    points = np.stack(np.meshgrid(centre[0] + offsets / spacing[0], centre[1] + offsets / spacing[1], indexing="ij"))
    neighbours = np.clip([k - 1, k, k + 1], 0, len(volume) - 1)
    crop = np.stack([ndimage.map_coordinates(volume[j], points, order=1, mode="constant", cval=0.0) for j in neighbours])
    return standardise(crop), k, points


@dataclass
class Crops:
    images: list[np.ndarray] = field(default_factory=list)  # float32 [3, CROP, CROP]
    labels: list[int] = field(default_factory=list)  # index into CLASSES
    study: list[int] = field(default_factory=list)  # phantom seed: crops of one study stay in one split
    level: list[str] = field(default_factory=list)
    contrast: list[str] = field(default_factory=list)

    def extend(self, other: "Crops") -> None:
        for name in ("images", "labels", "study", "level", "contrast"):
            getattr(self, name).extend(getattr(other, name))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.stack(self.images), np.asarray(self.labels)


def phantom_crops(seed: int, jitter: int = 0) -> Crops:
    """Crops of L1-S1 on each sagittal series (T2, T1, STIR) of one phantom study, labelled with the
    study's marrow truth; `jitter` more crops per body with the box moved and resized a little, as
    a segmentation at inference would place it."""
    from training.datasets.phantom import phantom_series
    from training.phantom.anatomy import LABEL_VALUES
    from training.phantom.generator import PhantomOptions

    rng = np.random.default_rng([seed, 7])
    out = Crops()
    for s in phantom_series(seed, PhantomOptions(contrasts=("T2", "T1", "STIR"), max_matrix=384)):
        volume = normalise(s.pixels)
        for level in LEVELS:
            mask = s.labels == LABEL_VALUES[level]
            if mask.sum() < 50:
                continue
            label = CLASSES.index(s.design.findings.vertebrae[level].marrow)
            for j in range(1 + jitter):
                margin, shift = (MARGIN, (0.0, 0.0)) if j == 0 else (rng.uniform(1.15, 1.5), tuple(rng.uniform(-0.08, 0.08, 2)))
                out.images.append(vertebra_crop(volume, mask, s.spacing, margin, shift)[0])
                out.labels.append(label)
                out.study.append(seed)
                out.level.append(level)
                out.contrast.append(s.contrast)
    return out
