"""Storage and the job table on their own: durable layout, duplicates, retention, retries."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dicomnode import storage
from dicomnode.jobs import JobStore
from dicomnode.storage import DIRECT_BLOCK, DIRECT_BUFFER, Identity, InvalidInstance, Storage, _Row, check_uid, write_durably


def ident(i: int, series: str = "1.2.3.1") -> Identity:
    return Identity("1.2.840.10008.5.1.4.1.1.4", f"1.2.3.9.{i}", "1.2.3", series)


def test_uids_are_checked_before_they_become_paths() -> None:
    assert check_uid("x", "1.2.840.10008") == "1.2.840.10008"
    for bad in ("../../x", "1.2.03", "1..2", "a.b", "1.2/3", "1" * 65, ""):
        with pytest.raises(InvalidInstance):
            check_uid("SOP Instance UID", bad)


@pytest.mark.parametrize("direct", [True, False])
def test_files_are_written_byte_exact_whatever_their_size(tmp_path: Path, direct: bool) -> None:
    """Direct I/O writes whole blocks from an aligned buffer and the rest through the page cache:
    sizes around a block and beyond the buffer, from pieces that do not line up with either."""
    rng = np.random.default_rng(0)
    for n in (0, 1, DIRECT_BLOCK - 1, DIRECT_BLOCK, DIRECT_BLOCK + 1, DIRECT_BUFFER, 2 * DIRECT_BUFFER + 132):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        cut = max(7, n // 3)
        path = tmp_path / f"{n}.dcm"
        assert write_durably(path, [data[:7], data[7:cut], b"", data[cut:]], direct) == n
        assert path.read_bytes() == data


def test_a_device_that_refuses_the_block_size_gets_the_page_cache_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "DIRECT_BLOCK", 128)  # no disk has 128-byte blocks: the direct write fails (EINVAL)
    data = bytes(range(256)) * 40
    assert write_durably(tmp_path / "x.dcm", [data]) == len(data)
    assert (tmp_path / "x.dcm").read_bytes() == data


def test_concurrent_writers_do_not_share_a_buffer(tmp_path: Path) -> None:
    blobs = [bytes([i]) * (DIRECT_BUFFER // 2 + 1000 * i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: write_durably(tmp_path / str(i), [blobs[i][:5000], blobs[i][5000:]]), range(8)))
    assert all((tmp_path / str(i)).read_bytes() == blobs[i] for i in range(8))


def test_an_instance_given_in_pieces_is_stored_whole(tmp_path: Path) -> None:
    s = Storage(tmp_path)
    assert s.store((b"header", b"data set" * 1000), ident(1), dict, "A") == "stored"
    assert s.path_for(ident(1)).read_bytes() == b"header" + b"data set" * 1000
    assert s.instance("1.2.3.9.1")["size"] == 8006
    assert s.store(bytearray(b"one buffer"), ident(2), dict, "A") == "stored"
    assert s.path_for(ident(2)).read_bytes() == b"one buffer"


def test_rows_queued_during_a_commit_share_the_next_one_and_its_failure(tmp_path: Path) -> None:
    s = Storage(tmp_path)

    def row(i: int, size: object = 1) -> _Row:
        return _Row((f"1.2.3.9.{i}", "1.2.840.10008.5.1.4.1.1.4", "1.2.3", "1.2.3.1", "x", size, 0.0, "A"), "{}")

    def queued_behind_a_commit(rows: list[_Row]) -> list[BaseException | None]:
        with ThreadPoolExecutor(3) as pool:
            with s._lock:  # a commit in progress: the three queue up behind it
                futures = [pool.submit(s._index, r) for r in rows]
                wait_for_queue = time.monotonic() + 5
                while len(s._queue) < 3 and time.monotonic() < wait_for_queue:
                    time.sleep(0.01)
        assert all(r.done for r in rows)
        return [f.exception() for f in futures]

    assert queued_behind_a_commit([row(1), row(2), row(3)]) == [None, None, None]
    assert s.series("1.2.3.1")["n_instances"] == 3
    errors = queued_behind_a_commit([row(4), row(5, size=object()), row(6)])
    assert all(isinstance(e, sqlite3.Error) for e in errors)  # one bad row: none of its batch is indexed
    assert s.series("1.2.3.1")["n_instances"] == 3


def test_eight_threads_store_and_every_row_counts(tmp_path: Path) -> None:
    s = Storage(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: s.store(b"x" * 5000, ident(i, f"1.2.3.{i % 2}"), dict, "A"), range(200)))
    assert s.counts()["instances"] == 200
    assert [s.series(f"1.2.3.{k}")["n_instances"] for k in (0, 1)] == [100, 100]
    assert all(s.path_for(ident(i, f"1.2.3.{i % 2}")).stat().st_size == 5000 for i in range(200))


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
