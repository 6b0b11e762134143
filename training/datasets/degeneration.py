"""Crops for `degeneration` (seeds 001, 002), the way RSNA 2024 solutions localise before they grade.

Per disc level, located from named labels (the phantom's exact ones in training, `spine-seg`'s at
inference) on the series where each condition is read:
- `canal`: sagittal T2, the mid-sagittal slice and its neighbours, centred between the disc and the
  spinal canal: spinal canal stenosis;
- `foramen`: sagittal T1 (T2 when there is no T1), the slices `FORAMEN_MM` to the patient's left
  and right of the midline, same centre: left / right neural foraminal narrowing;
- `axial`: axial T2, the slice nearest the disc's centre with its neighbours, centred on the canal
  projected from the sagittal labels, patient left on the crop's right and anterior at the top
  (radiological convention): left / right subarticular stenosis.
And per study, `study_image`: the lumbar region of the mid-sagittal T2 slice, for the four-class
label (healthy / herniated disc / spinal stenosis / spondylosis) of seed 001.

Series are `pipelines.series.Series` (files read from DICOM) in training too, so the geometry is
the one inference sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from pipelines.series import Series
from training.datasets.discs import enlarge, mask_box, mid_slice
from training.datasets.marrow import standardise
from training.phantom.anatomy import LABEL_VALUES, LUMBAR_DISCS, LUMBAR_VERTEBRAE

LEVELS = tuple(LUMBAR_DISCS)
GRADES = ("normal_mild", "moderate", "severe")
CONDITIONS = ("spinal_canal_stenosis", "left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing",
              "left_subarticular_stenosis", "right_subarticular_stenosis")
STUDY_CLASSES = ("healthy", "herniated_disc", "spinal_stenosis", "spondylosis")
VIEWS = {"canal": ("spinal_canal_stenosis",),
         "foramen": ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"),
         "axial": ("left_subarticular_stenosis", "right_subarticular_stenosis")}
# taught beside a view's grades, not reported: what the study label reads (herniation twice: the
# axial slice through the disc shows a protrusion across its width, the sagittal one only where it cuts)
AUXILIARY = {"canal": ("herniation", "disc_degeneration"), "axial": ("herniation",)}
AUXILIARY_GRADES = {"herniation": {"none": 0, "bulge": 0, "protrusion": 1, "extrusion": 2},
                    "disc_degeneration": {"none": 0, "mild": 0, "moderate": 1, "severe": 2}}
DATA_VERSION = 3  # part of the sample cache's name: raise it when samples change (2: auxiliary canal grades, 3: axial)
CROP = 64
STUDY_CROP = 96
STUDY_ENLARGE = 1.15  # the study image: the L1-S1 region's box grown by this, squared
SAGITTAL_SIDE = 1.6  # crop side / the disc's anteroposterior extent
AXIAL_SIDE_MM = 64.0
FORAMEN_MM = 16.0  # the foramina lie about this far from the midline (canal half-width + a few mm)


def heads(view: str) -> int:
    """Outputs of a view's network, three grades each: its reported conditions, then its auxiliary ones."""
    return 1 if view == "foramen" else len(VIEWS[view]) + len(AUXILIARY.get(view, ()))


def sample_points(centre: np.ndarray, side: float, spacing: tuple[float, float], n: int = CROP) -> np.ndarray:
    """(row, col) points [2, n, n] of a square of `side` mm about `centre` (row, col) on a slice."""
    offsets = (np.arange(n) + 0.5) / n * side - side / 2
    return np.stack(np.meshgrid(centre[0] + offsets / spacing[0], centre[1] + offsets / spacing[1], indexing="ij"))


@dataclass(frozen=True)
class Crop:
    """A crop, the slice its middle channel comes from and where on that slice it was sampled
    ([2, n, n] (row, col) points, mirrored as the crop was): what a Grad-CAM map is laid back on."""
    image: np.ndarray  # [3, n, n], standardised
    slice: int
    points: np.ndarray

    def mirrored(self, axis: int) -> "Crop":
        """Mirror along rows (axis 1) or columns (axis 2); the points follow."""
        flip = [slice(None)] * 3
        flip[axis] = slice(None, None, -1)
        return Crop(np.ascontiguousarray(self.image[tuple(flip)]), self.slice, np.ascontiguousarray(self.points[tuple(flip)]))


def _stack(volume: np.ndarray, k: int, neighbours: tuple[int, int], centre: np.ndarray, side: float,
           spacing: tuple[float, float], n: int = CROP) -> Crop:
    """Slices (neighbours[0], k, neighbours[1]) sampled on one square of `side` mm about `centre`."""
    ks = [int(np.clip(j, 0, len(volume) - 1)) for j in (neighbours[0], k, neighbours[1])]
    points = sample_points(centre, side, spacing, n)
    image = np.stack([ndimage.map_coordinates(volume[j], points, order=1, mode="constant", cval=0.0) for j in ks])
    return Crop(standardise(image), k, points)


@dataclass
class Anchor:
    """Where one disc level is on a sagittal series: slice, the disc's and the crop's (row, col)
    centres, crop side in mm, and the canal's centre in the disc's rows (None where none is labelled)."""
    slice: int
    disc: np.ndarray
    centre: np.ndarray
    side: float
    canal: np.ndarray | None


def sagittal_anchors(labels: np.ndarray, spacing: tuple[float, float]) -> tuple[int, dict[str, Anchor]]:
    """(mid-sagittal slice, anchor per disc level) from named labels [slice, row, col]: centred
    between the disc's centre and the canal in the disc's rows."""
    mid = mid_slice(labels)
    out = {}
    for lv in LEVELS:
        disc = labels[mid] == LABEL_VALUES[lv]
        box = mask_box(disc)
        if box is None:
            continue
        r0, r1 = int(box[0]), int(box[2])
        canal = np.zeros_like(disc)
        canal[r0:r1] = labels[mid, r0:r1] == LABEL_VALUES["canal"]
        rows, cols = np.nonzero(disc)
        centre = np.array([rows.mean(), cols.mean()])
        at = np.array([np.nonzero(canal)[0].mean(), np.nonzero(canal)[1].mean()]) if canal.any() else None
        out[lv] = Anchor(mid, centre, centre if at is None else (centre + at) / 2, SAGITTAL_SIDE * (box[3] - box[1]) * spacing[1], at)
    return mid, out


def canal_crops(series: Series, labels: np.ndarray, volume: np.ndarray) -> dict[str, Crop]:
    mid, anchors = sagittal_anchors(labels, series.spacing)
    return {lv: _stack(volume, mid, (mid - 1, mid + 1), a.centre, a.side, series.spacing) for lv, a in anchors.items()}


def _patient_x(series: Series, k: int) -> float:
    """Patient x (LPS: + is left) of the centre of slice k."""
    rows, cols = series.volume.shape[1:]
    return float(series.patient_points(k, np.array([rows / 2]), np.array([cols / 2]))[0, 0])


def foramen_crops(series: Series, labels: np.ndarray, volume: np.ndarray) -> dict[tuple[str, str], Crop]:
    """{(side, level): crop} on the slices FORAMEN_MM either side of the midline."""
    mid, anchors = sagittal_anchors(labels, series.spacing)
    step = max(1, int(round(FORAMEN_MM / max(series.slice_spacing, 1e-3))))
    out = {}
    for k in (mid - step, mid + step):
        if not 0 <= k < len(volume):
            continue
        side = "left" if _patient_x(series, k) > _patient_x(series, mid) else "right"
        for lv, a in anchors.items():
            out[(side, lv)] = _stack(volume, k, (k - 1, k + 1), a.centre, a.side, series.spacing)
    return out


def _to_pixels(ds, point: np.ndarray, spacing: tuple[float, float]) -> tuple[np.ndarray, float]:
    """(row, col) of a patient point projected onto a slice, and its distance from the slice plane (mm)."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    d = point - np.asarray(ds.ImagePositionPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return np.array([d @ iop[3:] / spacing[0], d @ iop[:3] / spacing[1]]), float(abs(d @ normal))


def axial_crops(sagittal: Series, labels: np.ndarray, axial: Series, volume: np.ndarray) -> dict[str, Crop]:
    """{level: crop} on the axial slice nearest each disc's centre (within one and a half slice
    spacings), centred on the canal, patient left on the crop's right, anterior at the top."""
    mid, anchors = sagittal_anchors(labels, sagittal.spacing)
    iop = np.asarray(axial.datasets[0].ImageOrientationPatient, dtype=float)
    out = {}
    for lv, a in anchors.items():
        disc = sagittal.patient_points(mid, np.array([a.disc[0]]), np.array([a.disc[1]]))[0]
        target = a.canal if a.canal is not None else a.centre
        canal = sagittal.patient_points(mid, np.array([target[0]]), np.array([target[1]]))[0]
        found = [_to_pixels(ds, disc, axial.spacing) for ds in axial.datasets]
        k = int(np.argmin([dist for _, dist in found]))
        if found[k][1] > 1.5 * max(axial.slice_spacing, 1.0):
            continue
        neighbours = [j for j in (k - 1, k, k + 1) if 0 <= j < len(volume) and found[j][1] < 2.5 * max(axial.slice_spacing, 1.0)]
        crop = _stack(volume, k, (neighbours[0], neighbours[-1]), _to_pixels(axial.datasets[k], canal, axial.spacing)[0],
                      AXIAL_SIDE_MM, axial.spacing)
        if iop[0] < 0:  # columns run toward the patient's right: mirror so that left is on the right
            crop = crop.mirrored(2)
        if iop[4] < 0:  # rows run anterior: mirror so that anterior is at the top
            crop = crop.mirrored(1)
        out[lv] = crop
    return out


def study_image(series: Series, labels: np.ndarray, volume: np.ndarray) -> Crop | None:
    """[3, STUDY_CROP, STUDY_CROP]: the lumbar region (L1 to S1) of the mid-sagittal slice and its neighbours."""
    mid = mid_slice(labels)
    box = mask_box(np.isin(labels[mid], [LABEL_VALUES[v] for v in (*LUMBAR_VERTEBRAE, *LEVELS)]))
    if box is None:
        return None
    r0, c0, r1, c1 = enlarge(box, STUDY_ENLARGE)
    side = max((r1 - r0) * series.spacing[0], (c1 - c0) * series.spacing[1])
    return _stack(volume, mid, (mid - 1, mid + 1), np.array([(r0 + r1) / 2, (c0 + c1) / 2]), side, series.spacing, STUDY_CROP)


@dataclass
class DegenerationSamples:
    """Crops per view with their grades (index into GRADES), and study images with their class."""
    crops: dict[str, list[np.ndarray]] = field(default_factory=lambda: {v: [] for v in VIEWS})
    grades: dict[str, list[list[int]]] = field(default_factory=lambda: {v: [] for v in VIEWS})  # one per condition of the view
    keys: dict[str, list[tuple[int, str]]] = field(default_factory=lambda: {v: [] for v in VIEWS})  # (study, level)
    study_images: list[np.ndarray] = field(default_factory=list)
    study_classes: list[int] = field(default_factory=list)
    studies: list[int] = field(default_factory=list)

    def extend(self, other: "DegenerationSamples") -> None:
        for v in VIEWS:
            self.crops[v] += other.crops[v]
            self.grades[v] += other.grades[v]
            self.keys[v] += other.keys[v]
        self.study_images += other.study_images
        self.study_classes += other.study_classes
        self.studies += other.studies

    def arrays(self, view: str) -> tuple[np.ndarray, np.ndarray]:
        return np.stack(self.crops[view]), np.asarray(self.grades[view])


def by_instance(labels: np.ndarray, series: Series) -> np.ndarray:
    """Phantom labels (stored by ascending InstanceNumber) in the series' slice order."""
    return labels[[int(ds.InstanceNumber) - 1 for ds in series.datasets]]


def phantom_samples(seed: int, max_matrix: int = 320) -> DegenerationSamples:
    """One phantom study (sagittal T1 and T2, axial T2) written as DICOM and read back, crops from its exact labels."""
    import json
    import tempfile
    from pathlib import Path

    from pipelines.series import read_planes
    from training.datasets.spine_seg import normalise
    from training.phantom.generator import PhantomOptions, generate_study

    out = DegenerationSamples()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        generate_study(folder, seed, PhantomOptions(contrasts=("T1", "T2"), axial=True, max_matrix=max_matrix), write_tissue=False)
        truth = json.loads((folder / "truth" / "truth.json").read_text())
        files = {s["description"]: s for s in truth["series"]}
        planes = read_planes(sorted((folder / "dicom").rglob("*.dcm")))
        series = {s.description: s for s in planes["sagittal"]}
        axial = next(iter(planes.get("axial", [])), None)
        labels = {d: by_instance(np.load(folder / "truth" / files[d]["labels_file"])["labels"], s) for d, s in series.items()}
        if axial is not None:
            labels["AX T2"] = by_instance(np.load(folder / "truth" / files["AX T2"]["labels_file"])["labels"], axial)
    t2, t1 = series["SAG T2"], series["SAG T1"]
    levels = truth["levels"]
    grade = lambda lv, c: GRADES.index(levels[lv][c])  # noqa: E731
    v2, v1 = normalise(t2.volume), normalise(t1.volume)
    auxiliary = lambda view, lv: [AUXILIARY_GRADES[c][levels[lv][c]] for c in AUXILIARY[view]]  # noqa: E731
    for lv, crop in canal_crops(t2, labels["SAG T2"], v2).items():
        _add(out, "canal", crop.image, [grade(lv, "spinal_canal_stenosis"), *auxiliary("canal", lv)], seed, lv)
    for (side, lv), crop in foramen_crops(t1, labels["SAG T1"], v1).items():
        _add(out, "foramen", crop.image, [grade(lv, f"{side}_neural_foraminal_narrowing")], seed, f"{side} {lv}")
    if axial is not None:
        for lv, crop in axial_crops(t2, labels["SAG T2"], axial, normalise(axial.volume)).items():
            _add(out, "axial", crop.image, [grade(lv, "left_subarticular_stenosis"), grade(lv, "right_subarticular_stenosis"),
                                            *auxiliary("axial", lv)], seed, lv)
    image = study_image(t2, labels["SAG T2"], v2)
    if image is not None:
        out.study_images.append(image.image)
        out.study_classes.append(STUDY_CLASSES.index(truth["study_class"]))
        out.studies.append(seed)
    return out


def _add(out: DegenerationSamples, view: str, crop: np.ndarray, grades: list[int], seed: int, level: str) -> None:
    out.crops[view].append(crop.astype(np.float32))
    out.grades[view].append(grades)
    out.keys[view].append((seed, level))

