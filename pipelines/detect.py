"""YOLOv8 detectors (ultralytics), kept off the network and on our own box convention.

Ultralytics looks for a font and for updates on first use; here nothing may reach the internet, so
before it is imported it gets a local font (any TTF named Arial.ttf in its config folder) and
offline mode. Boxes come back as (row0, col0, row1, col1) in pixels, as `training.datasets.discs`
writes them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

FONTS = (Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),)


def offline() -> None:
    """Environment for ultralytics: offline, config folder with a local font. Call before importing it."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    config = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".config" / "dicomnode-yolo")))
    font = config / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        source = next((f for f in FONTS if f.exists()), None)
        if source is not None:
            font.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, font)


def load(path: Path):
    """A trained detector (an ultralytics checkpoint) on the CPU."""
    offline()
    from ultralytics import YOLO

    if not Path(path).exists():
        raise FileNotFoundError(f"detector weights {path} are missing; rebuild the model folder with `dicomnode train`")
    return YOLO(str(path), task="detect")


def detect(model, image: np.ndarray, imgsz: int, conf: float = 0.25, device: str = "cpu") -> list[tuple[tuple[float, float, float, float], float]]:
    """Boxes and confidences, best first, on one 8-bit grey image."""
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    result = model.predict(rgb, imgsz=imgsz, conf=conf, device=device, verbose=False)[0]
    xyxy = result.boxes.xyxy.cpu().numpy()
    scores = result.boxes.conf.cpu().numpy()
    order = np.argsort(-scores)
    return [((float(xyxy[i, 1]), float(xyxy[i, 0]), float(xyxy[i, 3]), float(xyxy[i, 2])), float(scores[i])) for i in order]
