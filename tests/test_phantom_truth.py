"""The ground truth is what the masks and images show, measured here by independent methods."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.config import lordosis_class
from tests.conftest import patient_coords, read_series
from training.datasets.spine_seg import FOV_END_MM, IGNORE, end_field_of_view
from training.phantom.acquisition import acquisitions
from training.phantom.anatomy import LABEL_VALUES, LUMBAR_DISCS
from training.phantom.generator import PhantomOptions, design_study, generate_study
from training.phantom.geometry import SlicePlane, rotation, stack
from training.phantom.mr import Contrast, signal_table
from training.phantom.pathology import grade_of
from training.phantom.render import paint_plane, render_series


def _yz(plane: SlicePlane, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(y, z) patient coordinates of pixel positions: the projection on the sagittal plane."""
    p = plane.position + np.outer(c * plane.pixel_spacing[1], plane.row_cosine) + np.outer(r * plane.pixel_spacing[0], plane.col_cosine)
    return p[:, 1:]


def _mask_points(planes: list[SlicePlane], labels: list[np.ndarray], value: int) -> np.ndarray:
    return np.concatenate([_yz(p, *np.nonzero(lab == value)) for p, lab in zip(planes, labels)])


def superior_endplate_angle(planes: list[SlicePlane], labels: list[np.ndarray], value: int) -> float:
    """Angle (deg, in the sagittal plane) of the superior boundary of a vertebral body mask.

    Independent of how the generator builds the spine: principal axes of the mask give its
    antero-posterior direction; in every slice the boundary between the first labelled pixel of
    each image column and the pixel above it is a point of the endplate; a least-squares line
    through those points over the central 60 % of the body gives the angle, refitted without
    points more than 1 mm off the first line (osteophytes).
    """
    pts = _mask_points(planes, labels, value)
    centre = pts.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov((pts - centre).T))
    a_dir, b_dir = vecs[:, 1] * np.sign(vecs[0, 1]), vecs[:, 0] * np.sign(vecs[1, 0])  # +y, +z
    lo, hi = np.percentile((pts - centre) @ a_dir, [20, 80])
    edges = []
    for plane, lab in zip(planes, labels):
        m = lab == value
        cols = np.nonzero(m.any(axis=0))[0]
        edges.append(_yz(plane, np.argmax(m, axis=0)[cols] - 0.5, cols))
    e = np.concatenate(edges) - centre
    a, b = e @ a_dir, e @ b_dir
    a, b = a[(a > lo) & (a < hi)], b[(a > lo) & (a < hi)]
    fit = np.polyfit(a, b, 1)
    inlier = np.abs(np.polyval(fit, a) - b) < 1.0  # osteophytes rise above the endplate line
    d = a_dir + np.polyfit(a[inlier], b[inlier], 1)[0] * b_dir
    return float(np.degrees(np.arctan2(d[1], d[0])))


def _endplate_angle(planes: list[SlicePlane], labels: list[np.ndarray], value: int) -> float:
    """Superior endplate angle from the slices that cut the body near its middle (>= 70 % of its
    largest area), so that slices grazing its side do not count."""
    areas = np.array([(lab == value).sum() for lab in labels])
    keep = np.nonzero(areas >= 0.7 * areas.max())[0]
    return superior_endplate_angle([planes[i] for i in keep], [labels[i] for i in keep], value)


def _label_volume_error(seed: int) -> float:
    """|L1-S1 from 0.4 mm label volumes around L1 and S1 - the designed angle| for one seed."""
    d = design_study(seed)
    rng = np.random.default_rng([0, seed])
    tilt = rng.uniform(2, 5, size=2) * rng.choice([-1, 1], size=2)
    rot = rotation(rng.uniform(-15, 15), *tilt)
    angle = {}
    for name in ("L1", "S1"):
        planes = stack(d.chain[name].to_patient(0, 0, 0), rot, 220, 220, 0.4, 7, 1.5, 1.0)
        angle[name] = _endplate_angle(planes, [paint_plane(d.shapes, p)[0] for p in planes], LABEL_VALUES[name])
    return abs(angle["S1"] - angle["L1"] - d.lordosis["L1-S1"])


def _series_labels_error(seed: int) -> float:
    """The same on the study's own T2 series."""
    d = design_study(seed)
    acq = acquisitions(d, PhantomOptions(contrasts=("T2",)))[0]
    labels = [paint_plane(d.shapes, p)[0] for p in acq.planes]
    l1, s1 = (_endplate_angle(acq.planes, labels, LABEL_VALUES[k]) for k in ("L1", "S1"))
    return abs(s1 - l1 - d.lordosis["L1-S1"])


def _over_seeds(error: Callable[[int], float], seeds: range) -> np.ndarray:
    """Per-seed errors, on every core (each seed is independent and pure numpy)."""
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return np.array(list(pool.map(error, seeds)))


def test_lordosis_from_the_label_volume_matches_truth_over_200_seeds() -> None:
    """0.4 mm label volumes around L1 and S1, re-measured from the masks: within 1 deg.

    Seven slices 1.5 mm apart, turned in plane by up to 15 deg and tilted out of plane by 2-5 deg,
    so that each slice samples the endplate at another pixel phase.
    """
    errors = _over_seeds(_label_volume_error, range(200))
    assert errors.max() < 1.0, f"max error {errors.max():.2f} deg (mean {errors.mean():.2f}) at seed {errors.argmax()}"


def test_lordosis_from_the_written_series_labels_is_within_pixel_limits() -> None:
    """On each study's own T2 series (0.4-1.2 mm pixels, 3-6 mm apart) the masks still give the
    angle; the tolerance is what a digital boundary of that pixel size allows."""
    errors = _over_seeds(_series_labels_error, range(40))
    assert np.mean(errors) < 0.3 and max(errors) < 1.5, errors


def test_lordosis_covers_10_to_80_and_classes_follow_thresholds() -> None:
    angles = [design_study(s).lordosis["L1-S1"] for s in range(40)]
    assert min(angles) < 25 and max(angles) > 60
    assert all(10 - 1e-6 <= a <= 80 + 1e-6 for a in angles)
    assert lordosis_class(38.9) == "hypolordosis" and lordosis_class(39) == "normal"
    assert lordosis_class(53) == "normal" and lordosis_class(53.1) == "hyperlordosis"


def _patch(d, centre: np.ndarray, x_half: float) -> tuple[list[SlicePlane], list[np.ndarray]]:
    """Label slices 1 mm apart and 0.4 mm pixels, 80 mm square around `centre`: for measuring shapes."""
    planes = stack(centre, rotation(0, 0, 0), 200, 200, 0.4, int(2 * x_half) + 1, 1.0, 1.0)
    return planes, [paint_plane(d.shapes, p)[0] for p in planes]


def _pca(yz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre, antero-posterior axis (+y) and long axis (+z) of a mask in the sagittal plane."""
    c = yz.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov((yz - c).T))
    return c, vecs[:, 1] * np.sign(vecs[0, 1]), vecs[:, 0] * np.sign(vecs[1, 0])


def test_herniations_reach_past_the_posterior_vertebral_line() -> None:
    """From the masks alone: the posterior vertebral line joins the posterior corners of the two
    bodies next to the disc; a protrusion or extrusion reaches past it by its stated depth, a
    normal disc does not."""
    seen = {"protrusion": 0, "extrusion": 0, "none": 0}
    for seed in range(30):
        d = design_study(seed, PhantomOptions(study_class="herniated_disc"))
        for disc in LUMBAR_DISCS:
            lv = d.levels[disc]
            if lv["herniation"] == "bulge":
                continue
            planes, labels = _patch(d, d.chain[disc].to_patient(0, 10, 0), 7)  # the canal, not the foramina
            disc_pts = _mask_points(planes, labels, LABEL_VALUES[disc])
            centre, ap, _ = _pca(disc_pts)
            walls = []
            for body, side in zip(disc.split("/"), (-1, 1)):
                pts = _mask_points(planes, labels, LABEL_VALUES[body])
                c, _, axis = _pca(pts)
                h = side * ((pts - c) @ axis)  # large next to this disc
                near = h > np.percentile(h, 80)
                walls.append(((pts[near] - centre) @ ap).max())
            reach = ((disc_pts - centre) @ ap).max() - np.mean(walls)
            seen[lv["herniation"]] += 1
            if lv["herniation"] == "none":
                assert reach < 1.0, (seed, disc, reach)
            else:
                assert abs(reach - lv["herniation_depth_mm"]) < 1.5, (seed, disc, reach, lv["herniation_depth_mm"])
        if min(seen.values()) >= 3:
            break
    assert min(seen.values()) >= 3, seen


def test_narrowing_on_the_axial_mid_disc_slices_matches_the_truth(tmp_path) -> None:
    """Canal, lateral recess and foramen areas on the axial series' mid-disc slices (patient x
    from the headers splits left and right) against the truth's stated areas and narrowing."""
    checked = {"normal_mild": 0, "moderate": 0, "severe": 0}
    for seed in range(40):
        truth = generate_study(tmp_path / str(seed), seed,
                               PhantomOptions(contrasts=(), axial=True, study_class="spinal_stenosis", max_matrix=448))
        s = truth["series"][0]
        labels = np.load(tmp_path / str(seed) / "truth" / s["labels_file"])["labels"]
        _, headers = read_series(tmp_path / str(seed) / "dicom" / "series_1")
        px = s["acquisition"]["pixel_spacing_mm"] ** 2
        rl = truth["anatomy"]["canal_lr_radius"]
        for disc, (_, mid, _) in s["disc_blocks"].items():
            lv = truth["levels"][disc]
            lab = labels[mid]
            rr, cc = np.indices(lab.shape)
            x = patient_coords(headers[mid], rr.ravel(), cc.ravel())[:, 0].reshape(lab.shape)
            canal = lab == LABEL_VALUES["canal"]
            foramen = np.isin(lab, [LABEL_VALUES["neural_foramen"], LABEL_VALUES["nerve_root"]])
            measured = {"canal": canal, "recess_left": canal & (x > rl / 3), "recess_right": canal & (x < -rl / 3),
                        "foramen_left": foramen & (x > 0), "foramen_right": foramen & (x < 0)}
            for k, m in measured.items():
                stated = lv["midplane_areas_mm2"][k]
                # A digital area is off by up to half a pixel along its boundary.
                edge = (m & ~ndimage.binary_erosion(m)).sum()
                assert abs(m.sum() * px - stated["measured"]) < 0.03 * stated["normal"] + 0.5 * edge * px, (seed, disc, k)
            narrowing = 1 - measured["canal"].sum() * px / lv["midplane_areas_mm2"]["canal"]["normal"]
            assert abs(100 * narrowing - lv["canal_narrowing_pct"]) < 5, (seed, disc, narrowing, lv["canal_narrowing_pct"])
            assert lv["spinal_canal_stenosis"] == grade_of(lv["canal_narrowing_pct"] / 100)
            checked[lv["spinal_canal_stenosis"]] += 1
        if min(checked.values()) >= 2:
            break
    assert min(checked.values()) >= 2, checked


@pytest.mark.parametrize("kind,t1_sign,t2_sign", [("modic1", -1, +1), ("modic2", +1, +1), ("modic3", -1, -1)])
def test_modic_types_change_t1_and_t2_signal_the_right_way(kind: str, t1_sign: int, t2_sign: int) -> None:
    seed = next(s for s in range(500) if any(v.marrow == kind and v.modic_strength > 0.6
                                             for v in design_study(s).findings.vertebrae.values()))
    d = design_study(seed)
    level = next(k for k, v in d.findings.vertebrae.items() if v.marrow == kind and v.modic_strength > 0.6)
    planes, _ = _patch(d, d.chain[level].to_patient(0, 0, 0), 4)
    tissue_id = next(i for i, n in enumerate(d.tissues.names) if n.startswith(kind))
    marrow_id = d.tissues.names.index("marrow")
    for contrast, sign in ((Contrast("T1", 550, 12), t1_sign), (Contrast("T2", 3500, 100), t2_sign)):
        labels, tissue, image = render_series(d.shapes, planes, signal_table(d.tissues.names, contrast, d.nucleus_t2))
        in_level = labels == LABEL_VALUES[level]
        modic = image[in_level & (tissue == tissue_id)].mean()
        normal = image[in_level & (tissue == marrow_id)].mean()
        assert sign * (modic - normal) > 0.1 * normal, (kind, contrast.name, modic, normal)


def test_half_the_studies_keep_a_rudimentary_s1_s2_disc_inside_the_sacrum() -> None:
    """The remnant is disc tissue labelled as sacrum, just below S1: a network must not take it for a
    mobile disc (S1 is the lowest vertebra with a disc above it)."""
    remnants = [design_study(seed).params.s1_s2_remnant_mm for seed in range(40)]
    assert 0.3 < np.mean([r > 0 for r in remnants]) < 0.7
    assert all(r == 0 or 1.5 <= r <= 4.0 for r in remnants)
    seed = next(s for s, r in enumerate(remnants) if r > 3)
    d = design_study(seed)
    plane = next(iter(acquisitions(d, PhantomOptions(contrasts=("T2",)))))
    mid = plane.planes[len(plane.planes) // 2]
    labels, tissue = paint_plane(d.shapes, mid)
    nucleus = d.tissues.names.index("nucleus")
    remnant = (labels == LABEL_VALUES["sacrum"]) & (tissue == nucleus)
    assert remnant.sum() > 20
    s1_rows = np.nonzero((labels == LABEL_VALUES["S1"]).any(axis=1))[0]
    rows = np.nonzero(remnant.any(axis=1))[0]
    spacing = mid.pixel_spacing[0]
    # below S1 (rows grow downwards in a sagittal image) and within a few mm of its lower end
    assert rows.min() > s1_rows.min() and (rows.min() - s1_rows.max()) * spacing < 6


@pytest.mark.parametrize("depth, s1_in_view", [(-25.0, False), (20.0, True)])
def test_field_of_view_can_end_inside_s1_as_in_real_series(depth: float, s1_in_view: bool) -> None:
    """Most real sagittal series end inside S1; with `fov_end_mm` the phantom's does too, and only
    the position of the slices changes (same matrix, spacing, orientation, slices)."""
    seed = 3
    d = design_study(seed)
    whole = acquisitions(d, PhantomOptions(contrasts=("T2",)))[0]
    cut = acquisitions(d, PhantomOptions(contrasts=("T2",), fov_end_mm=(depth, depth)))[0]
    assert cut.parameters == whole.parameters and len(cut.planes) == len(whole.planes)
    for a, b in zip(whole.planes, cut.planes):
        assert np.allclose(a.row_cosine, b.row_cosine) and np.allclose(a.col_cosine, b.col_cosine)
        assert abs((b.position - a.position) @ a.row_cosine) < 1e-6  # moved along the columns only
    mid = cut.planes[len(cut.planes) // 2]
    labels, _ = paint_plane(d.shapes, mid)
    rows_of = {n: np.nonzero((labels == LABEL_VALUES[n]).any(axis=1))[0] for n in ("L5", "S1")}
    assert len(rows_of["L5"]) and bool(len(rows_of["S1"])) == s1_in_view
    if s1_in_view:  # a sliver cut by the lower edge, L5 whole above it
        assert rows_of["S1"].max() == labels.shape[0] - 1 and rows_of["L5"].max() < labels.shape[0] - 1
        assert len(rows_of["S1"]) * mid.pixel_spacing[0] < 35
    whole_labels, _ = paint_plane(d.shapes, whole.planes[len(whole.planes) // 2])
    whole_s1 = np.nonzero((whole_labels == LABEL_VALUES["S1"]).any(axis=1))[0]
    assert whole_s1.max() < whole_labels.shape[0] - 1  # by default the whole of S1 is in view


def test_training_slices_can_end_inside_s1() -> None:
    """The trainer's cut of a phantom slice: below a row drawn from FOV_END_MM of S1's top, the
    image is what lies outside an image (0) and the loss ignores it; above, nothing changes."""
    target = np.zeros((120, 40), dtype=np.uint8)
    target[20:50, 10:30], target[50:60, 10:30], target[60:90, 10:30] = 1, 3, 2  # L5, L5/S1 disc, S1
    image = np.random.default_rng(0).uniform(0.1, 1, target.shape).astype(np.float32)
    rng = np.random.default_rng(1)
    edges = []
    for _ in range(200):
        im, t = end_field_of_view(image, target, rng)
        edge = int(np.argmax((t == IGNORE).all(axis=1)))
        assert (im[edge:] == 0).all() and (t[edge:] == IGNORE).all()
        assert (im[:edge] == image[:edge]).all() and (t[:edge] == target[:edge]).all()
        edges.append(edge - 60)
    assert min(edges) == FOV_END_MM[0] and max(edges) == FOV_END_MM[1]
    no_s1 = np.where(target == 2, 0, target).astype(np.uint8)
    im, t = end_field_of_view(image, no_s1, rng)
    assert im is image and t is no_s1
    tall_image, tall = np.pad(image, ((0, 80), (0, 0))), np.pad(target, ((0, 80), (0, 0)))
    halves = [int(np.argmax((end_field_of_view(tall_image, tall, rng, grid=0.5)[1] == IGNORE).all(axis=1))) - 60
              for _ in range(200)]  # on a 0.5 mm grid the same millimetres are twice the rows
    assert min(halves) == 2 * FOV_END_MM[0] and max(halves) == 2 * FOV_END_MM[1]
