"""`dicomnode ensemble spine-seg`: a weighted-average ensemble (WAE, seed 004) of trained
spine-seg model folders, its weights found by grid search on validation phantom studies that
neither training (1000-1059) nor evaluation (5000-5029) uses: by default seeds 4000-4011.

Real cases cannot serve as validation data here: every member trained on the same real fold, and
the held-out fold is the test set. The search maximises the mean Dice of the named structures, so
a weight that breaks level naming scores low.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.spine_seg import Model, name_levels
from training.evaluation.metrics import dice
from training.evaluation.spine_seg import BODIES, DISCS, load_study
from training.phantom.anatomy import LABEL_VALUES
from training.trainers.common import git_commit, read_description


def weight_grid(members: int, step: float) -> list[tuple[float, ...]]:
    """Every weight vector on a grid of `step` whose weights are >= 0 and sum to 1."""
    n = round(1 / step)
    return [tuple(k / n for k in ks) for ks in itertools.product(range(n + 1), repeat=members) if sum(ks) == n]


def study_scores(probs: list[np.ndarray], truth: np.ndarray, series, grid: list[tuple[float, ...]]) -> list[float]:
    """Mean Dice over the structures of one study, for each weight vector."""
    out = []
    for weights in grid:
        classes = np.argmax(sum(w * p for w, p in zip(weights, probs)), axis=0).astype(np.uint8)
        labels = name_levels(classes, series).labels
        scores = [dice(labels == LABEL_VALUES[s], truth == LABEL_VALUES[s]) for s in BODIES + DISCS + ["canal"]
                  if (truth == LABEL_VALUES[s]).any()]
        out.append(float(np.mean(scores)))
    return out


def search(members: list[Path], seeds: list[int], step: float = 0.1) -> dict:
    """Grid search of the member weights on validation phantom studies; returns the best weights and
    the mean Dice of every weight vector tried."""
    from training.phantom.generator import PhantomOptions, generate_study

    models = [Model(m) for m in members]
    grid = weight_grid(len(members), step)
    scores = np.zeros((len(seeds), len(grid)))
    with tempfile.TemporaryDirectory() as tmp:
        for i, seed in enumerate(tqdm(seeds, desc="validation studies", unit="study")):
            folder = Path(tmp) / f"phantom-{seed}"
            generate_study(folder, seed, PhantomOptions(contrasts=(("T2", "T1", "STIR")[i % 3],), max_matrix=512), write_tissue=False)
            series, truth, _ = load_study(folder)
            scores[i] = study_scores([m.probabilities(series) for m in models], truth, series, grid)
    mean = scores.mean(axis=0)
    best = int(np.argmax(mean))
    return {"weights": list(grid[best]), "validation_dice": float(mean[best]), "validation_phantom_seeds": seeds,
            "grid": [{"weights": list(w), "mean_dice": round(float(d), 4)} for w, d in zip(grid, mean)]}


def chosen_weights(weights: list[float], members: int) -> dict:
    """Weights given instead of searched, for a trade-off that the phantom validation set cannot see
    (robustness on scanners never seen); the folder records that no search chose them."""
    if len(weights) != members:
        raise ValueError(f"{len(weights)} weights given for {members} member folders: give one weight per member")
    if min(weights) < 0 or abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f"ensemble weights {weights} must be >= 0 and sum to 1")
    return {"weights": list(weights), "validation_dice": None, "validation_phantom_seeds": [], "grid": []}


def write_ensemble(members: list[Path], found: dict, out: Path, version: str) -> Path:
    """An ensemble model folder: each member folder copied under its own name, and a model.json that
    lists them with their weights and describes the whole (what it trained and was validated on)."""
    descriptions = [read_description(m) for m in members]
    for member, d in zip(members, descriptions):
        if d.get("members"):
            raise ValueError(f"{member} is itself an ensemble: list its member folders instead")
    out.mkdir(parents=True, exist_ok=True)
    names = [f"member-{i + 1}-{d['version']}" for i, d in enumerate(descriptions)]
    for member, name in zip(members, names):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(member, out / name, ignore=shutil.ignore_patterns("checkpoint.pt"))
    first = descriptions[0]
    training = [d["training"] for d in descriptions]
    description = {
        "name": first["name"], "version": version, "framework": "weighted-average ensemble of " + first["framework"],
        "classes": first["classes"], "grid_mm": first["grid_mm"], "normalisation": first["normalisation"],
        "test_time_grids_mm": first.get("test_time_grids_mm", [first["grid_mm"]]),
        "levels": first["levels"], **({"structures": first["structures"]} if "structures" in first else {}),
        "members": [{"folder": n, "weight": w} for n, w in zip(names, found["weights"])],
        "training": {"phantom_seeds": sorted({s for t in training for s in t["phantom_seeds"]}),
                     "real_case_ids": sorted({c for t in training for c in t["real_case_ids"]}),
                     "phantom_slices": max(t["phantom_slices"] for t in training),
                     "real_slices": max(t["real_slices"] for t in training),
                     "validation_phantom_seeds": found["validation_phantom_seeds"],
                     "weight_search": {"validation_dice": found["validation_dice"], "grid": found["grid"]}},
        "commit": git_commit(), "metrics": {},
    }
    (out / "model.json").write_text(json.dumps(description, indent=1))
    return out
