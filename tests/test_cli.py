"""The `dicomnode` command as users run it: a real process, real files, clear errors."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np

from tests.conftest import read_series
from tests.node_helpers import dicomnode_cmd, dicomnode_env


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*dicomnode_cmd(), *args], capture_output=True, text=True, env=dicomnode_env(**env))


def test_phantom_command_writes_dicom_and_truth(tmp_path: Path) -> None:
    r = run("phantom", "--out", str(tmp_path / "s"), "--seed", "42", "--contrasts", "t2,T1", "--max-matrix", "320")
    assert r.returncode == 0, r.stderr
    truth = json.loads((tmp_path / "s" / "truth" / "truth.json").read_text())
    assert [s["description"] for s in truth["series"]] == ["SAG T2", "SAG T1"]
    for s in truth["series"]:
        vol, headers = read_series(tmp_path / "s" / "dicom" / f"series_{s['series_number']}")
        labels = np.load(tmp_path / "s" / "truth" / s["labels_file"])["labels"]
        assert labels.shape == vol.shape and [int(h.InstanceNumber) for h in headers] == list(range(1, len(headers) + 1))
        assert len(s["boxes"]) > 0 and "region" in s["boxes"][0]
    assert "seed 42" in r.stdout


def test_phantom_count_writes_one_folder_per_seed(tmp_path: Path) -> None:
    r = run("phantom", "--out", str(tmp_path), "--seed", "5", "--count", "2", "--contrasts", "T2", "--max-matrix", "256")
    assert r.returncode == 0, r.stderr
    uids = {json.loads((tmp_path / f"study_{s:06d}" / "truth" / "truth.json").read_text())["study_instance_uid"] for s in (5, 6)}
    assert len(uids) == 2
    assert "[2/2]" in r.stdout


def test_bad_arguments_fail_with_a_clear_message(tmp_path: Path) -> None:
    r = run("phantom", "--out", str(tmp_path), "--contrasts", "T2,FLAIR")
    assert r.returncode != 0 and "unknown contrast 'FLAIR'" in r.stderr
    r = run("real-to-dicom", "NO_SUCH_CASE", "--out", str(tmp_path))
    assert r.returncode != 0 and "no real case at" in r.stderr
    r = run("phantom", "--out", str(tmp_path), "--study-class", "fracture")
    assert r.returncode != 0 and "invalid choice" in r.stderr
    assert not any(tmp_path.rglob("*.dcm"))


def test_training_and_evaluation_mistakes_say_what_without_a_traceback(tmp_path: Path) -> None:
    """An unknown dataset, an empty real-data folder, a folder that is not a model: one line each,
    no Python traceback, and no model folder or report left behind; DICOMNODE_DEBUG=1 keeps the traceback."""
    for args, said in ((["train", "spine-seg", "--fold", "VB2"], "error: no real cases of dataset 'VB2'"),
                       (["train", "spine-seg", "--real-dir", str(tmp_path)], "error: no real cases"),
                       (["train", "spine-seg", "--crop", "100"], "must be a multiple of 16"),
                       (["train", "spine-seg", "--grid-mm", "0"], "the grid (0.0 mm) and the edge weight (1.0) positive"),
                       (["train", "spine-seg", "--edge-weight", "-1"], "the edge weight (-1.0) positive"),
                       (["evaluate", "spine-seg", "--model-folder", str(tmp_path)], "is not a model folder")):
        r = run(*args, "--out", str(tmp_path / "out"))
        assert r.returncode != 0 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    r = run("train", "spine-seg", "--fold", "VB2", "--out", str(tmp_path / "out"), DICOMNODE_DEBUG="1")
    assert r.returncode != 0 and "Traceback" in r.stderr and "in split" in r.stderr  # where it was raised, for a bug report


def test_demo_sends_a_study_through_the_node_and_shows_the_results(tmp_path: Path) -> None:
    r = run("demo", "--out", str(tmp_path), "--seed", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "preview.png").stat().st_size > 20_000 and (tmp_path / "result.png").stat().st_size > 20_000
    assert "truth: class" in r.stdout and "AX T2" in r.stdout
    assert "spine-seg: done" in r.stdout and "lordosis: done" in r.stdout
    assert re.search(r"lordosis L1-S1: [0-9.]+ deg \(truth [0-9.]+\)", r.stdout)
    assert list((tmp_path / "var" / "results").rglob("seg.dcm")) and list((tmp_path / "var" / "results").rglob("sr.dcm"))


def test_process_runs_routed_pipelines_on_a_folder(tmp_path: Path) -> None:
    from training.phantom.generator import PhantomOptions, generate_study

    generate_study(tmp_path / "in", 4, PhantomOptions(contrasts=("T2", "T1"), max_matrix=256))
    (tmp_path / "in" / "dicom" / "notes.txt").write_text("not DICOM")
    (tmp_path / "node.yaml").write_text(
        "plugins: [tests.plugins.pipelines_for_tests]\n"
        "rules: [{name: t2, match: {SeriesDescription: '(?i)t2'}, pipelines: [derive]}]\n")
    r = run("process", str(tmp_path / "in" / "dicom"), str(tmp_path / "out"), "--config", str(tmp_path / "node.yaml"))
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    truth = json.loads((tmp_path / "in" / "truth" / "truth.json").read_text())
    [study] = results["studies"]
    assert study["study_instance_uid"] == truth["study_instance_uid"]
    assert [o["modality"] for o in study["outputs"]] == ["OT"]  # only the T2 series matched
    assert (tmp_path / "out" / study["outputs"][0]["path"]).exists()
    assert "notes.txt: not a readable DICOM instance" in r.stderr
    r = run("process", str(tmp_path / "in" / "dicom"), str(tmp_path / "out2"), "--pipelines", "nonexistent")
    assert r.returncode != 0 and "no pipeline named 'nonexistent'" in r.stderr
