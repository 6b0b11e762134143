"""Shared training machinery: seeding, masked losses, augmentation, checkpoints, model folders.

A model folder describes itself (`model.json`: network, classes, normalisation, data, commit,
metrics, version) beside its weights (`model.pt`), so inference needs only that folder.
"""

from __future__ import annotations

import functools
import json
import pickle
import platform
import random
import subprocess
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def seed_runs(seeds: list[int]) -> list[range]:
    """Runs of consecutive seeds, in order: what a seed list is cached and written as."""
    runs: list[range] = []
    for s in seeds:
        if runs and s == runs[-1].stop:
            runs[-1] = range(runs[-1].start, s + 1)
        else:
            runs.append(range(s, s + 1))
    return runs


def cached_runs(seeds: list[int], path_of: Callable[[range], Path], render: Callable[[int], Any], out: Any,
                workers: int, desc: str) -> Any:
    """`out` extended by `render(seed)` of every seed, rendered in `workers` processes and kept per
    run of consecutive seeds (in a new `type(out)`) at `path_of(run)`: adding seeds does not render
    the others again."""
    for run in seed_runs(seeds):
        path = path_of(run)
        if not path.exists():
            samples = type(out)()
            with ProcessPoolExecutor(workers) as pool:
                for s in tqdm(pool.map(render, run), total=len(run), desc=desc, unit="study"):
                    samples.extend(s)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pickle.dumps(samples))
        out.extend(pickle.loads(path.read_bytes()))
    return out


def seed_text(seeds: list[int]) -> str:
    """"8000-8299, 8400-8699": seeds as a person reads them."""
    return ", ".join(f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start) for r in seed_runs(seeds))


def git_commit(repo: Path = Path(__file__).resolve().parents[2]) -> str:
    """HEAD, with "+uncommitted" when tracked files differ from it: weights trained from code that was
    never committed must not pass for that commit's."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+uncommitted" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def edge_band(target: torch.Tensor, known: torch.Tensor, width: int = 2) -> torch.Tensor:
    """The known pixels within `width` pixels of another known class: where a label's edge lies
    (the border with what a partial label leaves unknown is no edge)."""
    t = target.float()[:, None]
    k = known[:, None]
    pool = functools.partial(torch.nn.functional.max_pool2d, kernel_size=2 * width + 1, stride=1, padding=width)
    high = pool(torch.where(k, t, -torch.inf))
    low = -pool(torch.where(k, -t, -torch.inf))
    return known & (high != low)[:, 0]


def masked_ce_dice(logits: torch.Tensor, target: torch.Tensor, ignore: int, dice_weight: float = 1.0,
                   edge_weight: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the pixels whose class is known (target < number of
    classes); `ignore` teaches nothing; values between the classes and `ignore` say "not class
    254 - value" and add -log(1 - p) of that class. What a partially labelled case does not label
    is never taught as background. `dice_weight` scales the Dice term (0: cross-entropy alone);
    `edge_weight` the cross-entropy of pixels in a label's edge band (1: every pixel alike), one for
    the batch or one per slice (a source whose truth's edges are exact may weigh them, another not)."""
    n = logits.shape[1]
    known = target < n
    ce = torch.nn.functional.cross_entropy(logits, torch.where(known, target, ignore).long(), ignore_index=ignore,
                                           reduction="none")
    per_slice = torch.as_tensor(edge_weight, dtype=logits.dtype).reshape(-1, 1, 1)
    weight = torch.where(edge_band(target, known), per_slice, 1.0) * known
    ce = (ce * weight).sum() / weight.sum().clamp(min=1e-6)
    prob = torch.softmax(logits, dim=1)
    negative = (target >= 254 - n + 1) & (target < ignore)
    loss = ce
    if negative.any():
        excluded = (254 - target[negative]).long()
        p_excluded = prob.permute(0, 2, 3, 1)[negative].gather(1, excluded[:, None])[:, 0]
        loss = loss + (-torch.log1p(-p_excluded.clamp(max=1 - 1e-6))).mean()
    probk = prob * known[:, None]
    onehot = torch.nn.functional.one_hot(torch.where(known, target, 0).long(), n).permute(0, 3, 1, 2)
    onehot = onehot * known[:, None]
    inter = (probk * onehot).sum(dim=(0, 2, 3))
    denom = probk.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    present = onehot.sum(dim=(0, 2, 3)) > 0
    dice = 1 - (2 * inter + 1e-5) / (denom + 1e-5)
    return loss + dice_weight * (dice[present].mean() if present.any() else 0 * ce)


def batched(fn: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """`fn` (tensor -> tensor) over `x` in batches, without gradients, as one array: inference on
    thousands of crops without holding all their activations at once."""
    with torch.inference_mode():
        return np.concatenate([fn(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])


def optimise(loss: torch.Tensor, opt: torch.optim.Optimizer, sched: Any, losses: list[float], bar: Any) -> None:
    """One optimiser and schedule step; the running mean loss goes on the progress bar."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    losses.append(loss.item())
    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")


def augment(image: np.ndarray, target: np.ndarray, rng: np.random.Generator, crop: int, ignore: int) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation (±15°), scale (0.85-1.2), crop; gamma, bias field, noise, blur, contrast
    inversion: what scanners vary and the phantom may not cover. `image` is [rows, cols] or
    [channel, rows, cols] (neighbouring slices, all moved alike); the result has a channel axis."""
    angle = np.deg2rad(rng.uniform(-15, 15))
    scale = rng.uniform(0.85, 1.2)
    c, s = np.cos(angle), np.sin(angle)
    matrix = np.array([[c, -s], [s, c]]) / scale
    # centre the crop on a random labelled point half of the time, so the spine is usually seen
    fg = np.argwhere((target > 0) & (target != ignore))
    centre = fg[rng.integers(len(fg))] if len(fg) and rng.random() < 0.7 else np.array(target.shape) / 2
    centre = centre + rng.uniform(-40, 40, size=2)
    offset = centre - matrix @ np.array([crop / 2, crop / 2])
    channels = image[None] if image.ndim == 2 else image
    img = np.stack([ndimage.affine_transform(ch, matrix, offset, output_shape=(crop, crop), order=1, cval=0.0)
                    for ch in channels])
    tgt = ndimage.affine_transform(target, matrix, offset, output_shape=(crop, crop), order=0, cval=ignore)
    img = np.clip(img, 0, 1) ** rng.uniform(0.7, 1.5)
    if rng.random() < 0.15:
        img = 1 - img  # unusual contrasts: fat-suppressed, inverted windows
    yy, xx = np.mgrid[0:crop, 0:crop] / crop
    img = img * (1 + rng.uniform(-0.3, 0.3) * (yy - 0.5) + rng.uniform(-0.3, 0.3) * (xx - 0.5))
    if rng.random() < 0.3:
        sigma = rng.uniform(0.5, 1.2)
        img = ndimage.gaussian_filter(img, (0, sigma, sigma))
    img = img + rng.normal(0, rng.uniform(0, 0.05), img.shape)
    return img.astype(np.float32), tgt.astype(np.uint8)


def random_contrast(image: np.ndarray, rng: np.random.Generator, knots: int = 5) -> np.ndarray:
    """Intensities in [0, 1] through a random piecewise-linear curve, not necessarily monotonic:
    tissues trade brightness as they do between sequences and scanners, so what is left to learn
    is shape (SynthSeg's idea, on images instead of tissue maps)."""
    return np.interp(np.clip(image, 0, 1), np.linspace(0, 1, knots), rng.uniform(0, 1, knots)).astype(np.float32)


def pad_to(image: np.ndarray, multiple: int = 16, value: float = 0.0) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad rows and columns up to a multiple (U-Net strides); returns the padded image and original shape."""
    r, c = image.shape[-2:]
    pr, pc = (-r) % multiple, (-c) % multiple
    pad = [(0, 0)] * (image.ndim - 2) + [(0, pr), (0, pc)]
    return np.pad(image, pad, constant_values=value), (r, c)


def machine() -> dict[str, Any]:
    """What trained a model. A training command repeats bit for bit on the same kind of CPU and
    libraries only (one recipe gave other weights on another processor kind), so this is recorded."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
             if ln.startswith("model name")] if cpuinfo.exists() else []
    return {"cpu": names[0] if names else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}


def write_model_folder(folder: Path, state: dict[str, torch.Tensor], description: dict[str, Any]) -> None:
    """Weights in half precision (a few MB) and the description beside them, with the machine that trained them."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, folder / "model.pt")
    (folder / "model.json").write_text(json.dumps({**description, "machine": machine()}, indent=1))


def read_description(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / "model.json").exists():
        raise FileNotFoundError(f"{folder} is not a model folder (no model.json); rebuild it with `dicomnode train`")
    return json.loads((folder / "model.json").read_text())


def read_model_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    description = read_description(folder)
    state = torch.load(Path(folder) / "model.pt", map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, description
