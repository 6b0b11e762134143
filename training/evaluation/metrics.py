"""Metrics the papers use, and the plots a reviewer looks at first."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def dice(pred: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> float:
    if where is not None:
        pred, truth = pred[where], truth[where]
    total = pred.sum() + truth.sum()
    return float(2 * (pred & truth).sum() / total) if total else float("nan")


def iou(pred: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> float:
    if where is not None:
        pred, truth = pred[where], truth[where]
    union = (pred | truth).sum()
    return float((pred & truth).sum() / union) if union else float("nan")


def bland_altman(ours: Sequence[float], reference: Sequence[float], path: Path, title: str, unit: str = "deg") -> dict:
    a, b = np.asarray(ours, dtype=float), np.asarray(reference, dtype=float)
    diff, mean = a - b, (a + b) / 2
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    ax.scatter(mean, diff, s=14)
    for y, style in ((bias, "-"), (bias + 1.96 * sd, "--"), (bias - 1.96 * sd, "--")):
        ax.axhline(y, color="grey", linestyle=style, lw=1)
    ax.set_xlabel(f"mean of both ({unit})")
    ax.set_ylabel(f"ours - reference ({unit})")
    ax.set_title(f"{title}\nbias {bias:+.2f}, limits of agreement ±{1.96 * sd:.2f} {unit}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"bias": bias, "loa": 1.96 * sd, "mae": float(np.abs(diff).mean()), "max_abs": float(np.abs(diff).max()),
            "n": len(diff)}


def confusion(truth: Sequence[str], pred: Sequence[str], labels: Sequence[str], path: Path, title: str) -> np.ndarray:
    m = np.zeros((len(labels), len(labels)), dtype=int)
    for t, p in zip(truth, pred):
        m[labels.index(t), labels.index(p)] += 1
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=110)
    ax.imshow(m, cmap="Blues")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="black")
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return m


def bars(values: dict[str, float], path: Path, title: str, target: float | None = None) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    names = list(values)
    ax.bar(range(len(names)), [values[n] for n in names], color="#4a7ab8")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    if target is not None:
        ax.axhline(target, color="#c04040", lw=1, linestyle="--")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def roc(truth: Sequence[bool], scores: Sequence[float], path: Path, title: str) -> float:
    """ROC curve of a binary decision; returns the AUC."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(truth, scores)
    auc = float(roc_auc_score(truth, scores))
    fig, ax = plt.subplots(figsize=(4.2, 4), dpi=110)
    ax.plot(fpr, tpr, lw=1.5)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{title}\nAUC {auc:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return auc


RSNA_WEIGHTS = (1.0, 2.0, 4.0)  # normal-mild, moderate, severe
RSNA_GROUPS = {"spinal_canal_stenosis": ("spinal_canal_stenosis",),
               "neural_foraminal_narrowing": ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"),
               "subarticular_stenosis": ("left_subarticular_stenosis", "right_subarticular_stenosis")}


def rsna_score(truth: dict[str, dict], probs: dict[str, dict]) -> dict[str, float]:
    """The RSNA 2024 LSDC metric: per condition group, the log loss with sample weights 1 / 2 / 4 by
    the true grade (normal-mild / moderate / severe), normalised by the weights; and "any severe
    spinal": per study, is any level's canal stenosis severe, scored by the largest P(severe) over its
    levels, weights 1 / 4. `score` is the mean of the four. `truth[condition][(study, level)]` is a
    grade index, `probs[...]` the three probabilities."""
    out: dict[str, float] = {}
    for group, conditions in RSNA_GROUPS.items():
        keys = [(c, k) for c in conditions for k in truth[c] if k in probs[c]]
        if not keys:
            continue
        t = np.array([truth[c][k] for c, k in keys])
        p = np.clip(np.array([probs[c][k][truth[c][k]] for c, k in keys]), 1e-15, 1)
        w = np.array(RSNA_WEIGHTS)[t]
        out[group] = float(-(w * np.log(p)).sum() / w.sum())
    studies: dict = {}
    for (study, _), grade in truth["spinal_canal_stenosis"].items():
        studies.setdefault(study, [False, 0.0])
        studies[study][0] |= grade == 2
    for (study, _), p in probs["spinal_canal_stenosis"].items():
        if study in studies:
            studies[study][1] = max(studies[study][1], float(p[2]))
    if studies:
        y = np.array([v[0] for v in studies.values()], dtype=float)
        p = np.clip(np.array([v[1] for v in studies.values()]), 1e-15, 1 - 1e-15)
        w = np.where(y > 0, 4.0, 1.0)
        out["any_severe_spinal"] = float(-(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum())
    out["score"] = float(np.mean(list(out.values())))
    return out


def spine_seg_version() -> str:
    """The spine-seg an end-to-end figure went through: levels, slices and boxes come from it, so the
    figure moves with it."""
    from pipelines.registry import get
    return get("spine-seg").version


def check_held_out(description: dict, seeds: Sequence[int]) -> None:
    """Refuse to evaluate on phantom seeds the model trained or was validated on."""
    used = set(description["training"]["train_seeds"]) | set(description["training"].get("validation_seeds") or [])
    if used & set(seeds):
        raise ValueError(f"phantom seeds {sorted(used & set(seeds))[:5]}... were used in training or validation")


def overlay_grid(panels: Sequence[tuple[np.ndarray, np.ndarray, str]], path: Path) -> None:
    """Grad-CAM examples in a row: (grey image, map in [0, 1], title) each."""
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6), dpi=100)
    for ax, (image, heat, title) in zip(np.atleast_1d(axes), panels):
        ax.imshow(image, cmap="gray")
        ax.imshow(heat, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
