"""Sampling shapes on slice grids: label volumes at slice centres, images with partial volume."""

from __future__ import annotations

import numpy as np

from training.phantom.anatomy import Shape
from training.phantom.geometry import SlicePlane


def paint_plane(shapes: list[Shape], plane: SlicePlane, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Label and tissue of every pixel centre of one plane (shifted by `offset` along its normal)."""
    labels = np.zeros((plane.rows, plane.columns), dtype=np.uint8)
    tissue = np.zeros((plane.rows, plane.columns), dtype=np.uint8)
    for s in shapes:
        box = plane.index_box(s.lo, s.hi, margin=abs(offset) + 1.0)
        if box is None:
            continue
        r0, r1, c0, c1 = box
        mask, t = s.paint(plane.points(r0, r1, c0, c1, offset))
        if not mask.any():
            continue
        labels[r0:r1, c0:c1][mask] = s.label
        tissue[r0:r1, c0:c1][mask] = t if np.isscalar(t) else t[mask]
    return labels, tissue


def render_labels(shapes: list[Shape], planes: list[SlicePlane]) -> np.ndarray:
    """Label volume [slice, row, column] sampled at slice centres: the exact ground truth."""
    return np.stack([paint_plane(shapes, p)[0] for p in planes])


def render_series(shapes: list[Shape], planes: list[SlicePlane], signals: np.ndarray,
                  partial_volume: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, tissue, clean magnitude image) of a series.

    The image averages the signal over `partial_volume` sub-slices spread across the slice
    thickness, which is what a thick slice does to thin structures.
    """
    labels, tissue, image = [], [], []
    for plane in planes:
        lab, tis = paint_plane(shapes, plane)
        acc = signals[tis].astype(np.float32)
        if partial_volume > 1:
            offsets = (np.arange(partial_volume) - (partial_volume - 1) / 2) * plane.thickness / partial_volume
            for off in offsets[offsets != 0]:
                acc += signals[paint_plane(shapes, plane, float(off))[1]]
            acc /= partial_volume
        labels.append(lab)
        tissue.append(tis)
        image.append(acc)
    return np.stack(labels), np.stack(tissue), np.stack(image)
