"""Small pipelines that tests register through `plugins:` in the node configuration.

`derive` writes one derived Secondary Capture per series (any DICOM dataset will do for the node).
`slow-derive` does the same after sleeping `DICOMNODE_TEST_SLEEP` seconds, leaving a marker file
for every attempt so a test can kill the node mid-run and see the job run again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pydicom
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from pipelines.registry import Pipeline, register
from structured_reports.model import ResultOptions


def derive(files: list[Path], out: Path, options: ResultOptions | None = None) -> list[Path]:
    src = pydicom.dcmread(sorted(files)[0])
    ds = src.copy()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(src.SOPInstanceUID), "derived"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(src.SeriesInstanceUID), "derived"])
    ds.SeriesDescription = "TEST DERIVED"
    ds.ImageComments = f"derived from {len(files)} instances"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = out / "derived.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]


def slow_derive(files: list[Path], out: Path, options: ResultOptions | None = None) -> list[Path]:
    marker = Path(os.environ["DICOMNODE_TEST_MARKERS"])
    marker.mkdir(parents=True, exist_ok=True)
    (marker / f"attempt-{os.getpid()}-{time.time_ns()}").touch()  # the pid says which worker ran it
    time.sleep(float(os.environ.get("DICOMNODE_TEST_SLEEP", "0")))
    return derive(files, out)


def failing(files: list[Path], out: Path, options: ResultOptions | None = None) -> list[Path]:
    raise RuntimeError("this test pipeline always fails")


register(Pipeline("derive", derive))
register(Pipeline("slow-derive", slow_derive))
register(Pipeline("failing", failing))
