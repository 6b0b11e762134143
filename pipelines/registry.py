"""Pipelines by name: what the routing rules refer to.

A pipeline takes the files of one series (or study), a folder for its results and the configured
result encoding (`ResultOptions`), and returns the result files (DICOM objects) it wrote there,
usually through `structured_reports.writer.write_results`. `device` says where it runs: one GPU job at a time per GPU,
CPU jobs in parallel.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from structured_reports.model import ResultOptions

RunFn = Callable[[list[Path], Path, ResultOptions], list[Path]]


@dataclass(frozen=True)
class Pipeline:
    name: str
    run: RunFn
    device: str = "cpu"  # cpu | gpu
    version: str = "0"
    scope: str = "series"  # what it reads when named on `process --pipelines`: one series, or the whole study
    model_dir: Path | None = None  # the self-describing model folder (model.json) it runs
    load_model: Callable[..., object] | None = None  # its cached loader, to tell whether the model is in memory

    def describe(self) -> dict:
        """Name, device, version, whether the model is loaded, and the model folder's description and metrics."""
        model = None
        if self.model_dir is not None and (self.model_dir / "model.json").is_file():
            meta = json.loads((self.model_dir / "model.json").read_text())
            model = {k: meta.get(k) for k in ("name", "version", "framework", "commit", "training", "metrics")}
        cache = getattr(self.load_model, "cache_info", None)
        return {"Name": self.name, "Device": self.device, "Version": self.version, "Scope": self.scope,
                "Loaded": bool(cache and cache().currsize), "Model": model}


_REGISTRY: dict[str, Pipeline] = {}
BUILTIN = ("pipelines.spine_seg", "pipelines.lordosis", "pipelines.marrow", "pipelines.herniation",
           "pipelines.degeneration")  # imported on first lookup; torch only when they run


def register(p: Pipeline) -> Pipeline:
    _REGISTRY[p.name] = p
    return p


def _builtins() -> None:
    for module in BUILTIN:
        importlib.import_module(module)


def get(name: str) -> Pipeline:
    _builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no pipeline named {name!r} is installed (installed: {', '.join(sorted(_REGISTRY)) or 'none'})") from None


def names() -> list[str]:
    _builtins()
    return sorted(_REGISTRY)


def load_plugins(modules: list[str]) -> None:
    """Import modules that register more pipelines (the configuration's `plugins:`)."""
    for module in modules:
        importlib.import_module(module)
