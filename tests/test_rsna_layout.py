"""The RSNA 2024 LSDC layout: the phantom writes it, the reader reads it back (grades, series,
coordinates that land on the structure they name), and a malformed file is an error naming it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from training.datasets.rsna import CONDITIONS, DESCRIPTIONS, LEVELS, read_rsna, write_fixture


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixture(tmp_path_factory.mktemp("rsna") / "lsdc", [5001, 5002])


def test_the_phantom_in_rsna_layout_reads_back(fixture_root: Path) -> None:
    from training.phantom.generator import PhantomOptions, design_study

    studies = read_rsna(fixture_root)
    assert [s.study_id for s in studies] == [5001, 5002]
    for s in studies:
        assert sorted(s.series.values()) == sorted(DESCRIPTIONS)
        truth = design_study(s.study_id, PhantomOptions(contrasts=("T1", "T2"), axial=True)).levels
        assert s.grades == {(c, lv): truth[lv][c] for c in CONDITIONS for lv in LEVELS}
        assert {c.condition for c in s.coordinates} == set(CONDITIONS)
        for c in s.coordinates:
            files = s.files(c.series_id)
            assert [int(p.stem) for p in files] == list(range(1, len(files) + 1))
            ds = pydicom.dcmread(files[c.instance_number - 1])
            assert int(ds.InstanceNumber) == c.instance_number
            assert 0 <= c.x < ds.Columns and 0 <= c.y < ds.Rows
            expected = "Axial T2" if "subarticular" in c.condition else \
                "Sagittal T1" if "foraminal" in c.condition else "Sagittal T2/STIR"
            assert s.series[c.series_id] == expected, c


def test_canal_points_sit_in_the_bright_canal_between_the_discs_levels(fixture_root: Path) -> None:
    [s, _] = read_rsna(fixture_root)
    canal = sorted((c for c in s.coordinates if c.condition == "spinal_canal_stenosis"), key=lambda c: LEVELS.index(c.level))
    assert [c.level for c in canal] == list(LEVELS) and len({c.instance_number for c in canal}) == 1
    assert all(a.y < b.y for a, b in zip(canal, canal[1:]))  # L1/L2 above L5/S1
    image = pydicom.dcmread(s.files(canal[0].series_id)[canal[0].instance_number - 1]).pixel_array.astype(float)
    ranks = [(image < image[int(round(c.y)), int(round(c.x))]).mean() for c in canal]
    assert np.median(ranks) > 0.7, ranks  # CSF is among the brightest on T2 (with fat); bone and disc are not


def _rewrite(path: Path, change) -> None:
    rows = list(csv.DictReader(path.open()))
    fields = list(rows[0])
    rows, fields = change(rows, fields)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_malformed_files_are_errors_that_name_the_file_and_row(fixture_root: Path, tmp_path: Path) -> None:
    import shutil

    for name in ("train.csv", "train_series_descriptions.csv", "train_label_coordinates.csv"):
        shutil.copy(fixture_root / name, tmp_path / name)
    (tmp_path / "train_images").symlink_to(fixture_root / "train_images")

    def blank_one(rows, fields):
        rows[0]["spinal_canal_stenosis_l4_l5"] = ""
        return rows, fields
    _rewrite(tmp_path / "train.csv", blank_one)  # a missing label stays absent
    assert ("spinal_canal_stenosis", "L4/L5") not in read_rsna(tmp_path)[0].grades

    def bad_grade(rows, fields):
        rows[1]["left_subarticular_stenosis_l1_l2"] = "Mild"
        return rows, fields
    _rewrite(tmp_path / "train.csv", bad_grade)
    with pytest.raises(ValueError, match=r"train.csv line 3: left_subarticular_stenosis_l1_l2 is 'Mild'"):
        read_rsna(tmp_path)

    def drop_column(rows, fields):
        return [{k: v for k, v in r.items() if k != "x"} for r in rows], [f for f in fields if f != "x"]
    shutil.copy(fixture_root / "train.csv", tmp_path / "train.csv")
    _rewrite(tmp_path / "train_label_coordinates.csv", drop_column)
    with pytest.raises(ValueError, match=r"train_label_coordinates.csv: columns \['x'\] are missing"):
        read_rsna(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an RSNA 2024 LSDC folder"):
        read_rsna(tmp_path / "nowhere")
