"""The ingestion pipeline's own choices: overlapped model and commits, batch size, how far decoding runs ahead."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from altsearch import Engine
from altsearch.decode import DecodePool
from altsearch.errors import IndexStoreError
from altsearch.ingest import CPU_BATCH_SIZE, HASH_META, Ingestor, default_batch_size
from altsearch.store import CATALOG_FILE
from tests.oldformats import hash_like_before_hash_kinds
from tests.photos import make_folder, save_photo


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    paths = make_folder(root, 12)
    shutil.copyfile(paths[0], root / "copy-of-0.jpg")  # byte-identical: embedded once
    shutil.copyfile(paths[1], root / "copy-of-1.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


def _run(tmp_path, name, checkpoint, photos, quantize=None, lazy=False, **kw):
    """Index ``photos`` into a fresh index with an Ingestor built with ``kw``; (report, {path: vector}).
    ``lazy``: the Ingestor gets the model's files and loads the model when it has files to embed, as
    Engine.index does."""
    with Engine.open(tmp_path / name, model=str(checkpoint), device="cpu", quantize=quantize) as engine:
        model, load = (engine._model_files(), lambda: engine.model) if lazy else (engine.model, None)
        ingestor = Ingestor(engine.store, model, load=load, workers=kw.pop("workers", 0), **kw)
        report = ingestor.run(str(photos))
        ids, vecs = next(engine.store.catalog.iter_vectors())
        paths = [r.path for r in engine.store.catalog.get(ids.tolist())]
        assert engine.check() == []
    return report, dict(zip(paths, vecs))


def _counts(report):
    return (report.added, report.failed, report.duplicates, report.embedded, report.interrupted)


@pytest.mark.parametrize("workers, quantize, lazy", [(0, None, False), (1, None, True), (2, None, False),
                                                     (2, "int8", True)])
def test_overlapped_run_indexes_exactly_what_the_serial_one_does(tmp_path, tiny_checkpoint, photos, monkeypatch,
                                                                 workers, quantize, lazy):
    """Bit for bit: batches take the files in the scan's order whatever order the workers finish in
    (a vector depends on its batch: in the last bit in float32, far more with int8). With the model
    loaded by the run itself (``lazy``), the threads are settled then, and used the same way."""
    threads = set()
    writers = set()
    real_write = Ingestor._write

    def write(self, *args):
        writers.add(threading.current_thread().name)
        return real_write(self, *args)

    model_calls = []
    serial, serial_vectors = _run(tmp_path, "serial", tiny_checkpoint, photos, quantize, batch_size=2, chunk_size=3,
                                  overlap=False)
    with Engine.open(tmp_path / "probe", model=str(tiny_checkpoint), device="cpu", quantize=quantize) as engine:
        model = engine.model
    real_encode = type(model).encode_pixels

    def encode(self, pixels):
        threads.add(threading.current_thread().name)
        model_calls.append(len(pixels))
        return real_encode(self, pixels)

    monkeypatch.setattr(type(model), "encode_pixels", encode)
    monkeypatch.setattr(Ingestor, "_write", write)
    overlapped, vectors = _run(tmp_path, "overlapped", tiny_checkpoint, photos, quantize, lazy, batch_size=2,
                               chunk_size=3, overlap=True, workers=workers)
    assert _counts(overlapped) == _counts(serial) == (14, 1, 2, 12, False)
    assert overlapped.failures == serial.failures
    assert vectors.keys() == serial_vectors.keys()
    for path, v in vectors.items():
        np.testing.assert_array_equal(v, serial_vectors[path])
    assert threads and all(name.startswith("altsearch-model") for name in threads)
    # the chunks in the writer thread; the last, after the embedding, in the run's own
    assert {name.split("_")[0] for name in writers} == {"altsearch-writer", threading.current_thread().name}
    assert sorted(model_calls) == [2] * 6  # full batches; the twins never reach the model


def test_an_error_in_the_writer_thread_stops_the_run_and_keeps_what_was_committed(tmp_path, tiny_checkpoint,
                                                                                   photos, armed):
    armed("commit:3=raise")  # the third chunk (a first run has no moves, deletions or touched files to commit)
    with Engine.open(tmp_path / "index", model=str(tiny_checkpoint), device="cpu") as engine:
        ingestor = Ingestor(engine.store, engine.model, workers=0, batch_size=2, chunk_size=3, overlap=True)
        with pytest.raises(IndexStoreError, match="No space left on device"):
            ingestor.run(str(photos))
        kept = engine.store.catalog.count()
        assert 6 <= kept < 14 and engine.check() == []
    armed("")
    report, _ = _run(tmp_path, "index", tiny_checkpoint, photos, overlap=True)
    assert (report.added, report.unchanged) == (14 - kept, kept)


def test_an_interrupt_in_the_overlapped_run_commits_the_finished_batches(tmp_path, tiny_checkpoint, photos,
                                                                        monkeypatch):
    decoded = {"n": 0}
    real = DecodePool.imap

    def imap(self, paths):
        for d in real(self, paths):
            decoded["n"] += 1
            if decoded["n"] == 9:
                raise KeyboardInterrupt
            yield d

    monkeypatch.setattr(DecodePool, "imap", imap)
    report, vectors = _run(tmp_path, "index", tiny_checkpoint, photos, batch_size=2, overlap=True)
    assert report.interrupted and report.added == len(vectors) and 6 <= report.added <= 8
    monkeypatch.setattr(DecodePool, "imap", real)
    again, _ = _run(tmp_path, "index", tiny_checkpoint, photos, overlap=True)
    assert again.added == 14 - report.added


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_a_run_holds_only_the_vectors_it_has_not_committed(tmp_path, tiny_checkpoint, photos, monkeypatch, overlap):
    """A first run over millions of new files must not keep every vector it made until its end (3 KB each
    at 768 dimensions): a vector is let go once the chunk that stores it is committed, and a later file
    with the same bytes finds it in the catalogue (the fixture's copy-of-1.jpg is scanned first, its
    original eighth, three chunks later), so the model still runs once per distinct content."""
    held = []
    real = Ingestor._maybe_commit

    def maybe_commit(self, report):
        held.append(len(self._unstored))
        real(self, report)

    monkeypatch.setattr(Ingestor, "_maybe_commit", maybe_commit)
    report, vectors = _run(tmp_path, "index", tiny_checkpoint, photos, batch_size=2, chunk_size=3, overlap=overlap)
    assert _counts(report) == (14, 1, 2, 12, False)
    assert max(held) <= 2 * 3 + 2  # a chunk gathering, one in the writer, a batch's vectors (12 held before)
    for copy in ("copy-of-0.jpg", "copy-of-1.jpg"):
        original = next(p for p in vectors if p.endswith(f"img_00{copy[-5]}.jpg"))
        np.testing.assert_array_equal(vectors[str(photos / copy)], vectors[original])


def test_pipeline_keeps_a_batch_decoded_ahead(tmp_path, tiny_checkpoint, photos, monkeypatch):
    seen = {}
    real_init = DecodePool.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen["max_in_flight"] = self.max_in_flight

    monkeypatch.setattr(DecodePool, "__init__", init)
    _run(tmp_path, "index", tiny_checkpoint, photos, batch_size=5, workers=2)
    assert seen["max_in_flight"] == 5 + 2 * 2


def test_default_batch_size_asks_the_model_first(tiny_checkpoint):
    with Engine.open(None, model=str(tiny_checkpoint), device="cpu") as engine:
        model = engine.model
    assert default_batch_size(model) == CPU_BATCH_SIZE
    model.suggest_batch_size = lambda **limits: 40 if limits == {"maximum": 256, "cpu_batch": 16} else 0
    assert default_batch_size(model) == 40


def _hashes(engine) -> dict[str, str]:
    cat = engine.store.catalog
    return {r.path: r.content_hash for r in cat.get(cat.filter_ids().tolist())}


def test_a_new_catalogue_hashes_files_with_sha256(tmp_path, tiny_checkpoint, photos):
    with Engine.open(tmp_path / "index", model=str(tiny_checkpoint), device="cpu") as engine:
        assert engine.stats()["content_hash"] is None  # chosen by the first indexing run
        engine.index(photos)
        assert engine.store.catalog.get_meta(HASH_META) == engine.stats()["content_hash"] == "sha256-128"
        hashes = _hashes(engine)
    assert len(hashes) == 14
    assert all(h == hashlib.sha256(Path(p).read_bytes()).hexdigest()[:32] for p, h in hashes.items())


def test_a_catalogue_from_before_hash_kinds_keeps_blake2b_and_still_follows_its_files(tmp_path, tiny_checkpoint,
                                                                                       photos):
    """Its stored hashes are BLAKE2b: hashing with anything else would take a touched file for a changed
    one and a moved file for a new one, and embed both again."""
    with Engine.open(tmp_path / "index", model=str(tiny_checkpoint), device="cpu") as engine:
        engine.index(photos)
    assert hash_like_before_hash_kinds(tmp_path / "index" / CATALOG_FILE) == 14
    touched, moved, copied = sorted(photos.rglob("img_*"))[3:6]
    os.utime(touched, (1e9, 1e9))  # same bytes, another mtime
    moved.rename(photos / f"renamed{moved.suffix}")
    shutil.copyfile(copied, photos / f"copy{copied.suffix}")  # new path, known bytes
    make_folder(photos / "new", 1, start=50)
    with Engine.open(tmp_path / "index", model=str(tiny_checkpoint), device="cpu") as engine:
        report = engine.index(photos)
        kind, hashes = engine.stats()["content_hash"], _hashes(engine)
        assert engine.check() == []
    assert (report.moved, report.removed, report.embedded, report.duplicates) == (1, 0, 1, 1)
    assert kind == "blake2b-128"
    assert all(h == hashlib.blake2b(Path(p).read_bytes(), digest_size=16).hexdigest() for p, h in hashes.items())


def test_a_catalogue_hashed_with_an_unknown_kind_is_refused_before_anything_changes(tmp_path, tiny_checkpoint,
                                                                                     photos):
    with Engine.open(tmp_path / "index", model=str(tiny_checkpoint), device="cpu") as engine:
        engine.index(photos)
        engine.store.catalog.set_meta(HASH_META, "xxh3-128")
        before = _hashes(engine)
        make_folder(photos / "new", 1, start=50)
        with pytest.raises(IndexStoreError, match="'xxh3-128', which this version of altsearch does not know"):
            engine.index(photos)
        assert _hashes(engine) == before


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
@pytest.mark.parametrize("slow", ["decode", "model", "commit"])
def test_the_report_says_which_stage_the_run_waited_on(tmp_path, tiny_checkpoint, photos, monkeypatch, overlap, slow):
    """IndexReport.waited: the stage made slow is the one the run's own thread spent its time on."""
    from altsearch import ingest

    delay = 0.1  # the slow stage must outweigh the others even on a busy machine (0.05 once did not)
    if slow == "decode":
        real = DecodePool.imap

        def imap(self, paths):
            for d in real(self, paths):
                threading.Event().wait(delay)
                yield d

        monkeypatch.setattr(DecodePool, "imap", imap)
    elif slow == "commit":
        real_write = Ingestor._write

        def write(self, *args):
            threading.Event().wait(delay * 5)
            return real_write(self, *args)

        monkeypatch.setattr(Ingestor, "_write", write)
    with Engine.open(tmp_path / "idx", model=str(tiny_checkpoint), device="cpu") as engine:
        if slow == "model":
            real_encode = engine.model.encode_pixels

            def encode(pixels):
                threading.Event().wait(delay * 5)
                return real_encode(pixels)

            monkeypatch.setattr(engine.model, "encode_pixels", encode)
        report = Ingestor(engine.store, engine.model, workers=0, batch_size=2, chunk_size=3,
                          overlap=overlap).run(str(photos))
    assert report.embedded == 12 and set(report.waited) == set(ingest.STAGES)
    expected = {"decode": 15 * delay, "model": 6 * 5 * delay, "commit": 3 * 5 * delay}[slow]  # 15 files, 6 batches
    assert report.waited[slow] >= 0.9 * expected
    assert report.waited[slow] == max(report.waited.values())
    assert sum(report.waited.values()) <= report.seconds
    assert report.to_dict()["waited"] == {k: round(v, 3) for k, v in report.waited.items()}


# --- scanning while embedding -------------------------------------------------------------------------


def _held_scan(monkeypatch, after: int, release: threading.Event, fail: Exception | None = None) -> list[bool]:
    """Make the run's scan stop after ``after`` entries until ``release`` is set (20 s at most), then go
    on, or raise ``fail``. The list returned gets whether the scan was released (True) or gave up waiting."""
    from altsearch import ingest

    real = ingest.scan
    released: list[bool] = []

    def scan(*args, **kwargs):
        items = real(*args, **kwargs)  # checks the root at once, as the real one does

        def held():
            for i, item in enumerate(items):
                if i == after:
                    released.append(release.wait(20))
                    if fail is not None:
                        raise fail
                yield item
        return held()

    monkeypatch.setattr(ingest, "scan", scan)
    return released


def _index_heard(engine, folder, on_embed=None, **kw):
    """Index ``folder`` decoding in this thread; (report, the embed progress reports as (done, total, found))."""
    heard = []

    def progress(p) -> None:
        if p.phase == "embed":
            heard.append((p.done, p.total, p.found))
            if on_embed is not None:
                on_embed()

    return engine.index(folder, workers=0, batch_size=2, progress=progress, **kw), heard


def test_a_first_run_embeds_while_its_scan_goes_on(tmp_path, tiny_checkpoint, photos, monkeypatch):
    """A first run over millions of files on a slow disk must not wait for the whole scan before the model
    starts: the scan is held after 10 of the fixture's 15 files until the run reports embedding."""
    release = threading.Event()
    released = _held_scan(monkeypatch, 10, release)
    with Engine.open(tmp_path / "index", model=str(tiny_checkpoint), device="cpu") as engine:
        report, heard = _index_heard(engine, photos, release.set)
        assert released == [True]
        assert _counts(report) == (14, 1, 2, 12, False)
        assert heard[0][1] is None and 8 <= heard[0][2] <= 10  # no total while scanning, and how many found
        assert heard[-1] == (15, 15, 15)  # the scan is over: every file counted, the broken one too
        assert engine.check() == []
    assert not [t for t in threading.enumerate() if t.name == "altsearch-scan"]


def test_a_rerun_streams_new_files_once_every_catalogued_one_is_met(tmp_path, tiny_checkpoint, photos,
                                                                     monkeypatch):
    """A resumed run meets the files it committed first (the scan's order is fixed): the new ones after
    them are embedded while the scan goes on. A new file met while a catalogued one is still unmet
    waits for the end of the scan, since it may be that file moved."""
    with Engine.open(tmp_path / "index", model=str(tiny_checkpoint), device="cpu") as engine:
        engine.index(photos, workers=0)
        later = make_folder(photos / "zz-later", 12, start=40)  # scanned after everything catalogued
        release = threading.Event()
        released = _held_scan(monkeypatch, 15 + 9, release)
        report, heard = _index_heard(engine, photos, release.set)
        assert released == [True] and heard[0][1] is None
        assert (report.added, report.unchanged, report.embedded, report.moved) == (12, 14, 12, 0)

        # a moved file's old path is never met: the new file of its size waits for the end of the scan,
        # and the move is followed
        monkeypatch.undo()
        moved = photos / "zz-later" / "zz-moved.jpg"
        shutil.move(photos / "copy-of-0.jpg", moved)
        make_folder(photos / "zz-last", 3, start=80)
        report, heard = _index_heard(engine, photos)
        assert (report.added, report.moved, report.removed, report.embedded) == (3, 1, 0, 3)
        assert heard[-1] == (4, 4, 4)  # the three and broken.jpg (tried again)
        assert engine.store.catalog.get_by_path(str(moved)) is not None and engine.check() == []
    assert len(later) == 12


def test_a_run_with_a_catalogued_file_gone_streams_new_files_of_other_sizes(tmp_path, tiny_checkpoint, photos,
                                                                            monkeypatch):
    """A run resumed after a committed file was deleted (or a nightly run over new photos beside deleted
    ones) never meets every catalogued file. A move keeps a file's size, so only a new file of the size
    of a catalogued file not met yet waits for the end of the scan (and is then followed as a move, or
    added); the others are embedded while the scan goes on (held here until the run reports embedding)."""
    with Engine.open(tmp_path / "index", model=str(tiny_checkpoint), device="cpu") as engine:
        engine.index(photos, workers=0)
        catalogued = {r.path: r.size for r in engine.store.catalog.get(engine.store.catalog.vector_ids().tolist())}
        gone = sorted(catalogued)[3]
        os.unlink(gone)
        later = make_folder(photos / "zz-later", 12, start=40)
        assert not {p.stat().st_size for p in later} & set(catalogued.values())  # no new file could be a move
        same_size = photos / "zz-later" / "zz-same-size.jpg"  # the gone file's size, other bytes: not a move
        data = save_photo(tmp_path / "small.jpg", seed=99, size=(48, 32)).read_bytes()
        assert len(data) < catalogued[gone]
        same_size.write_bytes(data + b"\0" * (catalogued[gone] - len(data)))  # padding after the JPEG's end
        release = threading.Event()
        released = _held_scan(monkeypatch, 14 + 10, release)
        report, heard = _index_heard(engine, photos, release.set)
        assert released == [True] and heard[0][1] is None  # embedding before the scan's end
        assert (report.added, report.moved, report.removed, report.embedded) == (13, 0, 1, 13)
        assert engine.store.catalog.get_by_path(str(same_size)) is not None
        assert engine.store.catalog.get_by_path(gone) is None and engine.check() == []


def test_the_scan_takes_the_sizes_of_unmet_catalogued_files_again_as_they_are_met():
    """A size only an already met file has holds no new file back once half of those taken are met."""
    from altsearch.ingest import _Walk
    from altsearch.scan import FileEntry

    known = {f"/p/k{i}": (i, 100 + i, 0.0) for i in range(8)}
    walk = _Walk(iter(()), known, set(), ahead=10)
    assert walk._may_be_moved(100) and walk._may_be_moved(107) and not walk._may_be_moved(99)
    for i in range(3):
        del known[f"/p/k{i}"]
    assert walk._may_be_moved(100)  # 5 of 8 left: the sizes taken at first still hold
    del known["/p/k3"]
    assert not walk._may_be_moved(100) and walk._may_be_moved(107)  # 4 of 8: taken again
    known.clear()
    assert not walk._may_be_moved(107)
    assert FileEntry("/p/x", 100, 0.0).size == 100


def test_the_scan_runs_a_bounded_way_ahead_of_the_decoders(tmp_path, tiny_checkpoint, monkeypatch):
    """Past PLAN_AHEAD new files the scan waits for the decoders: a first run over 5M files would
    otherwise hold an entry for each (about 280 bytes) before embedding most of them."""
    from altsearch import ingest

    monkeypatch.setattr(ingest, "PLAN_AHEAD", 3)
    folder = tmp_path / "photos"
    make_folder(folder, 40)
    with Engine.open(tmp_path / "index", model=str(tiny_checkpoint), device="cpu") as engine:
        report, heard = _index_heard(engine, folder)
    assert report.added == 40 and heard[-1] == (40, 40, 40)
    assert max(found - done for done, _, found in heard) <= 3 + 1  # the queue, and the file being decoded
    assert heard[0][1] is None  # the first reports came while the scan was held back


def test_an_interrupt_or_an_error_in_the_scan_ends_the_run_and_its_thread(tmp_path, tiny_checkpoint, photos,
                                                                          monkeypatch):
    """Both come while the scan is held after 12 files; the next run adds exactly what is missing."""
    def interrupt():
        release.set()
        raise KeyboardInterrupt

    kept = {}
    for name, on_embed, fail in [("interrupted", interrupt, None),
                                 ("failed", lambda: release.set(), OSError(5, "Input/output error"))]:
        release = threading.Event()
        _held_scan(monkeypatch, 12, release, fail)
        with Engine.open(tmp_path / name, model=str(tiny_checkpoint), device="cpu") as engine:
            if fail is None:
                report, _ = _index_heard(engine, photos, on_embed)
                assert report.interrupted
            else:
                with pytest.raises(OSError, match="Input/output error"):
                    _index_heard(engine, photos, on_embed)
            assert engine.check() == []
            kept[name] = engine.store.catalog.count()
        assert not [t for t in threading.enumerate() if t.name == "altsearch-scan"]
        monkeypatch.undo()

    for name, n in kept.items():
        with Engine.open(tmp_path / name, model=str(tiny_checkpoint), device="cpu") as engine:
            again = engine.index(photos, workers=0)
            assert (again.added, again.unchanged) == (14 - n, n) and engine.stats()["images"] == 14
