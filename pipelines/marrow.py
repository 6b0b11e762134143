"""`marrow` (seed 000): is the bone marrow of each vertebral body L1-S1 normal, and if not, which
change (Modic type 1, 2, 3, or a focal lesion)?

Each body is found by `spine-seg` on every sagittal series of the study (T2, T1, STIR); a crop
around it goes through a ConvNeXt to its penultimate-layer features, and the classical classifier
that won the comparison of nine (see the model folder) gives class probabilities. The series are
combined per body as independent evidence (naive Bayes): Modic types differ by their signal on
T1 and T2 together, which no single series shows.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.registry import Pipeline, register
from pipelines.series import NoUsableSeries, Series, read_series
from structured_reports.model import Algorithm, Explanation, Finding, ResultOptions
from structured_reports.writer import write_results
from training.phantom.anatomy import LABEL_VALUES

MODEL_DIR = Path(__file__).resolve().parent / "models" / "marrow"
GRADCAM_LAYER = "net.features.3"  # the second stage: 8x8 on a 64-pixel crop
WEIGHTINGS = ("T2", "T1", "STIR")  # the first present is the series results and maps refer to


def penultimate(net):  # torch is imported here, not with this module: the node imports pipelines at start
    """The backbone up to its penultimate layer as one module (Grad-CAM hooks into its layers)."""
    import torch

    class Penultimate(torch.nn.Module):
        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.classifier[:2](self.net.avgpool(self.net.features(x)))

    return Penultimate(net)


class Model:
    """A trained marrow model folder: backbone weights, the chosen classifier, and its description.
    It runs on the CPU: a few 64-pixel crops per study."""

    def __init__(self, folder: Path = MODEL_DIR):
        from training.trainers.common import read_model_folder
        from training.trainers.marrow import network

        state, self.description = read_model_folder(folder)
        net = network(tuple(self.description["network"]["widths"]), tuple(self.description["network"]["depths"]))
        net.load_state_dict(state)
        self.net = net.eval()
        self.penultimate = penultimate(self.net)
        self.classifier = pickle.loads((Path(folder) / self.description["classifier"]["file"]).read_bytes())
        self.prior = np.asarray(self.description["classifier"]["prior"], dtype=float)
        self.classes: list[str] = self.description["classes"]
        self.algorithm = Algorithm(f"dicomnode marrow ({self.description['classifier']['name']})", self.description["version"])

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """[crop, class] probabilities of crops [crop, 3, 64, 64] from `vertebra_crop`."""
        from training.trainers.marrow import features

        return self.classifier.predict_proba(features(self.net, crops))

    def explain(self, crop: np.ndarray, class_index: int) -> np.ndarray:
        """Grad-CAM of one class on one crop. For a linear classifier (logistic regression behind a
        scaler) the decision is exactly its class score on the features; otherwise the backbone's
        own head for that class stands in for it."""
        import torch

        from pipelines.explain import grad_cam

        scaler, final = self.classifier[0], self.classifier[-1]
        if hasattr(final, "coef_") and len(final.coef_) == len(self.classes):
            w = torch.tensor(final.coef_[class_index] / scaler.scale_, dtype=torch.float32)
            decision = lambda f: (f[0] * w).sum()  # noqa: E731
        else:
            head = self.net.classifier[2]
            decision = lambda f: head(f)[0, class_index]  # noqa: E731
        return grad_cam(self.penultimate, GRADCAM_LAYER, torch.from_numpy(np.ascontiguousarray(crop[None])), decision)


@functools.lru_cache(maxsize=1)
def load_model(folder: str = str(MODEL_DIR)) -> Model:
    return Model(Path(folder))


def fuse(per_series: list[np.ndarray], prior: np.ndarray) -> np.ndarray:
    """Class probabilities of one body from several series, each taken as independent evidence:
    p ∝ prior^(1-n) · Π p_s."""
    logp = np.sum([np.log(np.clip(p, 1e-6, 1)) for p in per_series], axis=0) - (len(per_series) - 1) * np.log(prior)
    p = np.exp(logp - logp.max())
    return p / p.sum()


@dataclass
class BodyResult:
    level: str
    probabilities: np.ndarray  # fused, over the model's classes
    series: list[str]  # weightings that saw this body
    explanation: Explanation | None = None


def classify(study: list[Series], model: Model | None = None) -> tuple[list[BodyResult], list[str], Series]:
    """Per body L1-S1 the fused class probabilities, with a Grad-CAM of the decision on the
    reference series; problems found; the reference series."""
    from pipelines.explain import crop_to_slice
    from pipelines.spine_seg import segment
    from training.datasets.marrow import vertebra_crop
    from training.datasets.spine_seg import normalise

    model = model or load_model()
    usable = [s for s in study if s.weighting in WEIGHTINGS]  # best weighting first (read_series)
    if not usable:
        raise NoUsableSeries("no sagittal T2, T1 or STIR series in the study: marrow needs at least one")
    per_level: dict[str, list[tuple[np.ndarray, str]]] = {}
    crops_ref: dict[str, tuple[np.ndarray, int, np.ndarray]] = {}
    problems: list[str] = []
    for series in usable:
        labelled = segment(series)
        volume = normalise(series.volume)
        found = [lv for lv in model.description["levels"] if (labelled.labels == LABEL_VALUES[lv]).any()]
        if not found:
            problems.append(f"{series.weighting} series '{series.description}': no vertebral body named ({'; '.join(labelled.problems)})")
            continue
        crops = {lv: vertebra_crop(volume, labelled.labels == LABEL_VALUES[lv], series.spacing) for lv in found}
        probs = model.probabilities(np.stack([c[0] for c in crops.values()]))
        for lv, p in zip(found, probs):
            per_level.setdefault(lv, []).append((p, series.weighting))
            if series is usable[0]:
                crops_ref[lv] = crops[lv]
    ref = usable[0]
    results = []
    for lv in model.description["levels"]:
        if lv not in per_level:
            continue
        fused = fuse([p for p, _ in per_level[lv]], model.prior)
        r = BodyResult(lv, fused, [w for _, w in per_level[lv]])
        if lv in crops_ref:
            crop, k, points = crops_ref[lv]
            decided = int(np.argmax(fused))
            heat = crop_to_slice(model.explain(crop, decided), points, ref.volume.shape[1:])
            r.explanation = Explanation(str(ref.datasets[k].SOPInstanceUID), heat, f"marrow {lv}: {model.classes[decided]}")
        results.append(r)
    return results, problems, ref


def findings(results: list[BodyResult], classes: list[str]) -> tuple[list[Finding], dict]:
    """SR findings per body (a Modic change graded 0-3, a focal lesion present or not, each with its
    probability) and the results.json entry, per SPEC: {"L3": {"label", "probability", "type"}}."""
    out, summary = [], {}
    for r in results:
        p_abnormal = float(1 - r.probabilities[classes.index("normal")])
        kind = classes[int(np.argmax(r.probabilities))]
        summary[r.level] = {"label": "abnormal" if p_abnormal >= 0.5 else "normal", "probability": round(p_abnormal, 4),
                            "type": kind, "series": r.series}
        modic = {c: float(r.probabilities[classes.index(c)]) for c in ("modic1", "modic2", "modic3")}
        grade = "modic_0" if kind in ("normal", "lesion") else f"modic_{kind[-1]}"
        out.append(Finding("modic_change", r.level, round(sum(modic.values()), 4), grade))
        out.append(Finding("marrow_lesion", r.level, round(float(r.probabilities[classes.index("lesion")]), 4),
                           "present" if kind == "lesion" else "none"))
    return out, summary


def run(files: list[Path], out: Path, options: ResultOptions) -> list[Path]:
    from pipelines.spine_seg import write_findings

    model = load_model()
    results, problems, ref = classify(read_series(files), model)
    found, summary = findings(results, model.classes)
    write_findings(out, {"marrow": {**summary, "problems": problems}})
    if not found:
        return []
    explanations = [r.explanation for r in results if r.explanation is not None]
    return write_results(out, ref.datasets, model.algorithm, options, findings=found, explanations=explanations)


register(Pipeline("marrow", run, device="gpu", version="1.0", scope="study", model_dir=MODEL_DIR, load_model=load_model))
