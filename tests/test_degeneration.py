"""The `degeneration` pipeline: the RSNA metric, crops located on real geometry, the shipped model
folder, results that validate (dciodvfy, dcmqi), missing series said plainly, and the trainer end
to end on a few studies."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipelines.degeneration import MODEL_DIR, Model
from pipelines.registry import get
from tests.conftest import dciodvfy_errors
from tests.node_helpers import dicomnode_cmd, dicomnode_env
from training.datasets import degeneration as data
from training.evaluation.metrics import rsna_score
from training.phantom.generator import PhantomOptions, design_study, generate_study

BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"


def test_the_rsna_score_weighs_grades_one_two_four_and_adds_any_severe_spinal() -> None:
    truth = {c: {(1, lv): 0 for lv in data.LEVELS} for c in data.CONDITIONS}
    truth["spinal_canal_stenosis"][(1, "L4/L5")] = 2  # one severe canal level
    truth["left_subarticular_stenosis"][(1, "L3/L4")] = 1
    uniform = {c: {k: np.full(3, 1 / 3) for k in truth[c]} for c in data.CONDITIONS}
    s = rsna_score(truth, uniform)
    assert s["spinal_canal_stenosis"] == pytest.approx(math.log(3))
    assert s["any_severe_spinal"] == pytest.approx(-math.log(1 / 3))  # one positive study, P(severe) 1/3
    perfect = {c: {k: np.eye(3)[g] * 0.999 + 0.0005 for k, g in truth[c].items()} for c in data.CONDITIONS}
    assert rsna_score(truth, perfect)["score"] < 0.01
    wrong = {c: {k: np.array([0.98, 0.01, 0.01]) for k in truth[c]} for c in data.CONDITIONS}  # always normal-mild
    w = rsna_score(truth, wrong)
    # canal: 4 normal levels at -log 0.98, the severe one at -log 0.01 with weight 4, over weights 4 + 4
    assert w["spinal_canal_stenosis"] == pytest.approx((4 * -math.log(0.98) + 4 * -math.log(0.01)) / 8)



def test_the_study_svm_reads_each_finding_wherever_its_level_is() -> None:
    from training.trainers.degeneration import STUDY_READS, study_features

    normal = np.tile([0.9, 0.07, 0.03], (data.heads("canal"), 1))
    herniated = normal.copy()
    herniated[1] = [0.2, 0.3, 0.5]  # canal head 1: herniation, P(>= moderate) 0.8, P(severe) 0.5
    axial = {lv: np.tile([0.9, 0.07, 0.03], (data.heads("axial"), 1)) for lv in data.LEVELS}
    at_l2 = study_features({"canal": {lv: herniated if lv == "L2/L3" else normal for lv in data.LEVELS}, "axial": axial})
    at_l5 = study_features({"canal": {lv: herniated if lv == "L5/S1" else normal for lv in data.LEVELS}, "axial": axial})
    none = study_features({"canal": {lv: normal for lv in data.LEVELS}, "axial": axial})
    np.testing.assert_allclose(at_l2, at_l5, rtol=1e-6)
    assert not np.allclose(at_l2, none)
    sagittal, axial_read, reads = STUDY_READS.index(("canal", "herniation")), STUDY_READS.index(("axial", "herniation")), len(STUDY_READS)
    assert at_l2[sagittal * 2] == pytest.approx(0.8) and at_l2[sagittal * 2 + 1] == pytest.approx(0.5)  # largest over levels
    assert at_l2[2 * reads + sagittal * 2] == pytest.approx(0.8 + 4 * 0.1)  # summed over levels
    assert at_l2[axial_read * 2] == pytest.approx(0.1)  # the axial network saw no herniation
    # no axial series: the sagittal reading of herniation stands in for the axial one
    no_axial = study_features({"canal": {lv: herniated if lv == "L2/L3" else normal for lv in data.LEVELS}})
    assert no_axial[axial_read * 2] == pytest.approx(0.8)
    assert study_features({"canal": {"L4/L5": herniated}}).shape == none.shape  # a level not located counts as nothing found


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A held-out phantom study (never trained on) with sagittal T1, T2 and an axial T2, with canal stenosis."""
    seed = next(s for s in range(5000, 5060) if design_study(s, PhantomOptions()).study_class == "spinal_stenosis")
    folder = tmp_path_factory.mktemp("degeneration") / str(seed)
    generate_study(folder, seed, PhantomOptions(contrasts=("T1", "T2"), axial=True, max_matrix=320), write_tissue=False)
    return folder


def test_crops_are_found_for_every_level_on_every_view(study: Path) -> None:
    from pipelines.series import read_series
    from training.datasets.spine_seg import normalise

    files = sorted((study / "dicom").rglob("*.dcm"))
    t2 = next(s for s in read_series(files) if s.weighting == "T2")
    t1 = next(s for s in read_series(files) if s.weighting == "T1")
    [axial] = read_series(files, plane="axial")
    truth = json.loads((study / "truth" / "truth.json").read_text())
    labels = {s["description"]: np.load(study / "truth" / s["labels_file"])["labels"] for s in truth["series"]}
    l2, l1 = data.by_instance(labels["SAG T2"], t2), data.by_instance(labels["SAG T1"], t1)
    canal = data.canal_crops(t2, l2, normalise(t2.volume))
    assert list(canal) == list(data.LEVELS) and all(c.image.shape == (3, data.CROP, data.CROP) for c in canal.values())
    foramina = data.foramen_crops(t1, l1, normalise(t1.volume))
    assert set(foramina) == {(side, lv) for side in ("left", "right") for lv in data.LEVELS}
    ax = data.axial_crops(t2, l2, axial, normalise(axial.volume))
    assert list(ax) == list(data.LEVELS)
    # each level's axial crop comes from that level's block of three slices, the middle one on the disc
    mid, anchors = data.sagittal_anchors(l2, t2.spacing)
    for i, lv in enumerate(data.LEVELS):
        point = t2.patient_points(mid, np.array([anchors[lv].disc[0]]), np.array([anchors[lv].disc[1]]))[0]
        distances = [data._to_pixels(ds, point, axial.spacing)[1] for ds in axial.datasets]
        assert int(axial.datasets[int(np.argmin(distances))].InstanceNumber) == 3 * i + 2


def test_the_shipped_model_describes_itself() -> None:
    d = json.loads((MODEL_DIR / "model.json").read_text())
    assert d["name"] == "degeneration" and d["conditions"] == list(data.CONDITIONS) and d["grades"] == list(data.GRADES)
    assert d["study"]["chosen"] in ("cnn", "cnn_svm") and d["metrics"]["rsna"]["score"] > 0
    assert d["metrics"]["end_to_end_spine_seg"] == get("spine-seg").version  # re-measure it when spine-seg changes
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 15e6


def test_process_grades_every_level_and_labels_the_study_with_results_that_validate(study: Path, tmp_path: Path) -> None:
    from structured_reports.reader import read_sr

    r = subprocess.run([*dicomnode_cmd(), "process", str(study / "dicom"), str(tmp_path), "--pipelines", "degeneration"],
                       capture_output=True, text=True, env=dicomnode_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    [result] = json.loads((tmp_path / "results.json").read_text())["studies"]
    found = result["findings"]["degeneration"]
    assert found["problems"] == []
    for lv in data.LEVELS:
        assert set(found[lv]) == set(data.CONDITIONS)
        for v in found[lv].values():
            assert v["label"] in data.GRADES and sum(v["probabilities"]) == pytest.approx(1, abs=1e-3)
    assert found["study"]["label"] in data.STUDY_CLASSES
    paths = [tmp_path / o["path"] for o in result["outputs"]]
    # the SR and a Grad-CAM map per image decided on: the mid-sagittal T2 (canal grades, and the
    # CNN-SVM's study label; the plain CNN's has a map of its own), a T1 slice either side (foramina),
    # the five axial slices through the discs (recesses)
    assert len(paths) == 1 + 1 + 2 + 5 + (found["study"]["model"] == "cnn")
    for p in paths:
        assert dciodvfy_errors(p) == []
    [sr] = [p for p in paths if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]
    report = read_sr(pydicom.dcmread(sr))
    assert len([f for f in report.findings if f.kind in data.CONDITIONS]) == 25
    assert [(f.level, f.grade) for f in report.findings if f.kind == "study_class"] == [("lumbar spine", found["study"]["label"])]
    out = tmp_path / "tid1500.json"
    r = subprocess.run([str(BIN / "tid1500reader"), "--inputDICOM", str(sr), "--outputMetadata", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(out.read_text())["Measurements"]) == 26


def test_a_study_without_t1_or_axial_is_graded_where_it_can_be_and_says_what_is_missing(tmp_path: Path) -> None:
    from pipelines.degeneration import assess

    generate_study(tmp_path / "s", 5001, PhantomOptions(contrasts=("T2",), max_matrix=256), write_tissue=False)
    a = assess(sorted((tmp_path / "s" / "dicom").rglob("*.dcm")))
    assert a.problems == ["no sagittal T1: the neural foramina are graded on the T2 series",
                          "no axial T2 series: subarticular stenosis not graded"]
    graded = {c for lv in a.grades.values() for c in lv}
    assert "spinal_canal_stenosis" in graded and not any("subarticular" in c for c in graded)


def test_a_model_folder_from_another_version_says_to_rebuild_it(tmp_path: Path) -> None:
    import pickle
    import shutil

    from sklearn.svm import SVC

    folder = tmp_path / "old"
    shutil.copytree(MODEL_DIR, folder)
    (folder / "study_svm.pkl").write_bytes(pickle.dumps(SVC().fit(np.eye(4), [0, 1, 2, 3])))
    with pytest.raises(ValueError, match="reads 4 values per study.*rebuild it with `dicomnode train degeneration`"):
        Model(folder)


def _render_marked(seed: int, marks: Path) -> list[str]:
    """A stand-in study renderer (run in worker processes) that leaves a mark per rendering."""
    with open(marks / str(seed), "a") as f:
        f.write("rendered\n")
    return [f"study {seed}"]


def test_training_samples_are_cached_per_run_of_seeds_so_more_seeds_render_only_themselves(tmp_path: Path) -> None:
    import functools

    from dicomnode.cli import _seeds
    from training.trainers.common import cached_runs, seed_text

    render = functools.partial(_render_marked, marks=tmp_path)
    paths: list[Path] = []

    def path(run: range) -> Path:
        paths.append(tmp_path / f"{run.start}-{run.stop - 1}.pkl")
        return paths[-1]

    assert cached_runs(_seeds("1-3,7-8"), path, render, [], 2, "test") == ["study 1", "study 2", "study 3", "study 7", "study 8"]
    assert cached_runs(_seeds("1-3,7-8,20"), path, render, [], 2, "test")[-1] == "study 20"
    assert [p.name for p in paths] == ["1-3.pkl", "7-8.pkl", "1-3.pkl", "7-8.pkl", "20-20.pkl"]
    assert {f.name: f.read_text() for f in tmp_path.iterdir() if f.suffix != ".pkl"} == {
        str(s): "rendered\n" for s in (1, 2, 3, 7, 8, 20)}  # each seed once: the second call rendered only 20
    assert seed_text(_seeds("1-3,7-8,20")) == "1-3, 7-8, 20"


def test_training_writes_a_model_folder_that_grades(tmp_path: Path) -> None:
    from training.trainers.degeneration import DegenerationConfig, train

    by_class: dict[str, list[int]] = {}
    for seed in range(8000, 8100):  # two training studies of each class, one validation study
        by_class.setdefault(design_study(seed, PhantomOptions()).study_class, []).append(seed)
    train_seeds = sorted(s for seeds in by_class.values() for s in seeds[:2])
    cfg = DegenerationConfig(train_seeds=train_seeds, validation_seeds=[by_class["healthy"][2], by_class["spondylosis"][2]],
                             iterations=20, workers=1)
    model = Model(train(cfg, tmp_path / "model", tmp_path / "cache"))
    crops = np.random.default_rng(0).random((3, 3, data.CROP, data.CROP), dtype=np.float32)
    p = model.grades("axial", crops)
    assert p.shape == (3, data.heads("axial"), 3) and np.allclose(p.sum(-1), 1, atol=1e-5)
    levels = ("L4/L5", "L5/S1")
    study = model.study(np.random.default_rng(1).random((3, data.STUDY_CROP, data.STUDY_CROP), dtype=np.float32),
                        {"canal": dict(zip(levels, model.grades("canal", crops[:2]))), "axial": dict(zip(levels, p[:2]))})
    assert set(study) == {"cnn", "cnn_svm"} and all(v.shape == (4,) for v in study.values())
