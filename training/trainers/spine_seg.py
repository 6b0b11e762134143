"""Training of `spine-seg`: a 2-D MONAI U-Net on sagittal slices (1 mm grid by default) of phantom studies and real
cases together (partial labels masked out of the loss), resumable from its checkpoint."""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipelines.spine_seg import Network, structure_codes
from training.datasets import spine_seg as data
from training.datasets.real_lumbar import DEFAULT_DIR, RealCase, case_paths, load_case
from training.trainers.common import (augment, git_commit, masked_ce_dice, optimise, pad_to, random_contrast, read_model_folder,
                                      seed_everything, write_model_folder)

log = logging.getLogger("dicomnode.train")

VERSION = "1.6"  # 1.2: real share 0.6, S1 labelled in the real cases from 1.1 (--s1-from); 1.3: three test-time grids; 1.4: random contrast on a fifth of the real slices (--random-contrast 0.2 --random-contrast-real-only); 1.5: 1.4's recipe at 5000 iterations (--iterations 5000); 1.6: 1.5's recipe on a 0.75 mm grid (--grid-mm 0.75 --crop 256)


@dataclass
class SpineSegConfig:
    phantom_seeds: list[int] = field(default_factory=lambda: list(range(1000, 1060)))
    real_cases: list[str] | None = None  # None: every real case
    real_dir: str = str(DEFAULT_DIR)
    iterations: int = 2500  # 8000 and real_fraction 0.5 gave candidate 1.3 (docs/models/spine-seg-history.md)
    batch: int = 8
    crop: int = 192  # pixels of the working grid
    grid_mm: float = data.GRID_MM  # the working grid's pixel size
    lr: float = 2e-3
    real_fraction: float = 0.4  # share of each batch drawn from real slices
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    context: int = 0  # neighbouring slices on either side as extra input channels: 0 is 2-D, 1 is 2.5-D
    beyond_ends: bool = False  # real cases: below L5 is no lumbar body, above the L1/L2 disc no disc
    run_rows: bool = True  # real cases: unlabelled voxels in the rows inside the labelled run, lateral slices too, are not that kind
    fov_end: float = 0.0  # share of phantom slices whose field of view ends inside S1, as real series do
    random_contrast: float = 0.0  # share of slices whose intensities go through a random curve (common.random_contrast)
    random_contrast_real_only: bool = False  # the phantom keeps its designed contrasts (random ones cost its Dice)
    s1_from: str | None = None  # a trained spine-seg model folder: S1 in the real cases where it marks bone below L5
    dice_weight: float = 1.0  # weight of the soft Dice term beside cross-entropy
    edge_weight: float = 1.0  # cross-entropy weight of pixels within 2 of a label's edge (common.edge_band)
    edge_weight_phantom_only: bool = False  # the phantom's edges are exact; the manual masks' follow a hand
    init_from: str | None = None  # a trained spine-seg model folder whose weights the run starts from (fine-tuning)
    head_by_source: bool = False  # one output head for phantom slices, one for real: each learns its truth's edges; inference reads the real one
    seed: int = 0
    workers: int = 2


HEADS = ("phantom", "real")  # the output heads of a network trained with head_by_source, in channel order


def network(channels: tuple[int, ...] = SpineSegConfig.channels, in_channels: int = 1, heads: int = 1) -> torch.nn.Module:
    """The U-Net; with `heads` > 1 its output holds that many sets of class logits, one after the other."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=heads * len(data.CLASSES), channels=tuple(channels),
                strides=(2,) * (len(channels) - 1), num_res_units=1, norm="batch")


def collect(cfg: SpineSegConfig, cache: Path) -> tuple[data.Slices, data.Slices]:
    """Phantom and real training slices, cached in `cache` (rendering the phantom takes minutes)."""
    s1_from = Network(Path(cfg.s1_from), "cpu") if cfg.s1_from else None  # a wrong folder fails before the rendering
    paths = {path.stem: path for path in case_paths(Path(cfg.real_dir))}  # a case's id is its file name
    missing = sorted(set(cfg.real_cases or []) - set(paths))
    if missing:
        raise ValueError(f"real cases {missing} are not in {cfg.real_dir}")
    cases = [load_case(path) for cid, path in paths.items() if cfg.real_cases is None or cid in cfg.real_cases]
    suffix = (f"-v{data.PHANTOM_DATA_VERSION}" + (f"-context{cfg.context}" if cfg.context else "")
              + (f"-grid{cfg.grid_mm:g}" if cfg.grid_mm != data.GRID_MM else ""))
    phantom_file = cache / f"phantom-{min(cfg.phantom_seeds)}-{max(cfg.phantom_seeds)}-{len(cfg.phantom_seeds)}{suffix}.npz"
    if phantom_file.exists():
        phantom = data.load(phantom_file)
    else:
        phantom = data.Slices([], [], [])
        with ProcessPoolExecutor(cfg.workers) as pool:
            render = functools.partial(data.phantom_slices, context=cfg.context, grid=cfg.grid_mm)
            for s in tqdm(pool.map(render, cfg.phantom_seeds), total=len(cfg.phantom_seeds),
                          desc="phantom studies", unit="study"):
                phantom.extend(s)
        data.save(phantom, phantom_file)
    real = data.Slices([], [], [])
    for case in tqdm(cases, desc="real cases", unit="case", disable=s1_from is None):
        s1 = data.s1_below_l5(case, classes_of(s1_from, case)) if s1_from else None
        real.extend(data.real_slices(case, cfg.context, cfg.beyond_ends, cfg.run_rows, s1, cfg.grid_mm))
    return phantom, real


def classes_of(net: Network, case: RealCase) -> np.ndarray:
    """A trained network's classes on every sagittal slice of a real case, [SI, AP, LR]."""
    image = np.moveaxis(data.normalise(case.image), 2, 0)  # sagittal slices first
    padded, (rows, cols) = pad_to(image)
    out = []
    with torch.inference_mode():
        for i in range(0, len(padded), 8):
            out.append(net.logits(padded, slice(i, i + 8)).argmax(1).numpy()[:, :rows, :cols].astype(np.uint8))
    return np.moveaxis(np.concatenate(out), 0, 2)


def _batch(pool: data.Slices, n: int, rng: np.random.Generator, crop: int,
           fov_end: float = 0.0, contrast: float = 0.0, grid: float = data.GRID_MM) -> tuple[np.ndarray, np.ndarray]:
    pairs = []
    for i in rng.integers(len(pool.images), size=n):
        image, target = pool.images[i], pool.targets[i]
        if fov_end and rng.random() < fov_end:
            image, target = data.end_field_of_view(image, target, rng, grid)
        image, target = augment(image, target, rng, crop, data.IGNORE)
        if contrast and rng.random() < contrast:
            image = random_contrast(image, rng)
        pairs.append((image, target))
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def training_batch(phantom: data.Slices, real: data.Slices, n_real: int, cfg: SpineSegConfig,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One batch: `n_real` real slices after the phantom ones, each augmented, `cfg.random_contrast`
    of them through a random intensity curve (of the real ones alone with `random_contrast_real_only`)."""
    phantom_contrast = 0.0 if cfg.random_contrast_real_only else cfg.random_contrast
    xs, ys = _batch(phantom, cfg.batch - n_real, rng, cfg.crop, cfg.fov_end, phantom_contrast, cfg.grid_mm)
    if n_real:
        xr, yr = _batch(real, n_real, rng, cfg.crop, contrast=cfg.random_contrast)
        xs, ys = np.concatenate([xs, xr]), np.concatenate([ys, yr])
    return xs, ys


def edge_weights(cfg: SpineSegConfig, n_real: int) -> torch.Tensor:
    """Each slice's edge weight in a batch (phantom slices first): with `edge_weight_phantom_only` the
    real slices' edges weigh as much as any pixel."""
    w = torch.full((cfg.batch,), cfg.edge_weight)
    if cfg.edge_weight_phantom_only:
        w[cfg.batch - n_real:] = 1.0
    return w


def by_source(logits: torch.Tensor, n_phantom: int) -> torch.Tensor:
    """Each slice's class logits from its own source's head (HEADS order): a batch's first `n_phantom`
    slices are phantom ones, the rest real, so neither source's truth pulls at the other's edges."""
    n = len(data.CLASSES)
    return torch.cat([logits[:n_phantom, :n], logits[n_phantom:, n:2 * n]])


def _initial_weights(cfg: SpineSegConfig) -> dict[str, torch.Tensor] | None:
    """The `init_from` folder's weights, if any, once its network is known to match this run's."""
    if not cfg.init_from:
        return None
    state, described = read_model_folder(Path(cfg.init_from))

    def network_of(channels: list[int], inputs: int, heads: bool) -> str:
        return f"channels {channels}, {inputs} input slices and {'a head per source' if heads else 'one head'}"

    theirs = (described["network"]["channels"], described["network"]["in_channels"], "heads" in described["network"])
    ours = (list(cfg.channels), 2 * cfg.context + 1, cfg.head_by_source)
    if theirs != ours:
        raise ValueError(f"cannot start from {cfg.init_from}: its network has {network_of(*theirs)}, "
                         f"this run {network_of(*ours)}")
    return state


def train(cfg: SpineSegConfig, out: Path, cache: Path) -> Path:
    """Train and write the model folder `out`; `out/checkpoint.pt` lets an interrupted run resume."""
    if cfg.crop <= 0 or cfg.crop % 16 or cfg.grid_mm <= 0 or cfg.edge_weight <= 0:
        raise ValueError(f"spine-seg training crop {cfg.crop} must be a multiple of 16 (U-Net strides), at least 16, "
                         f"and the grid ({cfg.grid_mm} mm) and the edge weight ({cfg.edge_weight}) positive")
    rng = seed_everything(cfg.seed)
    commit = git_commit()  # the code that trains, not whatever is checked out when it ends
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    initial = _initial_weights(cfg)  # a folder that does not fit fails before the rendering
    phantom, real = collect(cfg, cache)
    log.info("training on %d phantom and %d real slices", len(phantom.images), len(real.images))
    heads = len(HEADS) if cfg.head_by_source else 1
    net = network(cfg.channels, 2 * cfg.context + 1, heads)  # after collect, whose --s1-from network draws from the seeded RNG too
    if initial:
        net.load_state_dict(initial)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.iterations, pct_start=0.1)
    start, losses = 0, []
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, losses = state["iteration"], state["losses"]
        rng = np.random.default_rng([cfg.seed, start])
        log.info("resuming at iteration %d", start)
    n_real = round(cfg.batch * cfg.real_fraction) if real.images else 0
    t0 = time.time()
    net.train()
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="spine-seg", unit="it")
    for it in bar:
        xs, ys = training_batch(phantom, real, n_real, cfg, rng)
        logits = net(torch.from_numpy(xs))
        if heads > 1:
            logits = by_source(logits, cfg.batch - n_real)
        loss = masked_ce_dice(logits, torch.from_numpy(ys), data.IGNORE, cfg.dice_weight, edge_weights(cfg, n_real))
        optimise(loss, opt, sched, losses, bar)
        if (it + 1) % 250 == 0 or it + 1 == cfg.iterations:
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "iteration": it + 1, "losses": losses}, ckpt)
    description = {
        "name": "spine-seg", "version": VERSION, "framework": "monai.networks.nets.UNet",
        "network": {"spatial_dims": 2, "in_channels": 2 * cfg.context + 1, "context_slices": cfg.context,
                    "channels": list(cfg.channels), "num_res_units": 1,
                    **({"heads": list(HEADS), "inference_head": "real"} if heads > 1 else {})},
        "classes": list(data.CLASSES), "grid_mm": cfg.grid_mm,
        "test_time_grids_mm": [round(cfg.grid_mm * f, 4) for f in data.TEST_TIME_SCALES],
        "normalisation": "per volume: (x - p0.5) / (p99.5 - p0.5), clipped to [0, 1]",
        "levels": "named after inference by anatomy: bodies counted up from S1 (L5, L4, ...), discs between them",
        "structures": structure_codes(),
        "training": {**asdict(cfg), "phantom_slices": len(phantom.images), "real_slices": len(real.images),
                     "real_case_ids": sorted({o.split(":", 1)[1] for o in real.origin}),
                     "final_loss": float(np.mean(losses[-100:])), "seconds": round(time.time() - t0, 1)},
        "commit": commit, "metrics": {},
    }
    write_model_folder(out, net.state_dict(), description)
    return out
