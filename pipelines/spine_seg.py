"""`spine-seg`: vertebral bodies L1-L5 and S1, discs L1/L2-L5/S1 and the spinal canal on a sagittal
MR series, as a DICOM SEG.

A 2-D U-Net labels each 1 mm sagittal slice with five classes (background, vertebral body, S1,
disc, canal); levels are then named by anatomy, counting vertebral bodies up from S1 and checking
that a disc lies between each pair, never by where they sit in the image.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from pipelines.registry import Pipeline, register
from pipelines.series import Series, pick_series
from structured_reports.codes import STRUCTURES
from structured_reports.model import Algorithm, ResultOptions, Segment
from structured_reports.writer import write_results
from training.phantom.anatomy import LABEL_VALUES

if TYPE_CHECKING:  # torch is imported lazily, where a network runs
    import torch

MODEL_DIR = Path(__file__).resolve().parent / "models" / "spine-seg"
GRADCAM_LAYER = "model.1.submodule.2"  # the decoder block at half resolution
BODY, S1, DISC, CANAL = 1, 2, 3, 4
LUMBAR = ["L5", "L4", "L3", "L2", "L1"]  # counted up from S1
MIN_BODY_MM3, MIN_S1_MM3, MIN_DISC_MM3 = 1500.0, 1500.0, 250.0
MIN_FRACTION = 0.3  # of a typical body: smaller is a fragment; of a typical disc: too little to be a mobile disc
SACRUM_SIZE = 2.0  # bone marked S1 this many typical bodies large is the sacrum, not a body (with a sliver of S1) taken for S1
S1_CONTACT = 0.05  # share of a body's voxels next to S1 above which it is part of S1
SPLIT_MM = 3.0  # erosion that separates vertebral bodies touching through misclassified pixels
MAX_STEP_MM = 60.0  # centre-to-centre distance beyond which a vertebra is missing, not the next one
L5_SIZE = (0.6, 1.8)  # L5's volume over L2-L4's median where naming is plausible (0.90-1.42 in 93 of 96 studies, 1.6)
S1_DEPTH = 1.2  # S1's body spans about L5's height down the sacrum; what the network marks beyond is S2 and below


class Network:
    """One trained U-Net of a model folder."""

    def __init__(self, folder: Path, device: str):
        from training.trainers.common import read_model_folder
        from training.trainers.spine_seg import network

        state, description = read_model_folder(folder)
        described = description["network"]
        self.context = int(described.get("context_slices", 0))
        heads, read = described.get("heads", [None]), described.get("inference_head")
        if read not in heads:
            raise ValueError(f"{folder}/model.json: inference_head {read!r} is not one of its heads {heads}")
        self.net = network(tuple(described["channels"]), 2 * self.context + 1, len(heads))
        n, i = len(description["classes"]), heads.index(read)
        self.classes = slice(i * n, (i + 1) * n)  # the output channels inference reads
        self.net.load_state_dict(state)
        self.net.to(device).eval()
        self.device = device

    def inputs(self, grid: np.ndarray, k: slice) -> np.ndarray:
        """The network input [batch, channel, row, col] for slices `k` of a [slice, row, col] grid."""
        from training.datasets.spine_seg import with_context

        return np.ascontiguousarray(with_context(grid, self.context, k))

    def logits(self, grid: np.ndarray, k: slice) -> torch.Tensor:
        """Class logits [batch, class, row, col] for slices `k` of a padded [slice, row, col] grid."""
        import torch

        return self.net(torch.from_numpy(self.inputs(grid, k)).to(self.device))[:, self.classes]


def structure_codes() -> dict[str, dict]:
    """What each structure the pipeline names is in its results: the label value, the SEG segment
    label and the coded type. A model folder records it (model.json `structures`), so the folder
    says what its results mean without this code."""
    return {n: {"label_value": LABEL_VALUES[n], "segment_label": label, "code": [c.scheme_designator, c.value, c.meaning]}
            for n, (c, label, _) in STRUCTURES.items()}


class Model:
    """A trained spine-seg model folder, ready to run on CPU or GPU: one network, or (when its
    model.json lists `members`) a weighted-average ensemble of member folders (seed 004), whose
    class probabilities are averaged with the weights found on validation data."""

    def __init__(self, folder: Path = MODEL_DIR, device: str = "cpu"):
        import torch

        from training.trainers.common import read_description

        folder = Path(folder)
        self.description = read_description(folder)
        recorded, ours = self.description.get("structures"), structure_codes()
        if recorded is not None and recorded != ours:  # folders from before 2026-12-05 record none
            differ = sorted(n for n in {*recorded, *ours} if recorded.get(n) != ours.get(n))
            raise ValueError(f"model folder {folder} names its structures otherwise than this dicomnode writes them "
                             f"(differs in {', '.join(differ)}): use a folder trained by this version")
        self.device = torch.device(device)
        members = self.description.get("members") or [{"folder": ".", "weight": 1.0}]
        self.members = [(Network(folder / m["folder"], device), float(m["weight"])) for m in members]
        self.explained = max(self.members, key=lambda m: m[1])[0]  # Grad-CAM explains the heaviest member
        self.grids_mm = [float(g) for g in self.description.get("test_time_grids_mm") or [self.description["grid_mm"]]]
        self.algorithm = Algorithm(f"dicomnode {self.description['name']}", self.description["version"])

    @staticmethod
    def grid(volume: np.ndarray, spacing: tuple[float, float], grid_mm: float) -> tuple[np.ndarray, tuple[int, int]]:
        """A normalised [slice, row, col] volume on a working grid, padded for the U-Net; and the unpadded size."""
        from training.datasets.spine_seg import to_grid
        from training.trainers.common import pad_to

        return pad_to(np.stack([to_grid(s, spacing, order=1, grid=grid_mm) for s in volume]))

    def probabilities(self, series: Series, batch: int = 8) -> np.ndarray:
        """Class probabilities [class, slice, row, col] on the series' own grid: each member's on
        each of the model's working grids (`test_time_grids_mm`), weighted and averaged."""
        import torch

        from training.datasets.spine_seg import normalise

        volume = normalise(series.volume)
        slices, rows, cols = volume.shape
        total = np.zeros((slices, len(self.description["classes"]), rows, cols), dtype=np.float32)
        with torch.inference_mode():
            for grid_mm in self.grids_mm:
                padded, (r, c) = self.grid(volume, series.spacing, grid_mm)
                for i in range(0, slices, batch):
                    k = slice(i, i + batch)
                    p = sum(w * torch.softmax(m.logits(padded, k), dim=1) for m, w in self.members)
                    # back to the series grid (pixel centres aligned, edges held) where the network ran:
                    # scipy's 4-D zoom of the whole stack took 3.3 s of a 7.3 s spine-seg + lordosis run
                    p = torch.nn.functional.interpolate(p[:, :, :r, :c], size=(rows, cols), mode="bilinear", align_corners=False)
                    total[k] += p.float().cpu().numpy()
        total /= len(self.grids_mm)
        return total.transpose(1, 0, 2, 3)  # class, slice, row, col

    def explain(self, series: Series, k: int, class_index: int, region: np.ndarray) -> np.ndarray:
        """Grad-CAM on slice k of the summed `class_index` logit inside `region` (a mask on the
        series grid), back on the series grid, in [0, 1]."""
        import torch

        from pipelines.explain import grad_cam, segmentation_decision
        from training.datasets.spine_seg import normalise, to_grid
        from training.trainers.common import pad_to

        grid_mm = float(self.description["grid_mm"])
        padded, (r, c) = self.grid(normalise(series.volume), series.spacing, grid_mm)
        where, _ = pad_to(to_grid(region.astype(np.uint8), series.spacing, order=0, grid=grid_mm))
        x = torch.from_numpy(self.explained.inputs(padded, slice(k, k + 1))).to(self.device)
        decision = segmentation_decision(self.explained.classes.start + class_index, where)
        cam = grad_cam(self.explained.net, GRADCAM_LAYER, x, decision)[:r, :c]
        rows, cols = series.volume.shape[1:]
        back = ndimage.zoom(cam, (rows / r, cols / c), order=1, grid_mode=True, mode="nearest")[:rows, :cols]
        return np.clip(back, 0, 1).astype(np.float32)


@functools.lru_cache(maxsize=2)
def load_model(folder: str = str(MODEL_DIR), device: str | None = None) -> Model:
    """The model, loaded once per process; on the GPU when there is one."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Model(Path(folder), device)


@dataclass
class Labelled:
    """Named structures on the series grid, in the phantom's label values (L1 = 1 ... L5/S1 = 15, canal 30)."""

    labels: np.ndarray
    classes: np.ndarray  # the network's five classes, before naming
    problems: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        present = set(np.unique(self.labels).tolist())
        return [n for n in STRUCTURES if LABEL_VALUES[n] in present]


def _components(mask: np.ndarray, voxel_mm3: float, minimum: float, series: Series,
                split_mm: float = 0.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mask, centroid in patient mm) of each 3-D connected component of at least `minimum` mm³.

    With `split_mm`, components are first found in the mask eroded in-plane by about that much,
    then every voxel of the mask joins its nearest eroded component: thin bridges (a few pixels
    of a disc taken for bone) no longer fuse two vertebrae into one. The work is done inside the
    mask's bounding box (same result: outside it there is neither mask nor seed)."""
    boxes = ndimage.find_objects(mask.astype(np.uint8))
    if not boxes:
        return []
    box = boxes[0]
    sub = mask[box]
    if split_mm > 0:
        steps = max(1, int(round(split_mm / min(series.spacing))))
        cross = ndimage.generate_binary_structure(2, 1)[np.newaxis]  # in-plane, slice by slice
        across = np.ones((3, 1, 1), dtype=bool)  # and once across slices: a bridge in one slice only goes too
        core = ndimage.binary_erosion(ndimage.binary_erosion(sub, cross, iterations=steps), across)
        seeds, n = ndimage.label(core)
        if n == 0:
            return []
        gap = voxel_mm3 / (series.spacing[0] * series.spacing[1])
        dist, idx = ndimage.distance_transform_edt(seeds == 0, sampling=(gap, *series.spacing), return_indices=True)
        # voxels further than the erosion from every seed belonged to fragments that vanished: left out
        lab = np.where(sub & (dist <= np.hypot(1.5 * steps * max(series.spacing), gap)), seeds[tuple(idx)], 0)
    else:
        lab, n = ndimage.label(sub)
    sizes = ndimage.sum_labels(sub, lab, range(1, n + 1))
    kept = [i for i, size in enumerate(sizes, start=1) if size * voxel_mm3 >= minimum]
    out = []
    for i, at in zip(kept, ndimage.center_of_mass(sub, lab, kept) if kept else []):
        comp = np.zeros_like(mask)
        comp[box] = lab == i
        k, r, c = (float(v) + b.start for v, b in zip(at, box))
        centre = series.patient_points(int(round(k)), np.array([r]), np.array([c]))[0]
        out.append((comp, centre))
    return out


def voxel_mm3(series: Series) -> float:
    ipp = [np.asarray(d.ImagePositionPatient, dtype=float) for d in series.datasets[:2]]
    gap = float(np.linalg.norm(ipp[1] - ipp[0])) if len(ipp) == 2 else 1.0
    return series.spacing[0] * series.spacing[1] * gap


Component = tuple[np.ndarray, np.ndarray]  # mask, centroid (patient mm)


def _between(discs: list[Component], lower: np.ndarray, upper: np.ndarray) -> list[Component]:
    return [d for d in discs if lower[2] < d[1][2] < upper[2]]


Discs = list[tuple[float, int]]  # height (patient mm) and voxel count of each disc component


def _disc_between(discs: Discs, lower: float, upper: float, share: float = MIN_FRACTION) -> bool:
    """Whether the disc voxels centred between heights `lower` and `upper` add up to `share` of a
    typical disc: fragments of one disc add up; a scrap of the S1/S2 remnant does not."""
    voxels = sum(n for z, n in discs if lower < z < upper)
    return voxels > 0 and voxels >= share * _typical([n for _, n in discs])


def _typical(sizes: list[int]) -> float:
    """Voxels of a typical body or disc: the median of the five largest components."""
    return float(np.median(sorted(sizes, reverse=True)[:5]))


def _s1_disc_share(s1: np.ndarray, typical_body: float) -> float:
    """How much of a typical disc must lie between bone marked S1 and a body above it for that body
    to be mobile (L5), not part of S1. Bone marked S1 at least the size of a typical body is the
    sacrum in view, not a scrap: then any disc component will do, as the L5/S1 disc is often thin
    and partly missed (VB3_32, VB3_39: L5 was taken for S1)."""
    return 0.0 if s1.sum() >= typical_body else MIN_FRACTION


def _find_s1(marked: list[Component], bodies: list[Component], discs: Discs, typical_body: float,
             problems: list[str]) -> Component | None:
    """S1, in order of confidence: the largest S1-class component with a disc between it and the
    nearest vertebral body above it; else the lowest body with a disc above it and none below it
    (below S1 the sacrum is fused: there is no mobile disc; a field of view ending inside S1 leaves
    it cut, often marked as a body, with scraps of the S1/S2 remnant disc under it); else an
    S1-class component with a body within reach above."""
    marked = sorted(marked, key=lambda c: -c[0].sum())
    reach = [(s, [b for b in bodies if 0 < b[1][2] - s[1][2] and np.linalg.norm(b[1] - s[1]) <= MAX_STEP_MM])
             for s in marked]
    for s, above in reach:
        if above and _disc_between(discs, s[1][2], min(b[1][2] for b in above), _s1_disc_share(s[0], typical_body)):
            return s
    ordered = sorted(bodies, key=lambda b: b[1][2])
    for (mask, centre), upper in zip(ordered, ordered[1:]):
        below = _disc_between(discs, centre[2] - MAX_STEP_MM / 2, centre[2])
        if _disc_between(discs, centre[2], upper[1][2]) and not below:
            problems.append("S1 taken as the lowest vertebra with a disc above it and none below "
                            "(the network did not mark S1 itself)")
            return mask, centre
    return next((s for s, above in reach if above), None)


def _lumbar_above_a_disc(classes: np.ndarray, marked: list[Component], discs: Discs, typical_body: float,
                         problems: list[str]) -> tuple[np.ndarray, list[Component]]:
    """The classes with every S1-marked component that has a mobile disc below it marked vertebral
    body instead, and the S1-marked components left: below S1 the sacrum is fused, so that is L5 (a
    network that learned S1 as the bone at the lower edge of real images marks L5 so when the image
    ends inside the L5/S1 disc or S1). Not bone far larger than a body: that is the sacrum, and
    what lies under it are pieces of the S1/S2 remnant disc (fold 2's VB3_15)."""
    moved = [c for c in marked if c[0].sum() < SACRUM_SIZE * typical_body
             and _disc_between(discs, c[1][2] - MAX_STEP_MM / 2, c[1][2])]
    if not moved:
        return classes, marked
    classes = classes.copy()
    for mask, _ in moved:
        classes[mask] = BODY
    problems.append("bone marked S1 above a mobile disc taken as a lumbar vertebral body")
    return classes, [c for c in marked if all(c[0] is not m[0] for m in moved)]


def _below_l5(bodies: list[Component], discs: list[Component]) -> np.ndarray | None:
    """Where S1 lies when the network marked no S1 (it may sit cut at the edge of the field of
    view): below the lowest body that has a disc under it and no body under that disc, as far
    below the disc as the body is above it. None when no such body exists."""
    ordered = sorted(bodies, key=lambda b: b[1][2])
    if not ordered:
        return None
    _, lowest = ordered[0]
    under = [d for d in discs if 0 < lowest[2] - d[1][2] <= MAX_STEP_MM / 2]
    if not under:
        return None
    disc = max(under, key=lambda d: d[0].sum())[1]
    return disc + (disc - lowest)


def name_levels(classes: np.ndarray, series: Series) -> Labelled:
    """Name bodies and discs by anatomy: find S1; the bodies above it, nearest first, are L5, L4,
    ... L1; a disc takes the names of the two bodies around it."""
    v = voxel_mm3(series)
    out = Labelled(np.zeros(classes.shape, dtype=np.uint8), classes)
    out.labels[classes == CANAL] = LABEL_VALUES["canal"]
    discs = _components(classes == DISC, v, MIN_DISC_MM3, series)
    heights = [(float(d[1][2]), int(d[0].sum())) for d in discs]
    marked = _components(classes == S1, v, MIN_S1_MM3, series)
    candidates = _components(classes == BODY, v, MIN_BODY_MM3, series, SPLIT_MM)
    typical_body = _typical([int(c[0].sum()) for c in candidates]) if candidates else np.inf
    classes, left = _lumbar_above_a_disc(classes, marked, heights, typical_body, out.problems)
    if len(left) < len(marked):
        candidates = _components(classes == BODY, v, MIN_BODY_MM3, series, SPLIT_MM)
        typical_body = _typical([int(c[0].sum()) for c in candidates]) if candidates else np.inf
    marked = left
    # fragments (a posterior element, a piece of S1 taken for a body) are far smaller than bodies
    candidates = [c for c in candidates if c[0].sum() >= MIN_FRACTION * typical_body]
    s1 = _find_s1(marked, candidates, heights, typical_body, out.problems)
    if s1 is not None:
        s1_mask, s1_centre = s1
        s1_share = _s1_disc_share(s1_mask, typical_body)
        near_s1 = ndimage.binary_dilation(s1_mask, ndimage.generate_binary_structure(3, 1))

        def part_of_s1(c: Component) -> bool:
            """A "body" sharing a long border with S1 and no disc between them is S1 the network was unsure of."""
            touching = (c[0] & near_s1).sum() >= S1_CONTACT * c[0].sum()
            return c[0] is s1_mask or (touching and not _disc_between(heights, s1_centre[2], c[1][2], s1_share))

        s1_parts = [c for c in candidates if part_of_s1(c)]
        for comp, _ in [(s1_mask, s1_centre), *s1_parts]:
            out.labels[comp] = LABEL_VALUES["S1"]
        candidates = [b for b in candidates if all(b[0] is not p[0] for p in s1_parts)]
    else:
        s1_centre = _below_l5(candidates, discs)
        if s1_centre is None:
            out.problems.append("S1 is not in the field of view (or not recognised): vertebral levels are not named")
            return out
        out.problems.append("S1 not recognised: L5 taken as the lowest vertebral body above a disc with no body below "
                            "it; S1 itself is not segmented")
    bodies = sorted((b for b in candidates if b[1][2] > s1_centre[2]), key=lambda b: b[1][2])
    chain: list[tuple[str, np.ndarray]] = [("S1", s1_centre)]
    for name, (mask, centre) in zip(LUMBAR, bodies):
        if np.linalg.norm(centre - chain[-1][1]) > MAX_STEP_MM:
            out.problems.append(f"no vertebral body found within {MAX_STEP_MM:.0f} mm above {chain[-1][0]}: "
                                f"levels above it are not named")
            break
        out.labels[mask] = LABEL_VALUES[name]
        chain.append((name, centre))
    _trim_s1(out.labels, series)
    if len(chain) < 6:
        out.problems.append(f"only {len(chain) - 1} lumbar vertebral bodies found above S1 (L1 may be outside the field of view)")
    for (lower, lc), (upper, uc) in zip(chain, chain[1:]):
        between = _between(discs, lc, uc)
        if not between:
            out.problems.append(f"no disc found between {upper} and {lower}: check the level naming")
            continue
        mask = np.logical_or.reduce([d[0] for d in between])
        out.labels[mask & (out.labels == 0)] = LABEL_VALUES[f"{upper}/{lower}"]
    doubt = l5_size_doubt(out.labels)
    if doubt:
        out.problems.append(doubt)
    return out


def l5_size_doubt(labels: np.ndarray) -> str | None:
    """Why the naming around L5 needs a look, or None: L5 far smaller or larger than L2-L4 (median)
    means part of S1 was named L5 (a marrow change along an endplate can pass for a disc), or part of
    L5 was taken for S1; then the levels, and the L5 and S1 endplates the angles rest on, may be off."""
    sizes = [int(np.count_nonzero(labels == LABEL_VALUES[n])) for n in ("L2", "L3", "L4", "L5")]
    typical = float(np.median(sizes[:3]))
    if typical == 0 or sizes[3] == 0:
        return None
    ratio = sizes[3] / typical
    if L5_SIZE[0] <= ratio <= L5_SIZE[1]:
        return None
    return (f"L5 is {ratio:.2f} times the size of L2-L4 (median): part of S1 may be named L5, or part of L5 "
            f"S1; check the level naming and the L5 and S1 endplate lines")


def _trim_s1(labels: np.ndarray, series: Series) -> None:
    """Keep S1's body: the network's S1 often runs on down the sacrum and into its posterior parts,
    which are not S1's body (the phantom and radiologists draw the body alone). Kept: what lies, in
    the sagittal plane, within S1_DEPTH L5 heights of S1's top along the direction from L5's centre
    to S1's, and across it within L5's depth and a fifth more either side. The direction is taken
    again from what is kept (the parts cut off pull S1's centre away)."""
    s1, l5 = labels == LABEL_VALUES["S1"], labels == LABEL_VALUES["L5"]
    if not s1.any() or not l5.any():
        return
    mm = np.array(series.spacing)
    k, r, c = np.nonzero(s1)
    at1 = np.stack([r, c], axis=1) * mm
    at5 = np.stack(np.nonzero(l5)[1:], axis=1) * mm
    keep = np.ones(len(at1), dtype=bool)
    for _ in range(3):
        down = at1[keep].mean(axis=0) - at5.mean(axis=0)
        down /= np.linalg.norm(down)
        across = np.array([-down[1], down[0]])
        lo, hi = np.percentile(at5 @ down, [2, 98])
        front, back = np.percentile(at5 @ across, [2, 98])
        margin = 0.2 * (back - front)
        along1, across1 = at1 @ down, at1 @ across
        keep = ((along1 <= np.percentile(along1[keep], 2) + S1_DEPTH * (hi - lo))
                & (across1 >= front - margin) & (across1 <= back + margin))
        if not keep.any():
            return
    labels[k[~keep], r[~keep], c[~keep]] = 0


# The latest results, oldest first. A key holds its model, so a model loaded later cannot reuse that
# model's id() and be handed its labels.
_cache: dict[tuple[Model, tuple[str, ...]], Labelled] = {}
CACHE_SERIES = 3  # a study's sagittal T2, T1 and STIR: every study pipeline reuses them
_cache_lock = threading.Lock()


def segment(series: Series, model: Model | None = None) -> Labelled:
    """Named labels of a series. The last few results are kept, so `lordosis`, `marrow` and
    `disc-herniation` after `spine-seg` on the same study do not run the network again."""
    model = model or load_model()
    key = (model, tuple(series.uids))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    classes = np.argmax(model.probabilities(series), axis=0).astype(np.uint8)
    result = name_levels(classes, series)
    with _cache_lock:
        _cache[key] = result
        while len(_cache) > CACHE_SERIES:
            del _cache[next(iter(_cache))]
    return result


def write_findings(out: Path, findings: dict) -> None:
    """What `process` and the node add to results.json beside the objects (e.g. problems found)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "findings.json").write_text(json.dumps(findings, indent=1))


def run(files: list[Path], out: Path, options: ResultOptions) -> list[Path]:
    series = pick_series(files)
    model = load_model()
    result = segment(series, model)
    segments = [Segment(n, result.labels == LABEL_VALUES[n]) for n in result.names()]
    write_findings(out, {"spine-seg": {"series": series.description, "structures": result.names(),
                                       "problems": result.problems}})
    if not segments:
        return []
    return write_results(out, series.datasets, model.algorithm, options, segments=segments)


register(Pipeline("spine-seg", run, device="gpu", version="1.6", model_dir=MODEL_DIR, load_model=load_model))
