"""Grad-CAM (Selvaraju et al. 2017) for our networks: which image regions drove a decision.

The decision is any scalar of the network's output (a class logit for a classifier; for a
segmentation network, the summed logit of one class inside one structure). Maps come back in
[0, 1] at the input's size, ready for `structured_reports.explain`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def grad_cam(net: torch.nn.Module, layer: str, x: torch.Tensor, decision: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Grad-CAM of `decision(net(x))` at the output of the named layer, for one input (batch 1)."""
    module = dict(net.named_modules())[layer]
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    try:
        net.zero_grad()
        with torch.enable_grad():
            score = decision(net(x))
            grads = torch.autograd.grad(score, store["a"])[0]
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * store["a"]).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0].detach().cpu().numpy()
    return (cam / cam.max()).astype(np.float32) if cam.max() > 0 else cam.astype(np.float32)


def segmentation_decision(class_index: int, region: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    """The summed logit of one class inside a region (e.g. the disc class inside the L4/L5 disc)."""
    where = torch.from_numpy(region.astype(np.float32))

    def score(logits: torch.Tensor) -> torch.Tensor:
        return (logits[0, class_index] * where.to(logits.device)).sum()
    return score


def crop_to_slice(heatmap: np.ndarray, points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A crop's map back onto its source slice; the crop was sampled at `points` [2, n, n] (row, col),
    an axis-aligned square grid on that slice."""
    r0, c0 = points[0, 0, 0], points[1, 0, 0]
    dr, dc = points[0, 1, 0] - r0, points[1, 0, 1] - c0
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    out = ndimage.map_coordinates(heatmap, [(rows - r0) / dr, (cols - c0) / dc], order=1, mode="constant", cval=0.0)
    return np.clip(out, 0, 1).astype(np.float32)
