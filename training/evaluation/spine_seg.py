"""`dicomnode evaluate spine-seg`: the model on studies it did not train on, through the same code
the node runs (DICOM series in, named labels and angles out).

- Phantom: seeds never used in training (default 5000-5029, contrasts T2/T1/STIR in turn):
  Dice and IoU per structure and level, level naming per study, L1-S1 and L1-L5 angle error
  (Bland-Altman), hypo/normal/hyper confusion matrix.
- Real: the held-out fold of `../shared/data/real_lumbar` (the shipped model never saw it):
  Dice/IoU per level where the case names its levels (VB3 bodies L1-L5, IVD discs), Dice of each
  labelled structure with the output structure that overlaps it most, whatever its name (VB1 names no
  levels), level naming per study that labels L1-L5 or its five discs (VB3, IVD), recall by how
  fully each sagittal slice cuts the labelled structures (where voxels are missed), and the L1-L5
  angle from our segmentation against the same measurement on the manual masks.
- Both: each endplate's tilt against the reference masks' (which endplate an angle error comes from).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from dicomnode.config import lordosis_class
from pipelines.lordosis import SPREAD_DEG, Endplate, measure, slice_angles, slice_endplates
from pipelines.series import Series, pick_series
from pipelines.spine_seg import BODY, DISC, S1, SPLIT_MM, Labelled, Model, _components, segment, voxel_mm3
from training.datasets.real_lumbar import UNNAMED_BASE
from training.evaluation.metrics import bars, bland_altman, confusion, dice, iou
from training.phantom.anatomy import LABEL_VALUES

BODIES = ["L1", "L2", "L3", "L4", "L5", "S1"]
DISCS = ["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]
CLASSES = ["hypolordosis", "normal", "hyperlordosis"]
# the lines the two angles join, by the name the report gives each
ENDPLATES = {"L1 superior": ("L1", "superior"), "L5 inferior": ("L5", "inferior"), "S1 superior": ("S1", "superior")}


@dataclass
class StudyResult:
    name: str
    dice: dict[str, float] = field(default_factory=dict)
    iou: dict[str, float] = field(default_factory=dict)
    named_ok: bool | None = None
    angles: dict[str, float] = field(default_factory=dict)
    reference_angles: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # real cases: {labelled kind: {slice cut: (voxels found, voxels labelled)}}, see recall_by_cut
    recall_by_cut: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    edge_offsets: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # see edge_offsets
    reference_split: float | None = None  # real cases: see reference_split
    endplate_tilt: dict[str, float] = field(default_factory=dict)  # see endplate_tilt_errors
    contrast: str | None = None  # phantom studies: the one series' contrast
    flagged: set[str] = field(default_factory=set)  # the spans `measure` flags uncertain (spread, L5's size)


def load_study(folder: Path) -> tuple[Series, np.ndarray, np.ndarray | None]:
    """The series and its truth labels (and `known` mask for partial labels) in the series' slice order."""
    series = pick_series(sorted((folder / "dicom" / "series_1").glob("*.dcm")))
    z = np.load(folder / "truth" / "series_1.npz")
    order = [int(d.InstanceNumber) - 1 for d in series.datasets]
    return series, z["labels"][order], z["known"][order] if "known" in z else None


def evaluate_study(folder: Path, model: Model, structures: list[str]) -> StudyResult:
    series, truth, known = load_study(folder)
    pred = segment(series, model)
    r = StudyResult(folder.name, problems=pred.problems)
    for name in structures:
        t = truth == LABEL_VALUES[name]
        if t.any():
            r.dice[name] = dice(pred.labels == LABEL_VALUES[name], t)
            r.iou[name] = iou(pred.labels == LABEL_VALUES[name], t)
    r.named_ok = named_ok(r.dice)
    measured = measure(pred.labels, series)
    r.angles = {a.span: a.degrees for a in measured.angles}
    r.flagged = {a.span for a in measured.angles if a.uncertain}
    r.problems = r.problems + measured.problems
    r.reference_angles = {a.span: a.degrees for a in measure(truth, series).angles}
    r.endplate_tilt = endplate_tilt_errors(pred.labels, truth, series)
    if known is not None:  # real cases: each labelled structure against its best-matching output structure
        r.dice.update(component_dice(pred, truth, series))
        r.recall_by_cut = recall_by_cut(pred.classes, truth)
        r.edge_offsets = edge_offsets(pred.classes, truth, series.spacing)
        r.reference_split = reference_split(truth, series)
    return r


def named_ok(level_dice: dict[str, float]) -> bool | None:
    """All five lumbar levels named right: by the bodies L1-L5 where they are labelled, else by the discs
    L1/L2-L5/S1 (the IVD cases label only discs; a disc's name comes from the bodies on either side, so
    five discs named right mean L1-L5 named right). None where neither set is labelled whole."""
    for levels in (BODIES[:5], DISCS):
        if all(n in level_dice for n in levels):
            return all(level_dice[n] > 0.5 for n in levels)
    return None


def endplate_tilt_errors(labels: np.ndarray, reference: np.ndarray, series: Series) -> dict[str, float]:
    """Each endplate's tilt on `labels` minus its tilt on `reference`, degrees, the median over the
    central slices where both show it: an angle error is the sum of its two endplates' errors, and
    this says which of them to improve."""
    ours, ref = slice_endplates(labels, series), slice_endplates(reference, series)
    errors = {}
    for name, plate in ENDPLATES.items():
        pairs = [(ours[k][plate], ref[k][plate]) for k in sorted(ours.keys() & ref.keys())]
        turns = [_tilt(a) - _tilt(b) for a, b in pairs if a is not None and b is not None]
        if turns:
            errors[name] = float(np.median([(t + 90) % 180 - 90 for t in turns]))
    return errors


def _tilt(plate: Endplate) -> float:
    """The line's angle to the image rows, degrees in [0, 180): a line has no direction."""
    return float(np.degrees(np.arctan2(plate.direction[0], plate.direction[1])) % 180)


def reference_split(truth: np.ndarray, series: Series, span: str = "L1-L5") -> float | None:
    """The manual masks' own spread: `span` measured as the pipeline does (the median over the
    central slices), on the odd central slices minus on the even ones. How far our angle can be
    expected to agree with the reference, given that one slice's masks tilt an endplate by degrees."""
    measured = slice_angles(slice_endplates(truth, series), span)
    if not measured:
        return None
    k0 = min(k for _, k in measured)
    halves = [[deg for deg, k in measured if (k - k0) % 2 == parity] for parity in (0, 1)]
    return float(np.median(halves[1]) - np.median(halves[0])) if all(halves) else None


CUTS = ("central (>= 0.8)", "0.5-0.8", "lateral (< 0.5)")


def recall_by_cut(classes: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, tuple[int, int]]]:
    """Where the labelled voxels are missed: each sagittal slice by its labelled area over the largest
    slice's (1: through the middle of the structures, small: grazing their sides), as (found, labelled)
    voxels of the labelled kind (a body found as body or S1, a disc as disc)."""
    kind, labelled, found = _kind(classes, truth)
    area = labelled.sum(axis=(1, 2))
    out = dict.fromkeys(CUTS, (0, 0))
    for k in np.nonzero(area)[0]:
        share = area[k] / area.max()
        cut = CUTS[0] if share >= 0.8 else CUTS[1] if share >= 0.5 else CUTS[2]
        hit, n = out[cut]
        out[cut] = (hit + int((found[k] & labelled[k]).sum()), n + int(area[k]))
    return {kind: out}


SIDES = ("superior", "inferior", "anterior", "posterior")


def edge_offsets(classes: np.ndarray, truth: np.ndarray, spacing: tuple[float, float]) -> dict[str, dict[str, list[float]]]:
    """How far our boundary lies beyond (+) or inside (-) the manual one, in mm, at each labelled
    boundary pixel of the central slices (labelled area >= 0.8 of the largest slice's, where we found
    that kind at all), by the side of the structure it is on: whether Dice is lost to an edge drawn
    elsewhere rather than to structures or slices missed.
    Real cases only: rows run superior to inferior, columns anterior to posterior (`case_to_dicom`)."""
    kind, labelled, found = _kind(classes, truth)
    pixel, any_found = min(spacing), found.any(axis=(1, 2))
    out: dict[str, list[float]] = {side: [] for side in SIDES}
    for value in np.unique(truth[labelled]):
        t = truth == value
        area = t.sum(axis=(1, 2))
        for k in np.nonzero((area >= 0.8 * area.max()) & any_found)[0]:
            inside = ndimage.distance_transform_edt(found[k], sampling=spacing) - pixel
            outside = ndimage.distance_transform_edt(~found[k], sampling=spacing)
            offset = np.where(found[k], inside, -outside)
            rows, cols = np.nonzero(t[k])
            r, c = np.nonzero(t[k] & ~ndimage.binary_erosion(t[k]))
            dr, dc = (r - rows.mean()) / max(np.ptp(rows), 1), (c - cols.mean()) / max(np.ptp(cols), 1)  # in box units
            across = np.abs(dr) > np.abs(dc)
            for side, on in zip(SIDES, (across & (dr < 0), across & (dr > 0), ~across & (dc < 0), ~across & (dc > 0))):
                out[side] += offset[r[on], c[on]].tolist()
    return {kind: out}


def _kind(classes: np.ndarray, truth: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """The labelled kind of a real case, its labelled voxels and the voxels we found of that kind
    (a body found as body or S1, a disc as disc)."""
    bodies = np.isin(truth, [LABEL_VALUES[n] for n in BODIES]) | (truth >= UNNAMED_BASE)
    if bodies.any():
        return "vertebral body", bodies, np.isin(classes, (BODY, S1))
    return "disc", np.isin(truth, [LABEL_VALUES[n] for n in DISCS]), classes == DISC


def component_dice(pred: Labelled, truth: np.ndarray, series: Series) -> dict[str, float]:
    """Mean Dice of each labelled body (or disc) with the output structure that overlaps it most,
    whatever its name: segmentation quality apart from naming. Output structures are what the
    pipeline delivers (each named level) and the connected components of what the network marked
    but naming left unnamed (T12, bodies of a study it could not name); a component spanning
    several vertebrae scores low."""
    v = voxel_mm3(series)
    values = [int(x) for x in np.unique(truth) if x]
    out = {}
    for name, names, classes, split in (("vertebral body (any level)", BODIES, (BODY, S1), SPLIT_MM),
                                        ("disc (any level)", DISCS, (DISC,), 0.0)):
        named = [LABEL_VALUES[n] for n in names]
        wanted = [x for x in values if x in named or (BODY in classes and x >= UNNAMED_BASE)]
        if not wanted:
            continue
        unnamed = np.isin(pred.classes, classes) & ~np.isin(pred.labels, named)
        comps = [m for m in (pred.labels == x for x in named) if m.any()]
        comps += [c for c, _ in _components(unnamed, v, 0.0, series, split)]
        scores = []
        for x in wanted:
            t = truth == x
            best = max(comps, key=lambda c: (c & t).sum(), default=None)
            scores.append(dice(best, t) if best is not None and (best & t).any() else 0.0)
        out[name] = float(np.mean(scores))
    return out


def _mean(results: list[StudyResult], key: str, attr: str = "dice") -> float:
    vals = [getattr(r, attr)[key] for r in results if key in getattr(r, attr)]
    return float(np.nanmean(vals)) if vals else float("nan")


def dice_by_contrast(phantom: list[StudyResult]) -> dict[str, dict[str, float]]:
    """Mean Dice of the bodies (L1-S1), the discs and the canal over the studies of each contrast:
    whether a structure falls short on one contrast or on all (the pipeline reads a study's T2
    first, so a T1-only gap matters less than one on every contrast)."""
    out: dict[str, dict[str, float]] = {}
    for contrast in dict.fromkeys(r.contrast for r in phantom if r.contrast):
        studies = [r for r in phantom if r.contrast == contrast]
        out[contrast] = {"studies": len(studies)}
        for group, names in (("bodies", BODIES), ("discs", DISCS), ("canal", ["canal"])):
            out[contrast][group] = float(np.mean([_mean(studies, n) for n in names]))
    return out


def evaluate(model_dir: Path, out: Path, phantom_seeds: list[int], fold: int | str = 0,
             fov_end_mm: tuple[float, float] | None = None, training_fit: bool = False) -> dict:
    """Phantom and real held-out figures and the report; with `fov_end_mm`, the phantoms' field of
    view ends inside S1 (naming where S1 is a sliver or out of view), and the model folder's own
    metrics are left as they are. With `training_fit`, the real cases the model trained on are
    measured too, apart: a fit hardly better than the held-out figures means the model does not
    memorise them, so regularisation is not what it lacks."""
    from training.datasets.real_lumbar import case_paths, case_to_dicom, load_case, split
    from training.phantom.generator import PhantomOptions, generate_study

    model = Model(model_dir)
    trained_on = set(model.description["training"].get("real_case_ids", []))
    trained_seeds = set(model.description["training"].get("phantom_seeds", []))
    trained_seeds |= set(model.description["training"].get("validation_phantom_seeds", []))
    if trained_seeds & set(phantom_seeds):
        raise ValueError(f"phantom seeds {sorted(trained_seeds & set(phantom_seeds))[:5]}... were used in training or validation")
    paths = {path.stem: path for path in case_paths()}  # a case's id is its file name; each is read when measured
    held = split(sorted(paths), fold)[1]
    leaked = trained_on & set(held)
    if leaked:
        raise ValueError(f"real cases {sorted(leaked)} were used in training; evaluate another fold")
    out.mkdir(parents=True, exist_ok=True)
    phantom, real = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, seed in enumerate(tqdm(phantom_seeds, desc="phantom held out", unit="study")):
            folder = Path(tmp) / f"phantom-{seed}"
            contrast = ("T2", "T1", "STIR")[i % 3]
            generate_study(folder, seed, PhantomOptions(contrasts=(contrast,), max_matrix=512, fov_end_mm=fov_end_mm),
                           write_tissue=False)
            r = evaluate_study(folder, model, BODIES + DISCS + ["canal"])
            truth = json.loads((folder / "truth" / "truth.json").read_text())
            r.reference_angles = truth["lordosis_deg"]
            r.name, r.contrast = f"phantom {seed} {contrast}", contrast
            phantom.append(r)
        fit: list[StudyResult] = []
        groups = [("real held out", held, real)]
        if training_fit:
            groups.append(("real training cases (fit)", sorted(trained_on & set(paths)), fit))
        for desc, ids, results in groups:
            for cid in tqdm(ids, desc=desc, unit="case"):
                folder = Path(tmp) / cid
                case_to_dicom(load_case(paths[cid]), folder)
                results.append(evaluate_study(folder, model, BODIES + DISCS))
    metrics = report(model, phantom, real, out, phantom_seeds, held, fov_end_mm, fit)
    if fov_end_mm is None:
        record_metrics(model_dir, metrics, phantom_seeds, held)
    return metrics


def record_metrics(model_dir: Path, metrics: dict, seeds: list[int], held: list[str]) -> None:
    """The held-out figures go into the model folder's description, beside what it was trained on."""
    path = Path(model_dir) / "model.json"
    description = json.loads(path.read_text())
    description["metrics"] = {"held_out": {"phantom_seeds": [min(seeds), max(seeds)], "real_cases": held}, **metrics}
    path.write_text(json.dumps(description, indent=1))


def report(model: Model, phantom: list[StudyResult], real: list[StudyResult], out: Path, seeds: list[int],
           held: list[str], fov_end_mm: tuple[float, float] | None = None, fit: list[StudyResult] | None = None) -> dict:
    structures = BODIES + DISCS + ["canal"]
    ph_dice = {s: _mean(phantom, s) for s in structures}
    ph_iou = {s: _mean(phantom, s, "iou") for s in structures}
    real_levels = [s for s in BODIES + DISCS if any(s in r.dice for r in real)]
    re_dice = {s: _mean(real, s) for s in real_levels + ["vertebral body (any level)", "disc (any level)"]}
    re_iou = {s: _mean(real, s, "iou") for s in real_levels}
    bars(ph_dice, out / "phantom_dice.png", "Phantom held out: Dice per structure", 0.95)
    bars({k: v for k, v in re_dice.items() if not np.isnan(v)}, out / "real_dice.png", "Real held out: Dice", 0.90)
    metrics: dict = {"phantom": {"studies": len(phantom), "dice": ph_dice, "iou": ph_iou},
                     "real": {"cases": len(real), "dice": re_dice, "iou": re_iou}}
    metrics["phantom"]["dice_by_contrast"] = dice_by_contrast(phantom)
    named = [r.named_ok for r in phantom if r.named_ok is not None]
    metrics["phantom"]["level_naming_accuracy"] = float(np.mean(named)) if named else None
    named_real = [r.named_ok for r in real if r.named_ok is not None]
    metrics["real"]["level_naming_accuracy"] = float(np.mean(named_real)) if named_real else None
    metrics["real"]["level_naming_studies"] = len(named_real)
    for kind in ("vertebral body", "disc"):
        counts = [r.recall_by_cut[kind] for r in real if kind in r.recall_by_cut]
        if counts:
            metrics["real"][f"{kind} recall by slice"] = {
                cut: sum(c[cut][0] for c in counts) / max(sum(c[cut][1] for c in counts), 1) for cut in CUTS}
        offsets = [r.edge_offsets[kind] for r in real if kind in r.edge_offsets]
        if offsets:
            metrics["real"][f"{kind} edge offset mm"] = {
                side: float(np.mean([x for o in offsets for x in o[side]] or [np.nan])) for side in SIDES}
    for span in ("L1-S1", "L1-L5"):
        pairs = [(r.angles[span], r.reference_angles[span]) for r in phantom if span in r.angles]
        if len(pairs) > 1:
            metrics["phantom"][f"angle_{span}"] = bland_altman(*zip(*pairs), out / f"phantom_bland_altman_{span}.png",
                                                               f"Phantom {span}: ours vs truth")
        metrics["phantom"][f"angle_{span}_measured_in"] = f"{len(pairs)}/{len(phantom)}"
    pairs = [(r.angles["L1-L5"], r.reference_angles["L1-L5"]) for r in real
             if "L1-L5" in r.angles and "L1-L5" in r.reference_angles]
    if len(pairs) > 1:
        metrics["real"]["angle_L1-L5"] = bland_altman(*zip(*pairs), out / "real_bland_altman_L1-L5.png",
                                                      "Real L1-L5: our segmentation vs manual masks")
    metrics["real"]["angle_L1-L5_measured_in"] = f"{len(pairs)}/{sum('L1-L5' in r.reference_angles for r in real)}"
    for where, results in (("phantom", phantom), ("real", real)):
        metrics[where]["endplate tilt error deg"] = {
            name: _mean_abs([r.endplate_tilt.get(name) for r in results]) for name in ENDPLATES}
        metrics[where]["angles flagged uncertain"] = flagged_errors(results)
    splits = [r.reference_split for r in real if r.reference_split is not None]
    if splits:
        metrics["real"]["angle_L1-L5_manual_odd_vs_even_slices"] = {"mae": float(np.mean(np.abs(splits))), "n": len(splits)}
    if fit:
        errors = [abs(r.angles["L1-L5"] - r.reference_angles["L1-L5"]) for r in fit
                  if "L1-L5" in r.angles and "L1-L5" in r.reference_angles]
        metrics["real_training_fit"] = {"cases": len(fit), "dice": {k: _mean(fit, k) for k in re_dice if "any level" in k},
                                        "angle_L1-L5": {"mae": float(np.mean(errors)) if errors else None, "n": len(errors)}}
    cls = [(lordosis_class(r.reference_angles["L1-S1"]), r.angles.get("L1-S1")) for r in phantom]
    cls_pred = [lordosis_class(p) if p is not None else "normal" for _, p in cls]
    m = confusion([t for t, _ in cls], cls_pred, CLASSES, out / "phantom_lordosis_confusion.png",
                  "Phantom lordosis class (L1-S1; unmeasured counted as normal)")
    metrics["phantom"]["lordosis_class_accuracy"] = float(np.trace(m) / m.sum())
    if fov_end_mm:
        metrics["phantom"]["fov_end_mm_below_s1_top"] = list(fov_end_mm)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _markdown(model, metrics, phantom, real, out, seeds, held)
    return metrics


def flagged_errors(results: list[StudyResult]) -> dict[str, dict]:
    """Per span, the studies whose angle `measure` flags as uncertain (its per-slice values spread over
    SPREAD_DEG, or L5's size doubts the naming) and the angle error of those against the others:
    whether the flag tells a radiologist which angles to check."""
    out = {}
    for span in ("L1-S1", "L1-L5"):
        both = [r for r in results if span in r.angles and span in r.reference_angles]
        groups = {flag: [abs(r.angles[span] - r.reference_angles[span]) for r in both
                         if (span in r.flagged) == flag] for flag in (True, False)}
        out[span] = {"flagged": len(groups[True]), "of": len(both),
                     "mae_flagged": float(np.mean(groups[True])) if groups[True] else None,
                     "mae_others": float(np.mean(groups[False])) if groups[False] else None}
    return out


def _mean_abs(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean absolute value and how many there were (None where a study lacks it)."""
    known = [abs(v) for v in values if v is not None]
    return {"mean_abs": float(np.mean(known)) if known else None, "n": len(known)}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def ensemble_line(d: dict) -> list[str]:
    if not d.get("members"):
        return []
    members = ", ".join(f"{m['folder']} (weight {m['weight']:g})" for m in d["members"])
    val = d["training"]["validation_phantom_seeds"]
    if not val:
        return [f"Weighted-average ensemble of {members}; weights chosen by hand, not searched."]
    return [f"Weighted-average ensemble of {members}; weights by grid search on validation phantom seeds "
            f"{min(val)}-{max(val)} (mean Dice {d['training']['weight_search']['validation_dice']:.3f})."]


def _markdown(model: Model, m: dict, phantom: list[StudyResult], real: list[StudyResult], out: Path, seeds: list[int],
              held: list[str]) -> None:
    d = model.description
    fov = m["phantom"].get("fov_end_mm_below_s1_top")
    cut = f", field of view ending {fov[0]:g} to {fov[1]:g} mm below the top of S1" if fov else ""
    commit = f"`{d['commit'][:10]}`" + (" with uncommitted changes" if d["commit"].endswith("+uncommitted") else "")
    lines = [f"# spine-seg {d['version']}: evaluation on data it did not train on", "",
             f"Model: commit {commit}, trained on {d['training']['phantom_slices']} phantom slices "
             f"(seeds {min(d['training']['phantom_seeds'])}-{max(d['training']['phantom_seeds'])}) and "
             f"{d['training']['real_slices']} slices of {len(d['training']['real_case_ids'])} real cases"
             + (f"; of its heads ({', '.join(d['network']['heads'])}) inference reads the {d['network']['inference_head']} one."
                if "heads" in d.get("network", {}) else "."),
             *ensemble_line(d),
             f"Phantom held out: seeds {min(seeds)}-{max(seeds)} ({len(phantom)} studies, T2/T1/STIR in turn{cut}). "
             f"Real held out: {len(held)} cases ({', '.join(held)}).", "",
             "| structure | phantom Dice | phantom IoU | real Dice | real IoU |", "|---|---|---|---|---|"]
    for s in BODIES + DISCS + ["canal"]:
        lines.append(f"| {s} | {_fmt(m['phantom']['dice'].get(s))} | {_fmt(m['phantom']['iou'].get(s))} | "
                     f"{_fmt(m['real']['dice'].get(s))} | {_fmt(m['real']['iou'].get(s))} |")
    for s in ("vertebral body (any level)", "disc (any level)"):
        lines.append(f"| {s}: best-matching output structure, naming aside | | | {_fmt(m['real']['dice'].get(s))} | |")
    lines += ["", f"- Level naming (all five lumbar bodies right, or all five discs where only discs are labelled): phantom "
              f"{_fmt(m['phantom']['level_naming_accuracy'])}, real {_fmt(m['real']['level_naming_accuracy'])} over "
              f"{m['real']['level_naming_studies']} studies that label L1-L5 or L1/L2-L5/S1.",
              f"- Lordosis class accuracy (phantom, L1-S1): {_fmt(m['phantom']['lordosis_class_accuracy'])}."]
    by_contrast = "; ".join(f"{c} {_fmt(v['bodies'])} / {_fmt(v['discs'])} / {_fmt(v['canal'])} ({v['studies']} studies)"
                            for c, v in m["phantom"].get("dice_by_contrast", {}).items())
    if by_contrast:
        lines.append(f"- Phantom mean Dice by the series' contrast, bodies L1-S1 / discs / canal: {by_contrast} "
                     f"(each study here has one series; the pipeline reads a study's T2 first).")
    for kind in ("vertebral body", "disc"):
        if f"{kind} recall by slice" in m["real"]:
            shares = ", ".join(f"{cut} {_fmt(v)}" for cut, v in m["real"][f"{kind} recall by slice"].items())
            lines.append(f"- Real {kind} recall by sagittal slice, by its labelled area over the largest slice's: {shares}.")
        if f"{kind} edge offset mm" in m["real"]:
            sides = ", ".join(f"{side} {v:+.2f}" for side, v in m["real"][f"{kind} edge offset mm"].items())
            lines.append(f"- Real {kind} edge, ours beyond (+) or inside (-) the manual one, mm (central slices): {sides}.")
    for key, where in (("angle_L1-S1", "phantom"), ("angle_L1-L5", "phantom"), ("angle_L1-L5", "real")):
        a = m[where].get(key)
        if a:
            lines.append(f"- {where} {key[6:]} angle: MAE {a['mae']:.2f} deg, max {a['max_abs']:.2f}, bias {a['bias']:+.2f}, "
                         f"limits ±{a['loa']:.2f} (n={a['n']}; measured in {m[where][key + '_measured_in']}).")
    for where in ("phantom", "real"):
        tilts = [f"{p} {_fmt(v['mean_abs'])} (n={v['n']})" for p, v in m[where].get("endplate tilt error deg", {}).items() if v["n"]]
        if tilts:
            lines.append(f"- {where} endplate tilt, ours against the {'truth' if where == 'phantom' else 'manual'} masks' on "
                         f"the same central slices, mean absolute difference in deg: {', '.join(tilts)}.")
    for where in ("phantom", "real"):
        flags = [f"{span} {v['flagged']} of {v['of']} (MAE {_fmt(v['mae_flagged'])} deg; the others {_fmt(v['mae_others'])})"
                 for span, v in m[where].get("angles flagged uncertain", {}).items() if v["of"]]
        if flags:
            lines.append(f"- {where} angles flagged uncertain (spread over {SPREAD_DEG:g} deg across the central slices, "
                         f"or L5's size doubting the naming): "
                         f"{', '.join(flags)}.")
    split = m["real"].get("angle_L1-L5_manual_odd_vs_even_slices")
    if split:
        lines.append(f"- The reference's own spread: real L1-L5 from the manual masks on the odd central slices against "
                     f"the even ones, MAE {split['mae']:.2f} deg (n={split['n']}); were slices independent, the "
                     f"reference (all of them) would be off by about half that.")
    fit = m.get("real_training_fit")
    if fit:
        plural = {"vertebral body (any level)": "bodies", "disc (any level)": "discs"}
        dice_fit = ", ".join(f"{plural[k]} {_fmt(v)}" for k, v in fit["dice"].items())
        mae = fit["angle_L1-L5"]["mae"]
        lines.append(f"- Fit on the {fit['cases']} real cases it trained on (not held out, measured only to tell under- "
                     f"from over-fitting): Dice, best-matching structure, {dice_fit}; L1-L5 MAE "
                     f"{'n/a' if mae is None else f'{mae:.2f}'} deg (n={fit['angle_L1-L5']['n']}).")
    lines += ["", "![phantom Dice](phantom_dice.png) ![real Dice](real_dice.png)", "",
              "![Bland-Altman](phantom_bland_altman_L1-S1.png) ![Bland-Altman](real_bland_altman_L1-L5.png) "
              "![confusion](phantom_lordosis_confusion.png)", "", "## Per study", "",
              "| study | naming | L1-S1 ours / ref | L1-L5 ours / ref | endplate tilt ours - ref: L1 sup. / L5 inf. / S1 sup. | problems |",
              "|---|---|---|---|---|---|"]
    for r in phantom + real:
        ang = " | ".join(f"{r.angles.get(s, float('nan')):.1f} / {r.reference_angles.get(s, float('nan')):.1f}"
                         for s in ("L1-S1", "L1-L5"))
        tilt = " / ".join(f"{r.endplate_tilt[name]:+.1f}" if name in r.endplate_tilt else "-" for name in ENDPLATES)
        lines.append(f"| {r.name} | {'ok' if r.named_ok else '-' if r.named_ok is None else 'WRONG'} | {ang} | {tilt} | "
                     f"{'; '.join(r.problems)} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
