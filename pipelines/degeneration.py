"""`degeneration` (seeds 001, 002): per disc level L1/L2 to L5/S1, spinal canal stenosis, left and
right neural foraminal narrowing and left and right subarticular stenosis, each normal-mild /
moderate / severe (the RSNA 2024 grading); per study, healthy / herniated disc / spinal stenosis /
spondylosis (seed 001).

As RSNA 2024 solutions do: localise, crop, grade. `spine-seg` names the discs and finds the canal
on the sagittal T2 (canal) and T1 (foramina; the T2 stands in when there is no T1); the axial T2
slice nearest each disc is found from the sagittal geometry (subarticular recesses). One small CNN
per view grades its crops; the study label comes from the CNN or the CNN-SVM hybrid, whichever won
on validation studies. Each graded image gets one Grad-CAM map that shows every decision on it.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.registry import Pipeline, register
from pipelines.series import NoUsableSeries, Series, read_series
from structured_reports.model import Algorithm, Explanation, Finding, ResultOptions
from structured_reports.writer import write_results
from training.datasets import degeneration as data

MODEL_DIR = Path(__file__).resolve().parent / "models" / "degeneration"


class Model:
    """A trained degeneration model folder: one network per view, the study network and its SVM."""

    def __init__(self, folder: Path = MODEL_DIR):
        from training.trainers.common import read_model_folder
        from training.trainers.degeneration import network

        folder = Path(folder)
        state, self.description = read_model_folder(folder)
        d = self.description
        self.heads = {"canal": 1, "foramen": 1, "axial": 2}
        self.nets = {}
        for view, outputs in (*((v, h * len(data.GRADES)) for v, h in self.heads.items()), ("study", len(data.STUDY_CLASSES))):
            net = network(outputs)
            net.load_state_dict({k[len(view) + 1:]: v for k, v in state.items() if k.startswith(view + ".")})
            self.nets[view] = net.eval()
        self.svm = pickle.loads((folder / d["study"]["svm_file"]).read_bytes())
        self.algorithm = Algorithm("dicomnode degeneration (per-view CNNs, CNN-SVM study label)", d["version"])

    def grades(self, view: str, crops: np.ndarray) -> np.ndarray:
        """[crop, head, grade] probabilities."""
        from training.trainers.degeneration import grade_probabilities

        return grade_probabilities(self.nets[view], crops, self.heads[view])

    def study(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Class probabilities of the study image from the plain CNN and from the CNN-SVM."""
        import torch

        from training.trainers.degeneration import features

        with torch.inference_mode():
            cnn = torch.softmax(self.nets["study"](torch.from_numpy(image[None])), 1).numpy()[0]
        return {"cnn": cnn, "cnn_svm": self.svm.predict_proba(features(self.nets["study"], image[None]))[0]}

    def explain(self, view: str, crop: np.ndarray, head: int, grade: int) -> np.ndarray:
        import torch

        from pipelines.explain import grad_cam

        index = head * len(data.GRADES) + grade if view != "study" else grade
        return grad_cam(self.nets[view], self.description["network"]["gradcam_layer"],
                        torch.from_numpy(np.ascontiguousarray(crop[None])), lambda out: out[0, index])


@functools.lru_cache(maxsize=1)
def load_model(folder: str = str(MODEL_DIR)) -> Model:
    return Model(Path(folder))


@dataclass
class Assessment:
    grades: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # level -> condition -> 3 probabilities
    study: dict[str, np.ndarray] = field(default_factory=dict)  # cnn | cnn_svm -> 4 probabilities
    study_label: str = "cnn_svm"
    explanations: list[Explanation] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def assess(files: list[Path], model: Model | None = None) -> Assessment:
    from pipelines.spine_seg import segment
    from training.datasets.spine_seg import normalise

    model = model or load_model()
    sagittal = read_series(files)
    t2 = next((s for s in sagittal if s.weighting == "T2"), None)
    if t2 is None:
        found = ", ".join(f"{s.weighting} '{s.description}'" for s in sagittal) or "no sagittal MR series"
        raise NoUsableSeries(f"degeneration reads a sagittal T2 series (and a sagittal T1 and an axial T2 where present); "
                             f"the files hold {found}")
    a = Assessment(study_label=model.description["study"]["chosen"])
    labels_t2 = segment(t2).labels
    v2 = normalise(t2.volume)
    t1 = next((s for s in sagittal if s.weighting == "T1"), None)
    if t1 is None:
        a.problems.append("no sagittal T1: the neural foramina are graded on the T2 series")
    foramen_series, labels_f = (t1, segment(t1).labels) if t1 is not None else (t2, labels_t2)
    axial = next((s for s in read_series(files, plane="axial") if s.weighting == "T2"), None)
    views: dict[str, tuple[Series, dict]] = {
        "canal": (t2, data.canal_crops(t2, labels_t2, v2)),
        "foramen": (foramen_series, {f"{side} {lv}": c for (side, lv), c in
                                     data.foramen_crops(foramen_series, labels_f, normalise(foramen_series.volume)).items()}),
    }
    if axial is None:
        a.problems.append("no axial T2 series: subarticular stenosis not graded")
    else:
        views["axial"] = (axial, data.axial_crops(t2, labels_t2, axial, normalise(axial.volume)))
    if views["canal"][1]:
        a.explanations.append(_canal_map(model, t2, labels_t2, views["canal"][1]))
    for view, (series, crops) in views.items():
        if not crops:
            a.problems.append(f"{view}: no disc level located on '{series.description}'")
            continue
        probs = model.grades(view, np.stack(list(crops.values())))
        for key, p in zip(crops, probs):
            if view == "foramen":
                side, level = key.split(" ")
                a.grades.setdefault(level, {})[f"{side}_neural_foraminal_narrowing"] = p[0]
            else:
                for h, condition in enumerate(data.VIEWS[view]):
                    a.grades.setdefault(key, {})[condition] = p[h]
    image = data.study_image(t2, labels_t2, v2)
    if image is None:
        a.problems.append("no lumbar region segmented on the T2 series: no study label")
    else:
        a.study = model.study(image)
        chosen = a.study[a.study_label]
        heat = model.explain("study", image, 0, int(np.argmax(chosen)))
        a.explanations.append(_study_map(t2, labels_t2, data.mid_slice(labels_t2), heat, f"study class: {data.STUDY_CLASSES[int(np.argmax(chosen))]}"))
    return a


def _canal_map(model: Model, series: Series, labels: np.ndarray, crops: dict[str, np.ndarray]) -> Explanation:
    """One map on the mid-sagittal T2 slice: each level's Grad-CAM of its canal grade, laid back where its crop came from."""
    from pipelines.explain import crop_to_slice

    mid, anchors = data.sagittal_anchors(labels, series.spacing)
    probs = model.grades("canal", np.stack(list(crops.values())))[:, 0]
    heat = np.zeros(series.volume.shape[1:], dtype=np.float32)
    said = []
    for (level, crop), p in zip(crops.items(), probs):
        g = int(np.argmax(p))
        points = data.sample_points(anchors[level].centre, anchors[level].side, series.spacing)
        heat = np.maximum(heat, crop_to_slice(model.explain("canal", crop, 0, g), points, heat.shape))
        said.append(f"{level} {data.GRADES[g]}")
    return Explanation(str(series.datasets[mid].SOPInstanceUID), heat, f"spinal canal stenosis: {', '.join(said)}")


def _study_map(series: Series, labels: np.ndarray, mid: int, heat: np.ndarray, decision: str) -> Explanation:
    """The study image's Grad-CAM back on the mid-sagittal slice it was cropped from."""
    from pipelines.explain import crop_to_slice
    from training.datasets.discs import enlarge, mask_box
    from training.phantom.anatomy import LABEL_VALUES, LUMBAR_VERTEBRAE

    box = mask_box(np.isin(labels[mid], [LABEL_VALUES[v] for v in (*LUMBAR_VERTEBRAE, *data.LEVELS)]))
    r0, c0, r1, c1 = enlarge(box, data.STUDY_ENLARGE)
    side = max((r1 - r0) * series.spacing[0], (c1 - c0) * series.spacing[1])
    points = data.sample_points(np.array([(r0 + r1) / 2, (c0 + c1) / 2]), side, series.spacing, data.STUDY_CROP)
    return Explanation(str(series.datasets[mid].SOPInstanceUID), crop_to_slice(heat, points, series.volume.shape[1:]), decision)


def findings(a: Assessment) -> tuple[list[Finding], dict]:
    """SR findings (grade and its probability per condition and level; the study class at the
    lumbar spine) and the results.json entry per SPEC."""
    out, summary = [], {}
    for level in data.LEVELS:
        for condition, p in a.grades.get(level, {}).items():
            g = int(np.argmax(p))
            out.append(Finding(condition, level, round(float(p[g]), 4), data.GRADES[g]))
            summary.setdefault(level, {})[condition] = {"label": data.GRADES[g], "probability": round(float(p[g]), 4),
                                                        "probabilities": [round(float(x), 4) for x in p]}
    if a.study:
        p = a.study[a.study_label]
        k = int(np.argmax(p))
        out.append(Finding("study_class", "lumbar spine", round(float(p[k]), 4), data.STUDY_CLASSES[k]))
        summary["study"] = {"label": data.STUDY_CLASSES[k], "probability": round(float(p[k]), 4), "model": a.study_label,
                            **{name: {c: round(float(x), 4) for c, x in zip(data.STUDY_CLASSES, q)} for name, q in a.study.items()}}
    return out, summary


def run(files: list[Path], out: Path, options: ResultOptions) -> list[Path]:
    from pipelines.spine_seg import write_findings

    model = load_model()
    a = assess(files, model)
    found, summary = findings(a)
    write_findings(out, {"degeneration": {**summary, "problems": a.problems}})
    if not found:
        return []
    t2 = next(s for s in read_series(files) if s.weighting == "T2")
    return write_results(out, t2.datasets, model.algorithm, options, findings=found, explanations=a.explanations)


register(Pipeline("degeneration", run, device="gpu", version="1.0", scope="study"))
