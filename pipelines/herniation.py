"""`disc-herniation` (seed 004): which lumbar disc, L1/L2 to L5/S1, is herniated?

On the mid-sagittal slice of the T2 series (the slice through most of the vertebral bodies, as
`spine-seg` segments them), YOLOv8 finds the lumbar region, then each disc in the region's crop;
each disc box, enlarged by 10 %, is cropped on that slice and on the slices beside it and judged
by a weighted-average ensemble of three CNNs. Discs are named by `spine-seg` (counted from the
sacrum): a detected box takes the name of the segmented disc it overlaps most. Where the detector
misses a disc that the segmentation found, the segmentation's box stands in and the result says so.

The SR carries, per disc, herniation present or absent with its probability and the box as an
image region on the mid-sagittal slice; one Grad-CAM map on that slice shows every disc's decision.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.registry import Pipeline, register
from pipelines.series import Series, read_series, sagittal_t2
from structured_reports.model import Algorithm, Explanation, Finding, Region, ResultOptions
from structured_reports.writer import write_results
from training.datasets import discs as data
from training.phantom.anatomy import LABEL_VALUES

MODEL_DIR = Path(__file__).resolve().parent / "models" / "disc-herniation"
MIN_IOU = 0.2  # a detected box and a segmented disc below this overlap are different discs


class Model:
    """A trained disc-herniation model folder: two detectors, the ensemble's CNNs and its weights."""

    def __init__(self, folder: Path = MODEL_DIR):
        from pipelines import detect
        from training.trainers.common import read_model_folder
        from training.trainers.herniation import member

        folder = Path(folder)
        state, self.description = read_model_folder(folder)
        d = self.description
        self.weights: dict[str, float] = d["ensemble"]["weights"]
        self.members = {}
        for name in d["ensemble"]["members"]:
            net = member(name)
            net.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
            self.members[name] = net.eval()
        self.detectors = {stage: detect.load(folder / spec["file"]) for stage, spec in d["detectors"].items()}
        self.imgsz = {stage: int(spec["imgsz"]) for stage, spec in d["detectors"].items()}
        self.algorithm = Algorithm("dicomnode disc-herniation (YOLOv8 + CNN ensemble)", d["version"])

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """P(herniated) per crop [n, 3, CROP, CROP]: the weighted average of the members."""
        from training.trainers.herniation import probabilities

        return sum(w * probabilities(self.members[n], crops) for n, w in self.weights.items() if w > 0)

    def explain(self, crop: np.ndarray) -> np.ndarray:
        """Grad-CAM of the herniated-minus-normal logit, averaged over the members with their weights."""
        import torch

        from pipelines.explain import grad_cam

        x = torch.from_numpy(np.ascontiguousarray(crop[None]))
        layers = self.description["ensemble"]["gradcam_layers"]
        maps = [w * grad_cam(self.members[n], layers[n], x, lambda out: out[0, 1] - out[0, 0])
                for n, w in self.weights.items() if w > 0]
        total = np.sum(maps, axis=0)
        return (total / total.max()).astype(np.float32) if total.max() > 0 else total.astype(np.float32)

    def detect_discs(self, image: np.ndarray) -> tuple[data.Box | None, list[tuple[data.Box, float]]]:
        """(the lumbar region, the disc boxes with their confidences) on one 8-bit slice, in its pixels."""
        from pipelines.detect import detect

        regions = detect(self.detectors["region"], image, self.imgsz["region"])
        if not regions:
            return None, []
        region = regions[0][0]
        r0, c0, r1, c1 = (int(round(v)) for v in data.enlarge(region, data.ENLARGE, image.shape))
        found = detect(self.detectors["discs"], np.ascontiguousarray(image[r0:r1, c0:c1]), self.imgsz["discs"])
        return region, [((b[0] + r0, b[1] + c0, b[2] + r0, b[3] + c0), score) for b, score in found]


@functools.lru_cache(maxsize=1)
def load_model(folder: str = str(MODEL_DIR)) -> Model:
    return Model(Path(folder))


@dataclass
class DiscResult:
    level: str
    box: data.Box  # on the mid-sagittal slice, (row0, col0, row1, col1) pixels
    source: str  # detector | segmentation
    probability: float  # herniated
    heatmap: np.ndarray | None = None  # Grad-CAM on the slice


def box_iou(a: data.Box, b: data.Box) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda x: (x[2] - x[0]) * (x[3] - x[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def name_boxes(detected: list[data.Box], segmented: dict[str, data.Box]) -> tuple[dict[str, tuple[data.Box, str]], list[str]]:
    """Each segmented (named) disc takes the detected box that overlaps it most; a disc the detector
    missed keeps the segmentation's box. With no segmentation, five detected boxes are named from
    the top down (the region is L1 to S1). Returns {level: (box, source)} and problems."""
    problems: list[str] = []
    if not segmented:
        inside = sorted(detected, key=lambda b: b[0] + b[2])
        if len(inside) != len(data.LEVELS):
            return {}, [f"no disc named by spine-seg and {len(inside)} discs detected (5 expected): discs not named"]
        return {lv: (b, "detector") for lv, b in zip(data.LEVELS, inside)}, \
            ["discs named by their order in the lumbar region: spine-seg named none"]
    named: dict[str, tuple[data.Box, str]] = {}
    free = list(detected)
    for level, seg_box in segmented.items():
        scores = [box_iou(b, seg_box) for b in free]
        if scores and max(scores) >= MIN_IOU:
            named[level] = (free.pop(int(np.argmax(scores))), "detector")
        else:
            named[level] = (seg_box, "segmentation")
            problems.append(f"{level}: not detected; the segmentation's box is used")
    return named, problems


def classify(series: Series, model: Model | None = None, boxes: str = "detector") -> tuple[list[DiscResult], list[str], int]:
    """Per disc its box and P(herniated) with a Grad-CAM map; problems; the mid-sagittal slice index.
    `boxes="segmentation"` takes every box from the `spine-seg` masks instead of the detector (the
    comparison the evaluation reports)."""
    from pipelines.explain import crop_to_slice
    from pipelines.spine_seg import segment
    from training.datasets.spine_seg import normalise

    model = model or load_model()
    labelled = segment(series)
    mid = data.mid_slice(labelled.labels)
    segmented = {lv: b for lv in data.LEVELS if (b := data.mask_box(labelled.labels[mid] == LABEL_VALUES[lv])) is not None}
    volume = normalise(series.volume)
    problems = list(labelled.problems)
    if boxes == "segmentation":
        named = {lv: (b, "segmentation") for lv, b in segmented.items()}
    else:
        region, found = model.detect_discs(data.to_uint8(volume[mid]))
        if region is None:
            problems.append("no lumbar region detected on the mid-sagittal slice")
        named, more = name_boxes([b for b, _ in found], segmented)
        problems += more
    if not named:
        return [], problems, mid
    levels = [lv for lv in data.LEVELS if lv in named]
    points = [data.crop_points(named[lv][0]) for lv in levels]
    crops = np.stack([data.disc_crop(volume, mid, p, series.slice_spacing) for p in points])
    probs = model.probabilities(crops)
    shape = volume.shape[1:]
    return [DiscResult(lv, named[lv][0], named[lv][1], float(p), crop_to_slice(model.explain(c), pts, shape))
            for lv, p, c, pts in zip(levels, probs, crops, points)], problems, mid


def findings(results: list[DiscResult], sop_uid: str) -> tuple[list[Finding], dict]:
    """SR findings (herniation present or absent, its probability, the box as a region) and the
    results.json entry per SPEC: {"L4/L5": {"label": "herniated", "probability": 0.93}}."""
    out, summary = [], {}
    for r in results:
        herniated = r.probability >= 0.5
        r0, c0, r1, c1 = r.box
        corners = ((c0, r0), (c1, r0), (c1, r1), (c0, r1))  # (column, row), as SCOORD has them
        out.append(Finding("disc_herniation", r.level, round(r.probability, 4), "present" if herniated else "none",
                           region=Region(sop_uid, corners)))
        summary[r.level] = {"label": data.CLASSES[int(herniated)], "probability": round(r.probability, 4),
                            "box": [round(v, 1) for v in r.box], "box_source": r.source}
    return out, summary


def run(files: list[Path], out: Path, options: ResultOptions) -> list[Path]:
    from pipelines.spine_seg import write_findings

    series = sagittal_t2(read_series(files), "disc-herniation")
    model = load_model()
    results, problems, mid = classify(series, model)
    sop_uid = str(series.datasets[mid].SOPInstanceUID)
    found, summary = findings(results, sop_uid)
    write_findings(out, {"disc-herniation": {**summary, "problems": problems}})
    if not found:
        return []
    herniated = [r.level for r in results if r.probability >= 0.5]
    heat = np.max([r.heatmap for r in results], axis=0)
    decision = f"disc herniation: {', '.join(herniated) if herniated else 'none'}"
    return write_results(out, series.datasets, model.algorithm, options, findings=found,
                         explanations=[Explanation(sop_uid, heat, decision)])


# scope study: it finds the sagittal T2 series itself
register(Pipeline("disc-herniation", run, device="gpu", version="1.1", scope="study", model_dir=MODEL_DIR,
                  load_model=load_model))
