"""Acquisition of a designed study: series geometry, contrast and imperfections, DICOM identity.

Each series gets its own field of view, matrix, slices, tilt and noise, as separate scans of one
patient do; the axial series follows the discs, as lumbar protocols angle their blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from training.dicom_writer import SeriesInfo, StudyInfo, uid
from training.phantom.anatomy import LUMBAR_DISCS
from training.phantom.geometry import SlicePlane, rotation, stack
from training.phantom.mr import Contrast, Degradation

if TYPE_CHECKING:
    from training.phantom.generator import PhantomOptions, StudyDesign

MATRICES = (256, 320, 384, 448, 512, 576, 640)


@dataclass
class Acquisition:
    planes: list[SlicePlane]
    series: SeriesInfo
    contrast: Contrast
    degradation: Degradation
    parameters: dict


def _matrix(rng: np.random.Generator, fov: float, max_matrix: int) -> int:
    ok = [m for m in MATRICES if 0.4 <= fov / m <= 1.2 and m <= max_matrix] or [min(MATRICES)]
    return int(rng.choice(ok))


def _contrast(rng: np.random.Generator, name: str, field_t: float) -> Contrast:
    if name == "T1":
        return Contrast("T1", rng.uniform(400, 700), rng.uniform(8, 15), None, field_t)
    if name == "T2":
        return Contrast("T2", rng.uniform(2500, 5000), rng.uniform(80, 120), None, field_t)
    null = 260 * (1.25 if field_t == 3.0 else 1.0) * np.log(2)
    return Contrast("STIR", rng.uniform(3000, 5000), rng.uniform(40, 70), null * rng.uniform(0.92, 1.05), field_t)


def _degradation(rng: np.random.Generator) -> Degradation:
    return Degradation(noise=rng.uniform(0.01, 0.06), bias=rng.uniform(0.0, 0.3), blur_px=rng.uniform(0.0, 1.0),
                       texture=rng.uniform(0.02, 0.08), bits=int(rng.choice([12, 16])), fill=rng.uniform(0.3, 0.95),
                       seed=int(rng.integers(2**31)))


def sample_sagittal(rng: np.random.Generator, d: StudyDesign, contrast: str, number: int,
                    options: PhantomOptions, field_t: float) -> Acquisition:
    chain = d.chain
    centre_yz = (chain["L1"].top + chain["S1"].top) / 2
    axis = chain["L1"].top - chain["S1"].top
    axis /= np.linalg.norm(axis)
    shift = rng.uniform(-15, 15) * axis + rng.uniform(-10, 10) * np.array([axis[1], -axis[0]])
    centre = np.array([rng.uniform(-4, 4), *(centre_yz + shift)])
    fov = rng.uniform(240, 320)
    matrix = _matrix(rng, fov, options.max_matrix)
    n, thick, gap = int(rng.integers(9, 20)), rng.uniform(3, 5), rng.uniform(0, 1)
    rot = rotation(rng.uniform(-12, 12), rng.uniform(-5, 5), rng.uniform(-5, 5))
    if options.fov_end_mm is not None:
        depth = np.random.default_rng([d.seed, 3, number]).uniform(*options.fov_end_mm)  # other draws unchanged
        centre = _ending_below_s1_top(d, centre, rot, fov, depth)
    planes = stack(centre, rot, matrix, matrix, fov / matrix, n, thick + gap, thick)
    c = _contrast(rng, contrast, field_t)
    deg = _degradation(rng)
    rescale = (round(rng.uniform(0.5, 3.0), 4), 0.0) if rng.random() < 0.3 else None
    series = SeriesInfo(uid(d.seed, "series", number, repr(options)), number, f"SAG {contrast}", contrast, c.tr, c.te, c.ti,
                        field_t, deg.bits, rescale, thick + gap)
    params = {"plane": "sagittal", "matrix": matrix, "fov_mm": fov, "pixel_spacing_mm": fov / matrix, "slices": n,
              "slice_thickness_mm": thick, "gap_mm": gap, "rotation_deg": rot_angles(rot)}
    return Acquisition(planes, series, c, deg, params)


def _ending_below_s1_top(d: StudyDesign, centre: np.ndarray, rot: np.ndarray, fov: float, depth: float) -> np.ndarray:
    """The stack centre moved along the image columns so that the lower edge of the image lies
    `depth` mm below the top of S1 (the centre of its superior endplate; measured along the columns)."""
    down = rot @ np.array([0.0, 0.0, -1.0])  # direction of increasing row index, as `stack` builds it
    s1_top = np.array([centre[0], *d.chain["S1"].top])
    return centre + ((s1_top - (centre + down * fov / 2)) @ down + depth) * down


def rot_angles(rot: np.ndarray) -> list[float]:
    """Total tilt of the slice normal from +x and in-plane rotation, degrees (for the statistics)."""
    n = rot @ np.array([1.0, 0, 0])
    r = rot @ np.array([0.0, 1, 0])
    return [float(np.rad2deg(np.arccos(np.clip(n[0], -1, 1)))), float(np.rad2deg(np.arctan2(r[2], r[1])))]


def sample_axial(rng: np.random.Generator, d: StudyDesign, number: int, options: PhantomOptions,
                 field_t: float) -> Acquisition:
    """A block of three slices parallel to each disc, centred on the disc's mid-plane."""
    fov = rng.uniform(160, 220)
    matrix = _matrix(rng, fov, 448)
    spacing, gap = rng.uniform(3.5, 4.5), rng.uniform(0, 0.5)
    planes = []
    for name in LUMBAR_DISCS:
        el = d.chain[name]
        e = np.array([0.0, np.cos(el.mid_angle), np.sin(el.mid_angle)])
        nrm = np.array([0.0, -np.sin(el.mid_angle), np.cos(el.mid_angle)])
        spin = np.deg2rad(rng.uniform(-3, 3))
        row_cos = np.cos(spin) * np.array([1.0, 0, 0]) + np.sin(spin) * e
        col_cos = np.cross(nrm, row_cos)
        centre = el.to_patient(rng.uniform(-5, 5), 15 + rng.uniform(-5, 5), 0.0)
        px = fov / matrix
        for k in (1, 0, -1):  # superior first
            c = centre + k * spacing * nrm
            pos = c - row_cos * px * (matrix - 1) / 2 - col_cos * px * (matrix - 1) / 2
            planes.append(SlicePlane(pos, row_cos, col_cos, (px, px), matrix, matrix, spacing - gap))
    c = _contrast(rng, "T2", field_t)
    deg = _degradation(rng)
    series = SeriesInfo(uid(d.seed, "series", number, repr(options)), number, "AX T2", "T2", c.tr, c.te, None, field_t, deg.bits,
                        None, spacing)
    params = {"plane": "axial", "matrix": matrix, "fov_mm": fov, "pixel_spacing_mm": fov / matrix,
              "slices": len(planes), "slice_thickness_mm": spacing - gap, "gap_mm": gap}
    return Acquisition(planes, series, c, deg, params)


def study_info(seed: int, options: PhantomOptions) -> StudyInfo:
    """The study's patient and UIDs. The UIDs follow the options too: the same seed with other
    contrasts, matrix or field of view is other images, which must not share an instance UID."""
    rng = np.random.default_rng([seed, 7])
    year, month, day = 2020 + int(rng.integers(0, 6)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return StudyInfo(study_instance_uid=uid("dicomnode-phantom", seed, "study", repr(options)),
                     patient_name=f"PHANTOM^LUMBAR^{seed}", patient_id=f"PH{seed:08d}",
                     patient_birth_date=f"{1940 + int(rng.integers(0, 60))}0101", patient_sex=str(rng.choice(["F", "M"])),
                     study_date=f"{year}{month:02d}{day:02d}", study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
                     accession_number=f"A{seed:08d}", study_id=str(seed % 100000),
                     frame_of_reference_uid=uid("dicomnode-phantom", seed, "frame", repr(options)))


def acquisitions(d: StudyDesign, options: PhantomOptions) -> list[Acquisition]:
    rng = np.random.default_rng([d.seed, 2])
    field_t = float(rng.choice([1.5, 3.0], p=[0.6, 0.4]))
    acq = [sample_sagittal(rng, d, c, i + 1, options, field_t) for i, c in enumerate(options.contrasts)]
    if options.axial:
        acq.append(sample_axial(rng, d, len(acq) + 1, options, field_t))
    return acq
