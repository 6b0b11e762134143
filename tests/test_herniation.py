"""The `disc-herniation` pipeline: the YOLO and class-folder formats, naming of detected boxes, the
ensemble's weight search, the shipped model folder, results that validate (dciodvfy, dcmqi), and
the trainer end to end on a few studies."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipelines.herniation import MODEL_DIR, Model, name_boxes
from pipelines.registry import get
from pipelines.series import NoUsableSeries, read_series, sagittal_t2
from tests.conftest import dciodvfy_errors
from tests.node_helpers import dicomnode_cmd, dicomnode_env
from training.datasets import discs as data
from training.phantom.generator import PhantomOptions, generate_study
from training.trainers.herniation import ensemble_weights

BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"


def test_a_yolo_folder_reads_back_the_boxes_it_was_written_with(tmp_path: Path) -> None:
    images = [np.zeros((100, 80), np.uint8), np.zeros((60, 60), np.uint8)]
    boxes = [[(10.0, 20.0, 30.0, 50.0), (40.0, 5.0, 90.0, 75.0)], [(0.0, 0.0, 60.0, 60.0)]]
    data_yaml = data.write_yolo_folder(tmp_path, "train", images, boxes, data.DISC_NAMES)
    assert "train: images/train" in data_yaml.read_text() and "val: images/train" in data_yaml.read_text()
    read = data.read_yolo_folder(tmp_path, "train")
    assert [p.name for p, _ in read] == ["000000.png", "000001.png"]
    for (_, got), want in zip(read, boxes):
        assert [c for c, _ in got] == [0] * len(want)
        assert np.allclose([b for _, b in got], want, atol=1e-3)
    (tmp_path / "labels" / "train" / "000001.txt").write_text("0 0.5 0.5 1.0\n")
    with pytest.raises(ValueError, match=r"000001.txt:1: expected 'class x_centre y_centre width height'"):
        data.read_yolo_folder(tmp_path, "train")


def test_class_folders_read_back_as_standardised_crops(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    crops = rng.random((5, 3, data.CROP, data.CROP), dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 1])
    data.write_class_folders(tmp_path, crops, labels)
    x, y = data.read_class_folders(tmp_path)
    assert x.shape == crops.shape and sorted(y.tolist()) == sorted(labels.tolist())
    assert abs(float(x[0].mean())) < 1e-4 and float(x[0].std()) == pytest.approx(1.0, abs=1e-3)
    (tmp_path / "bulging").mkdir()
    with pytest.raises(ValueError, match=r"class folders \['bulging'\] are not among \['normal', 'herniated'\]"):
        data.read_class_folders(tmp_path)


def test_detected_boxes_take_the_names_of_the_segmented_discs() -> None:
    segmented = {lv: (20.0 * i, 10.0, 20.0 * i + 8, 50.0) for i, lv in enumerate(data.LEVELS, start=1)}
    detected = [(20.0 * i + 1, 11.0, 20.0 * i + 9, 49.0) for i in (5, 1, 2, 4)]  # L3/L4 missed, order shuffled
    named, problems = name_boxes(detected, segmented)
    assert named["L1/L2"] == ((21.0, 11.0, 29.0, 49.0), "detector") and named["L5/S1"][0][0] == 101.0
    assert named["L3/L4"] == (segmented["L3/L4"], "segmentation")
    assert problems == ["L3/L4: not detected; the segmentation's box is used"]
    # no segmentation: five boxes are named top down, any other count is not named
    named, problems = name_boxes(detected + [(61.0, 11.0, 69.0, 49.0)], {})
    assert [named[lv][0][0] for lv in data.LEVELS] == [21.0, 41.0, 61.0, 81.0, 101.0]
    named, problems = name_boxes(detected, {})
    assert named == {} and "4 discs detected (5 expected)" in problems[0]


def test_a_study_without_a_sagittal_t2_is_refused_with_what_it_holds(tmp_path: Path) -> None:
    generate_study(tmp_path, 5000, PhantomOptions(contrasts=("T1",), max_matrix=256), write_tissue=False)
    with pytest.raises(NoUsableSeries, match=r"reads a sagittal T2 series; the files hold T1 'SAG T1'"):
        sagittal_t2(read_series(sorted((tmp_path / "dicom").rglob("*.dcm"))), "disc-herniation")


def test_the_weight_search_favours_the_member_that_separates_the_classes() -> None:
    truth = np.array([0] * 40 + [1] * 10)
    rng = np.random.default_rng(1)
    good = np.clip(truth * 0.7 + rng.normal(0.15, 0.1, len(truth)), 0, 1)
    noise = rng.random(len(truth))
    w = ensemble_weights({"good": good, "noise": noise}, truth)
    assert w["good"] >= 0.8 and sum(w.values()) == pytest.approx(1.0)


def test_the_shipped_model_describes_itself() -> None:
    d = json.loads((MODEL_DIR / "model.json").read_text())
    assert d["name"] == "disc-herniation" and d["classes"] == list(data.CLASSES) and d["levels"] == list(data.LEVELS)
    assert set(d["detectors"]) == {"region", "discs"} and sum(d["ensemble"]["weights"].values()) == pytest.approx(1.0)
    assert d["metrics"]["detection"]["discs"]["map50"] > 0  # held-out figures recorded by `dicomnode evaluate disc-herniation`
    assert d["metrics"]["end_to_end_spine_seg"] == get("spine-seg").version  # re-measure it when spine-seg changes
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 15e6


@pytest.fixture(scope="module")
def herniated_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The first held-out phantom study (seeds from 5000, never trained on) with a herniated disc."""
    root = tmp_path_factory.mktemp("herniation")
    for seed in range(5000, 5100):
        folder = root / str(seed)
        generate_study(folder, seed, PhantomOptions(contrasts=("T2",), max_matrix=320), write_tissue=False)
        levels = json.loads((folder / "truth" / "truth.json").read_text())["levels"]
        if any(levels[lv]["herniation"] in data.HERNIATED for lv in data.LEVELS):
            return folder, levels
    raise AssertionError("no phantom study with a herniated disc among 100 seeds")


def test_process_reports_each_disc_with_its_box_and_a_gradcam_that_validate(herniated_study: tuple[Path, dict],
                                                                           tmp_path: Path) -> None:
    from structured_reports.reader import read_sr

    study, levels = herniated_study
    r = subprocess.run([*dicomnode_cmd(), "process", str(study / "dicom"), str(tmp_path), "--pipelines", "disc-herniation"],
                       capture_output=True, text=True, env=dicomnode_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    [result] = json.loads((tmp_path / "results.json").read_text())["studies"]
    found = result["findings"]["disc-herniation"]
    assert [lv for lv in data.LEVELS if lv in found] == list(data.LEVELS), found
    assert all(found[lv]["box_source"] == "detector" for lv in data.LEVELS), found
    # the trained model on a study it never saw: the disc it finds most likely herniated is herniated
    likeliest = max(data.LEVELS, key=lambda lv: found[lv]["probability"])
    assert levels[likeliest]["herniation"] in data.HERNIATED, (likeliest, found)
    paths = [tmp_path / o["path"] for o in result["outputs"]]
    assert sorted(str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in paths).count("SR") == 1
    assert len(paths) == 2  # the SR and one Grad-CAM map on the mid-sagittal slice
    for p in paths:
        assert dciodvfy_errors(p) == []
    [sr] = [p for p in paths if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]
    report = read_sr(pydicom.dcmread(sr))
    regions = {f.level: f.region for f in report.findings if f.kind == "disc_herniation"}
    assert set(regions) == set(data.LEVELS)
    for lv, region in regions.items():
        r0, c0, r1, c1 = found[lv]["box"]
        assert np.allclose(np.array(region.points)[:4], [(c0, r0), (c1, r0), (c1, r1), (c0, r1)], atol=0.1)
    out = tmp_path / "tid1500.json"
    r = subprocess.run([str(BIN / "tid1500reader"), "--inputDICOM", str(sr), "--outputMetadata", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {m["TrackingIdentifier"] for m in json.loads(out.read_text())["Measurements"]} == \
        {f"disc_herniation {lv}" for lv in data.LEVELS}


def test_training_writes_a_model_folder_that_detects_and_classifies(tmp_path: Path) -> None:
    from training.trainers.herniation import HerniationConfig, train

    cfg = HerniationConfig(train_seeds=list(range(7000, 7006)), validation_seeds=[7300, 7301], epochs=1, iterations=20,
                           jitter=1, workers=1)
    folder = train(cfg, tmp_path / "model", tmp_path / "cache")
    model = Model(folder)
    crops = np.random.default_rng(0).random((4, 3, data.CROP, data.CROP), dtype=np.float32)
    p = model.probabilities(crops)
    assert p.shape == (4,) and ((0 <= p) & (p <= 1)).all()
    heat = model.explain(crops[0])
    assert heat.shape == (data.CROP, data.CROP) and 0 <= heat.min() and heat.max() <= 1
    region, boxes = model.detect_discs(np.zeros((128, 128), np.uint8))  # one epoch finds nothing sure; it runs
    assert region is None or len(region) == 4
    d = json.loads((folder / "model.json").read_text())
    assert d["training"]["train_seeds"] == cfg.train_seeds and set(d["validation"]["classifiers"]) >= {"ensemble"}


def test_training_from_a_users_yolo_and_class_folders(tmp_path: Path) -> None:
    from training.trainers.herniation import HerniationConfig, train

    root = tmp_path / "data"
    for split, seeds in (("train", [7000, 7001, 7002]), ("val", [7300])):
        samples = data.DiscSamples()
        for seed in seeds:
            samples.extend(data.phantom_samples(seed, study_class="herniated_disc"))
        data.write_yolo_folder(root / "region", split, samples.region_images, samples.region_boxes, data.REGION_NAMES)
        data.write_yolo_folder(root / "discs", split, samples.disc_images, samples.disc_boxes, data.DISC_NAMES)
        data.write_class_folders(root / "crops" / split, *samples.arrays())
    cfg = HerniationConfig(epochs=1, iterations=20, data_dir=str(root))
    d = json.loads((train(cfg, tmp_path / "model", tmp_path / "cache") / "model.json").read_text())
    assert d["validation"]["data"] == str(root) and d["training"]["crops"] == 15
    (root / "discs" / "labels" / "val" / "000000.txt").write_text("0 0.5\n")
    with pytest.raises(ValueError, match=r"000000.txt:1: expected"):
        train(cfg, tmp_path / "again", tmp_path / "cache")
