"""End to end through the Python API with the tiny checkpoint: index, search, similar, re-index."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from altsearch import Engine, faults, load_model
from altsearch import vectors as vectors_module
from altsearch import store as store_module
from altsearch.errors import (AltsearchError, IndexLockedError, IndexStoreError, IndexTooLargeError,
                              ModelMismatchError, ModelNotFoundError, QueryError)
from altsearch.home import WriteLock
from altsearch.store import IndexStore
from altsearch.vectors import saved_kind
from tests.checkpoints import write_checkpoint
from tests.photos import make_folder, photo, save_photo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    make_folder(root, 12)
    return root


@pytest.fixture
def engine(tmp_path, tiny_checkpoint):
    with Engine.open(tmp_path / "index", model=str(tiny_checkpoint), device="cpu") as e:
        yield e


def _index(engine, folder, **kw):
    return engine.index(folder, workers=kw.pop("workers", 0), **kw)


def test_index_then_search_matches_brute_force(engine, photos, tiny_checkpoint):
    report = _index(engine, photos)
    assert (report.added, report.failed, report.embedded) == (12, 0, 12)
    stats = engine.stats()
    assert stats["images"] == stats["vectors"] == 12
    assert stats["dimension"] == 24 and stats["model"] == str(tiny_checkpoint.absolute())

    model = load_model(tiny_checkpoint, device="cpu")
    files = sorted(str(p) for p in photos.rglob("*") if p.is_file())
    img = model.encode_image(files, draft=448)
    for query in ("sunset over the sea", "海边的日落"):
        q = model.encode_text([query])[0]
        want = [files[i] for i in np.argsort(-(img @ q))[:5]]
        hits = engine.search(query, k=5)
        assert [h.path for h in hits] == want
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        np.testing.assert_allclose([h.score for h in hits], np.sort(img @ q)[::-1][:5], atol=2e-3)


def test_similar_finds_the_original_of_a_resized_reencoded_copy(engine, photos, tmp_path):
    _index(engine, photos)
    originals = sorted(p for p in photos.rglob("*.jpg"))[:4]
    for original in originals:
        copy = tmp_path / "query" / (original.stem + "_small.jpg")
        copy.parent.mkdir(exist_ok=True)
        with Image.open(original) as im:
            im.convert("RGB").resize((200, 150), Image.Resampling.LANCZOS).save(copy, quality=70)
        hits = engine.similar(copy, k=3)
        assert hits[0].path == str(original)


def test_similar_by_id_excludes_itself(engine, photos):
    _index(engine, photos)
    first = engine.search("a photo", k=1)[0]
    hits = engine.similar(first.id, k=20)
    assert first.id not in [h.id for h in hits] and len(hits) == 11
    assert engine.similar(f"#{first.id}", k=20) == hits  # as queries and the CLI name it


def test_reindex_counts_every_kind_of_change(engine, photos, tmp_path):
    _index(engine, photos)
    files = sorted(p for p in photos.rglob("*.jpg"))
    moved_id = engine.store.catalog.get_by_path(str(files[3])).id
    # two new files
    save_photo(photos / "new" / "a.jpg", seed=100)
    save_photo(photos / "new" / "b.png", seed=101)
    # content changed
    save_photo(files[0], seed=200)
    # touched only (same bytes, new mtime)
    os.utime(files[1], (1_700_000_000, 1_700_000_000))
    # deleted
    files[2].unlink()
    # moved to another folder
    (photos / "moved").mkdir()
    shutil.move(files[3], photos / "moved" / "renamed.jpg")
    # byte-identical duplicate of an indexed file
    shutil.copy2(files[4], photos / "new" / "dup.jpg")
    # indexed, then rewritten into something unreadable: its entry goes, and the report says so
    files[5].write_bytes(files[5].read_bytes()[:200])
    os.utime(files[5], (1_700_000_100, 1_700_000_100))
    (photos / "new" / "junk.jpg").write_bytes(b"never an image")  # a new failure: nothing dropped

    report = _index(engine, photos)
    assert (report.added, report.updated, report.moved, report.removed) == (3, 1, 1, 1)
    assert report.unchanged == 12 - 1 - 1 - 1 - 1  # all but changed, deleted, moved, now unreadable
    assert report.duplicates == 1 and report.embedded == 3  # dup reused the stored vector
    assert (report.failed, report.dropped) == (2, 1)
    assert engine.store.catalog.get_by_path(str(files[5])) is None
    stats = engine.stats()
    assert stats["images"] == stats["vectors"] == 12 + 3 - 1 - 1
    assert engine.check() == []
    # the moved file kept its catalogue entry (and vector) under the new path
    assert engine.store.catalog.get_by_path(str(photos / "moved" / "renamed.jpg")).id == moved_id
    # the duplicate shares its twin's vector exactly
    twin = engine.similar(files[4], k=1)[0]
    assert twin.path == str(photos / "new" / "dup.jpg") and twin.score == pytest.approx(1.0, abs=1e-3)

    again = _index(engine, photos)
    assert (again.added, again.updated, again.moved, again.removed, again.embedded) == (0, 0, 0, 0, 0)
    assert again.unchanged == 13 and (again.failed, again.dropped) == (2, 0)


def test_filters(engine, photos):
    _index(engine, photos)
    under = engine.search("a photo", k=50, under=photos / "trips")
    assert under and all(h.path.startswith(str(photos / "trips") + os.sep) for h in under)
    assert len(under) == 6
    in_2022 = engine.search("a photo", k=50, taken_from="2022-01-01", taken_to="2022-12-31")
    assert in_2022
    for h in in_2022:
        assert h.date.year == 2022
    scores = [h.score for h in engine.search("a photo", k=50)]
    cut = scores[5]
    assert [h.score for h in engine.search("a photo", k=50, min_score=cut)] == scores[:6]
    assert engine.search("a photo", k=5, under=photos / "nothing-here") == []


def test_a_repeated_filter_is_read_once_until_the_catalogue_changes(engine, photos, tiny_checkpoint, monkeypatch):
    _index(engine, photos)
    catalog = engine.store.catalog
    reads = []
    real = catalog.filter_ids
    catalog.filter_ids = lambda **where: reads.append(where) or real(**where)

    def trips():
        return sorted(h.path for h in engine.search("a photo", k=50, under=photos / "trips"))

    selectors = []
    real_selector = vectors_module.id_selector
    monkeypatch.setattr(vectors_module, "id_selector", lambda ids: selectors.append(1) or real_selector(ids))
    first = trips()
    assert len(first) == 6 and trips() == first and len(reads) == 1  # the same filter: its ids kept
    assert len(selectors) == 1  # and its FAISS selector
    everything = engine.search("a photo", k=50, under=photos)
    assert everything == engine.search("a photo", k=50) and len(everything) == 12
    assert len(selectors) == 1 and len(reads) == 2  # a filter that allows every image needs no selector
    assert len(engine.search("a photo", k=50, under=photos / "home")) == 6 and len(reads) == 3
    assert trips() == first and len(reads) == 4  # only the last filter is kept

    make_folder(photos, 4, start=100)  # two more under trips, indexed by this engine
    _index(engine, photos)
    assert len(trips()) == 8 and len(reads) == 5
    with Engine.open(engine.path, model=str(tiny_checkpoint), device="cpu", create=False) as other:
        assert other.remove([photos / "trips" / "2022"]) == 4  # another engine, as another process would
    assert len(trips()) == 4 and len(reads) == 6
    assert not any("/trips/2022/" in p for p in trips())


def test_a_new_filter_on_an_approximate_index_is_tried_after_the_search_first(tmp_path, tiny_checkpoint, monkeypatch):
    """Reading a filter's ids costs 0.1-0.2 s per million images it matches, a search of an approximate
    index a few ms: a filter that allows enough of the best images is applied to them, and its ids are
    never read; the hits are those of the search restricted to the filter's ids. A filter that allows
    too few of them is read as before, once."""
    from altsearch import engine as engine_module

    photos = tmp_path / "photos"
    make_folder(photos, 48)  # half under trips/, a quarter in each year
    with Engine.open(tmp_path / "idx", model=str(tiny_checkpoint), device="cpu") as engine:
        _index(engine, photos)
        engine.optimize("ivf")
        reads, searches = [], []  # searches: "kept" (unfiltered, then the filter), or with the filter's ids
        real_read, real_search, real_kept = engine.store.catalog.filter_ids, engine.store.search, engine.store.search_kept

        def count_calls():
            monkeypatch.setattr(engine.store.catalog, "filter_ids", lambda **w: reads.append(w) or real_read(**w))
            monkeypatch.setattr(engine.store, "search",
                                lambda *a, **kw: searches.append("allowed" if "allowed" in kw else "plain")
                                or real_search(*a, **kw))
            monkeypatch.setattr(engine.store, "search_kept", lambda *a, **kw: searches.append("kept")
                                or real_kept(*a, **kw))

        count_calls()
        filters = [{"under": photos / "trips"}, {"taken_from": "2022-01-01", "taken_to": "2023-12-31"},
                   {"under": photos, "taken_from": "2021-01-01"}]  # a half, a half, all
        found = {}
        for query in ("a photo", "#7"):
            for i, where in enumerate(filters):
                found[query, i] = engine.search(query, k=5, **where)
        assert reads == [] and set(searches) == {"kept"}  # never read, never a selector
        assert len(found["a photo", 0]) == 5 and all("/trips/" in h.path for h in found["a photo", 0])
        assert all(h.id != 7 for h in found["#7", 1])  # the query's own image is still left out

        monkeypatch.setattr(engine_module, "POST_FILTER_DEPTH", 0)  # each filter read, as before
        for query in ("a photo", "#7"):
            for i, where in enumerate(filters):
                engine._last_filter = None
                assert engine.search(query, k=5, **where) == found[query, i]
        assert len(reads) == 6
        monkeypatch.undo()

        reads.clear(), searches.clear()
        count_calls()
        few = engine.search("a photo", k=20, under=photos / "trips" / "2022")  # 12 images: too few for 20
        assert len(few) == 12 and len(reads) == 1 and searches == ["kept", "allowed"]  # tried, then read
        assert engine.search("a photo", k=20, under=photos / "trips" / "2022") == few
        assert len(reads) == 1 and searches == ["kept", "allowed", "allowed"]  # its ids kept: not tried again


def test_query_combinations(engine, photos):
    _index(engine, photos)
    model = engine.model
    t = model.encode_text(["beach", "sunset", "people"])
    want = t[0] + t[1] - t[2]
    want /= np.linalg.norm(want)
    hits = engine.search("beach + sunset - people", k=3)
    base = engine._nearest(want, 3)
    assert [h.id for h in hits] == [h.id for h in base]
    img = sorted(photos.rglob("*.jpg"))[0]
    assert engine.search(f"{img} + sunset", k=1)
    assert engine.search(f"#{hits[0].id}", k=1)[0].id != hits[0].id  # an id alone excludes itself
    with pytest.raises(QueryError):
        engine.search("   ")
    with pytest.raises(QueryError):
        engine.search("#99999")


def test_a_run_that_changes_no_vector_builds_no_exact_index(engine, photos, monkeypatch):
    """An exact index is built from every stored vector at each open: a re-run that finds nothing to
    embed or remove leaves it unbuilt; one with a vector to drop builds it. An index whose kind has a
    file is opened as before, so a run still puts back a lost file."""
    _index(engine, photos)
    opened = []
    real_open = vectors_module.VectorIndex.open
    monkeypatch.setattr(vectors_module.VectorIndex, "open",
                        classmethod(lambda cls, *a, **kw: opened.append(1) or real_open(*a, **kw)))
    files = sorted(photos.rglob("*.jpg"))
    shutil.move(files[0], photos / "renamed.jpg")  # a move keeps its vector
    with Engine.open(engine.path, device="cpu") as e:
        report = _index(e, photos)
        assert (report.unchanged, report.moved, opened) == (11, 1, [])
        files[1].unlink()
        assert _index(e, photos).removed == 1 and opened == [1]
        assert e.stats()["vectors"] == e.stats()["images"] == 11 and e.check() == []
    for i in range(30):  # an ivf needs 40 vectors
        save_photo(photos / "more" / f"{i}.jpg", seed=300 + i, size=(64, 48))
    with Engine.open(engine.path, device="cpu") as e:
        assert _index(e, photos).added == 30
        assert e.optimize("ivf")["kind"] == "ivf"
    (engine.path / "vectors.faiss").unlink()  # lost
    with Engine.open(engine.path, device="cpu") as e:
        assert _index(e, photos).unchanged == 41
        assert (engine.path / "vectors.faiss").is_file() and e.stats()["vector_index"] == "ivf"


def test_bad_files_are_recorded_and_never_abort(engine, photos):
    bad = photos / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    good = (photos / "home").rglob("*.jpg").__next__().read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (bad / "海边 的日落.jpg").write_bytes(good)
    os.symlink(bad / "missing.jpg", bad / "broken.jpg")
    report = _index(engine, photos)
    reasons = {os.path.basename(f["path"]): f["reason"] for f in engine.failures()}
    assert {"empty.jpg", "text.jpg", "truncated.jpg", "broken.jpg"} <= set(reasons)
    assert report.failed == len(reasons)
    assert engine.stats()["images"] == 13  # 12 + the Chinese-named copy (a duplicate: no new embedding)
    # a fixed file is picked up and its failure cleared; a deleted one's failure goes with it
    (bad / "text.jpg").write_bytes(good)
    (bad / "empty.jpg").unlink()
    _index(engine, photos)
    left = {os.path.basename(f["path"]) for f in engine.failures()}
    assert "text.jpg" not in left and "empty.jpg" not in left and {"truncated.jpg", "broken.jpg"} <= left
    # failures elsewhere are not this folder's to clear
    _index(engine, photos / "home")
    assert {os.path.basename(f["path"]) for f in engine.failures()} == left


def test_model_mismatch_is_refused(tmp_path, photos, tiny_checkpoint):
    with Engine.open(tmp_path / "index", model=str(tiny_checkpoint), device="cpu") as e:
        _index(e, photos)
    other = write_checkpoint(tmp_path / "other-model", seed=99)
    with Engine.open(tmp_path / "index", model=str(other), device="cpu") as e:
        with pytest.raises(ModelMismatchError, match="built with model"):
            e.search("a cat")
        with pytest.raises(ModelMismatchError):
            _index(e, photos)
    # an engine whose first act is to index checks the model before the scan changes anything
    gone = next(photos.rglob("*.jpg"))
    gone.unlink()
    with Engine.open(tmp_path / "index", model=str(other), device="cpu") as e:
        with pytest.raises(ModelMismatchError, match="built with model"):
            _index(e, photos)
        assert e.store.catalog.get_by_path(str(gone)) is not None and e.stats()["images"] == 12
    with Engine.open(tmp_path / "index", device="cpu") as e:  # the recorded model by default
        assert len(e.search("a cat", k=3)) == 3


def test_second_writer_is_refused(engine, photos):
    with WriteLock(engine.path):
        with pytest.raises(IndexLockedError, match=f"process {os.getpid()}"):
            _index(engine, photos)


def _fail_on_call(monkeypatch, model, n: int, exc: BaseException):
    """Make the n-th batch the model embeds raise ``exc``; returns the undo."""
    real = model.encode_pixels
    calls = {"n": 0}

    def failing(pixels):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(pixels)

    monkeypatch.setattr(model, "encode_pixels", failing)
    return lambda: monkeypatch.setattr(model, "encode_pixels", real)


def test_crash_mid_index_resumes_without_duplicates(engine, photos, monkeypatch):
    restore = _fail_on_call(monkeypatch, engine.model, 3, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        engine.index(photos, workers=0, batch_size=2)
    committed = engine.stats()["images"]
    assert committed == 4  # two batches of two landed before the crash
    restore()
    report = _index(engine, photos)
    assert report.added == 12 - committed and report.unchanged == committed
    assert engine.stats()["images"] == engine.stats()["vectors"] == 12
    assert engine.check() == []


def test_interrupt_commits_finished_work(engine, photos, monkeypatch):
    restore = _fail_on_call(monkeypatch, engine.model, 2, KeyboardInterrupt())
    report = engine.index(photos, workers=0, batch_size=3)
    assert report.interrupted and report.added == 3
    restore()
    assert _index(engine, photos).added == 9


def test_a_flat_index_has_no_file_and_opens_with_what_was_committed(tmp_path, photos, tiny_checkpoint):
    index = tmp_path / "index"
    with Engine.open(index, model=str(tiny_checkpoint), device="cpu") as e:
        _index(e, photos)
        save_photo(photos / "late.jpg", seed=500)
        _index(e, photos)
        assert e.stats()["vector_index"] == "flat"
    assert sorted(p.name for p in index.iterdir() if "vectors" in p.name) == []  # built from the catalogue
    with Engine.open(index, device="cpu") as e:
        assert e.stats()["vectors"] == 13
        assert e.similar(photos / "late.jpg", k=1)
        assert any(h.path.endswith("late.jpg") for h in e.search("a photo", k=13))


def test_vector_file_lagging_behind_is_caught_up(tmp_path, tiny_checkpoint):
    """An approximate index's file left one save behind, as a kill before the last save leaves it. The
    index is an ivf (40 vectors at least) chosen with optimize, which indexing keeps."""
    photos = tmp_path / "photos"
    make_folder(photos, 48)
    index = tmp_path / "index"
    with Engine.open(index, model=str(tiny_checkpoint), device="cpu") as e:
        _index(e, photos)
        assert e.optimize("ivf") == {"kind": "ivf", "vectors": 48}
        saved = {name: (index / name).read_bytes() for name in ("vectors.faiss", "vectors.faiss.json")}
        save_photo(photos / "late.jpg", seed=500)
        _index(e, photos)
        stats = e.stats()
        assert stats["vector_index"] == "ivf"
        assert (stats["vector_nlist"], stats["vector_nprobe"]) == (e.store.vectors.nlist, e.store.vectors.nprobe)
        assert 1 <= stats["vector_nprobe"] <= stats["vector_nlist"]
        assert stats["vector_rerank"] is None  # an ivf re-ranks nothing
    for name, data in saved.items():
        (index / name).write_bytes(data)
    with Engine.open(index, device="cpu") as e:
        vectors = e.store.vectors
        assert vectors.kind == "ivf" and vectors.header.generation < e.store.generation  # the old file, caught up
        assert e.stats()["vectors"] == 49
        assert e.similar(photos / "late.jpg", k=1)
        assert any(h.path.endswith("late.jpg") for h in e.search("a photo", k=49))


def test_decode_workers_give_the_same_index(tmp_path, photos, tiny_checkpoint):
    results = []
    for workers in (0, 2):
        with Engine.open(tmp_path / f"index-{workers}", model=str(tiny_checkpoint), device="cpu") as e:
            e.index(photos, workers=workers)
            results.append([(h.path, round(h.score, 5)) for h in e.search("sunset", k=12)])
    assert results[0] == results[1]


def test_remove_and_check_repair(engine, photos):
    _index(engine, photos)
    assert engine.remove([photos / "trips"]) == 6
    assert engine.stats()["images"] == engine.stats()["vectors"] == 6
    assert all("trips" not in h.path for h in engine.search("a photo", k=12))
    assert not (engine.path / "vectors.faiss").exists()  # flat: built from the catalogue
    (engine.path / "vectors.faiss").write_bytes(b"garbage")
    problems = engine.check()
    assert problems == [f"vector index {engine.path / 'vectors.faiss'} has no header vectors.faiss.json; "
                        "rebuild the index"]
    assert engine.check(repair=True) == problems
    assert engine.check() == [] and not (engine.path / "vectors.faiss").exists()
    assert len(engine.search("a photo", k=12)) == 6


def test_remove_takes_one_path_as_one_path_and_forgets_its_failures(engine, photos):
    (photos / "trips" / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / "home" / "broken.jpg").write_bytes(b"not a jpeg")
    report = _index(engine, photos)
    assert (report.added, report.failed) == (12, 2)
    assert engine.remove(str(photos / "nowhere.jpg")) == 0  # a string is one path, not its characters
    assert engine.remove(photos / "nowhere") == 0 and engine.stats()["images"] == 12
    with pytest.raises(AltsearchError, match="empty path"):
        engine.remove("")  # would be the current folder
    assert engine.remove(str(photos / "trips")) == 6
    assert [f["path"] for f in engine.failures()] == [str(photos / "home" / "broken.jpg")]
    assert engine.remove([photos / "home" / "broken.jpg"]) == 0  # a failure alone
    assert engine.failures() == [] and engine.stats()["images"] == 6


def test_a_search_does_not_bind_an_empty_index_to_its_model(tmp_path, tiny_checkpoint, photos):
    other = write_checkpoint(tmp_path / "other", seed=7)
    with Engine.open(tmp_path / "typo", model=str(tiny_checkpoint), device="cpu") as e:
        assert e.search("a cat") == []  # an index nothing was indexed into
    with Engine.open(tmp_path / "typo", model=str(other), device="cpu") as e:
        assert e.index(photos, workers=0).added == 12  # takes the model of its first indexing run
        assert e.stats()["model_fingerprint"] == e.model.fingerprint
    with Engine.open(tmp_path / "typo", model=str(tiny_checkpoint), device="cpu") as e:
        with pytest.raises(ModelMismatchError):
            e.search("a cat")


def test_a_model_moved_since_indexing_is_named_with_the_way_to_pass_it(tmp_path, tiny_checkpoint, photos):
    model = tmp_path / "models" / "mine"
    shutil.copytree(tiny_checkpoint, model)
    with Engine.open(tmp_path / "idx", model=str(model), device="cpu") as e:
        assert _index(e, photos).added == 12
    moved = model.rename(tmp_path / "models" / "moved")
    with Engine.open(tmp_path / "idx", device="cpu") as e:  # the index's record names the old folder
        with pytest.raises(ModelNotFoundError, match=r"model folder not found: .*mine \(the model this index was "
                                                     r"built with; .* --model FOLDER"):
            e.search("a cat")
    with Engine.open(tmp_path / "idx", model=str(moved), device="cpu") as e:
        assert len(e.search("a cat", k=3)) == 3


def test_a_script_without_the_main_guard_is_told_why_its_workers_cannot_start(tmp_path, tiny_checkpoint, photos):
    """Decode workers start by running the main script again (spawn): an unguarded script's index call
    stops with WorkerStartError before a file is touched, and each worker says why in one line."""
    from tests.sandbox import as_if_cores

    script = tmp_path / "index_my_photos.py"
    script.write_text(
        "import altsearch\n"
        f"with altsearch.Engine.open({str(tmp_path / 'idx')!r}, model={str(tiny_checkpoint)!r}, device='cpu') as e:\n"
        f"    e.index({str(photos)!r}, workers=1)\n", encoding="utf-8")
    env = as_if_cores({**os.environ, "PYTHONPATH": str(ROOT)}, tmp_path, 4)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith("altsearch.decode.WorkerStartError: decode worker processes "
                                                   "could not start")
    assert "altsearch.Engine.open was called while a worker process was starting" in proc.stderr
    with Engine.open(tmp_path / "idx", create=False, device="cpu") as e:
        assert e.stats()["images"] == 0 and e.failures() == []  # no photo was blamed
    guarded = script.read_text().replace("with ", "if __name__ == '__main__':\n  with ").replace("\n    e.", "\n      e.")
    script.write_text(guarded, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with Engine.open(tmp_path / "idx", create=False, device="cpu") as e:
        assert e.stats()["images"] == 12
    # processes a program starts for its own work may open an engine as they start: not refused
    own = tmp_path / "own_pool.py"
    own.write_text(
        "import multiprocessing, altsearch\n"
        f"engine = altsearch.Engine.open({str(tmp_path / 'idx')!r}, device='cpu', create=False)\n"
        "def double(x):\n"
        "    return 2 * x\n"
        "if __name__ == '__main__':\n"
        "    with multiprocessing.get_context('spawn').Pool(1) as pool:\n"
        "        print(pool.map(double, [1, 2]))\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(own)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[2, 4]", proc.stderr


def test_a_searching_engine_drops_what_another_removes_without_listing_every_id(engine, photos, tiny_checkpoint):
    _index(engine, photos)
    with Engine.open(engine.path, model=str(tiny_checkpoint), device="cpu", create=False) as reader:
        assert len(reader.search("a photo", k=12)) == 12  # its vector index loaded
        catalog = reader.store.catalog
        listed = []
        real = catalog.vector_ids
        catalog.vector_ids = lambda *, changed_since=None: listed.append(changed_since) or real(changed_since=changed_since)
        assert engine.remove([photos / "trips"]) == 6  # another engine, as another process would
        hits = reader.search("a photo", k=12)
        assert len(hits) == 6 and all("trips" not in h.path for h in hits)
        assert listed and None not in listed  # caught up from the removal log, not by listing every id
        assert reader.store.vectors.ids().tolist() == catalog.vector_ids().tolist()


@pytest.mark.parametrize("write", ["remove", "index"])
def test_an_engine_that_searched_writes_on_what_another_committed_since(engine, photos, tiny_checkpoint, tmp_path, write):
    """A long-lived engine searches; another indexes more photos; the first then removes or indexes:
    its commit must build on the catalogue as it now is (the other's vectors kept), in memory and in
    every later process."""
    _index(engine, photos / "trips")
    assert len(engine.search("a photo", k=50)) == 6  # its vector index loaded
    with Engine.open(engine.path, model=str(tiny_checkpoint), device="cpu", create=False) as other:
        assert _index(other, photos / "home").added == 6  # as another process would
    if write == "remove":
        assert engine.remove([sorted((photos / "trips").rglob("*.jpg"))[0]]) == 1
    else:
        make_folder(tmp_path / "more", 2, start=200)
        assert _index(engine, tmp_path / "more").added == 2
    want = 5 + 6 if write == "remove" else 6 + 6 + 2
    catalog_ids = engine.store.catalog.vector_ids().tolist()
    assert len(catalog_ids) == want and engine.store.vectors.ids().tolist() == catalog_ids
    assert len(engine.search("a photo", k=50)) == want
    with Engine.open(engine.path, model=str(tiny_checkpoint), device="cpu", create=False) as later:
        assert later.check() == [] and len(later.search("a photo", k=50)) == want


def test_an_engine_that_searched_keeps_the_kind_another_chose(engine, tiny_checkpoint, tmp_path):
    """A long-lived engine searched its exact index; another process optimized the index to ivf (saving
    its file); the first one's removal must change that ivf index, not delete its file as stale."""
    photos = tmp_path / "many"
    make_folder(photos, 40)  # an ivf needs 40 vectors
    _index(engine, photos)
    assert len(engine.search("a photo", k=50)) == 40 and engine.store.vectors.kind == "flat"
    with Engine.open(engine.path, model=str(tiny_checkpoint), device="cpu", create=False) as other:
        other.optimize("ivf")
    assert engine.remove([sorted(photos.rglob("*.jpg"))[0]]) == 1
    assert engine.store.vectors.kind == "ivf" and len(engine.store.vectors) == 39
    with Engine.open(engine.path, model=str(tiny_checkpoint), device="cpu", create=False) as later:
        assert later.check() == [] and later.stats()["vector_index"] == "ivf"
        assert len(later.search("a photo", k=50)) == 39


def test_a_searching_engine_takes_up_the_kind_another_process_saved(engine, tiny_checkpoint, tmp_path, monkeypatch):
    """A long-lived engine that only searches reads the vector file again when another process saved
    one of another kind (an optimize; an indexing run that outgrew exact search), or deleted it, instead
    of going on with the index it read; a file of its own kind it catches up with, without reading."""
    from altsearch.vectors import VectorIndex

    photos = tmp_path / "many"
    make_folder(photos, 40)  # an ivf needs 40 vectors
    _index(engine, photos)
    want = [h.path for h in engine.search("a photo", k=40)]
    assert len(want) == 40 and engine.store.vectors.kind == "flat"
    opened = []
    real_open = VectorIndex.open.__func__
    def counted_open(cls, path, catalog, **kw):  # the files this engine reads
        if catalog is engine.store.catalog:
            opened.append(1)
        return real_open(cls, path, catalog, **kw)

    monkeypatch.setattr(VectorIndex, "open", classmethod(counted_open))
    with Engine.open(engine.path, model=str(tiny_checkpoint), device="cpu", create=False) as other:
        other.optimize("ivf")
        header = engine.path / "vectors.faiss.json"
        saved = header.read_text()
        fields = json.loads(saved)
        header.write_text(json.dumps({**fields, "size_bytes": fields["size_bytes"] + 1}))  # as if mid-save
        opened.clear()
        assert len(engine.search("a photo", k=40)) == 40 and engine.store.vectors.kind == "flat" and not opened
        header.write_text(saved)  # the save done
        with engine.store.catalog.transaction() as tx:  # and a commit, which makes the engine look again
            tx.set_meta("a note", "x")
        assert sorted(h.path for h in engine.search("a photo", k=40)) == sorted(want)
        assert engine.store.vectors.kind == "ivf" and opened == [1]
        make_folder(tmp_path / "more", 2, start=300)
        _index(other, tmp_path / "more")  # saves an ivf file again
        assert len(engine.search("a photo", k=50)) == 42 and opened == [1]  # caught up, not read again
        assert engine.store.vectors.ids().tolist() == engine.store.catalog.vector_ids().tolist()
        other.optimize("flat")  # deletes the file
        assert engine.stats()["vector_index"] == "flat" and engine.stats()["vectors"] == 42
        assert len(engine.search("a photo", k=50)) == 42 and engine.store.vectors.kind == "flat"


@pytest.mark.parametrize("first", ["optimize", "check --repair"])
def test_a_rebuild_in_a_fresh_engine_replaces_the_file_it_supersedes(tmp_path, tiny_checkpoint, first):
    """An engine whose first act is a rebuild (`altsearch optimize`, `check --repair`) writes the index
    it built, not the file it found there (which it never read)."""
    photos = tmp_path / "many"
    make_folder(photos, 40)
    with Engine.open(tmp_path / "idx", model=str(tiny_checkpoint), device="cpu") as e:
        _index(e, photos)
        e.optimize("ivf")
    with Engine.open(tmp_path / "idx", device="cpu") as e:
        if first == "optimize":
            assert e.optimize("flat") == {"kind": "flat", "vectors": 40}
        else:
            e.store.catalog.set_meta("vector_kind", "flat")  # as if chosen, then repaired
            e.check(repair=True)
        assert not (tmp_path / "idx" / "vectors.faiss").exists() and e.store.vectors.kind == "flat"
    with Engine.open(tmp_path / "idx", device="cpu") as e:
        assert e.stats()["vector_index"] == "flat" and e.check() == []


def _store_with_ivf(folder: Path, n: int = 100, dim: int = 16):
    """An IndexStore of n random vectors whose kind was chosen ivf (its file saved), its ids and vectors."""
    store = IndexStore(folder, device="cpu")
    store.bind_model("m", "fp", dim)
    vecs = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    records = [{"path": f"/p/{i}.jpg", "size": 1, "mtime": 1.0, "content_hash": str(i)} for i in range(n)]
    ids: list[int] = []
    store.commit(lambda tx: ids.extend(tx.add(records, vecs)), added=(ids, vecs))
    store.optimize("ivf")
    return store, ids, vecs


def _remove_as_engine_does(store: IndexStore, ids: list[int]) -> None:
    store.writable_vectors()
    store.commit(lambda tx: tx.remove(ids), removed_ids=ids)
    store.save_vectors()


def test_a_store_opened_during_another_save_takes_up_the_file_once_it_is_whole(tmp_path, monkeypatch):
    """Opened between the two renames of another process's save (file and header disagree), a store
    stands in with an exact index; once the save is whole it reads the file, and its own write keeps it."""
    folder = tmp_path / "idx"
    writer, ids, vecs = _store_with_ivf(folder)
    reader = IndexStore(folder, create=False, device="cpu")
    kinds = []
    real_point = faults.point

    def point(name: str) -> None:
        if name == "save-replace":
            kinds.append(reader.vectors.kind)
        real_point(name)

    monkeypatch.setattr(faults, "point", point)
    _remove_as_engine_does(writer, [ids[0]])
    monkeypatch.setattr(faults, "point", real_point)
    assert kinds == ["flat"]
    writer.commit(lambda tx: tx.set_meta("note", "x"))  # any later commit makes the reader look again
    assert len(reader.search(vecs[:1], 200)[1][0]) == 99 and reader.vectors.kind == "ivf"
    _remove_as_engine_does(reader, [ids[1]])
    assert saved_kind(folder / "vectors.faiss") == "ivf" and IndexStore(folder, create=False, device="cpu").check() == []


def test_a_commit_changes_the_index_it_catches_up_to(tmp_path):
    """A store's commit catches up first, which may read another kind's file in place of its index:
    the commit's own changes then go into that index, not the one it replaced."""
    folder = tmp_path / "idx"
    other, ids, vecs = _store_with_ivf(folder)
    other.optimize("flat")
    store = IndexStore(folder, create=False, device="cpu")
    assert store.vectors.kind == "flat"
    other.optimize("ivf")
    store.commit(lambda tx: tx.remove([ids[0]]), removed_ids=[ids[0]])
    assert store.vectors.kind == "ivf" and store.vectors.ids().tolist() == store.catalog.vector_ids().tolist()


def test_an_optimize_that_could_not_record_its_choice_leaves_the_index_as_it_was(tmp_path, armed):
    folder = tmp_path / "idx"
    store, ids, _ = _store_with_ivf(folder)
    armed("commit=raise")  # a full disk: the transaction rolls back
    with pytest.raises(IndexStoreError, match="No space left"):
        store.optimize("flat")
    armed("")
    assert store.chosen_kind == "ivf" and store.vectors.kind == "ivf"
    _remove_as_engine_does(store, [ids[0]])  # the same store writes on: the chosen ivf stays
    assert saved_kind(folder / "vectors.faiss") == "ivf" and IndexStore(folder, create=False, device="cpu").check() == []


def test_a_repair_in_a_long_lived_store_builds_the_kind_the_index_has_now(tmp_path):
    """A store searched the ivf index; another process went back to auto (exact, no file), and a crash
    there left the header: the first store's repair builds what the size picks, not the ivf it read."""
    folder = tmp_path / "idx"
    other, _, vecs = _store_with_ivf(folder)
    header = (folder / "vectors.faiss.json").read_text()
    store = IndexStore(folder, create=False, device="cpu")
    store.search(vecs[:1], 5)
    assert store.vectors.kind == "ivf"
    other.optimize("auto")
    (folder / "vectors.faiss.json").write_text(header)
    assert store.check() == ["vectors.faiss is missing (its header vectors.faiss.json is there)"]
    store.repair()
    assert saved_kind(folder / "vectors.faiss") is None and store.vectors.kind == "flat"
    assert IndexStore(folder, create=False, device="cpu").check() == []


def test_current_vector_file_opens_without_reconciling(tmp_path, tiny_checkpoint, monkeypatch):
    from altsearch.vectors import VectorIndex

    photos = tmp_path / "photos"
    make_folder(photos, 40)  # an ivf needs 40 vectors
    index = tmp_path / "index"
    with Engine.open(index, model=str(tiny_checkpoint), device="cpu") as e:
        _index(e, photos)
        e.optimize("ivf")

    def no_reconcile(*a, **k):
        raise AssertionError("a current vector file was reconciled")

    monkeypatch.setattr(VectorIndex, "reconcile", no_reconcile)
    with Engine.open(index, device="cpu") as e:
        assert len(e.search("a photo", k=12)) == 12 and e.stats()["vectors"] == 40
        assert e.stats()["vector_index"] == "ivf"


def test_a_folder_that_cannot_be_listed_is_not_taken_for_deleted(engine, photos, monkeypatch):
    _index(engine, photos)
    locked = str(photos / "trips")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = _index(engine, photos)
    assert report.removed == 0 and report.unchanged == 12
    assert engine.stats()["images"] == 12
    assert [f["path"] for f in engine.failures()] == [locked]
    monkeypatch.setattr(os, "scandir", real)
    again = _index(engine, photos)
    assert again.removed == 0 and engine.failures() == []


def test_optimize_refuses_a_kind_it_cannot_build(engine, photos):
    _index(engine, photos)
    with pytest.raises(IndexStoreError, match="unknown vector index kind 'hnsw'"):
        engine.optimize("hnsw")
    with pytest.raises(IndexStoreError, match="ivfpq index needs at least 256 vectors, got 12"):
        engine.optimize("ivfpq")  # 256 training points for its PQ codes
    assert engine.stats()["vector_index"] == "flat" and len(engine.search("a photo", k=3)) == 3


# --- a vector index kind chosen with optimize sticks ---------------------------------------------


MISSING_APPROXIMATE = ("vectors.faiss is missing: {} images call for an approximate index (searched exactly, "
                       "in memory, until it is built)")


def _vector_files(index):
    return sorted(p.name for p in index.iterdir() if "vectors" in p.name)


def test_flat_chosen_beyond_exact_max_is_kept(tmp_path, photos, tiny_checkpoint, monkeypatch):
    """optimize("flat") on an index beyond EXACT_MAX (lowered so that 12 photos are beyond it): writers
    keep the exact index, which has no file, and check accepts it, in this engine and in another."""
    index = tmp_path / "index"
    with Engine.open(index, model=str(tiny_checkpoint), device="cpu") as e:
        _index(e, photos)
        monkeypatch.setattr(vectors_module, "EXACT_MAX", 4)
        assert e.check() == [MISSING_APPROXIMATE.format(12)]  # the size picks ivfpq
        assert e.optimize("flat") == {"kind": "flat", "vectors": 12}
        assert e.store.chosen_kind == "flat" and e.store.catalog.get_meta("vector_kind") == "flat"
        assert e.check() == []
        save_photo(photos / "late.jpg", seed=500)
        _index(e, photos)  # a writer: the size would rebuild an ivfpq (which 13 vectors cannot train)
        assert e.stats()["vector_index"] == "flat"
    assert _vector_files(index) == []
    with Engine.open(index, device="cpu") as e:
        assert e.check() == [] and e.check(repair=True) == []
        stats = e.stats()
        assert (stats["vector_index"], stats["vector_index_chosen"], stats["vectors"]) == ("flat", "flat", 13)
        assert stats["vector_nlist"] is stats["vector_nprobe"] is stats["vector_rerank"] is None  # exact
        assert e.similar(photos / "late.jpg", k=1)
        with pytest.raises(IndexStoreError, match="ivfpq index needs at least 256 vectors"):
            e.optimize("auto")  # the size's kind cannot be built: nothing is recorded
        assert e.store.chosen_kind == "flat" and e.check() == []
        monkeypatch.setattr(vectors_module, "EXACT_MAX", 100)
        assert e.optimize("auto") == {"kind": "flat", "vectors": 13}
        assert e.store.chosen_kind is None and e.stats()["vector_index_chosen"] == "auto"
        monkeypatch.setattr(vectors_module, "EXACT_MAX", 4)
        assert e.check() == [MISSING_APPROXIMATE.format(13)]  # the size picks again


def test_an_ivf_chosen_below_exact_max_is_kept_rebuilt_and_repaired(tmp_path, tiny_checkpoint, caplog):
    """An ivf chosen for 48 images, where the size picks flat: indexing runs keep it, a lost file is
    reported and rebuilt as an ivf by `check --repair` and by the next indexing run, and one that
    shrank 4-fold below what an ivf can train on is kept as it is."""
    photos = tmp_path / "photos"
    make_folder(photos, 48)  # an ivf needs 40 vectors
    index = tmp_path / "index"
    with Engine.open(index, model=str(tiny_checkpoint), device="cpu") as e:
        _index(e, photos)
        assert e.optimize("ivf") == {"kind": "ivf", "vectors": 48}
        save_photo(photos / "late.jpg", seed=500)
        _index(e, photos)
        assert e.stats()["vector_index"] == "ivf" and e.check() == []
    assert _vector_files(index) == ["vectors.faiss", "vectors.faiss.json"]
    for rebuilt_by in ("repair", "index"):
        for name in _vector_files(index):
            (index / name).unlink()
        with Engine.open(index, device="cpu") as e:
            assert e.check() == ["vectors.faiss is missing: an ivf index was chosen with optimize (searched "
                                 "exactly, in memory, until it is built)"]
            assert e.stats()["vector_index"] == "flat"  # opened from the catalogue meanwhile
            heard = []
            if rebuilt_by == "repair":
                e.check(repair=True, progress=lambda *step: heard.append(step))
            else:
                assert _index(e, photos, progress=heard.append).unchanged == 49
                assert heard[-1].phase == "done"  # the rebuild comes after the last commit, before the end
                heard = [(p.step, p.done, p.total) for p in heard if p.phase == "vectors"]
            _assert_build_reported(heard, 49, ("train", "add", "tune"))
            assert e.stats()["vector_index"] == "ivf" and e.check() == []
        assert _vector_files(index) == ["vectors.faiss", "vectors.faiss.json"]
    shutil.rmtree(photos / "trips")
    shutil.rmtree(photos / "home" / "2021")
    (photos / "late.jpg").unlink()
    with Engine.open(index, device="cpu") as e:
        assert _index(e, photos).removed == 37  # 12 left of the 49 the ivf was trained on
        assert "ivf index needs at least 40 vectors" in caplog.text and "keeping the ivf" in caplog.text
        assert e.stats()["vector_index"] == "ivf" and e.stats()["vectors"] == 12 and e.check() == []
        assert e.store.vectors.header.count == 12  # and saved


def _assert_build_reported(heard, n, steps):
    """`heard`: the (step, done, total) a rebuild of n vectors reported, each step in turn, counting up
    to its total."""
    names = [step for step, _, _ in heard]
    assert [a for a, b in zip(names, names[1:] + [None]) if a != b] == list(steps)  # in turn, each once
    for name in steps:
        counts = [(done, total) for step, done, total in heard if step == name]
        assert counts[0][0] == 0 and counts[-1][0] == counts[-1][1]  # from nothing to all of it
        assert all(a[0] <= b[0] for a, b in zip(counts, counts[1:]))
        if name in ("load", "add"):
            assert counts[-1] == (n, n)


def test_a_rebuild_reports_its_steps(tmp_path, monkeypatch):
    """What `optimize`, `check --repair` and a writer's rebuild show while the vectors are read,
    clustered, added and the search settings tuned (~20 minutes at 10M on 2 cores)."""
    store, _ = _stored_vectors(tmp_path / "index", 300)
    heard = []
    assert store.optimize("ivfpq", progress=lambda *step: heard.append(step)).kind == "ivfpq"
    _assert_build_reported(heard, 300, ("train", "add", "tune"))
    heard.clear()
    assert store.optimize("flat", progress=lambda *step: heard.append(step)).kind == "flat"
    _assert_build_reported(heard, 300, ("load",))
    store.close()

    # a remove that must rebuild the approximate index first (lost, and too large to stand in exactly)
    monkeypatch.setattr(vectors_module, "EXACT_MAX", 100)
    with Engine.open(tmp_path / "index", device="cpu") as e:
        e.optimize("auto")
    (tmp_path / "index" / "vectors.faiss").unlink()
    monkeypatch.setattr(store_module, "available_memory", lambda: 1000)
    heard.clear()
    with Engine.open(tmp_path / "index", device="cpu") as e:
        assert e.remove(["/p/0.jpg"], progress=lambda *step: heard.append(step)) == 1
    _assert_build_reported(heard, 300, ("train", "add", "tune"))


def _add(store: IndexStore, n: int) -> None:
    """Commit n more images with random 16-d vectors, as an indexing run's chunk does."""
    start = store.catalog.count()
    records = [{"path": f"/p/{i}.jpg", "size": 1, "mtime": 1.0, "content_hash": str(i)}
               for i in range(start, start + n)]
    vecs = np.random.default_rng(start).standard_normal((n, 16)).astype(np.float32)
    added: list[int] = []
    store.commit(lambda tx: added.extend(tx.add(records, vecs)), added=(added, vecs))


def test_a_kind_chosen_with_optimize_is_retrained_as_itself(tmp_path):
    """Through IndexStore with stored vectors: an ivfpq chosen below EXACT_MAX stays one where the size
    would switch it to flat, and is retrained as an ivfpq once it has grown 4-fold."""
    store = IndexStore(tmp_path / "index", device="cpu")
    store.bind_model("m", "fp", 16)
    add = lambda n: _add(store, n)  # noqa: E731
    add(300)
    assert store.optimize("ivfpq").kind == "ivfpq" and store.check() == []
    add(10)
    assert store.vectors.needs_rebuild()  # what the size asks for: flat
    assert not store.maybe_rebuild() and store.vectors.kind == "ivfpq"
    add(1000)
    assert store.maybe_rebuild()
    assert (store.vectors.kind, store.vectors.built_count) == ("ivfpq", 1310)
    store.save_vectors()
    assert store.check() == []
    store.close()


def test_an_exact_index_grown_beyond_exact_search_is_let_go_until_the_run_ends(tmp_path, monkeypatch):
    """A run that grows an exact index beyond EXACT_MAX ends by building the approximate one from the
    catalogue (maybe_rebuild), so the exact one is not grown meanwhile: at 3 KB a vector, a first run
    over a million photos held 3 GB for nothing. Its commits leave the vectors to the catalogue; a
    search meanwhile opens the index again; an exact kind chosen with optimize is kept growing."""
    monkeypatch.setattr(vectors_module, "EXACT_MAX", 100)
    sizes = []  # the in-memory index's size after each add
    real_add = vectors_module.VectorIndex.add

    def add_to_index(self, ids, vecs):
        real_add(self, ids, vecs)
        sizes.append((self.kind, len(self)))

    monkeypatch.setattr(vectors_module.VectorIndex, "add", add_to_index)
    store = IndexStore(tmp_path / "index", device="cpu")
    store.bind_model("m", "fp", 16)
    for n in (80, 80, 200, 40):
        _add(store, n)
    assert sizes == [("flat", 80), ("flat", 160)]  # let go past 100, then not opened again
    assert store.maybe_rebuild()
    assert (store.vectors.kind, len(store.vectors)) == ("ivfpq", 400)
    store.save_vectors()
    assert store.check() == [] and saved_kind(tmp_path / "index" / "vectors.faiss") == "ivfpq"
    _add(store, 10)  # an approximate index is compact: kept, and added to
    assert sizes[-1] == ("ivfpq", 410)
    store.close()

    # a search while it is let go opens it again, from the catalogue, with every vector
    store = IndexStore(tmp_path / "other", device="cpu")
    store.bind_model("m", "fp", 16)
    _add(store, 280)
    query = np.random.default_rng(9).standard_normal((1, 16)).astype(np.float32)
    scores, ids = store.search(query, 300)
    assert ids.shape == (1, 280) and store.vectors.kind == "flat"
    _add(store, 10)
    assert store.maybe_rebuild() and (store.vectors.kind, len(store.vectors)) == ("ivfpq", 290)
    store.close()

    # an exact index chosen with optimize is the user's to hold, whatever its size
    store = IndexStore(tmp_path / "chosen", device="cpu")
    store.bind_model("m", "fp", 16)
    _add(store, 50)
    store.optimize("flat")
    sizes.clear()
    _add(store, 100)
    assert sizes == [("flat", 150)] and not store.maybe_rebuild()
    store.close()


def _stored_vectors(folder, n, dim=16):
    """An index folder whose catalogue holds n random vectors (no model: records and vectors only)."""
    store = IndexStore(folder, device="cpu")
    store.bind_model("m", "fp", dim)
    records = [{"path": f"/p/{i}.jpg", "size": 1, "mtime": 1.0, "content_hash": str(i)} for i in range(n)]
    vecs = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    added: list[int] = []
    store.commit(lambda tx: added.extend(tx.add(records, vecs)), added=(added, vecs))
    return store, vecs


def test_an_exact_index_that_would_not_fit_in_memory_is_not_built(tmp_path, monkeypatch, caplog):
    """Where the approximate index's file is lost or damaged, an exact index built in memory stands in
    for it, unless it would take more than FLAT_MEMORY_SHARE of the memory available (10M x 768
    float32: 31 GB): then a search says why and how to rebuild the file, losing nothing, `stats` says
    the same without failing, and a writer rebuilds the approximate index before it writes."""
    monkeypatch.setattr(vectors_module, "EXACT_MAX", 100)  # 300 vectors call for an ivfpq
    folder = tmp_path / "index"
    store, vecs = _stored_vectors(folder, 300)
    assert store.optimize("auto").kind == "ivfpq"
    store.close()
    (folder / "vectors.faiss").unlink()  # lost
    need = 300 * vectors_module.flat_bytes(16)
    just_short = int(need / store_module.FLAT_MEMORY_SHARE) - 1
    monkeypatch.setattr(store_module, "available_memory", lambda: just_short)

    reader = IndexStore(folder, create=False, device="cpu")
    read = []
    reader.catalog.iter_vectors = lambda *a, **kw: read.append(1) or iter(())
    with caplog.at_level(logging.INFO, logger="altsearch"), pytest.raises(IndexTooLargeError) as err:
        reader.search(vecs[:1], 5)
    assert read == [] and "building a flat vector index" not in caplog.text  # refused before reading
    del reader.catalog.iter_vectors
    message = str(err.value)
    assert "vectors.faiss: [Errno 2] No such file or directory" in message
    assert "and an exact index of its 300 vectors would take" in message
    assert f"altsearch check --repair --index {folder}" in message
    with Engine.open(folder, device="cpu") as e:
        stats = e.stats()  # says what is wrong instead of failing
        assert stats["vector_index"] is None and stats["vectors"] is None and stats["images"] == 300
        assert stats["vector_index_problem"] == message
    (folder / "vectors.faiss.json").write_text("{damaged")
    with pytest.raises(IndexTooLargeError, match="is damaged"):
        IndexStore(folder, create=False, device="cpu").search(vecs[:1], 5)
    (folder / "vectors.faiss.json").unlink()
    with pytest.raises(IndexTooLargeError, match="there is no vectors.faiss, and an exact index"):
        IndexStore(folder, create=False, device="cpu").search(vecs[:1], 5)
    assert reader.catalog.count() == 300  # nothing lost

    # a writer rebuilds the approximate index from the stored vectors (the model does not run)
    with Engine.open(folder, device="cpu") as e:
        assert e.remove(["/p/0.jpg"]) == 1
        assert e.store.vectors.kind == "ivfpq" and e.check() == []
    reader = IndexStore(folder, create=False, device="cpu")
    _, found = reader.search(vecs[1:2], 1)
    assert found[0, 0] >= 0 and reader.vectors.kind == "ivfpq"

    # with room for it, the exact index stands in for a lost file, as before
    (folder / "vectors.faiss.json").write_text("{damaged")
    monkeypatch.setattr(store_module, "available_memory", lambda: need * 10)
    with caplog.at_level(logging.INFO, logger="altsearch"):
        assert IndexStore(folder, create=False, device="cpu").vectors.kind == "flat"
    assert "is damaged" in caplog.text and "building a flat vector index from the catalogue" in caplog.text
    monkeypatch.setattr(store_module, "available_memory", lambda: None)  # not known: no limit
    assert IndexStore(folder, create=False, device="cpu").vectors.kind == "flat"


def test_flat_chosen_but_too_large_for_memory_is_refused(tmp_path, monkeypatch):
    store, _ = _stored_vectors(tmp_path / "index", 300)
    monkeypatch.setattr(store_module, "available_memory", lambda: 1000)
    read = []
    store.catalog.iter_vectors = lambda *a, **kw: read.append(1) or iter(())
    with pytest.raises(IndexTooLargeError, match="an approximate index would fit: altsearch optimize --kind auto"):
        store.optimize("flat")
    assert read == []  # refused from the count, before a vector was read
    del store.catalog.iter_vectors
    assert store.chosen_kind is None  # refused before anything was recorded
    store.close()


def test_optimize_stopped_after_recording_its_kind(tmp_path, tiny_checkpoint, armed):
    """optimize("flat") over an ivf, stopped (by a full disk, here) after it recorded the choice and
    before it deleted the ivf's file: readers still use the file, check reports its other kind, and a
    repair builds the chosen one."""
    photos = tmp_path / "photos"
    make_folder(photos, 40)
    index = tmp_path / "index"
    with Engine.open(index, model=str(tiny_checkpoint), device="cpu") as e:
        _index(e, photos)
        e.optimize("ivf")
        armed("committed=raise")
        with pytest.raises(IndexStoreError, match="No space left"):
            e.optimize("flat")
        armed("")
    with Engine.open(index, device="cpu") as e:
        assert e.stats()["vector_index"] == "ivf"
        assert e.check() == ["vectors.faiss holds an ivf index, but flat was chosen with optimize"]
        e.check(repair=True)
        assert e.stats()["vector_index"] == "flat" and e.check() == []
    assert _vector_files(index) == []
