"""Training of `marrow` (seed 000): a small ConvNeXt learns the five marrow classes from vertebral
body crops of phantom studies (batches half normal, half changed bodies); its penultimate-layer
features then train the nine classical classifiers of the paper, compared on validation studies;
the best one ships with the backbone."""

from __future__ import annotations

import functools
import logging
import pickle
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import sklearn
import torch
from tqdm import tqdm

from training.datasets import marrow as data
from training.datasets.spine_seg import PHANTOM_DATA_VERSION
from training.trainers.common import batched, git_commit, optimise, seed_everything, write_model_folder

log = logging.getLogger("dicomnode.train")

VERSION = "1.0"
CLASSIFIER_FILE = "classifier.pkl"


@dataclass
class MarrowConfig:
    train_seeds: list[int] = field(default_factory=lambda: list(range(6000, 6160)))
    validation_seeds: list[int] = field(default_factory=lambda: list(range(6160, 6280)))
    jitter: int = 2  # extra crops per body with the box moved, as a segmentation would place it
    widths: tuple[int, ...] = (32, 64, 128, 256)
    depths: tuple[int, ...] = (2, 2, 4, 2)
    iterations: int = 4000
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    workers: int = 2


def network(widths: tuple[int, ...] = MarrowConfig.widths, depths: tuple[int, ...] = MarrowConfig.depths,
            classes: int = len(data.CLASSES)) -> torch.nn.Module:
    """A ConvNeXt (Liu et al. 2022) sized for CPU training on 64-pixel crops."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    stages = [CNBlockConfig(w, widths[i + 1] if i + 1 < len(widths) else None, d)
              for i, (w, d) in enumerate(zip(widths, depths))]
    # layer scale 0.1 rather than ConvNeXt's 1e-6: from scratch on a few thousand crops, blocks that
    # start as near-identities barely learn in a CPU-sized schedule
    return ConvNeXt(stages, stochastic_depth_prob=0.05, layer_scale=0.1, num_classes=classes)


def features(net: torch.nn.Module, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """Penultimate-layer features (after the final LayerNorm), the paper's deep features."""
    from pipelines.marrow import penultimate

    return batched(penultimate(net).eval(), images, batch)


def classifiers(seed: int = 0) -> dict:
    """The nine classifiers of seed 000, each behind feature standardisation, balanced where they allow it."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import AdaBoostClassifier, HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    plain = {
        "KNN": KNeighborsClassifier(7),
        "SVM": CalibratedClassifierCV(SVC(class_weight="balanced", random_state=seed), ensemble=False),  # Platt scaling
        "DT": DecisionTreeClassifier(max_depth=8, class_weight="balanced", random_state=seed),
        "MLP": MLPClassifier((128,), max_iter=600, random_state=seed),
        "RF": RandomForestClassifier(300, class_weight="balanced", random_state=seed, n_jobs=2),
        "HistGradientBoosting": HistGradientBoostingClassifier(class_weight="balanced", random_state=seed),
        "AdaBoost": AdaBoostClassifier(n_estimators=200, random_state=seed),
        # no probabilities of its own: calibrated by cross-validation
        "PassiveAggressive": CalibratedClassifierCV(SGDClassifier(loss="hinge", penalty=None, learning_rate="pa1", eta0=1.0,
                                                                  class_weight="balanced", random_state=seed), cv=3),
        "LogisticRegression": LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced"),
    }
    return {name: make_pipeline(StandardScaler(), c) for name, c in plain.items()}


def implied_prior(clf, counts: np.ndarray) -> np.ndarray:
    """The class prior behind a fitted classifier's probabilities (what fusing series divides out):
    uniform where it was fitted with balanced class weights, the training frequencies otherwise
    (calibrated classifiers are calibrated on the training frequencies)."""
    final = clf[-1]
    if getattr(final, "class_weight", None) == "balanced":
        return np.full(len(counts), 1.0 / len(counts))
    return counts / counts.sum()


def binary_scores(truth: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Normal vs abnormal, as the paper reports: accuracy, precision, recall, F1 (abnormal positive),
    AUC; and the five-class accuracy."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    t, p_abn = truth != 0, 1 - probs[:, 0]
    pred = p_abn >= 0.5
    out = {"accuracy": accuracy_score(t, pred), "precision": precision_score(t, pred, zero_division=0),
           "recall": recall_score(t, pred, zero_division=0), "f1": f1_score(t, pred, zero_division=0),
           "auc": roc_auc_score(t, p_abn) if 0 < t.sum() < len(t) else float("nan"),
           "class_accuracy": accuracy_score(truth, probs.argmax(axis=1))}
    return {k: float(v) for k, v in out.items()}


def by_body(crops: data.Crops, probs: np.ndarray, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(truth, probabilities fused over its series as the pipeline fuses them) per body (study, level)."""
    from pipelines.marrow import fuse

    groups: dict[tuple[int, str], list[int]] = {}
    for i, key in enumerate(zip(crops.study, crops.level)):
        groups.setdefault(key, []).append(i)
    truth = np.array([crops.labels[idx[0]] for idx in groups.values()])
    return truth, np.stack([fuse([probs[i] for i in idx], prior) for idx in groups.values()])


def compare(f: np.ndarray, y: np.ndarray, f_test: np.ndarray, test: data.Crops, seed: int = 0) -> tuple[dict, dict]:
    """The nine classifiers fitted on features `f` and scored on the crops `test` (features `f_test`),
    per crop and per body: (scores by name, fitted by name)."""
    counts = np.bincount(y, minlength=len(data.CLASSES)).astype(float)
    table, fitted = {}, {}
    for name, clf in tqdm(classifiers(seed).items(), desc="nine classifiers", unit="model"):
        fitted[name] = clf.fit(f, y)
        p = clf.predict_proba(f_test)
        table[name] = {"per_crop": binary_scores(np.asarray(test.labels), p),
                       "per_body": binary_scores(*by_body(test, p, implied_prior(clf, counts)))}
    return table, fitted


def collect(seeds: list[int], jitter: int, cache: Path, workers: int, desc: str) -> data.Crops:
    """Crops of the given phantom studies, cached (rendering takes minutes)."""
    path = cache / f"marrow-{min(seeds)}-{max(seeds)}-{len(seeds)}-j{jitter}-v{PHANTOM_DATA_VERSION}-c{data.CROP_VERSION}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    crops = data.Crops()
    with ProcessPoolExecutor(workers) as pool:
        for c in tqdm(pool.map(functools.partial(data.phantom_crops, jitter=jitter), seeds), total=len(seeds),
                      desc=desc, unit="study"):
            crops.extend(c)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(crops))
    return crops


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """On a standardised crop: flips (a Modic change may sit at either endplate), contrast, offset, noise."""
    if rng.random() < 0.5:
        x = x[:, ::-1]
    x = x * rng.uniform(0.85, 1.15) + rng.uniform(-0.15, 0.15)
    return (x + rng.normal(0, rng.uniform(0, 0.15), x.shape)).astype(np.float32)


def train(cfg: MarrowConfig, out: Path, cache: Path) -> Path:
    rng = seed_everything(cfg.seed)
    commit = git_commit()  # the code that trains, not whatever is checked out when it ends
    train_crops = collect(cfg.train_seeds, cfg.jitter, cache, cfg.workers, "training studies")
    val_crops = collect(cfg.validation_seeds, 0, cache, cfg.workers, "validation studies")
    x, y = train_crops.arrays()
    xv, yv = val_crops.arrays()
    counts = np.bincount(y, minlength=len(data.CLASSES)).astype(float)
    log.info("marrow: %d training crops %s, %d validation crops", len(y), counts.astype(int).tolist(), len(yv))
    if not counts.all():
        missing = [c for c, n in zip(data.CLASSES, counts) if not n]
        raise ValueError(f"the training studies hold no {', '.join(missing)} example: train on more phantom seeds")
    normal, abnormal = np.nonzero(y == 0)[0], np.nonzero(y != 0)[0]  # batches half and half: most bodies are normal
    net = network(cfg.widths, cfg.depths)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.iterations, pct_start=0.1)
    t0, losses = time.time(), []
    net.train()
    bar = tqdm(range(cfg.iterations), desc="marrow backbone", unit="it")
    for _ in bar:
        idx = np.concatenate([rng.choice(normal, cfg.batch // 2), rng.choice(abnormal, cfg.batch - cfg.batch // 2)])
        xb = torch.from_numpy(np.stack([_augment(x[i], rng) for i in idx]))
        loss = torch.nn.functional.cross_entropy(net(xb), torch.from_numpy(y[idx]).long())
        optimise(loss, opt, sched, losses, bar)
    table, fitted = compare(features(net, x), y, features(net, xv), val_crops, cfg.seed)
    # chosen as the pipeline reports: per body, its series fused; F1 of abnormal, then AUC
    best = max(table, key=lambda n: (round(table[n]["per_body"]["f1"], 3), table[n]["per_body"]["auc"]))
    log.info("marrow: best classifier on validation studies: %s (F1 per body %.3f)", best, table[best]["per_body"]["f1"])
    description = {
        "name": "marrow", "version": VERSION, "framework": "torchvision.models.ConvNeXt + scikit-learn",
        "network": {"widths": list(cfg.widths), "depths": list(cfg.depths), "in_channels": 3},
        "classes": list(data.CLASSES), "levels": list(data.LEVELS),
        "input": {"crop_pixels": data.CROP, "margin": data.MARGIN,
                  "channels": "the body's middle sagittal slice and one neighbour on either side"},
        "normalisation": "per volume: (x - p0.5) / (p99.5 - p0.5), clipped to [0, 1]; then each crop to zero mean, unit variance",
        "classifier": {"name": best, "file": CLASSIFIER_FILE, "prior": implied_prior(fitted[best], counts).tolist(),
                       "scikit_learn": sklearn.__version__},
        "validation": {"seeds": [min(cfg.validation_seeds), max(cfg.validation_seeds)], "crops": len(yv),
                       "classifiers": table},
        "training": {**asdict(cfg), "crops": len(y), "class_counts": counts.astype(int).tolist(),
                     "final_loss": float(np.mean(losses[-100:])), "seconds": round(time.time() - t0, 1)},
        "commit": commit, "metrics": {},
    }
    write_model_folder(out, net.state_dict(), description)
    (out / CLASSIFIER_FILE).write_bytes(pickle.dumps(fitted[best]))
    return out
