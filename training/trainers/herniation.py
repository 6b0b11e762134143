"""Training of `disc-herniation` (seed 004): two YOLOv8 detectors (the lumbar region on the
mid-sagittal slice, then each disc in the region's crop), and a weighted-average ensemble of three
small CNNs that decides herniated or not per disc crop. Herniated discs are rare, so the loss is
class-weighted (seed 004); the ensemble weights are found by grid search on validation studies.

The detectors start from ultralytics' YOLOv8n description at half its width (nothing pretrained can
be downloaded here); the CNNs are a ConvNeXt, a ResNet and a DenseNet sized for CPU training.
"""

from __future__ import annotations

import functools
import itertools
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.datasets import discs as data
from training.datasets.spine_seg import PHANTOM_DATA_VERSION
from training.trainers.common import batched, cached_runs, git_commit, optimise, seed_everything, write_model_folder

log = logging.getLogger("dicomnode.train")

VERSION = "1.1"  # 1.1: 600 training studies, 30 epochs per detector
DETECTOR_WIDTH = 0.125  # YOLOv8n is 0.25: one kind of box on phantom-sized images needs less
MEMBERS = ("convnext", "resnet", "densenet")
GRADCAM_LAYERS = {"convnext": "features.3", "resnet": "layer2", "densenet": "features.transition1"}  # 8x8 on a 64-pixel crop


@dataclass
class HerniationConfig:
    train_seeds: list[int] = field(default_factory=lambda: [*range(7000, 7300), *range(7400, 7700)])
    validation_seeds: list[int] = field(default_factory=lambda: list(range(7300, 7380)))
    enrich: int = 2  # training studies whose seed is a multiple of this are drawn as 'herniated_disc' studies (chance gives 1 in 4)
    jitter: int = 2  # extra crops per disc, and one more slice per detector stage, as detection would place them
    epochs: int = 30  # per detector (the same number of steps as 1.0's 60 on half the studies)
    imgsz: int = 256
    iterations: int = 3000  # per CNN
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    workers: int = 2
    data_dir: str | None = None  # train from a user's folders instead of the phantom (see `user_data`)


def member(name: str) -> torch.nn.Module:
    """One CNN of the ensemble, two output logits (normal, herniated)."""
    from monai.networks.nets import DenseNet, ResNet

    from training.trainers.marrow import network

    if name == "convnext":
        return network((24, 48, 96, 192), (1, 1, 2, 1), classes=len(data.CLASSES))
    if name == "resnet":
        return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[16, 32, 64, 128], spatial_dims=2,
                      n_input_channels=3, num_classes=len(data.CLASSES))
    if name == "densenet":
        return DenseNet(spatial_dims=2, in_channels=3, out_channels=len(data.CLASSES), init_features=16,
                        growth_rate=8, block_config=(2, 4, 4, 2))
    raise ValueError(f"unknown ensemble member {name!r} (known: {', '.join(MEMBERS)})")


def probabilities(net: torch.nn.Module, crops: np.ndarray, batch: int = 256) -> np.ndarray:
    """P(herniated) per crop."""
    net.eval()
    return batched(lambda x: torch.softmax(net(x), 1)[:, 1], crops, batch)


def ensemble_weights(probs: dict[str, np.ndarray], truth: np.ndarray, step: float = 0.1) -> dict[str, float]:
    """Weights on a grid (steps of `step`, summing to 1) that maximise balanced accuracy of the
    weighted average on validation crops, then minimise its log loss (seed 004's grid search)."""
    names = list(probs)
    stack = np.stack([probs[n] for n in names])
    n = int(round(1 / step))
    best, best_key = None, None
    for combo in itertools.product(range(n + 1), repeat=len(names)):
        if sum(combo) != n:
            continue
        w = np.array(combo) / n
        p = np.clip(w @ stack, 1e-6, 1 - 1e-6)
        key = (round(balanced_accuracy(truth, p >= 0.5), 4), -float(np.mean(-truth * np.log(p) - (1 - truth) * np.log(1 - p))))
        if best_key is None or key > best_key:
            best, best_key = w, key
    return {name: float(v) for name, v in zip(names, best)}


def balanced_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    rates = [np.mean(pred[truth == c] == c) for c in (False, True) if (truth == c).any()]
    return float(np.mean(rates))


def collect(seeds: list[int], jitter: int, enrich: int, cache: Path, workers: int, desc: str) -> data.DiscSamples:
    """Samples of the given phantom studies, cached per run of consecutive seeds (rendering takes
    minutes); with `enrich`, studies whose seed is a multiple of it are drawn as herniated-disc studies."""
    name = f"j{jitter}-e{enrich}-v{PHANTOM_DATA_VERSION}-c{data.CROP_VERSION}"
    return cached_runs(seeds, lambda r: cache / f"discs-{r.start}-{r.stop - 1}-{len(r)}-{name}.pkl",
                       functools.partial(_samples, jitter=jitter, enrich=enrich), data.DiscSamples(), workers, desc)


def _samples(seed: int, jitter: int, enrich: int) -> data.DiscSamples:
    return data.phantom_samples(seed, jitter, study_class="herniated_disc" if enrich and seed % enrich == 0 else None)


def detector_config() -> dict:
    """Ultralytics' YOLOv8n description, one class, `DETECTOR_WIDTH` wide."""
    from pipelines.detect import offline

    offline()
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load("yolov8n.yaml")
    cfg.update(nc=1, scale="n", scales={"n": [0.33, DETECTOR_WIDTH, 512]})
    return cfg


def train_detector(data_yaml: Path, cfg: HerniationConfig, work: Path, name: str) -> tuple[Path, float]:
    """A one-class YOLOv8 trained from scratch on a YOLO folder; (best weights, mAP50 on its val split)."""
    from pipelines.detect import offline

    offline()
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.tasks import DetectionModel

    trainer = DetectionTrainer(overrides=dict(
        model="yolov8n.yaml", data=str(data_yaml), imgsz=cfg.imgsz, epochs=cfg.epochs, batch=16, device="cpu", workers=0,
        project=str(work), name=name, exist_ok=True, plots=False, seed=cfg.seed, deterministic=True, amp=False,
        degrees=15.0, flipud=0.0, fliplr=0.5, hsv_h=0.0, hsv_s=0.0, patience=cfg.epochs, verbose=False))
    trainer.model = DetectionModel(detector_config(), nc=1, verbose=False)  # a built model is trained as it is
    trainer.train()
    return trainer.best, validation_map50(trainer.best, data_yaml, cfg.imgsz)


def validation_map50(weights: Path, data_yaml: Path, imgsz: int) -> float:
    from pipelines.detect import load

    metrics = load(weights).val(data=str(data_yaml), split="val", imgsz=imgsz, device="cpu", plots=False, verbose=False)
    return float(metrics.box.map50)


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Either side's lateral slice may come first; up-down flips; contrast, offset, noise."""
    if rng.random() < 0.5:
        x = x[::-1]
    if rng.random() < 0.5:
        x = x[:, ::-1]
    x = x * rng.uniform(0.85, 1.15) + rng.uniform(-0.15, 0.15)
    return (x + rng.normal(0, rng.uniform(0, 0.15), x.shape)).astype(np.float32)


def train_member(name: str, x: np.ndarray, y: np.ndarray, cfg: HerniationConfig, rng: np.random.Generator) -> tuple[torch.nn.Module, float]:
    """One CNN, cross-entropy weighted by inverse class frequency (seed 004); (network, final loss)."""
    counts = np.bincount(y, minlength=len(data.CLASSES)).astype(float)
    weight = torch.tensor(len(y) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
    net = member(name)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.iterations, pct_start=0.1)
    losses: list[float] = []
    net.train()
    bar = tqdm(range(cfg.iterations), desc=f"disc-herniation {name}", unit="it")
    for _ in bar:
        idx = rng.integers(len(y), size=cfg.batch)
        xb = torch.from_numpy(np.stack([_augment(x[i], rng) for i in idx]))
        loss = torch.nn.functional.cross_entropy(net(xb), torch.from_numpy(y[idx]).long(), weight=weight)
        optimise(loss, opt, sched, losses, bar)
    return net.eval(), float(np.mean(losses[-100:]))


def phantom_data(cfg: HerniationConfig, cache: Path) -> tuple[dict[str, Path], tuple, tuple]:
    """Phantom studies rendered into YOLO folders (data.yaml per stage) and crop arrays."""
    tr = collect(cfg.train_seeds, cfg.jitter, cfg.enrich, cache, cfg.workers, "training studies")
    va = collect(cfg.validation_seeds, 0, 0, cache, cfg.workers, "validation studies")
    work = cache / "disc-herniation-yolo"
    shutil.rmtree(work, ignore_errors=True)
    yolo = {}
    for stage, images, boxes, names in (("region", "region_images", "region_boxes", data.REGION_NAMES),
                                        ("discs", "disc_images", "disc_boxes", data.DISC_NAMES)):
        data.write_yolo_folder(work / stage, "train", getattr(tr, images), getattr(tr, boxes), names)
        yolo[stage] = data.write_yolo_folder(work / stage, "val", getattr(va, images), getattr(va, boxes), names)
    return yolo, tr.arrays(), va.arrays()


def user_data(root: Path) -> tuple[dict[str, Path], tuple, tuple]:
    """A user's own data: `region/` and `discs/` YOLO folders (data.yaml, train and val splits) and
    `crops/{train,val}/{normal,herniated}/` images. Every label file is read first, so a malformed
    one stops training before it starts."""
    yolo = {}
    for stage in ("region", "discs"):
        if not (root / stage / "data.yaml").exists():
            raise FileNotFoundError(f"{root / stage / 'data.yaml'} is missing: {stage}/ must be a YOLO folder")
        for split in ("train", "val"):
            if not data.read_yolo_folder(root / stage, split):
                raise ValueError(f"{root / stage / 'images' / split} holds no images")
        yolo[stage] = root / stage / "data.yaml"
    return yolo, data.read_class_folders(root / "crops" / "train"), data.read_class_folders(root / "crops" / "val")


def train(cfg: HerniationConfig, out: Path, cache: Path) -> Path:
    rng = seed_everything(cfg.seed)
    commit = git_commit()  # the code that trains, not whatever is checked out when it ends
    t0 = time.time()
    if cfg.data_dir:
        yolo, (x, y), (xv, yv) = user_data(Path(cfg.data_dir))
    else:
        yolo, (x, y), (xv, yv) = phantom_data(cfg, cache)
    detectors = {}
    out.mkdir(parents=True, exist_ok=True)
    for stage, data_yaml in yolo.items():
        if (out / f"{stage}.pt").exists():  # an interrupted run keeps the detectors it finished
            log.info("disc-herniation: keeping the %s detector already in %s", stage, out)
            map50 = validation_map50(out / f"{stage}.pt", data_yaml, cfg.imgsz)
        else:
            log.info("disc-herniation: training the %s detector (%d epochs)", stage, cfg.epochs)
            best, map50 = train_detector(data_yaml, cfg, (cache / "disc-herniation-runs").resolve(), stage)
            shutil.copyfile(best, out / f"{stage}.pt")
        detectors[stage] = {"file": f"{stage}.pt", "imgsz": cfg.imgsz, "validation_map50": map50}
    log.info("disc-herniation: %d training crops (%d herniated), %d validation crops (%d herniated)",
             len(y), int(y.sum()), len(yv), int(yv.sum()))
    nets, val_probs, losses = {}, {}, {}
    for name in MEMBERS:
        nets[name], losses[name] = train_member(name, x, y, cfg, rng)
        val_probs[name] = probabilities(nets[name], xv)
    weights = ensemble_weights(val_probs, yv)
    combined = sum(w * val_probs[n] for n, w in weights.items())
    validation = {n: {"balanced_accuracy": balanced_accuracy(yv, p >= 0.5), "accuracy": float(np.mean((p >= 0.5) == yv))}
                  for n, p in {**val_probs, "ensemble": combined}.items()}
    log.info("disc-herniation: ensemble weights %s, validation %s", weights, validation["ensemble"])
    description = {
        "name": "disc-herniation", "version": VERSION, "framework": "ultralytics YOLOv8 + MONAI/torchvision CNNs",
        "classes": list(data.CLASSES), "levels": list(data.LEVELS),
        "detectors": detectors, "detector_width": DETECTOR_WIDTH,
        "ensemble": {"members": list(MEMBERS), "weights": weights, "gradcam_layers": GRADCAM_LAYERS},
        "input": {"crop_pixels": data.CROP, "enlarge": data.ENLARGE, "context": data.CONTEXT, "lateral_mm": data.LATERAL_MM,
                  "channels": "the mid-sagittal slice and the slices lateral_mm to either side",
                  "slice": "mid-sagittal: the slice through most of the vertebral bodies"},
        "normalisation": "per volume: (x - p0.5) / (p99.5 - p0.5), clipped to [0, 1]; detectors see it as 8-bit; "
                         "each crop to zero mean, unit variance",
        "validation": {"seeds": [min(cfg.validation_seeds), max(cfg.validation_seeds)] if not cfg.data_dir else None,
                       "data": cfg.data_dir or "phantom", "crops": len(yv),
                       "herniated": int(yv.sum()), "classifiers": validation},
        "training": {**asdict(cfg), "crops": len(y), "herniated": int(y.sum()), "final_loss": losses,
                     "seconds": round(time.time() - t0, 1)},
        "commit": commit, "metrics": {},
    }
    state = {f"{name}.{k}": v for name, net in nets.items() for k, v in net.state_dict().items()}
    write_model_folder(out, state, description)
    return out
