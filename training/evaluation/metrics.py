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
