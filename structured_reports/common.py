"""What every result object shares: series numbers, equipment, source ordering and UIDs."""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
from pydicom import Dataset

import dicomnode
from structured_reports import codes
from structured_reports.model import Algorithm

MANUFACTURER = "dicomnode"
# Results get Series Numbers 9901-9999 so they sort after the scanner's series in every viewer.
SERIES_NUMBERS = {"seg": 9901, "sr": 9902, "gradcam": 9903, "gradcam-overlay": 9904}
SERIES_DESCRIPTIONS = {"seg": "AI lumbar spine SEG", "sr": "AI lumbar spine report",
                       "gradcam": "AI lumbar spine Grad-CAM", "gradcam-overlay": "AI lumbar spine Grad-CAM overlay"}


# Every object that uses a private code declares our scheme (SOP Common, Coding Scheme Identification).
PRIVATE_SCHEME = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator=codes.PRIVATE_SCHEME, name=codes.PRIVATE_SCHEME_NAME, uid=codes.PRIVATE_SCHEME_UID,
    responsible_organization=MANUFACTURER)


def equipment(algorithm: Algorithm) -> dict:
    """Keyword arguments naming our equipment in highdicom's constructors."""
    return {"manufacturer": MANUFACTURER, "manufacturer_model_name": algorithm.name[:64],
            "software_versions": [f"dicomnode {dicomnode.__version__}", f"{algorithm.name} {algorithm.version}"[:64]],
            "device_serial_number": "1"}


def algorithm_identification(algorithm: Algorithm) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(name=algorithm.name, family=algorithm.family, version=algorithm.version)


def new_series(kind: str) -> dict:
    """Series and instance identity of a new result object (a new run is a new series)."""
    return {"series_instance_uid": hd.UID(), "series_number": SERIES_NUMBERS[kind], "sop_instance_uid": hd.UID(),
            "instance_number": 1, "series_description": SERIES_DESCRIPTIONS[kind]}


def check_sources(sources: Sequence[Dataset]) -> None:
    if not sources:
        raise ValueError("no source images: a result object must reference the images it was derived from")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"source images come from {len(studies)} studies; a result object belongs to one study")
