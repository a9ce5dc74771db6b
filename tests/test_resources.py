"""A full disk, a file-size limit, files that vanish, change or cannot be read while a run works on them.

Each run must either finish or stop with one clear line (no traceback), leave the index at its last
good state, and the next run must converge: the catalogue then holds exactly the folder's images,
each with its current size, mtime, hash and vector.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from altsearch import Engine, faults
from altsearch import vectors as vectors_module
from altsearch.decode import DEFAULT_DRAFT, hash_file
from altsearch.errors import IndexStoreError
from altsearch.scan import FileEntry, scan
from tests.hostile import assert_one_line_error, cli_env, run_cli
from tests.photos import make_folder

FIRST, MORE = 24, 12
LARGE_FIRST = 260  # an ivfpq index is built from 256 vectors at least


@pytest.fixture
def built(tmp_path, tiny_checkpoint):
    """An index of FIRST photos, and MORE photos added to the folder since."""
    photos = tmp_path / "photos"
    make_folder(photos, FIRST)
    index = tmp_path / "idx"
    with Engine.open(index, model=str(tiny_checkpoint), device="cpu") as engine:
        assert engine.index(photos, workers=0).added == FIRST
    make_folder(photos, MORE, start=FIRST)
    return photos, index


@pytest.fixture
def built_large(tmp_path, tiny_checkpoint, monkeypatch):
    """As `built`, but as an index beyond EXACT_MAX, whose vector index is an ivfpq saved to a file (a
    flat one has none): EXACT_MAX is lowered in this process (a CLI run needs ``exact_max=1``)."""
    monkeypatch.setattr(vectors_module, "EXACT_MAX", 1)
    photos = tmp_path / "photos"
    make_folder(photos, LARGE_FIRST)
    index = tmp_path / "idx"
    with Engine.open(index, model=str(tiny_checkpoint), device="cpu") as engine:
        assert engine.index(photos, workers=0).added == LARGE_FIRST
        assert engine.stats()["vector_index"] == "ivfpq"
    make_folder(photos, MORE, start=LARGE_FIRST)
    return photos, index


def _kind(index: Path) -> str:
    with Engine.open(index, device="cpu", create=False) as engine:
        return engine.stats()["vector_index"]


def _image_files(folder: Path) -> dict[str, Path]:
    return {os.path.abspath(p): p for p in folder.rglob("*") if p.suffix in (".jpg", ".png")}


def _snapshot(index: Path) -> dict:
    with Engine.open(index, device="cpu", create=False) as engine:
        return engine.store.catalog.file_states()


def _assert_sound(index: Path) -> list[str]:
    """The catalogue is intact and opens with one vector per image; returns check's problems, which may
    only be about the vector file lagging behind (the next open catches it up)."""
    with Engine.open(index, device="cpu", create=False) as engine:
        store = engine.store
        assert store.catalog.integrity() == []
        assert np.array_equal(store.vectors.ids(), store.catalog.vector_ids())
        problems = store.check()
    assert all("vectors.faiss" in p for p in problems), problems
    return problems


def _assert_converged(index: Path, folder: Path, *, failures: int = 0) -> None:
    """A normal run completes; after it, another finds nothing to do, and the catalogue is exactly the
    folder's images."""
    with Engine.open(index, device="cpu", create=False) as engine:
        assert not engine.index(folder, workers=0).interrupted
        report = engine.index(folder, workers=0)
        assert (report.added, report.updated, report.moved, report.removed, report.failed) == (0, 0, 0, 0, failures)
        states = engine.store.catalog.file_states()
        files = _image_files(folder)
        assert set(states) == set(files)
        for path, (_, size, mtime, digest) in states.items():
            st = files[path].stat()
            assert (size, mtime, digest) == (st.st_size, st.st_mtime, hash_file(path)), path
        assert engine.check() == []
        stats = engine.stats()
        assert stats["images"] == stats["vectors"] == len(files)
        assert stats["failures"] == failures


def _assert_vectors_match_content(index: Path, paths: list[str]) -> None:
    """The stored vectors of these files are those of their current bytes."""
    with Engine.open(index, device="cpu", create=False) as engine:
        ids = [engine.store.catalog.get_by_path(p).id for p in paths]
        stored = dict(pair for got, vecs in engine.store.catalog.iter_vectors(ids=np.asarray(ids))
                      for pair in zip(got.tolist(), vecs))
        fresh = engine.model.encode_image(paths, draft=DEFAULT_DRAFT)
        for i, vec in zip(ids, fresh):
            np.testing.assert_allclose(stored[i], vec, atol=2e-3)


# --- the fault hook ---------------------------------------------------------------------------


def test_fault_specs_are_parsed_strictly():
    assert faults.parse(" commit:3=kill, save-temp=raise ,") == (
        faults.Fault("commit", 3, "kill"), faults.Fault("save-temp", 1, "raise"))
    for bad in ("commit", "commit:3", "commit=explode", "comit=kill", "commit:0=kill", "commit:x=raise"):
        with pytest.raises(ValueError, match=faults.ENV):
            faults.parse(bad)


def test_a_point_fires_on_its_counted_hit_only(armed):
    armed("decoded:2=raise,decoded:4=raise")
    faults.point("decoded")
    faults.point("commit")  # not armed: does not count towards "decoded"
    with pytest.raises(OSError, match="No space left on device") as raised:
        faults.point("decoded")
    assert raised.value.errno == errno.ENOSPC
    faults.point("decoded")
    with pytest.raises(OSError):
        faults.point("decoded")
    faults.point("decoded")
    armed("")
    faults.point("decoded")  # unarmed: nothing, however often


# --- disk full ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, commits_chunk", [
    ("commit:1=raise", False),  # the first chunk of new images (nothing moved, touched or removed: no bookkeeping)
    ("committed:1=raise", True),  # the chunk is in; the in-memory vector index never heard of it
    ("save-temp=raise", True),  # writing the vector file (an ivfpq's: a flat index has none)
    ("save-replace=raise", True),  # between renaming the vector file and its header
])
def test_disk_full_stops_the_run_at_the_last_good_state(request, armed, spec, commits_chunk):
    photos, index = request.getfixturevalue("built_large" if spec.startswith("save") else "built")
    kind = _kind(index)
    before = _snapshot(index)
    armed(spec)
    with Engine.open(index, device="cpu") as engine, \
            pytest.raises(IndexStoreError, match="No space left on device .* keeps its last committed state"):
        engine.index(photos, workers=0)
    armed("")
    after = _snapshot(index)
    assert len(after) == len(before) + (MORE if commits_chunk else 0)
    assert {p: s for p, s in after.items() if p in before} == before
    _assert_sound(index)
    assert not list(index.glob(".vectors.faiss.*.tmp")) or spec.startswith("save")
    _assert_converged(index, photos)
    assert not list(index.glob(".vectors.faiss.*.tmp")), "the next save clears temp files of failed ones"
    assert _kind(index) == kind and (index / "vectors.faiss").exists() == (kind == "ivfpq")


@pytest.mark.parametrize("spec, where", [("commit:1=raise", "committing"), ("save-temp=raise", "saving vectors.faiss")])
def test_disk_full_is_one_line_through_the_cli(request, spec, where):
    saving = spec.startswith("save")
    photos, index = request.getfixturevalue("built_large" if saving else "built")
    result = run_cli("index", photos, "--index", index, "--workers", "0", env=cli_env(ALTSEARCH_FAULTS=spec),
                     exact_max=1 if saving else None)
    assert_one_line_error(result, "No space left on device", where)
    _assert_sound(index)
    _assert_converged(index, photos)


@pytest.mark.parametrize("limit_kb", [20, 48])  # 20: the WAL index (32 KB) cannot be made; 48: a commit fails
def test_file_size_limit_stops_the_run_cleanly(built, limit_kb):
    """A real write failure (EFBIG under RLIMIT_FSIZE, SIGXFSZ ignored), not an injected one."""
    photos, index = built
    before = _snapshot(index)

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kb * 1024, limit_kb * 1024))

    result = run_cli("index", photos, "--index", index, "--workers", "0", preexec_fn=limited)
    assert_one_line_error(result, "catalogue", "disk I/O error")
    assert _snapshot(index) == before
    assert _assert_sound(index) == []
    _assert_converged(index, photos)


# --- files that change under the indexer ------------------------------------------------------------


def _scan_order(folder: Path) -> list[str]:
    return [e.path for e in scan(folder) if isinstance(e, FileEntry)]


def _run_with(engine: Engine, folder: Path, when_embedding) -> object:
    """Index ``folder`` (decoding in this process, lazily), calling ``when_embedding`` once at the
    first embed progress report that gives a total: the scan is over, most files are not decoded yet."""
    calls = []

    def progress(p) -> None:
        if p.phase == "embed" and p.total is not None and not calls:
            calls.append(p.done)
            when_embedding()

    report = engine.index(folder, workers=0, progress=progress)
    assert calls, "no embed progress was reported"
    return report


def test_files_vanish_and_change_between_scan_and_decode(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    make_folder(photos, 30)
    index = tmp_path / "idx"
    order = _scan_order(photos)
    vanished, changed, grown = order[-1], order[-2], order[-3]

    def meddle() -> None:
        os.remove(vanished)
        shutil.copyfile(order[0], changed)  # other content (and size), same name
        with open(grown, "ab") as f:
            f.write(b"\0" * 1000)  # trailing bytes: still the same picture to a decoder

    with Engine.open(index, model=str(tiny_checkpoint), device="cpu") as engine:
        report = _run_with(engine, photos, meddle)
    assert not report.interrupted
    assert report.failures == [(vanished, "file vanished")] and report.added == 29
    _assert_converged(index, photos)  # the next run records the changed files' new size and mtime
    _assert_vectors_match_content(index, [changed, grown])


def test_folder_renamed_while_indexing(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    make_folder(photos, 30)
    index = tmp_path / "idx"
    renamed = photos / "home-renamed"  # "home" is scanned first: some of it is decoded before the rename

    with Engine.open(index, model=str(tiny_checkpoint), device="cpu") as engine:
        report = _run_with(engine, photos, lambda: (photos / "home").rename(renamed))
    assert 0 < report.failed < 15 and {r for _, r in report.failures} == {"file vanished"}
    assert all("/home/" in p for p, _ in report.failures)
    assert report.added == 30 - report.failed  # the decoded ones, under the paths they had when scanned
    with Engine.open(index, device="cpu", create=False) as engine:
        again = engine.index(photos, workers=0)
    assert (again.moved, again.added, again.removed, again.failed) == (15 - report.failed, report.failed, 0, 0)
    _assert_converged(index, photos)


def test_permission_errors_are_recorded_then_recovered(tmp_path, tiny_checkpoint, monkeypatch):
    from altsearch import scan as scan_module

    photos = tmp_path / "photos"
    make_folder(photos, 16)
    index = tmp_path / "idx"
    locked_file = _scan_order(photos)[0]
    locked_folder = str(photos / "trips")
    real_open, real_scandir = os.open, os.scandir

    def guarded_open(path, *args, **kwargs):
        if os.fspath(path) == locked_file:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    def guarded_scandir(path="."):
        if os.fspath(path) == locked_folder:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "open", guarded_open)  # how image files are opened for reading
    monkeypatch.setattr(scan_module.os, "scandir", guarded_scandir)
    with Engine.open(index, model=str(tiny_checkpoint), device="cpu") as engine:
        report = engine.index(photos, workers=0)
        assert sorted(report.failures) == [(locked_file, "permission denied"), (locked_folder, "permission denied")]
        assert report.added == 16 - 8 - 1  # "trips" holds 8 of the 16
        assert engine.check() == []
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(scan_module.os, "scandir", real_scandir)
    with Engine.open(index, device="cpu", create=False) as engine:
        again = engine.index(photos, workers=0)
    assert again.added == 9 and again.failed == 0
    _assert_converged(index, photos)
