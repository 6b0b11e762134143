"""`lordosis`: the lumbar lordosis (Cobb) angles L1-S1 (superior endplates of L1 and S1) and L1-L5
(L1 superior, L5 inferior), each from a robust line fit to the endplate boundary of the
segmentation on the slices through the vertebral midline (the median over them); hypo / normal /
hyper by thresholds (seed 003's 39 and 53 deg unless the configuration's
`results.lordosis_thresholds_deg` says otherwise).
A study where L1 or S1 is not found says so instead of guessing; an angle that changes much from
one central slice to the next is reported with that spread and flagged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from dicomnode.config import LORDOSIS_THRESHOLDS_DEG, lordosis_class
from pipelines import spine_seg
from pipelines.registry import Pipeline, register
from pipelines.series import Series, pick_series
from structured_reports.model import Angle, Line, ResultOptions
from structured_reports.writer import write_results
from training.phantom.anatomy import LABEL_VALUES

# Each angle is the median over the slices this close to the midline: on manual masks of real scans
# one angle moves 2.9 deg (mean) from one 2 mm slice to the next, so a single slice is noise.
CENTRAL_MM = 8.0
# L1-S1 is L1-L5 plus the L5/S1 segment, which is lordotic (the phantom's 2.4-28 deg); an L1-S1 this much
# smaller than L1-L5 means a wrong S1 endplate line (5 of 38 held-out real studies with spine-seg 1.3, no phantom)
IMPLAUSIBLE_DEG = 5.0
# An angle whose per-slice values spread this much (interquartile range over the central slices) is
# flagged for a look: twice the manual masks' median spread on real scans (4.0 deg, 38 VB3 studies); on
# the phantoms ours stays under 4.3 deg, with the field of view cut inside S1 too (docs/models/spine-seg-history.md)
SPREAD_DEG = 8.0
SPANS = {"L1-S1": (("L1", "superior"), ("S1", "superior")), "L1-L5": (("L1", "superior"), ("L5", "inferior"))}


# results.json and the phantom's truth name the class as SPEC does; the SR codes it as a key of codes.GRADES
SR_GRADE = {"hypolordosis": "hypolordosis", "normal": "normal_lordosis", "hyperlordosis": "hyperlordosis"}


@dataclass(frozen=True)
class Endplate:
    """A fitted endplate line on one slice: a point and unit direction in (row, col) mm, and its ends."""

    point: np.ndarray
    direction: np.ndarray
    ends_px: tuple[tuple[float, float], tuple[float, float]]  # (row, col) pixel coordinates


def _edge_points(pts: np.ndarray, along: np.ndarray, outward: np.ndarray) -> np.ndarray:
    """Per 1 mm strip across the central 80 % of the body, the index of the pixel furthest towards `outward`."""
    centre = pts.mean(axis=0)
    u, h = (pts - centre) @ along, (pts - centre) @ outward
    lo, hi = np.percentile(u, [10, 90])
    chosen = []
    for a in np.arange(lo, hi, 1.0):
        idx = np.nonzero((u >= a) & (u < a + 1.0))[0]
        if len(idx):
            chosen.append(idx[np.argmax(h[idx])])
    return np.array(chosen, dtype=int)


def _line(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Total least squares line; points more than 1.5 mm off are dropped and it is fitted again."""
    line = points
    for _ in range(3):
        c = line.mean(axis=0)
        d = np.linalg.svd(line - c, full_matrices=False)[2][0]
        keep = np.abs((line - c) @ np.array([-d[1], d[0]])) <= 1.5
        if keep.sum() < 5 or keep.all():
            break
        line = line[keep]
    return c, d, line


def _side_directions(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two side directions of the smallest rectangle around the points (a vertebral body is
    close to a rectangle in a sagittal slice, whatever its tilt and proportions)."""
    hull = pts[ConvexHull(pts).vertices]
    best, best_area = None, np.inf
    for a, b in zip(hull, np.roll(hull, -1, axis=0)):
        e = (b - a) / (np.linalg.norm(b - a) or 1.0)
        n = np.array([-e[1], e[0]])
        area = np.ptp(hull @ e) * np.ptp(hull @ n)
        if area < best_area:
            best, best_area = (e, n), area
    return best  # type: ignore[return-value]


def fit_endplate(mask: np.ndarray, spacing: tuple[float, float], outward: np.ndarray) -> Endplate | None:
    """The endplate of one vertebral body (2-D mask) facing `outward`, a (row, col) direction in mm
    towards the neighbouring body. Of the sides of the body's smallest enclosing rectangle, the one
    facing `outward` gives the direction across the body; the boundary pixel furthest that way in
    each 1 mm strip of the central 80 % is an endplate point; a total least squares line through
    them, points more than 1.5 mm off dropped, fitted again.

    A body cut by the image edge (most real sagittal series end inside S1) is no rectangle: the
    straight cut would pass for a side, so `outward` itself is the direction across it; and an
    endplate whose points lie mostly on the edge is outside the field of view: None."""
    mask = ndimage.binary_opening(ndimage.binary_fill_holes(mask), iterations=1)
    rows, cols = np.nonzero(mask)
    if len(rows) < 30:
        return None
    pts = np.column_stack([rows * spacing[0], cols * spacing[1]])
    out = np.asarray(outward, dtype=float) / np.linalg.norm(outward)
    on_edge = (rows == 0) | (rows == mask.shape[0] - 1) | (cols == 0) | (cols == mask.shape[1] - 1)
    cut = bool(on_edge.any())
    if cut:
        normal = out
    else:
        e, n = _side_directions(pts)
        normal = n if abs(np.dot(n, out)) >= abs(np.dot(e, out)) else e
    for _ in range(3 if cut else 1):  # a cut body: the fitted endplate gives the next direction
        normal = normal * np.sign(np.dot(normal, out))
        chosen = _edge_points(pts, np.array([-normal[1], normal[0]]), normal)
        if len(chosen) < 5 or on_edge[chosen].mean() > 0.5:
            return None
        c, d, line = _line(pts[chosen])
        normal = np.array([-d[1], d[0]])
    t = (line - c) @ d
    ends = [c + t.min() * d, c + t.max() * d]
    ends_px = tuple((float(p[0] / spacing[0]), float(p[1] / spacing[1])) for p in ends)
    return Endplate(c, d, ends_px)  # type: ignore[arg-type]


Plates = dict[tuple[str, str], Endplate | None]  # (level, side) -> its line on one slice


def angle_between(a: Endplate, b: Endplate) -> float:
    return float(np.degrees(np.arccos(np.clip(abs(np.dot(a.direction, b.direction)), 0, 1))))


def midline_slice(labels: np.ndarray) -> int:
    """The sagittal slice through the vertebral midline: the centre of the L1-L5 body voxels across
    the slices (a body is symmetric left to right; the slice with the most body pixels lies anywhere
    on a flat plateau, and real scans put ours and the manual masks' up to 8 slices apart). S1 is
    left out: how much of it a slice shows depends on where the field of view ends and on how far a
    segmentation follows it into the sacrum, neither of which says where the midline is."""
    counts = np.isin(labels, [LABEL_VALUES[n] for n in ("L1", "L2", "L3", "L4", "L5")]).sum(axis=(1, 2))
    if not counts.any():
        return labels.shape[0] // 2
    return int(round(float(np.average(np.arange(len(counts)), weights=counts))))


def central_slices(labels: np.ndarray, slice_spacing: float, half_width_mm: float = CENTRAL_MM) -> list[int]:
    """The slices within `half_width_mm` of the midline slice, the midline slice first."""
    k, half = midline_slice(labels), int(half_width_mm / slice_spacing + 1e-6) if slice_spacing > 0 else 0
    return [k] + [j for d in range(1, half + 1) for j in (k - d, k + d) if 0 <= j < labels.shape[0]]


@dataclass
class Measured:
    angles: list[Angle]
    problems: list[str]

    @property
    def unmeasured(self) -> list[str]:
        """The spans not measured or withheld: the SR lists them without a value."""
        return [span for span in SPANS if span not in {a.span for a in self.angles}]


def _endplates(sl: np.ndarray, spacing: tuple[float, float]) -> Plates:
    """The three endplates on one slice; each faces away from the body on its other side (L2 for
    L1, L4 for L5) or, for S1, towards L5."""
    def centre(level: str) -> np.ndarray | None:
        rows, cols = np.nonzero(sl == LABEL_VALUES[level])
        return np.array([rows.mean() * spacing[0], cols.mean() * spacing[1]]) if len(rows) else None

    neighbours = {("L1", "superior"): ("L2", -1), ("S1", "superior"): ("L5", 1), ("L5", "inferior"): ("L4", -1)}
    plates: Plates = {}
    for (level, side), (other, sign) in neighbours.items():
        a, b = centre(level), centre(other)
        plates[(level, side)] = None if a is None or b is None else \
            fit_endplate(sl == LABEL_VALUES[level], spacing, sign * (b - a))
    return plates


def slice_endplates(labels: np.ndarray, series: Series) -> dict[int, Plates]:
    """The three endplates on each central slice (`central_slices`), the midline slice first."""
    return {k: _endplates(labels[k], series.spacing) for k in central_slices(labels, series.slice_spacing)}


def slice_angles(per_slice: dict[int, Plates], span: str) -> list[tuple[float, int]]:
    """(angle, slice) of `span` on each slice where both of its endplates were found, smallest first."""
    a, b = SPANS[span]
    return sorted((angle_between(p[a], p[b]), k) for k, p in per_slice.items()  # type: ignore[arg-type]
                  if p[a] is not None and p[b] is not None)


def uncertain(spread_deg: float | None) -> bool:
    """Whether an angle's spread over the central slices calls for a look at its lines (SPREAD_DEG)."""
    return spread_deg is not None and spread_deg > SPREAD_DEG


def measure(labels: np.ndarray, series: Series, thresholds: tuple[float, float] = LORDOSIS_THRESHOLDS_DEG) -> Measured:
    """Both angles from named labels on the series grid (our segmentation, or manual masks). Each
    angle is measured on every central slice (`central_slices`) and the slice with the median angle
    is reported, so the lines shown on that image give the number reported; the per-slice angles'
    interquartile range goes with it, and above SPREAD_DEG the angle is flagged for a look; both
    angles are where L5's size puts the naming of L5 and S1 in doubt (`spine_seg.l5_size_doubt`)."""
    per_slice = slice_endplates(labels, series)
    problems, angles = [], []
    l5_doubt = spine_seg.l5_size_doubt(labels) is not None  # both angles rest on L5 or S1: flagged, said once by the naming
    for span, (a, b) in SPANS.items():
        measured = slice_angles(per_slice, span)
        if not measured:
            missing = [lv for lv, side in (a, b) if all(p[(lv, side)] is None for p in per_slice.values())]
            what = f"{', '.join(missing)} not found" if missing else f"{a[0]} and {b[0]} not found together"
            problems.append(f"lordosis {span} not measured: {what} on the slices through the vertebral midline "
                            f"(outside the field of view or not recognised)")
            continue
        deg, k = measured[(len(measured) - 1) // 2]
        spread = None
        if len(measured) >= 3:
            q1, q3 = np.percentile([d for d, _ in measured], [25, 75])
            spread = round(float(q3 - q1), 2)
            if uncertain(spread):
                problems.append(f"lordosis {span} uncertain: it varies by {spread:.1f} deg (interquartile range) "
                                f"over the {len(measured)} slices through the vertebral midline; check the endplate "
                                f"lines on the image")
        lines = tuple(Line((e.ends_px[0][1] + 0.5, e.ends_px[0][0] + 0.5), (e.ends_px[1][1] + 0.5, e.ends_px[1][0] + 0.5))
                      for e in (per_slice[k][a], per_slice[k][b]))  # type: ignore[union-attr]  # SCOORD (column, row)
        angles.append(Angle(span, round(deg, 2), str(series.datasets[k].SOPInstanceUID), lines,  # type: ignore[arg-type]
                            SR_GRADE[lordosis_class(deg, thresholds)] if span == "L1-S1" else None, spread,
                            uncertain(spread) or l5_doubt))
    by_span = {a.span: a for a in angles}
    if {"L1-S1", "L1-L5"} <= set(by_span) and by_span["L1-S1"].degrees < by_span["L1-L5"].degrees - IMPLAUSIBLE_DEG:
        problems.append(f"lordosis L1-S1 not reported: {by_span['L1-S1'].degrees:.1f} deg is less than L1-L5's "
                        f"{by_span['L1-L5'].degrees:.1f} deg, which the L5/S1 segment's lordosis makes larger; the S1 "
                        f"endplate line is not trusted (check S1 on the image)")
        angles.remove(by_span["L1-S1"])
    return Measured(angles, problems)


def run(files: list[Path], out: Path, options: ResultOptions) -> list[Path]:
    series = pick_series(files)
    model = spine_seg.load_model()
    labelled = spine_seg.segment(series, model)
    m = measure(labelled.labels, series, options.lordosis_thresholds_deg)
    angles = {a.span: a.degrees for a in m.angles}
    spine_seg.write_findings(out, {"lordosis": {  # SPEC's keys: angle_deg, class
        "angle_deg": angles, "class": lordosis_class(angles["L1-S1"], options.lordosis_thresholds_deg) if "L1-S1" in angles else None,
        "series": series.description, "thresholds_deg": list(options.lordosis_thresholds_deg),
        "spread_deg": {a.span: a.spread_deg for a in m.angles},
        "problems": labelled.problems + m.problems}})
    # an angle not measured is in the SR too, without a value: the radiologist sees it was tried
    return write_results(out, series.datasets, model.algorithm, options, angles=m.angles, unmeasured=m.unmeasured)


register(Pipeline("lordosis", run, device="gpu", version="1.2", model_dir=spine_seg.MODEL_DIR,
                  load_model=spine_seg.load_model))
