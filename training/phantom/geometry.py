"""Slice geometry in DICOM patient coordinates (LPS, millimetres).

A series is a list of planes, one per slice, because real axial lumbar protocols tilt a block of
slices to each disc: one orientation per series would not describe them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rotation(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    """Rotation matrix for rotations about the patient x, y and z axes, applied in that order."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class SlicePlane:
    """One image plane: ImagePositionPatient, the two ImageOrientationPatient cosines, spacing."""

    position: np.ndarray  # centre of the first transmitted pixel (row 0, column 0)
    row_cosine: np.ndarray  # direction of increasing column index
    col_cosine: np.ndarray  # direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as DICOM orders it
    rows: int
    columns: int
    thickness: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.col_cosine)

    def points(self, r0: int = 0, r1: int | None = None, c0: int = 0, c1: int | None = None,
               offset: float = 0.0) -> np.ndarray:
        """Patient coordinates of pixel centres in rows r0:r1, columns c0:c1, shape (R, C, 3)."""
        r1 = self.rows if r1 is None else r1
        c1 = self.columns if c1 is None else c1
        rr = np.arange(r0, r1, dtype=np.float32)[:, None, None] * self.pixel_spacing[0]
        cc = np.arange(c0, c1, dtype=np.float32)[None, :, None] * self.pixel_spacing[1]
        origin = (self.position + offset * self.normal).astype(np.float32)
        return origin + cc * self.row_cosine.astype(np.float32) + rr * self.col_cosine.astype(np.float32)

    def index_box(self, lo: np.ndarray, hi: np.ndarray, margin: float) -> tuple[int, int, int, int] | None:
        """Rows and columns of this plane that can lie inside the patient-space box [lo, hi].

        Returns None when the box does not reach the slab of this slice at all.
        """
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        rel = corners - self.position
        dist = rel @ self.normal
        if dist.min() > self.thickness / 2 + margin or dist.max() < -self.thickness / 2 - margin:
            return None
        cols = rel @ self.row_cosine / self.pixel_spacing[1]
        rows = rel @ self.col_cosine / self.pixel_spacing[0]
        m = margin / min(self.pixel_spacing)
        r0, r1 = int(np.floor(rows.min() - m)), int(np.ceil(rows.max() + m)) + 1
        c0, c1 = int(np.floor(cols.min() - m)), int(np.ceil(cols.max() + m)) + 1
        r0, c0 = max(r0, 0), max(c0, 0)
        r1, c1 = min(r1, self.rows), min(c1, self.columns)
        if r0 >= r1 or c0 >= c1:
            return None
        return r0, r1, c0, c1

    def affine(self) -> np.ndarray:
        """4x4 matrix from (column, row, 0, 1) to patient coordinates."""
        a = np.eye(4)
        a[:3, 0] = self.row_cosine * self.pixel_spacing[1]
        a[:3, 1] = self.col_cosine * self.pixel_spacing[0]
        a[:3, 2] = self.normal
        a[:3, 3] = self.position
        return a


def stack(center: np.ndarray, rot: np.ndarray, rows: int, columns: int, spacing: float,
          n_slices: int, slice_spacing: float, thickness: float) -> list[SlicePlane]:
    """A parallel stack of slices centred on `center`.

    `rot` maps the canonical sagittal frame (row cosine +y posterior, column cosine -z inferior,
    normal +x left) onto the patient; slices run along the normal, first slice on the right.
    """
    row_cos = rot @ np.array([0.0, 1.0, 0.0])
    col_cos = rot @ np.array([0.0, 0.0, -1.0])
    normal = np.cross(row_cos, col_cos)
    planes = []
    for k in range(n_slices):
        offset = (k - (n_slices - 1) / 2) * slice_spacing
        slice_center = center + offset * normal
        pos = slice_center - row_cos * spacing * (columns - 1) / 2 - col_cos * spacing * (rows - 1) / 2
        planes.append(SlicePlane(pos, row_cos, col_cos, (spacing, spacing), rows, columns, thickness))
    return planes
