"""Real cases load with their partial labels and travel the same DICOM path as the phantom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.conftest import dciodvfy_errors, patient_coords, read_series
from training.datasets.real_lumbar import DEFAULT_DIR, case_paths, case_to_dicom, load_case, load_cases, split

pytestmark = pytest.mark.skipif(not DEFAULT_DIR.exists(), reason=f"real cases not found at {DEFAULT_DIR}")


def test_all_cases_load_with_consistent_labels() -> None:
    cases = load_cases()
    manifest = {m["case"]: m for m in json.loads((DEFAULT_DIR / "manifest.json").read_text())}
    assert len(cases) == len(manifest) == 54
    assert {c.dataset for c in cases} == {"VB1", "VB3", "IVD"}
    for c in cases:
        assert c.image.shape == c.labels.shape == tuple(manifest[c.case_id]["shape"])
        assert list(c.names) == manifest[c.case_id]["levels"]
        assert set(np.unique(c.labels)) == set(range(len(c.names) + 1))
        # Ordered superior to inferior: label k's centroid lies above label k+1's (row 0 superior).
        rows = [np.nonzero(c.labels == k)[0].mean() for k in range(1, len(c.names) + 1)]
        assert rows == sorted(rows), c.case_id
        assert c.kind in ("vertebral_body", "disc")


def test_label_values_follow_the_phantom_convention() -> None:
    vb3 = load_case(DEFAULT_DIR / "VB3_01.npz")
    ivd = load_case(DEFAULT_DIR / "IVD_11.npz")
    vb1 = load_case(DEFAULT_DIR / "VB1_02.npz")
    assert vb3.label_values() == {"L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5}
    assert ivd.label_values()["L4/L5"] == 14
    assert vb1.label_values()["level1_from_top"] == 101  # level unknown: kept apart from L1..S1
    assert set(np.unique(vb3.relabelled())) == {0, 1, 2, 3, 4, 5}


def test_unlabelled_structures_are_not_background() -> None:
    """The `known` mask covers every labelled voxel but leaves the unlabelled spine open."""
    for path in (DEFAULT_DIR / "VB3_01.npz", DEFAULT_DIR / "IVD_11.npz"):
        c = load_case(path)
        known = c.known()
        assert known[c.labels > 0].all()
        # Just above the top labelled structure lies unlabelled anatomy (T12 or a vertebra): unknown.
        rows, cols, slices = np.nonzero(c.labels == 1)
        above = (max(rows.min() - 8, 0), int(np.median(cols)), int(np.median(slices)))
        assert not known[above]
        assert 0.2 < known.mean() < 0.95


@pytest.mark.parametrize("case_id", ["VB3_01", "IVD_11", "VB1_02"])
def test_case_as_dicom_is_valid_and_reads_back(case_id: str, tmp_path: Path) -> None:
    case = load_case(DEFAULT_DIR / f"{case_id}.npz")
    truth = case_to_dicom(case, tmp_path)
    folder = tmp_path / "dicom" / "series_1"
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == case.image.shape[2]
    for f in files[:: max(len(files) // 5, 1)]:
        assert dciodvfy_errors(f) == []
    vol, headers = read_series(folder)
    assert np.array_equal(vol, np.moveaxis(case.image, 2, 0))
    labels = np.load(tmp_path / "truth" / "series_1.npz")["labels"]
    assert labels.shape == vol.shape
    # Row 0 is superior and column 0 anterior, as the README of the data says.
    first, last = patient_coords(headers[0], np.array([0, vol.shape[1] - 1]), np.array([0, vol.shape[2] - 1]))
    assert first[2] > last[2] and first[1] < last[1]
    img = sitk.ReadImage([str(f) for f in files])
    assert np.allclose(img.GetSpacing(), (case.spacing_mm[1], case.spacing_mm[0], case.spacing_mm[2]))
    assert truth["series"][0]["label_values"] == case.label_values()


def test_folds_hold_out_every_case_once_and_a_dataset_can_be_held_out_whole() -> None:
    """Folds 0-2 each hold out a third of every dataset and together every case once; a dataset's
    name holds out all of it (scanners never seen) and nothing else; an unknown name is refused."""
    ids = [p.stem for p in case_paths()]
    folds = [split(ids, fold) for fold in range(3)]
    assert sorted(c for _, held in folds for c in held) == sorted(ids)
    for train, held in folds:
        assert {c.split("_")[0] for c in held} == {"VB1", "VB3", "IVD"} and sorted(train + held) == sorted(ids)
    train, vb3 = split(ids, "VB3")
    assert vb3 == sorted(c for c in ids if c.startswith("VB3_")) and len(vb3) == 38
    assert sorted(train + vb3) == sorted(ids) and not any(c.startswith("VB3_") for c in train)
    with pytest.raises(ValueError, match="no real cases of dataset 'VB2'.*IVD, VB1, VB3"):
        split(ids, "VB2")


def test_case_paths_lists_every_npz_and_refuses_a_folder_without_any(tmp_path: Path) -> None:
    assert len(case_paths()) == 54
    with pytest.raises(FileNotFoundError, match="DICOMNODE_REAL_DIR"):
        case_paths(tmp_path)


def test_what_the_level_names_imply_beyond_the_labels() -> None:
    """With `beyond_ends`, just below L5 (the L5/S1 disc, then S1) is marked "not a lumbar body" and
    just above the L1/L2 disc (L1) "not a disc"; without it, both stay unknown."""
    from training.datasets.spine_seg import IGNORE, NOT_BODY, NOT_DISC, real_classes

    for case_id, last_or_first, mark in (("VB3_01", "last", NOT_BODY), ("IVD_11", "first", NOT_DISC)):
        c = load_case(DEFAULT_DIR / f"{case_id}.npz")
        label = len(c.names) if last_or_first == "last" else 1
        rows, cols, slices = np.nonzero(c.labels == label)
        k, col = int(np.median(slices)), int(np.median(cols))
        column = c.labels[:, col, k] == label
        edge = np.nonzero(column)[0].max() + 3 if last_or_first == "last" else np.nonzero(column)[0].min() - 3
        assert real_classes(c)[edge, col, k] == IGNORE
        assert real_classes(c, beyond_ends=True)[edge, col, k] == mark


def test_rows_inside_the_labelled_run_teach_what_is_not_that_kind() -> None:
    """With `run_rows`, in the rows of L3 the canal and posterior elements behind it and a slice
    lateral to the spine are "not a body"; T12 above L1 and S1 below L5 stay unknown, and the
    lateral slices join the training slices."""
    from training.datasets.spine_seg import IGNORE, LATERAL_SLICES, NOT_BODY, real_classes, real_slices

    c = load_case(DEFAULT_DIR / "VB3_01.npz")
    plain, rows_on = real_classes(c), real_classes(c, run_rows=True)
    rows, cols, slices = np.nonzero(c.labels == 3)
    row, k = int(np.median(rows)), int(np.median(slices))
    behind = np.nonzero(c.labels[row, :, k] == 3)[0].max() + 10  # the canal, 10 mm behind L3
    lateral = slices.min() - 3
    assert plain[row, behind, k] == plain[row, behind, lateral] == IGNORE
    assert rows_on[row, behind, k] == rows_on[row, behind, lateral] == NOT_BODY
    assert (rows_on[c.labels == 3] == 1).all()
    for label, step in ((1, -1), (5, 1)):  # just above L1 and just below L5
        r, cc, s = np.nonzero(c.labels == label)
        col, sl = int(np.median(cc)), int(np.median(s))
        column = np.nonzero(c.labels[:, col, sl] == label)[0]
        beyond = (column.min() - 5) if step < 0 else (column.max() + 5)
        assert rows_on[beyond, col, sl] == IGNORE
    labelled = int((c.labels > 0).any(axis=(0, 1)).sum())
    assert len(real_slices(c, run_rows=True).images) == labelled + 2 * LATERAL_SLICES


def test_real_slices_come_on_the_training_grid_asked_for() -> None:
    """A 0.75 mm working grid: the same slices, 4/3 the pixels each way, every class value kept
    (IGNORE and the NOT_ kinds too) and each class's area the same in mm² within 2 %."""
    from training.datasets.spine_seg import real_slices

    c = load_case(DEFAULT_DIR / "VB3_01.npz")
    one, fine = real_slices(c, run_rows=True), real_slices(c, run_rows=True, grid=0.75)
    assert len(fine.images) == len(one.images) and fine.origin == one.origin
    for (im1, t1), (im2, t2) in zip(zip(one.images, one.targets), zip(fine.images, fine.targets)):
        assert im2.shape == t2.shape == tuple(round(n / 0.75) for n in im1.shape) and t2.dtype == np.uint8
        assert set(np.unique(t2)) == set(np.unique(t1))
        for v in np.unique(t1):
            area1, area2 = (t1 == v).sum(), (t2 == v).sum() * 0.75 ** 2
            assert abs(area2 - area1) <= 0.02 * area1 + 10, v


def test_s1_is_taken_from_the_bone_just_below_the_labelled_l5() -> None:
    """No real case labels the sacrum; `s1_below_l5` takes S1 from a network's classes: the largest
    unlabelled bone just below L5, a disc apart. Not bone far in front (an iliac wing in a lateral
    slice), not a sliver, nothing in a case whose labels do not end at L5."""
    from training.datasets.spine_seg import CLASSES, IGNORE, real_classes, s1_below_l5

    c = load_case(DEFAULT_DIR / "VB3_01.npz")
    body, s1_class = CLASSES.index("vertebral_body"), CLASSES.index("S1")
    classes = np.where(c.labels > 0, body, 0).astype(np.uint8)
    rows, cols, slices = np.nonzero(c.labels == len(c.names))  # L5
    bottom, height = rows.max(), rows.max() - rows.min() + 1
    s1 = np.zeros_like(classes, dtype=bool)
    s1[bottom + 8:bottom + 8 + height // 2, cols.min():cols.max() + 1, slices.min():slices.max() + 1] = True
    assert s1[:c.image.shape[0]].sum() > 0.2 * len(rows)  # inside the image and big enough
    classes[s1] = body
    wing = (slice(bottom + 5, bottom + 20), slice(max(cols.min() - 2 * height, 0), max(cols.min() - height - 5, 1)),
            slice(slices.min(), slices.max() + 1))
    classes[wing] = body  # bone more than a body height in front of L5
    found = s1_below_l5(c, classes)
    assert np.array_equal(found, s1)
    target = real_classes(c, s1=found)
    assert (target[found] == s1_class).all() and (target[c.labels > 0] == body).all()
    assert not s1_below_l5(c, np.where(c.labels > 0, body, 0).astype(np.uint8)).any()  # no bone below L5
    sliver = np.where(c.labels > 0, body, 0).astype(np.uint8)
    sliver[bottom + 8:bottom + 10, cols.min():cols.min() + 5, slices.min()] = s1_class
    assert not s1_below_l5(c, sliver).any()
    ivd = load_case(DEFAULT_DIR / "IVD_11.npz")  # labels end at the L5/S1 disc: no L5 to go by
    assert not s1_below_l5(ivd, np.ones(ivd.labels.shape, np.uint8)).any()
    assert (real_classes(ivd) != CLASSES.index("S1")).all() and IGNORE in real_classes(ivd)
