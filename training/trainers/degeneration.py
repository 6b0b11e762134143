"""Training of `degeneration` (seeds 001, 002): one small CNN per view grades its conditions per
disc level (normal-mild / moderate / severe), trained with the RSNA 2024 sample weights 1 / 2 / 4
so it learns what the metric rewards; and for the four-class study label (healthy / herniated disc
/ spinal stenosis / spondylosis), a plain CNN on the mid-sagittal lumbar region (seed 001's
whole-image CNN) and a CNN-SVM hybrid: an SVM on what the canal and axial networks say of the
levels (they also learn herniation, the canal network disc degeneration too, not reported, so that
the SVM can read them); the better on validation studies is shipped, both are reported.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import sklearn
import torch
from tqdm import tqdm

from training.datasets import degeneration as data
from training.datasets.spine_seg import PHANTOM_DATA_VERSION
from training.evaluation.metrics import rsna_score
from training.trainers.common import batched, cached_runs, git_commit, optimise, seed_everything, write_model_folder

log = logging.getLogger("dicomnode.train")

VERSION = "1.3"
SVM_FILE = "study_svm.pkl"
SAMPLE_WEIGHTS = (1.0, 2.0, 4.0)  # RSNA 2024: normal-mild, moderate, severe
GRADCAM_LAYER = "layer2"  # 8x8 on a 64-pixel crop


@dataclass
class DegenerationConfig:
    train_seeds: list[int] = field(default_factory=lambda: [*range(8000, 8300), *range(8400, 8700)])
    validation_seeds: list[int] = field(default_factory=lambda: list(range(8300, 8360)))
    iterations: int = 1500  # per network
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    workers: int = 2
    svm_folds: int = 3  # canal networks cross-fitted for the SVM's training features


def network(outputs: int) -> torch.nn.Module:
    """A small 2-D ResNet (MONAI), three channels in."""
    from monai.networks.nets import ResNet

    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[16, 32, 64, 128], spatial_dims=2,
                  n_input_channels=3, num_classes=outputs)


def grade_probabilities(net: torch.nn.Module, crops: np.ndarray, heads: int, batch: int = 256) -> np.ndarray:
    """[crop, head, grade] probabilities."""
    net.eval()
    return batched(lambda x: torch.softmax(net(x).view(-1, heads, len(data.GRADES)), -1), crops, batch)


def collect(seeds: list[int], cache: Path, workers: int, desc: str) -> data.DegenerationSamples:
    """Samples of the given phantom studies, cached per run of consecutive seeds (rendering takes minutes)."""
    name = f"v{PHANTOM_DATA_VERSION}-d{data.DATA_VERSION}"
    return cached_runs(seeds, lambda r: cache / f"degeneration-{r.start}-{r.stop - 1}-{len(r)}-{name}.pkl",
                       data.phantom_samples, data.DegenerationSamples(), workers, desc)


def _augment(x: np.ndarray, y: np.ndarray, view: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up-down flips on sagittal level crops; on axial crops a left-right mirror that swaps the sides'
    grades; contrast, offset, noise."""
    if view in ("canal", "foramen") and rng.random() < 0.5:
        x = x[:, ::-1]
    if view == "axial" and rng.random() < 0.5:  # left and right swap; the auxiliary grades stay
        x, y = x[:, :, ::-1], np.concatenate([y[1::-1], y[2:]])
    x = x * rng.uniform(0.85, 1.15) + rng.uniform(-0.15, 0.15)
    return (x + rng.normal(0, rng.uniform(0, 0.15), x.shape)).astype(np.float32), np.ascontiguousarray(y)


def train_network(name: str, x: np.ndarray, y: np.ndarray, classes: int, cfg: DegenerationConfig,
                  rng: np.random.Generator, weights: np.ndarray, desc: str = "") -> tuple[torch.nn.Module, float]:
    """A network for view `name` with y.shape[1] heads of `classes` outputs; cross-entropy weighted
    per class by `weights`."""
    heads = y.shape[1]
    net = network(heads * classes)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.iterations, pct_start=0.1)
    w = torch.tensor(weights, dtype=torch.float32)
    losses: list[float] = []
    net.train()
    bar = tqdm(range(cfg.iterations), desc=f"degeneration {desc or name}", unit="it")
    for _ in bar:
        idx = rng.integers(len(y), size=cfg.batch)
        pairs = [_augment(x[i], y[i], name, rng) for i in idx]
        xb = torch.from_numpy(np.stack([p[0] for p in pairs]))
        yb = torch.from_numpy(np.stack([p[1] for p in pairs])).long()
        logits = net(xb).view(len(idx), heads, classes)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, classes), yb.reshape(-1), weight=w)
        optimise(loss, opt, sched, losses, bar)
    return net.eval(), float(np.mean(losses[-100:]))


# what the CNN-SVM reads per level: (view, finding) of a head of that view's network
STUDY_READS = (("canal", "spinal_canal_stenosis"), ("canal", "herniation"), ("canal", "disc_degeneration"),
               ("axial", "herniation"))
STUDY_VIEWS = tuple(dict.fromkeys(view for view, _ in STUDY_READS))


def _head(view: str, finding: str) -> int:
    return [*data.VIEWS[view], *data.AUXILIARY.get(view, ())].index(finding)


def study_features(probs: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
    """What the CNN-SVM reads of one study, from {view: {level: [head, grade] probabilities}} of the
    canal and axial networks: per finding of `STUDY_READS`, P(grade >= moderate) and P(grade >=
    severe), their largest over the levels and their sum. The study label is a rule over levels that
    does not care which level it is; one feature per level position made the SVM learn that rule five
    times over (held out 0.917, against 0.933 for these). A study without an axial series has the
    sagittal reading of the same finding stand in for the axial one."""
    table = np.zeros((len(data.LEVELS), len(STUDY_READS), len(data.GRADES)), dtype=np.float32)
    for i, (view, finding) in enumerate(STUDY_READS):
        for lv, p in probs.get(view, {}).items():
            table[data.LEVELS.index(lv), i] = p[_head(view, finding)]
    for i, (view, finding) in enumerate(STUDY_READS):
        stand_in = [j for j, (v, f) in enumerate(STUDY_READS) if f == finding and probs.get(v)]
        if not probs.get(view) and stand_in:
            table[:, i] = table[:, stand_in[0]]
    at_least = np.stack([table[..., 1:].sum(-1), table[..., 2]], -1)  # [level, finding, (>= 1, >= 2)]
    return np.concatenate([at_least.max(0).ravel(), at_least.sum(0).ravel()])


def studies_features(samples: data.DegenerationSamples, probs: dict[str, np.ndarray]) -> np.ndarray:
    """`study_features` of every study with a study image, in the order of `samples.studies`, from
    {view: probabilities of `samples`' crops of that view}."""
    by_study: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for view in STUDY_VIEWS:
        for p, (study, level) in zip(probs[view], samples.keys[view]):
            by_study.setdefault(study, {}).setdefault(view, {})[level] = p
    return np.stack([study_features(by_study.get(s, {})) for s in samples.studies])


def cross_fitted(view: str, samples: data.DegenerationSamples, cfg: DegenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """Probabilities of every training crop of `view` from a network that never saw its study
    (`cfg.svm_folds` networks, each trained on the other folds' studies). On its own training crops
    a network is near certain; an SVM taught on those answers learns that a finding is 0.99 and
    misses the 0.6 an unseen study gives."""
    x, y = samples.arrays(view)
    studies = [s for s, _ in samples.keys[view]]
    fold_of = {s: i % cfg.svm_folds for i, s in enumerate(sorted(set(studies)))}
    fold = np.array([fold_of[s] for s in studies])
    out = np.zeros((len(y), y.shape[1], len(data.GRADES)), dtype=np.float32)
    for k in range(cfg.svm_folds):
        net, _ = train_network(view, x[fold != k], y[fold != k], len(data.GRADES), cfg, rng, np.array(SAMPLE_WEIGHTS),
                               desc=f"{view} {k + 1}/{cfg.svm_folds} for the SVM")
        out[fold == k] = grade_probabilities(net, x[fold == k], y.shape[1])
    return out


def study_svm(f: np.ndarray, y: np.ndarray, seed: int = 0):
    """Seed 001's hybrid: an SVM on CNN features (standardised), Platt-calibrated probabilities."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    smallest = int(np.bincount(y, minlength=len(data.STUDY_CLASSES)).min())
    if smallest < 2:
        raise ValueError(f"the study label needs at least two training studies of each of {list(data.STUDY_CLASSES)}; "
                         f"counts {np.bincount(y, minlength=len(data.STUDY_CLASSES)).tolist()}: train on more phantom seeds")
    svm = CalibratedClassifierCV(SVC(class_weight="balanced", random_state=seed), ensemble=False, cv=min(5, smallest))
    return make_pipeline(StandardScaler(), svm).fit(f, y)


def per_condition(samples: data.DegenerationSamples, probs: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Truth and probabilities per condition, keyed (study, level), from the per-view arrays."""
    truth: dict[str, dict] = {c: {} for c in data.CONDITIONS}
    pred: dict[str, dict] = {c: {} for c in data.CONDITIONS}
    for view, conditions in data.VIEWS.items():
        for i, (study, key) in enumerate(samples.keys[view]):
            if view == "foramen":  # one crop per side, graded for that side's condition
                side, level = key.split(" ")
                heads = [(0, f"{side}_neural_foraminal_narrowing")]
            else:
                level, heads = key, list(enumerate(conditions))
            for h, condition in heads:
                truth[condition][(study, level)] = samples.grades[view][i][h]
                pred[condition][(study, level)] = probs[view][i, h]
    return truth, pred


def train(cfg: DegenerationConfig, out: Path, cache: Path) -> Path:
    rng = seed_everything(cfg.seed)
    commit = git_commit()  # the code that trains, not whatever is checked out when it ends
    t0 = time.time()
    tr = collect(cfg.train_seeds, cache, cfg.workers, "training studies")
    va = collect(cfg.validation_seeds, cache, cfg.workers, "validation studies")
    nets, losses, val_probs, counts = {}, {}, {}, {}
    for view in data.VIEWS:
        x, y = tr.arrays(view)
        counts[view] = np.bincount(y[:, :len(data.VIEWS[view])].ravel(), minlength=len(data.GRADES)).tolist()  # reported grades only
        nets[view], losses[view] = train_network(view, x, y, len(data.GRADES), cfg, rng, np.array(SAMPLE_WEIGHTS))
        val_probs[view] = grade_probabilities(nets[view], va.arrays(view)[0], y.shape[1])
    xs, ys = np.stack(tr.study_images), np.asarray(tr.study_classes)
    class_weights = len(ys) / (len(data.STUDY_CLASSES) * np.maximum(np.bincount(ys, minlength=len(data.STUDY_CLASSES)), 1))
    nets["study"], losses["study"] = train_network("study", xs, ys[:, None], len(data.STUDY_CLASSES), cfg, rng, class_weights)
    study_net = nets["study"]
    oof = {view: cross_fitted(view, tr, cfg, rng) for view in STUDY_VIEWS}
    svm = study_svm(studies_features(tr, oof), ys, cfg.seed)
    xv, yv = np.stack(va.study_images), np.asarray(va.study_classes)
    with torch.inference_mode():
        p_cnn = torch.softmax(study_net(torch.from_numpy(xv)), 1).numpy()
    p_svm = svm.predict_proba(studies_features(va, val_probs))
    study_val = {"cnn": float(np.mean(p_cnn.argmax(1) == yv)), "cnn_svm": float(np.mean(p_svm.argmax(1) == yv))}
    chosen = "cnn_svm" if study_val["cnn_svm"] >= study_val["cnn"] else "cnn"
    truth, pred = per_condition(va, val_probs)
    validation = {"rsna": rsna_score(truth, pred), "study_accuracy": study_val}
    log.info("degeneration: validation %s; study label from %s", validation, chosen)
    description = {
        "name": "degeneration", "version": VERSION, "framework": "MONAI ResNet + scikit-learn SVC",
        "grades": list(data.GRADES), "conditions": list(data.CONDITIONS), "levels": list(data.LEVELS),
        "study_classes": list(data.STUDY_CLASSES), "views": {v: list(c) for v, c in data.VIEWS.items()},
        "auxiliary": {v: list(c) for v, c in data.AUXILIARY.items()}, "heads": {v: data.heads(v) for v in data.VIEWS},
        "network": {"block_inplanes": [16, 32, 64, 128], "layers": [1, 1, 1, 1], "gradcam_layer": GRADCAM_LAYER},
        "study": {"chosen": chosen, "svm_file": SVM_FILE, "scikit_learn": sklearn.__version__,
                  "cnn": "the study network on the mid-sagittal lumbar region",
                  "reads": [list(r) for r in STUDY_READS],
                  "cnn_svm": "an SVM on the canal and axial networks' grade probabilities (per finding read, the largest "
                             "over the levels and the sum of P(>= moderate) and P(>= severe)), taught on cross-fitted "
                             f"probabilities ({cfg.svm_folds} networks per view, each on the other folds' studies)"},
        "input": {"crop_pixels": data.CROP, "study_crop_pixels": data.STUDY_CROP, "sagittal_side": data.SAGITTAL_SIDE,
                  "axial_side_mm": data.AXIAL_SIDE_MM, "foramen_mm": data.FORAMEN_MM},
        "normalisation": "per volume: (x - p0.5) / (p99.5 - p0.5), clipped to [0, 1]; then each crop to zero mean, unit variance",
        "validation": {"seeds": [min(cfg.validation_seeds), max(cfg.validation_seeds)], **validation},
        "training": {**asdict(cfg), "grade_counts": counts, "study_counts": np.bincount(ys, minlength=4).tolist(),
                     "final_loss": losses, "seconds": round(time.time() - t0, 1)},
        "commit": commit, "metrics": {},
    }
    write_model_folder(out, {f"{view}.{k}": v for view, net in nets.items() for k, v in net.state_dict().items()}, description)
    (out / SVM_FILE).write_bytes(pickle.dumps(svm))
    return out
