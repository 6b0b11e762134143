"""Storage and the job table on their own: durable layout, duplicates, retention, retries."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dicomnode.jobs import JobStore
from dicomnode.storage import Identity, InvalidInstance, Storage, check_uid


def ident(i: int, series: str = "1.2.3.1") -> Identity:
    return Identity("1.2.840.10008.5.1.4.1.1.4", f"1.2.3.9.{i}", "1.2.3", series)


def test_uids_are_checked_before_they_become_paths() -> None:
    assert check_uid("x", "1.2.840.10008") == "1.2.840.10008"
    for bad in ("../../x", "1.2.03", "1..2", "a.b", "1.2/3", "1" * 65, ""):
        with pytest.raises(InvalidInstance):
            check_uid("SOP Instance UID", bad)


def test_duplicates_keep_first_or_replace(tmp_path: Path) -> None:
    keep = Storage(tmp_path / "a", "keep_first")
    assert keep.store(b"first", ident(1), dict, "A") == "stored"
    assert keep.store(b"second", ident(1), dict, "A") == "duplicate"
    assert keep.path_for(ident(1)).read_bytes() == b"first"
    replace = Storage(tmp_path / "b", "replace")
    replace.store(b"first", ident(1), dict, "A")
    assert replace.store(b"second", ident(1), dict, "A") == "replaced"
    assert replace.path_for(ident(1)).read_bytes() == b"second"
    assert replace.counts()["instances"] == 1 and replace.series("1.2.3.1")["n_instances"] == 1
    assert not list((tmp_path / "b" / "tmp").iterdir())  # no half-written files left behind


def test_retention_removes_the_oldest_but_not_what_jobs_need(tmp_path: Path) -> None:
    s = Storage(tmp_path)
    for i in range(10):
        s.store(b"x" * 100, ident(i, "1.2.3.1" if i < 5 else "1.2.3.2"), dict, "A")
        time.sleep(0.01)
    assert s.housekeep(None, 700, keep={"1.2.3.1"}) == 3  # only series 2 may go: its 3 oldest
    assert s.counts()["instances"] == 7 and s.counts()["bytes"] == 700
    assert not s.path_for(ident(5, "1.2.3.2")).exists() and s.path_for(ident(0)).exists()
    assert s.series("1.2.3.2")["n_instances"] == 2
    assert s.housekeep(1e-9, None) == 7  # everything is older than a nanosecond of a day
    assert s.counts()["instances"] == 0 and s.series("1.2.3.1") is None


def test_a_dead_job_is_requeued_once_however_many_ask(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "jobs.sqlite")
    job_id = jobs.enqueue("pipeline", "1.2.3.1", "1.2.3", max_attempts=1, pipeline="x")
    assert jobs.claim("cpu").id == job_id and jobs.fail(job_id, "boom") == "dead"

    def retry() -> str:
        try:
            return jobs.retry(job_id).state
        except ValueError as e:
            return str(e)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: retry(), range(8)))
    assert answers.count("queued") == 1, answers
    assert all("is queued; only dead or failed jobs can be retried" in a for a in answers if a != "queued")
    assert jobs.get(job_id).attempts == 0
    assert jobs.claim("cpu").id == job_id
    with pytest.raises(ValueError, match="is running"):
        jobs.retry(job_id)
    with pytest.raises(KeyError, match="there is no job 99"):
        jobs.retry(99)


@pytest.mark.parametrize("instance_uid", ["1.2.3.45", "1.2.3.4"])  # even and odd length: padding
def test_part10_header_is_read_by_pydicom_and_dcmtk(tmp_path: Path, instance_uid: str) -> None:
    """The listener writes each file's meta information itself (`part10_header`)."""
    import subprocess

    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
    from pynetdicom.dsutils import encode

    from dicomnode.scp import part10_header

    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.PatientID = MRImageStorage, instance_uid, "MR", "X"
    path = tmp_path / "x.dcm"
    path.write_bytes(part10_header(MRImageStorage, instance_uid, ExplicitVRLittleEndian, "STORESCU ")
                     + encode(ds, False, True))
    back = pydicom.dcmread(path)
    meta = back.file_meta
    assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID) == (MRImageStorage, instance_uid)
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian and meta.SourceApplicationEntityTitle == "STORESCU"
    assert meta.FileMetaInformationVersion == b"\x00\x01" and back.SOPInstanceUID == instance_uid
    assert subprocess.run(["dcmftest", str(path)], capture_output=True, text=True).stdout.startswith("yes")
    dump = subprocess.run(["dcmdump", "-M", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0 and not dump.stderr, dump.stderr
    assert meta.FileMetaInformationGroupLength == len(path.read_bytes()) - 144 - len(encode(ds, False, True))
