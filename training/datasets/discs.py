"""Training data for `disc-herniation` (seed 004), and the two formats users bring it in.

Per phantom study, on the mid-sagittal T2 slice (the slice through most of the vertebral bodies):
- stage 1: the lumbar region (L1 to S1, bodies and discs) as one box on the whole slice;
- stage 2: each disc L1/L2-L5/S1 as a box on the region crop (the region enlarged by 10 %);
- per disc, a crop around its box enlarged by 10 % (seed 004), labelled herniated (protrusion,
  extrusion) or not (none, bulge).

The crop has three channels: the mid-sagittal slice and the slices `LATERAL_MM` to either side,
because a paracentral herniation is not on the midline. It is square, `CONTEXT` times the enlarged
box's longer side, so a herniation beyond the disc's margin on the midline stays in view.

Formats: a YOLO folder (`images/<split>/*.png`, `labels/<split>/*.txt` with one
`class x_centre y_centre width height` line per box, normalised, and `data.yaml`) and image folders
per class (`<root>/<class>/*.png`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from training.phantom.anatomy import LABEL_VALUES, LUMBAR_DISCS, LUMBAR_VERTEBRAE

LEVELS = tuple(LUMBAR_DISCS)  # L1/L2 .. L5/S1
CLASSES = ("normal", "herniated")
HERNIATED = ("protrusion", "extrusion")  # a bulge is not a herniation
ENLARGE = 1.10  # seed 004: each detected box grows by 10 % before it is cropped
CONTEXT = 1.3
LATERAL_MM = 4.5  # a paracentral herniation lies about this far from the midline (phantom: 0.45 of the canal's half-width)
CROP_VERSION = 2  # part of the sample cache's name: raise it when crops change (2: lateral slices at 4.5 mm, not 9)
CROP = 64
REGION_NAMES = {0: "lumbar_region"}
DISC_NAMES = {0: "disc"}

Box = tuple[float, float, float, float]  # (row0, col0, row1, col1) in pixels, end exclusive


def mask_box(mask: np.ndarray) -> Box | None:
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return None
    return float(rows.min()), float(cols.min()), float(rows.max() + 1), float(cols.max() + 1)


def enlarge(box: Box, factor: float, shape: tuple[int, int] | None = None) -> Box:
    """The box with each side `factor` times as long about the same centre, clipped to `shape`."""
    r0, c0, r1, c1 = box
    cr, cc, hr, hc = (r0 + r1) / 2, (c0 + c1) / 2, (r1 - r0) * factor / 2, (c1 - c0) * factor / 2
    out = (cr - hr, cc - hc, cr + hr, cc + hc)
    if shape is None:
        return out
    return max(out[0], 0.0), max(out[1], 0.0), min(out[2], float(shape[0])), min(out[3], float(shape[1]))


def mid_slice(labels: np.ndarray) -> int:
    """The mid-sagittal slice of named labels [slice, row, col] (phantom label values): the slice
    through most of the vertebral bodies; the middle slice if there are none."""
    areas = np.isin(labels, [LABEL_VALUES[v] for v in LUMBAR_VERTEBRAE]).sum(axis=(1, 2))
    return int(np.argmax(areas)) if areas.any() else len(labels) // 2


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A normalised slice ([0, 1]) as the 8-bit grey image the detectors see."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def lateral_slices(mid: int, n: int, slice_spacing: float) -> list[int]:
    step = max(1, int(round(LATERAL_MM / max(slice_spacing, 1e-3))))
    return [int(np.clip(mid - step, 0, n - 1)), mid, int(np.clip(mid + step, 0, n - 1))]


def crop_points(box: Box, shift: tuple[float, float] = (0.0, 0.0), scale: float = 1.0) -> np.ndarray:
    """The (row, col) sample points [2, CROP, CROP] of a disc's square crop on its slice: the box
    enlarged by `ENLARGE`, squared to `CONTEXT` times its longer side. `shift` (fraction of the
    side) and `scale` move and resize it as a detector's box would."""
    r0, c0, r1, c1 = enlarge(box, ENLARGE)
    side = CONTEXT * max(r1 - r0, c1 - c0) * scale
    centre = np.array([(r0 + r1) / 2, (c0 + c1) / 2]) + np.array(shift) * side
    offsets = (np.arange(CROP) + 0.5) / CROP * side - side / 2
    return np.stack(np.meshgrid(centre[0] + offsets, centre[1] + offsets, indexing="ij"))


def disc_crop(volume: np.ndarray, mid: int, points: np.ndarray, slice_spacing: float) -> np.ndarray:
    """[3, CROP, CROP] of one disc at `points` (from `crop_points`), standardised; `volume` normalised
    [slice, row, col]."""
    from training.datasets.marrow import standardise

    crop = [ndimage.map_coordinates(volume[k], points, order=1, mode="constant", cval=0.0)
            for k in lateral_slices(mid, len(volume), slice_spacing)]
    return standardise(np.stack(crop))


@dataclass
class DiscSamples:
    """What one or more phantom studies give each stage: detector images with their boxes, and disc crops."""
    region_images: list[np.ndarray] = field(default_factory=list)  # uint8 [row, col]
    region_boxes: list[list[Box]] = field(default_factory=list)
    disc_images: list[np.ndarray] = field(default_factory=list)  # uint8 region crops
    disc_boxes: list[list[Box]] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)  # float32 [3, CROP, CROP]
    labels: list[int] = field(default_factory=list)  # index into CLASSES
    study: list[int] = field(default_factory=list)
    level: list[str] = field(default_factory=list)

    def extend(self, other: "DiscSamples") -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.stack(self.crops), np.asarray(self.labels)


def phantom_samples(seed: int, jitter: int = 0, detector_images: bool = True, study_class: str | None = None) -> DiscSamples:
    """One phantom study's T2 series as `DiscSamples`; `jitter` more crops per disc and one more
    (neighbouring) slice per detector stage, with boxes moved a little, as detection would place them.
    `study_class` forces the phantom's study class (training draws more herniated discs than chance gives)."""
    from training.datasets.phantom import phantom_series
    from training.datasets.spine_seg import normalise
    from training.phantom.generator import PhantomOptions

    rng = np.random.default_rng([seed, 4])
    s = next(phantom_series(seed, PhantomOptions(contrasts=("T2",), max_matrix=384, study_class=study_class)))
    volume = normalise(s.pixels)
    mid = mid_slice(s.labels)
    region_values = [LABEL_VALUES[v] for v in (*LUMBAR_VERTEBRAE, *LEVELS)]
    out = DiscSamples()
    slices = [mid] + ([int(np.clip(mid + rng.choice([-1, 1]), 0, len(volume) - 1))] if jitter else [])
    for k in slices if detector_images else []:
        region = mask_box(np.isin(s.labels[k], region_values))
        discs = [b for lv in LEVELS if (b := mask_box(s.labels[k] == LABEL_VALUES[lv])) is not None]
        if region is None or len(discs) < len(LEVELS):
            continue
        out.region_images.append(to_uint8(volume[k]))
        out.region_boxes.append([region])
        factor = ENLARGE if k == mid else rng.uniform(1.03, 1.2)
        r0, c0, r1, c1 = (int(round(v)) for v in enlarge(region, factor, volume.shape[1:]))
        out.disc_images.append(to_uint8(volume[k, r0:r1, c0:c1]))
        out.disc_boxes.append([(b[0] - r0, b[1] - c0, b[2] - r0, b[3] - c0) for b in discs])
    for lv in LEVELS:
        box = mask_box(s.labels[mid] == LABEL_VALUES[lv])
        if box is None:
            continue
        label = int(s.design.findings.discs[lv].herniation in HERNIATED)
        for j in range(1 + jitter):
            shift, scale = ((0.0, 0.0), 1.0) if j == 0 else (tuple(rng.uniform(-0.06, 0.06, 2)), rng.uniform(0.9, 1.15))
            out.crops.append(disc_crop(volume, mid, crop_points(box, shift, scale), s.slice_spacing))
            out.labels.append(label)
            out.study.append(seed)
            out.level.append(lv)
    return out


# --- YOLO folders ------------------------------------------------------------------------------

def write_yolo_folder(root: Path, split: str, images: list[np.ndarray], boxes: list[list[Box]],
                      names: dict[int, str], stems: list[str] | None = None) -> Path:
    """Images as PNG and their boxes (all of class 0) as YOLO label files; `data.yaml` lists the
    splits present. Returns the path of `data.yaml`."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i, (image, bs) in enumerate(zip(images, boxes)):
        stem = stems[i] if stems else f"{i:06d}"
        Image.fromarray(image).save(root / "images" / split / f"{stem}.png")
        h, w = image.shape[:2]
        lines = [f"0 {(c0 + c1) / 2 / w:.6f} {(r0 + r1) / 2 / h:.6f} {(c1 - c0) / w:.6f} {(r1 - r0) / h:.6f}"
                 for r0, c0, r1, c1 in bs]
        (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    splits = {p.name: f"images/{p.name}" for p in sorted((root / "images").iterdir()) if p.is_dir()}
    splits.setdefault("train", next(iter(splits.values())))  # ultralytics wants both keys, even to validate only
    splits.setdefault("val", splits["train"])
    text = [f"path: {root.resolve()}", *[f"{s}: {path}" for s, path in splits.items()],
            "names:", *[f"  {k}: {v}" for k, v in names.items()]]
    (root / "data.yaml").write_text("\n".join(text) + "\n")
    return root / "data.yaml"


def read_yolo_folder(root: Path, split: str) -> list[tuple[Path, list[tuple[int, Box]]]]:
    """(image path, [(class, box in pixels)]) for each image of a split of a YOLO folder; an image
    without a label file has no boxes (a negative example), a malformed line is an error naming the file."""
    images = sorted(p for p in (root / "images" / split).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    out = []
    for path in images:
        label = root / "labels" / split / f"{path.stem}.txt"
        w, h = Image.open(path).size
        boxes = []
        for n, line in enumerate(label.read_text().splitlines() if label.exists() else [], 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 5:
                raise ValueError(f"{label}:{n}: expected 'class x_centre y_centre width height', got {line!r}")
            cls, (x, y, bw, bh) = int(parts[0]), (float(v) for v in parts[1:])
            boxes.append((cls, ((y - bh / 2) * h, (x - bw / 2) * w, (y + bh / 2) * h, (x + bw / 2) * w)))
        out.append((path, boxes))
    return out


# --- image folders per class -------------------------------------------------------------------

def write_class_folders(root: Path, crops: np.ndarray, labels: np.ndarray) -> None:
    """Each crop as an RGB PNG (its three channels) under `root/<class>/`."""
    for i, (crop, label) in enumerate(zip(crops, labels)):
        folder = root / CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        lo, hi = float(crop.min()), float(crop.max())
        rgb = ((crop - lo) / max(hi - lo, 1e-6) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(rgb).save(folder / f"{i:06d}.png")


def read_class_folders(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(crops [n, 3, CROP, CROP] standardised, labels) from `root/normal/` and `root/herniated/`
    (any image size or mode: grey images fill all three channels)."""
    from training.datasets.marrow import standardise

    unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in CLASSES)
    if unknown:
        raise ValueError(f"{root}: class folders {unknown} are not among {list(CLASSES)}")
    crops, labels = [], []
    for index, name in enumerate(CLASSES):
        for path in sorted((root / name).glob("*")) if (root / name).is_dir() else []:
            image = Image.open(path).convert("RGB").resize((CROP, CROP), Image.BILINEAR)
            crops.append(standardise(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255))
            labels.append(index)
    if not crops:
        raise ValueError(f"{root}: no images under {', '.join(CLASSES)}/")
    return np.stack(crops), np.asarray(labels)
