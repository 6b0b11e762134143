"""The `marrow` pipeline: crops, fusion of series, the shipped model folder, results that validate,
and the trainer end to end on a few studies."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from pipelines.explain import crop_to_slice
from pipelines.marrow import MODEL_DIR, Model, fuse
from pipelines.registry import get
from tests.conftest import dciodvfy_errors
from tests.node_helpers import dicomnode_cmd, dicomnode_env
from training.datasets.marrow import CLASSES, CROP, vertebra_crop
from training.phantom.generator import PhantomOptions, generate_study


def test_a_crop_is_centred_on_its_body_and_its_map_lands_back_on_the_body() -> None:
    volume = np.zeros((5, 200, 160), dtype=np.float32)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[1:4, 80:110, 50:90] = True  # 30 rows x 40 columns at 0.8 x 0.5 mm: 24 x 20 mm
    mask[2, 78:112, 48:92] = True  # the middle slice is the largest
    volume[mask] = 1.0
    crop, k, points = vertebra_crop(volume, mask, (0.8, 0.5))
    assert k == 2 and crop.shape == (3, CROP, CROP)
    middle = crop[1]
    assert abs(crop.mean()) < 1e-5 and crop.std() == pytest.approx(1.0, abs=1e-4)  # standardised
    assert middle[CROP // 2, CROP // 2] == pytest.approx(middle.max()) and middle[0, 0] == pytest.approx(middle.min())
    rows, cols = np.nonzero(middle > (middle.max() + middle.min()) / 2)  # the body in the middle, a margin all round
    assert abs(rows.mean() - (CROP - 1) / 2) < 1.5 and abs(cols.mean() - (CROP - 1) / 2) < 1.5
    assert rows.min() > 2 and cols.min() > 2 and rows.max() < CROP - 3 and cols.max() < CROP - 3
    heat = np.zeros((CROP, CROP), dtype=np.float32)
    heat[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = 1.0
    back = crop_to_slice(heat, points, volume.shape[1:])
    hit = back > 0.5
    overlap = (hit & mask[2]).sum() / hit.sum()
    assert overlap > 0.9 and (hit & mask[2]).sum() / mask[2].sum() > 0.8


def test_series_are_fused_as_independent_evidence() -> None:
    prior = np.array([0.8, 0.05, 0.05, 0.05, 0.05])
    t1 = np.array([0.1, 0.45, 0.0, 0.45, 0.0])  # dark on T1: Modic 1 or 3
    t2 = np.array([0.1, 0.45, 0.45, 0.0, 0.0])  # bright on T2: Modic 1 or 2
    fused = fuse([t1, t2], prior)
    assert CLASSES[int(np.argmax(fused))] == "modic1" and fused.sum() == pytest.approx(1.0)
    assert np.allclose(fuse([t2], prior), t2, atol=1e-5)  # one series: its own probabilities


def test_the_shipped_marrow_model_describes_itself() -> None:
    d = json.loads((MODEL_DIR / "model.json").read_text())
    assert d["name"] == "marrow" and d["classes"] == list(CLASSES)
    assert set(d["validation"]["classifiers"]) == {"KNN", "SVM", "DT", "MLP", "RF", "HistGradientBoosting", "AdaBoost",
                                                   "PassiveAggressive", "LogisticRegression"}
    assert d["classifier"]["name"] in d["validation"]["classifiers"]
    assert d["metrics"]["per_body"]["f1"] > 0  # held-out figures recorded by `dicomnode evaluate marrow`
    assert d["metrics"]["end_to_end_spine_seg"] == get("spine-seg").version  # re-measure it when spine-seg changes
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 15e6


@pytest.fixture(scope="module")
def abnormal_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The first held-out phantom study (seeds from 5000, never trained on) with a changed body."""
    root = tmp_path_factory.mktemp("marrow")
    for seed in range(5000, 5100):
        folder = root / str(seed)
        generate_study(folder, seed, PhantomOptions(contrasts=("T2", "T1", "STIR"), max_matrix=320), write_tissue=False)
        levels = json.loads((folder / "truth" / "truth.json").read_text())["levels"]
        if any(v.get("marrow", "normal") != "normal" for v in levels.values()):
            return folder, levels
    raise AssertionError("no phantom study with a marrow change among 100 seeds")


def test_process_reports_each_body_with_sr_and_gradcam_that_validate(abnormal_study: tuple[Path, dict], tmp_path: Path) -> None:
    from structured_reports.reader import read_sr

    study, levels = abnormal_study
    r = subprocess.run([*dicomnode_cmd(), "process", str(study / "dicom"), str(tmp_path), "--pipelines", "marrow"],
                       capture_output=True, text=True, env=dicomnode_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    [result] = json.loads((tmp_path / "results.json").read_text())["studies"]
    found = result["findings"]["marrow"]
    bodies = [lv for lv in ("L1", "L2", "L3", "L4", "L5", "S1") if lv in found]
    assert len(bodies) >= 5, found
    for lv in bodies:
        assert found[lv]["label"] in ("normal", "abnormal") and 0 <= found[lv]["probability"] <= 1
        assert found[lv]["type"] in CLASSES
    # the trained model on a study it never saw: the body it finds most likely abnormal is abnormal
    likeliest = max(bodies, key=lambda lv: found[lv]["probability"])
    assert levels[likeliest]["marrow"] != "normal", (likeliest, found)
    paths = [tmp_path / o["path"] for o in result["outputs"]]
    modalities = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in paths)
    assert modalities.count("SR") == 1 and len(paths) == 1 + len(bodies)  # one Grad-CAM map per decision
    for p in paths:
        assert dciodvfy_errors(p) == []
    [sr] = [p for p in paths if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]
    report = read_sr(pydicom.dcmread(sr))
    assert {(f.kind, f.level) for f in report.findings} >= {("modic_change", lv) for lv in bodies}


def test_training_writes_a_model_folder_that_classifies(tmp_path: Path) -> None:
    from training.trainers.marrow import MarrowConfig, train

    cfg = MarrowConfig(train_seeds=list(range(6000, 6010)), validation_seeds=[6160, 6161], iterations=15, jitter=1,
                       widths=(8, 16, 32, 64), depths=(1, 1, 1, 1), workers=1)
    folder = train(cfg, tmp_path / "marrow", tmp_path / "cache")
    machine = json.loads((folder / "model.json").read_text())["machine"]  # weights repeat on the same CPU kind only
    assert machine["cpu"] and machine["torch"] == torch.__version__ and machine["threads"] >= 1
    model = Model(folder)
    crops = np.random.default_rng(0).random((4, 3, CROP, CROP), dtype=np.float32)
    p = model.probabilities(crops)
    assert p.shape == (4, len(CLASSES)) and np.allclose(p.sum(axis=1), 1)
    heat = model.explain(crops[0], 1)
    assert heat.shape == (CROP, CROP) and 0 <= heat.min() and heat.max() <= 1
