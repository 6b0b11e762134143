"""`dicomnode evaluate marrow`: the shipped classifier and the nine-classifier comparison on phantom
studies never used in training or validation.

- Per vertebral body, the three sagittal series fused as the pipeline does (crops from the exact
  masks): accuracy, precision, recall, F1 and AUC of normal vs abnormal, the five-class confusion
  matrix, ROC; the same for each series alone.
- The nine classifiers refitted on the training features of the shipped backbone (as training
  fitted them) and scored the same way: the paper's comparison table, on held-out studies.
- End to end on a few studies through DICOM: `spine-seg` finds the bodies, then the pipeline.
- Example Grad-CAM overlays of abnormal bodies.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.marrow import Model, classify
from training.datasets.marrow import CLASSES, Crops
from training.evaluation.metrics import check_held_out, confusion, overlay_grid, roc, spine_seg_version
from training.trainers.marrow import MarrowConfig, binary_scores, by_body, collect, compare, features


def evaluate(model_dir: Path, out: Path, seeds: list[int], end_to_end: int = 12, cache: Path = Path(".cache/training")) -> dict:
    model = Model(model_dir)
    d = model.description
    check_held_out(d, seeds)
    out.mkdir(parents=True, exist_ok=True)
    held = collect(seeds, 0, cache, 2, "held-out studies")
    x, y = held.arrays()
    f_held = features(model.net, x)
    probs = model.classifier.predict_proba(f_held)
    truth, fused = by_body(held, probs, model.prior)
    m: dict = {"studies": len(seeds), "bodies": len(truth), "crops": len(y), "classifier": d["classifier"]["name"],
               "per_body": binary_scores(truth, fused)}
    m["per_body"]["auc"] = roc(truth != 0, 1 - fused[:, 0], out / "roc_abnormal.png", "Marrow abnormal, per body (held out)")
    cm = confusion([CLASSES[t] for t in truth], [CLASSES[p] for p in fused.argmax(axis=1)], list(CLASSES),
                   out / "confusion.png", "Marrow class per body (three series fused)")
    m["per_body"]["confusion"] = cm.tolist()
    m["per_series"] = {w: binary_scores(y[sel], probs[sel]) for w in ("T2", "T1", "STIR")
                       if (sel := np.array(held.contrast) == w).any()}
    # the nine, refitted on the training features of this backbone, scored per body on the held-out studies
    cfg = MarrowConfig(**{k: v for k, v in d["training"].items() if k in MarrowConfig.__dataclass_fields__})
    train_crops = collect(cfg.train_seeds, cfg.jitter, cache, 2, "training studies (features for the nine)")
    xt, yt = train_crops.arrays()
    table, _ = compare(features(model.net, xt), yt, f_held, held, cfg.seed)
    m["nine_classifiers"] = {name: scores["per_body"] for name, scores in table.items()}
    m["end_to_end"] = _end_to_end(model, seeds[:end_to_end]) if end_to_end else {}
    m["end_to_end_spine_seg"] = spine_seg_version() if end_to_end else None
    _gradcam_examples(model, held, probs, out / "gradcam_examples.png")
    (out / "metrics.json").write_text(json.dumps(m, indent=1))
    _markdown(d, m, seeds, out)
    description = json.loads((model_dir / "model.json").read_text())
    description["metrics"] = {"held_out": {"phantom_seeds": [min(seeds), max(seeds)]}, **m}
    (model_dir / "model.json").write_text(json.dumps(description, indent=1))
    return m


def _end_to_end(model: Model, seeds: list[int]) -> dict:
    """The pipeline itself on DICOM studies: bodies found and named by `spine-seg`."""
    from pipelines.series import read_series
    from training.phantom.generator import PhantomOptions, generate_study

    truth, pred, missing = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in tqdm(seeds, desc="end to end", unit="study"):
            folder = Path(tmp) / str(seed)
            generate_study(folder, seed, PhantomOptions(contrasts=("T2", "T1", "STIR"), max_matrix=384), write_tissue=False)
            levels = json.loads((folder / "truth" / "truth.json").read_text())["levels"]
            results, _, _ = classify(read_series(sorted((folder / "dicom").rglob("*.dcm"))), model)
            found = {r.level: r.probabilities for r in results}
            for level in model.description["levels"]:
                if level not in found:
                    missing += 1
                    continue
                truth.append(CLASSES.index(levels[level]["marrow"]))
                pred.append(found[level])
    scores = binary_scores(np.array(truth), np.stack(pred)) if pred else {}
    return {"studies": len(seeds), "bodies_scored": len(truth), "bodies_not_found": missing, **scores}


def _gradcam_examples(model: Model, crops: Crops, probs: np.ndarray, path: Path, n: int = 8) -> None:
    abnormal = [i for i in range(len(crops.labels)) if crops.labels[i] != 0 and crops.contrast[i] == "T2"][:n]
    overlay_grid([(crops.images[i][1], model.explain(crops.images[i], c := int(np.argmax(probs[i]))),
                   f"{crops.level[i]} truth {CLASSES[crops.labels[i]]}\nsaid {CLASSES[c]} {probs[i][c]:.2f}") for i in abnormal], path)


def _markdown(d: dict, m: dict, seeds: list[int], out: Path) -> None:
    row = lambda name, s: (f"| {name} | {s['accuracy']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} | "  # noqa: E731
                           f"{s['f1']:.3f} | {s['auc']:.3f} | {s['class_accuracy']:.3f} |")
    head = ["| | accuracy | precision | recall | F1 | AUC | 5-class accuracy |", "|---|---|---|---|---|---|---|"]
    val = d["validation"]["classifiers"]
    lines = [f"# marrow {d['version']}: evaluation on phantom studies it did not train on", "",
             f"Backbone: ConvNeXt {d['network']['widths']} trained on {d['training']['crops']} crops of phantom studies "
             f"{min(d['training']['train_seeds'])}-{max(d['training']['train_seeds'])}; classifier "
             f"**{m['classifier']}**, chosen among nine by F1 on validation studies "
             f"{d['validation']['seeds'][0]}-{d['validation']['seeds'][1]}. Held out: seeds {min(seeds)}-{max(seeds)} "
             f"({m['studies']} studies, {m['bodies']} vertebral bodies L1-S1, {m['crops']} crops). Normal vs abnormal; "
             "abnormal is positive. Phantom only: no real marrow labels exist here.", "",
             "## Shipped model", "", *head, row("per body, T2+T1+STIR fused", m["per_body"]),
             *[row(f"per series, {w} alone", s) for w, s in m["per_series"].items()]]
    if m["end_to_end"]:
        e = m["end_to_end"]
        lines.append(row(f"end to end through DICOM and spine-seg {m['end_to_end_spine_seg']} ({e['studies']} studies, "
                         f"{e['bodies_not_found']} bodies not found)", e))
    lines += ["", "![ROC](roc_abnormal.png) ![confusion](confusion.png)", "",
              "## The nine classifiers (seed 000's comparison)", "",
              "Held out, per body fused; the validation F1 that chose the shipped one beside it.", "",
              "| classifier | accuracy | precision | recall | F1 | AUC | 5-class accuracy | validation F1 (per body) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, s in m["nine_classifiers"].items():
        mark = " (shipped)" if name == m["classifier"] else ""
        lines.append(f"{row(name + mark, s)} {val[name]['per_body']['f1']:.3f} |")
    lines += ["", "## Grad-CAM", "", "![Grad-CAM examples](gradcam_examples.png)", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
