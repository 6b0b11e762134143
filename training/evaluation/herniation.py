"""`dicomnode evaluate disc-herniation`: the shipped detectors and ensemble on phantom studies never
used in training or validation.

- Detection: mAP50 (and mAP50-95, precision, recall) of the lumbar region on the mid-sagittal slice
  and of the discs on the region's crop, by ultralytics' own validator on a YOLO folder.
- Classification per disc, on crops from the true boxes: accuracy, precision, recall, F1, AUC
  (herniated positive), confusion matrix and ROC; each CNN alone beside the ensemble.
- End to end through DICOM: `spine-seg` picks the slice and names the discs, boxes from the
  detector or from the segmentation: box IoU with the truth and herniation scores for each, the
  comparison the issue asks for.
- Example Grad-CAM overlays of herniated discs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.herniation import Model, box_iou, classify
from pipelines.series import read_series, sagittal_t2
from training.datasets import discs as data
from training.evaluation.metrics import check_held_out, confusion, overlay_grid, roc, spine_seg_version
from training.trainers.common import seed_text
from training.trainers.herniation import collect, probabilities


def scores(truth: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Herniated positive: accuracy, precision, recall, F1, AUC, balanced accuracy."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    t, pred = np.asarray(truth, bool), np.asarray(p) >= 0.5
    out = {"n": len(t), "herniated": int(t.sum()), "accuracy": accuracy_score(t, pred),
           "precision": precision_score(t, pred, zero_division=0), "recall": recall_score(t, pred, zero_division=0),
           "f1": f1_score(t, pred, zero_division=0), "balanced_accuracy": balanced_accuracy_score(t, pred),
           "auc": roc_auc_score(t, p) if 0 < t.sum() < len(t) else float("nan")}
    return {k: (int(v) if k in ("n", "herniated") else float(v)) for k, v in out.items()}


def detection(model_dir: Path, model: Model, held: data.DiscSamples, work: Path) -> dict:
    """Ultralytics' validator on the held-out mid-sagittal slices (region) and region crops (discs)."""
    out = {}
    for stage, images, boxes, names in (("region", held.region_images, held.region_boxes, data.REGION_NAMES),
                                        ("discs", held.disc_images, held.disc_boxes, data.DISC_NAMES)):
        data_yaml = data.write_yolo_folder(work / stage, "val", images, boxes, names)
        m = model.detectors[stage].val(data=str(data_yaml), split="val", imgsz=model.imgsz[stage], device="cpu",
                                       plots=False, verbose=False, project=str(work / "runs"), name=stage, exist_ok=True)
        out[stage] = {"images": len(images), "boxes": int(sum(len(b) for b in boxes)), "map50": float(m.box.map50),
                      "map50_95": float(m.box.map), "precision": float(m.box.mp), "recall": float(m.box.mr)}
    return out


def _truth_boxes(folder: Path, series, k: int) -> dict[str, data.Box]:
    """The true disc boxes on slice k of a phantom series (labels are stored by ascending InstanceNumber)."""
    from training.phantom.anatomy import LABEL_VALUES

    labels = np.load(folder / "truth" / "series_1.npz")["labels"]
    order = np.argsort([int(d.InstanceNumber) for d in series.datasets])
    index = int(np.nonzero(order == k)[0][0])  # rank of slice k among instance numbers
    return {lv: b for lv in data.LEVELS if (b := data.mask_box(labels[index] == LABEL_VALUES[lv])) is not None}


def end_to_end(model: Model, seeds: list[int]) -> dict:
    """The pipeline on DICOM studies with boxes from the detector and from the segmentation."""
    from training.phantom.generator import PhantomOptions, generate_study

    found: dict[str, dict[str, list]] = {s: {"truth": [], "p": [], "iou": [], "missing": []} for s in ("detector", "segmentation")}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in tqdm(seeds, desc="end to end", unit="study"):
            folder = Path(tmp) / str(seed)
            generate_study(folder, seed, PhantomOptions(contrasts=("T2",), max_matrix=384), write_tissue=False)
            levels = json.loads((folder / "truth" / "truth.json").read_text())["levels"]
            series = sagittal_t2(read_series(sorted((folder / "dicom").rglob("*.dcm"))), "disc-herniation")
            for source, f in found.items():
                results, _, mid = classify(series, model, boxes=source)
                true_boxes = _truth_boxes(folder, series, mid)
                got = {r.level: r for r in results}
                for lv in data.LEVELS:
                    if lv not in got:
                        f["missing"].append(1)
                        continue
                    f["missing"].append(0)
                    f["truth"].append(levels[lv]["herniation"] in data.HERNIATED)
                    f["p"].append(got[lv].probability)
                    f["iou"].append(box_iou(got[lv].box, true_boxes[lv]) if lv in true_boxes else 0.0)
                    if source == "detector":
                        f.setdefault("from_detector", []).append(got[lv].source == "detector")
    out = {}
    for source, f in found.items():
        out[source] = {"studies": len(seeds), "discs_missing": int(sum(f["missing"])),
                       "box_iou_mean": float(np.mean(f["iou"])) if f["iou"] else float("nan"),
                       "box_iou_min": float(np.min(f["iou"])) if f["iou"] else float("nan"),
                       **(scores(np.array(f["truth"]), np.array(f["p"])) if f["p"] else {})}
    d = found["detector"].get("from_detector", [])
    out["detector"]["boxes_from_detector"] = float(np.mean(d)) if d else 0.0
    return out


def evaluate(model_dir: Path, out: Path, seeds: list[int], studies_end_to_end: int = 30,
             cache: Path = Path(".cache/training")) -> dict:
    model = Model(model_dir)
    d = model.description
    check_held_out(d, seeds)
    out.mkdir(parents=True, exist_ok=True)
    held = collect(seeds, 0, 0, cache, 2, "held-out studies")
    m: dict = {"studies": len(seeds)}
    with tempfile.TemporaryDirectory() as tmp:
        m["detection"] = detection(model_dir, model, held, Path(tmp))
    x, y = held.arrays()
    per_member = {n: probabilities(net, x) for n, net in model.members.items()}
    p = model.probabilities(x)
    m["classification"] = {"ensemble": scores(y, p), **{n: scores(y, q) for n, q in per_member.items()}}
    m["classification"]["ensemble"]["auc"] = roc(y.astype(bool), p, out / "roc_herniated.png", "Disc herniation, per disc (held out)")
    cm = confusion([data.CLASSES[t] for t in y], [data.CLASSES[int(v >= 0.5)] for v in p], list(data.CLASSES),
                   out / "confusion.png", "Disc herniation per disc (true boxes)")
    m["classification"]["ensemble"]["confusion"] = cm.tolist()
    m["end_to_end"] = end_to_end(model, seeds[:studies_end_to_end]) if studies_end_to_end else {}
    m["end_to_end_spine_seg"] = spine_seg_version() if studies_end_to_end else None
    _gradcam_examples(model, held, p, out / "gradcam_examples.png")
    (out / "metrics.json").write_text(json.dumps(m, indent=1))
    _markdown(d, m, seeds, out)
    d["metrics"] = {"held_out": {"phantom_seeds": [min(seeds), max(seeds)]}, **m}
    (model_dir / "model.json").write_text(json.dumps(d, indent=1))
    return m


def _gradcam_examples(model: Model, held: data.DiscSamples, p: np.ndarray, path: Path, n: int = 8) -> None:
    chosen = [i for i in range(len(held.labels)) if held.labels[i]][:n]
    overlay_grid([(held.crops[i][1], model.explain(held.crops[i]), f"{held.level[i]} herniated\nP {p[i]:.2f}") for i in chosen], path)


def _markdown(d: dict, m: dict, seeds: list[int], out: Path) -> None:
    row = lambda name, s: (f"| {name} | {s['n']} ({s['herniated']}) | {s['accuracy']:.3f} | {s['precision']:.3f} | "  # noqa: E731
                           f"{s['recall']:.3f} | {s['f1']:.3f} | {s['auc']:.3f} | {s['balanced_accuracy']:.3f} |")
    head = ["| | discs (herniated) | accuracy | precision | recall | F1 | AUC | balanced accuracy |",
            "|---|---|---|---|---|---|---|---|"]
    t = d["training"]
    lines = [f"# disc-herniation {d['version']}: evaluation on phantom studies it did not train on", "",
             f"Trained on phantom studies {seed_text(t['train_seeds'])} ({t['crops']} disc crops, "
             f"{t['herniated']} herniated; 1 in {t['enrich']} studies drawn as a herniated-disc study); ensemble weights "
             f"{d['ensemble']['weights']} by grid search on validation studies {d['validation']['seeds'][0]}-"
             f"{d['validation']['seeds'][1]}. Held out: seeds {seed_text(seeds)} ({m['studies']} studies, the "
             "phantom's own mix of study classes). Herniated = protrusion or extrusion; a bulge is not. Phantom only: "
             "no real herniation labels exist here.", "",
             "## Detection (YOLOv8, ultralytics validator)", "",
             "| stage | images | boxes | mAP50 | mAP50-95 | precision | recall |", "|---|---|---|---|---|---|---|"]
    for stage, s in m["detection"].items():
        lines.append(f"| {stage} | {s['images']} | {s['boxes']} | {s['map50']:.3f} | {s['map50_95']:.3f} | "
                     f"{s['precision']:.3f} | {s['recall']:.3f} |")
    lines += ["", "## Herniated or not, per disc, crops from the true boxes", "", *head]
    lines += [row(name + (" (weighted average)" if name == "ensemble" else ""), s) for name, s in m["classification"].items()]
    lines += ["", "![ROC](roc_herniated.png) ![confusion](confusion.png)", ""]
    if m["end_to_end"]:
        e = m["end_to_end"]
        lines += [f"## End to end through DICOM: boxes from the detector or from spine-seg {m['end_to_end_spine_seg']}", "",
                  f"{e['detector']['studies']} studies; `spine-seg` chooses the mid-sagittal slice and names the discs "
                  "in both. Box IoU against the true disc box on that slice.", "",
                  "| boxes from | discs missing | box IoU mean | box IoU min | accuracy | precision | recall | F1 | AUC |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for source, s in e.items():
            if "accuracy" in s:
                lines.append(f"| {source} | {s['discs_missing']} | {s['box_iou_mean']:.3f} | {s['box_iou_min']:.3f} | "
                             f"{s['accuracy']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['auc']:.3f} |")
        scored = {k: v for k, v in e.items() if "f1" in v}
        better = max(scored, key=lambda k: (round(scored[k]["f1"], 3), scored[k]["box_iou_mean"])) if scored else None
        lines += ["", f"With the detector, {e['detector']['boxes_from_detector']:.1%} of the boxes came from it "
                  "(the rest: discs it missed, where the segmentation's box stood in).",
                  f"Better here (F1, then box IoU): **boxes from {better}**." if better else "", ""]
    lines += ["## Grad-CAM", "", "![Grad-CAM examples](gradcam_examples.png)", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
