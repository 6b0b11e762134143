"""`degeneration` (seeds 001, 002): per disc level L1/L2 to L5/S1, spinal canal stenosis, left and
right neural foraminal narrowing and left and right subarticular stenosis, each normal-mild /
moderate / severe (the RSNA 2024 grading); per study, healthy / herniated disc / spinal stenosis /
spondylosis (seed 001).

As RSNA 2024 solutions do: localise, crop, grade. `spine-seg` names the discs and finds the canal
on the sagittal T2 (canal) and T1 (foramina; the T2 stands in when there is no T1); the axial T2
slice nearest each disc is found from the sagittal geometry (subarticular recesses). One small CNN
per view grades its crops; the study label comes from the CNN or the CNN-SVM hybrid, whichever won
on validation studies. Each image a decision was made on gets one Grad-CAM map (the largest of its
decisions' maps, each laid back where its crop came from); its description lists the decisions.
The CNN-SVM's study label cites the mid-sagittal canal map (the SVM reads that network and the axial
one, whose maps are on the axial slices); the plain CNN's gets its own.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.registry import Pipeline, register
from pipelines.series import Series, read_planes, sagittal_t2
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
        self.heads: dict[str, int] = d["heads"]
        self.nets = {}
        for view, outputs in (*((v, h * len(data.GRADES)) for v, h in self.heads.items()), ("study", len(data.STUDY_CLASSES))):
            net = network(outputs)
            net.load_state_dict({k[len(view) + 1:]: v for k, v in state.items() if k.startswith(view + ".")})
            self.nets[view] = net.eval()
        self.svm = pickle.loads((folder / d["study"]["svm_file"]).read_bytes())
        from training.trainers.degeneration import study_features

        expected = len(study_features({}))
        if self.svm.n_features_in_ != expected:
            raise ValueError(f"{folder}: its study SVM reads {self.svm.n_features_in_} values per study, this version of "
                             f"dicomnode gives it {expected} (model {d['version']} is from another version): "
                             "rebuild it with `dicomnode train degeneration`")
        self.algorithm = Algorithm("dicomnode degeneration (per-view CNNs, CNN-SVM study label)", d["version"])

    def grades(self, view: str, crops: np.ndarray) -> np.ndarray:
        """[crop, head, grade] probabilities."""
        from training.trainers.degeneration import grade_probabilities

        return grade_probabilities(self.nets[view], crops, self.heads[view])

    def study(self, image: np.ndarray, probs: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Class probabilities of the study from the plain CNN (on the study image) and from the
        CNN-SVM (on {view: {level: the canal or axial network's probabilities, as `grades` gave them}})."""
        import torch

        from training.trainers.degeneration import study_features

        with torch.inference_mode():
            cnn = torch.softmax(self.nets["study"](torch.from_numpy(image[None])), 1).numpy()[0]
        return {"cnn": cnn, "cnn_svm": self.svm.predict_proba(study_features(probs)[None])[0]}

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
    sources: list = field(default_factory=list)  # every image the results refer to (T2, and T1 and axial when read)
    problems: list[str] = field(default_factory=list)


def assess(files: list[Path], model: Model | None = None) -> Assessment:
    """Grades per level and condition, the study label, one Grad-CAM map per graded image."""
    from pipelines.spine_seg import segment
    from training.datasets.spine_seg import normalise

    model = model or load_model()
    planes = read_planes(files)
    sagittal = planes.get("sagittal", [])
    t2 = sagittal_t2(sagittal, "degeneration (with a sagittal T1 and an axial T2 where present)")
    a = Assessment(study_label=model.description["study"]["chosen"], sources=list(t2.datasets))
    labels_t2 = segment(t2).labels
    v2 = normalise(t2.volume)
    t1 = next((s for s in sagittal if s.weighting == "T1"), None)
    if t1 is None:
        a.problems.append("no sagittal T1: the neural foramina are graded on the T2 series")
    foramen_series, labels_f = (t1, segment(t1).labels) if t1 is not None else (t2, labels_t2)
    foramina = data.foramen_crops(foramen_series, labels_f, normalise(foramen_series.volume))
    level_probs: dict[str, dict[str, np.ndarray]] = {}  # view -> crop key -> [head, grade]: the study SVM reads what it needs
    views: dict[str, tuple[Series, dict]] = {"canal": (t2, data.canal_crops(t2, labels_t2, v2)),
                                             "foramen": (foramen_series, {f"{side} {lv}": c for (side, lv), c in foramina.items()})}
    axial = next((s for s in planes.get("axial", []) if s.weighting == "T2"), None)
    if axial is None:
        a.problems.append("no axial T2 series: subarticular stenosis not graded")
    else:
        views["axial"] = (axial, data.axial_crops(t2, labels_t2, axial, normalise(axial.volume)))
    for view, (series, crops) in views.items():
        if not crops:
            a.problems.append(f"{view}: no disc level located on '{series.description}'")
            continue
        if series is not t2:
            a.sources += series.datasets
        probs = model.grades(view, np.stack([c.image for c in crops.values()]))
        level_probs[view] = dict(zip(crops, probs))
        maps: dict[int, tuple[np.ndarray, list[str]]] = {}  # slice -> (map, decisions)
        for (key, crop), p in zip(crops.items(), probs):
            side, level = key.split(" ") if view == "foramen" else ("", key)
            conditions = [f"{side}_neural_foraminal_narrowing"] if view == "foramen" else list(data.VIEWS[view])
            for h, condition in enumerate(conditions):
                a.grades.setdefault(level, {})[condition] = p[h]
                g = int(np.argmax(p[h]))
                _lay(maps, series, crop, model.explain(view, crop.image, h, g), f"{level} {condition.replace('_', ' ')} {data.GRADES[g]}")
        a.explanations += [Explanation(str(series.datasets[k].SOPInstanceUID), heat, "; ".join(said))
                           for k, (heat, said) in sorted(maps.items())]
    image = data.study_image(t2, labels_t2, v2)
    if image is None:
        a.problems.append("no lumbar region segmented on the T2 series: no study label")
    else:
        a.study = model.study(image.image, level_probs)
        k = int(np.argmax(a.study[a.study_label]))
        canal_map = next((e for e in a.explanations if e.sop_instance_uid == str(t2.datasets[image.slice].SOPInstanceUID)), None)
        if a.study_label == "cnn_svm" and canal_map is not None:
            # the SVM reads the canal (and axial) networks' view of each level: their maps are its evidence
            a.explanations[a.explanations.index(canal_map)] = Explanation(
                canal_map.sop_instance_uid, canal_map.heatmap, f"study class {data.STUDY_CLASSES[k]} (CNN-SVM on these levels); "
                + canal_map.decision)
        else:
            study_map: dict[int, tuple[np.ndarray, list[str]]] = {}
            _lay(study_map, t2, image, model.explain("study", image.image, 0, k), f"study class {data.STUDY_CLASSES[k]}")
            heat, said = study_map[image.slice]
            a.explanations.append(Explanation(str(t2.datasets[image.slice].SOPInstanceUID), heat, said[0]))
    return a


def _lay(maps: dict[int, tuple[np.ndarray, list[str]]], series: Series, crop: data.Crop, heat: np.ndarray, decision: str) -> None:
    """A crop's Grad-CAM laid back on its slice, kept as the largest over that slice's decisions."""
    from pipelines.explain import crop_to_slice

    on_slice = crop_to_slice(heat, crop.points, series.volume.shape[1:])
    current, said = maps.get(crop.slice, (np.zeros_like(on_slice), []))
    maps[crop.slice] = (np.maximum(current, on_slice), said + [decision])


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
    return write_results(out, a.sources, model.algorithm, options, findings=found, explanations=a.explanations)


register(Pipeline("degeneration", run, device="gpu", version="1.3", scope="study", model_dir=MODEL_DIR, load_model=load_model))
