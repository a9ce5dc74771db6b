from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from altsearch import catalog as catalog_module
from altsearch.catalog import SCHEMA_VERSION, Catalog, ImageRecord, as_stored, failures
from altsearch.errors import IndexLockedError, IndexStoreError, ModelMismatchError, SchemaVersionError

DIM = 16


def record(path: str, **fields: object) -> dict[str, object]:
    base: dict[str, object] = {"path": path, "size": 100, "mtime": 1_000.0, "content_hash": f"h:{path}"}
    return base | fields


def unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    vecs = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


@pytest.fixture
def cat(tmp_path: Path):
    catalog = Catalog(tmp_path / "index" / "catalog.sqlite")
    yield catalog
    catalog.close()


def add(cat: Catalog, paths: list[str], seed: int = 0, **fields: object) -> list[int]:
    with cat.transaction() as tx:
        return tx.add([record(p, **fields) for p in paths], unit(len(paths), seed=seed))


def all_vectors(cat: Catalog) -> dict[int, np.ndarray]:
    return {int(i): v for ids, vecs in cat.iter_vectors() for i, v in zip(ids, vecs)}


# --- writes ------------------------------------------------------------------------------


def test_add_then_read_back(cat: Catalog) -> None:
    vecs = unit(3)
    with cat.transaction() as tx:
        ids = tx.add(
            [
                record("/p/a.jpg", width=640, height=480, format="JPEG", taken_at=5.0, camera_make="Canon"),
                record("/p/b.png", content_hash="same"),
                record("/p/c.png", content_hash="same", size=np.int64(7)),
            ],
            vecs,
        )
    assert ids == [1, 2, 3]
    assert cat.count() == 3
    a = cat.get_by_path("/p/a.jpg")
    assert isinstance(a, ImageRecord)
    assert (a.id, a.width, a.height, a.format, a.taken_at, a.camera_make, a.status) == (
        1, 640, 480, "JPEG", 5.0, "Canon", "ok",
    )  # fmt: skip
    assert cat.get_by_path("/p/missing.jpg") is None
    assert [r.path for r in cat.get([3, 99, 1])] == ["/p/c.png", "/p/a.jpg"]
    # a duplicate's vector: the first image with that content, or the next one when it is excluded
    np.testing.assert_array_equal(cat.vector_for_hash("same"), as_stored(vecs[1]))
    np.testing.assert_array_equal(cat.vector_for_hash("same", exclude=2), as_stored(vecs[2]))
    assert cat.vector_for_hash("same", exclude=3) is not None
    assert cat.vector_for_hash("h:/p/a.jpg", exclude=1) is None
    assert cat.vector_for_hash("never stored") is None
    assert cat.file_states() == {
        "/p/a.jpg": (1, 100, 1000.0, "h:/p/a.jpg"),
        "/p/b.png": (2, 100, 1000.0, "same"),
        "/p/c.png": (3, 7, 1000.0, "same"),
    }
    np.testing.assert_array_equal(cat.vector_ids(), [1, 2, 3])
    stored = all_vectors(cat)
    for i, v in zip(ids, vecs):
        np.testing.assert_array_equal(stored[i], as_stored(v))
    assert cat.dimension == DIM and cat.get_meta("dimension") == str(DIM)


def test_update_move_remove(cat: Catalog) -> None:
    a, b, c = add(cat, ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"])
    b_vector = all_vectors(cat)[b]
    new = unit(1, seed=9)[0]
    with cat.transaction() as tx:
        tx.update(a, {"size": 5, "mtime": 2_000.0, "content_hash": "new", "width": 10}, new)
        tx.move(b, "/q/b-renamed.jpg", 101, 3_000.0)
        assert tx.remove([c, 12345]) == 1
    assert set(cat.file_states()) == {"/p/a.jpg", "/q/b-renamed.jpg"}
    (rec_a,) = cat.get([a])
    assert (rec_a.size, rec_a.mtime, rec_a.content_hash, rec_a.width) == (5, 2000.0, "new", 10)
    rec_b = cat.get_by_path("/q/b-renamed.jpg")
    assert rec_b is not None and (rec_b.id, rec_b.size, rec_b.mtime) == (b, 101, 3000.0)
    stored = all_vectors(cat)
    assert set(stored) == {a, b}  # c's vector went with its row
    np.testing.assert_array_equal(stored[a], as_stored(new))
    np.testing.assert_array_equal(stored[b], b_vector)  # moved: vector kept
    assert cat.integrity() == []


def test_update_only_vector_and_errors(cat: Catalog) -> None:
    (a,) = add(cat, ["/p/a.jpg"])
    add(cat, ["/p/b.jpg"], seed=1)
    with cat.transaction() as tx:
        tx.update(a, {}, unit(1, seed=3)[0])
    np.testing.assert_array_equal(all_vectors(cat)[a], as_stored(unit(1, seed=3)[0]))
    with pytest.raises(IndexStoreError, match="no image with id 999"), cat.transaction() as tx:
        tx.update(999, {"size": 1})
    with pytest.raises(IndexStoreError, match="UNIQUE"), cat.transaction() as tx:
        tx.move(a, "/p/b.jpg", 1, 1.0)
    with pytest.raises(IndexStoreError, match="UNIQUE"):
        add(cat, ["/p/a.jpg"])
    with pytest.raises(ValueError, match="unknown image fields"), cat.transaction() as tx:
        tx.update(a, {"colour": "red"})
    with pytest.raises(ValueError, match="lacks"), cat.transaction() as tx:
        tx.add([{"path": "/p/x.jpg"}], unit(1))
    assert cat.count() == 2


def test_vectors_are_checked(cat: Catalog) -> None:
    add(cat, ["/p/a.jpg"])
    with pytest.raises(ModelMismatchError, match="16-dimensional"), cat.transaction() as tx:
        tx.add([record("/p/b.jpg")], unit(1, dim=DIM + 1))
    with pytest.raises(ValueError, match="shape"), cat.transaction() as tx:
        tx.add([record("/p/b.jpg"), record("/p/c.jpg")], unit(1))
    bad = unit(1)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"), cat.transaction() as tx:
        tx.add([record("/p/b.jpg")], bad)
    assert cat.count() == 1


def test_failed_transaction_leaves_nothing(cat: Catalog) -> None:
    add(cat, ["/p/keep.jpg"])
    generation = cat.generation
    with pytest.raises(RuntimeError, match="boom"), cat.transaction() as tx:
        tx.add([record("/p/a.jpg"), record("/p/b.jpg")], unit(2))
        tx.remove([1])
        tx.record_failure("/p/bad.jpg", "corrupt")
        tx.set_meta("model_id", "x")
        raise RuntimeError("boom")
    assert list(cat.file_states()) == ["/p/keep.jpg"]
    assert cat.vector_ids().tolist() == [1]
    assert cat.failure_count() == 0
    assert cat.get_meta("model_id") is None
    assert cat.generation == generation
    assert cat.integrity() == []


def test_transaction_object_dies_with_its_transaction(cat: Catalog) -> None:
    with cat.transaction() as tx:
        pass
    with pytest.raises(IndexStoreError, match="ended"):
        tx.add([record("/p/a.jpg")], unit(1))


def test_ids_are_never_reused(cat: Catalog) -> None:
    ids = add(cat, ["/p/a.jpg", "/p/b.jpg"])
    with cat.transaction() as tx:
        tx.remove([ids[-1]])  # the highest id
    assert add(cat, ["/p/c.jpg"]) == [3]


def test_generation_counts_committed_changes(cat: Catalog) -> None:
    start = cat.generation
    with cat.transaction():
        pass  # nothing written: no new generation
    assert cat.generation == start
    add(cat, ["/p/a.jpg"])
    cat.set_meta("model_id", "BAAI/AltCLIP")
    assert cat.generation == start + 2
    assert cat.get_meta("model_id") == "BAAI/AltCLIP"
    meta = cat.all_meta()
    assert meta["schema_version"] == str(SCHEMA_VERSION)
    assert {"created_at", "updated_at", "catalog_id"} <= set(meta)
    assert float(meta["updated_at"]) >= float(meta["created_at"])


def test_data_version_moves_with_every_commit_from_anywhere(cat: Catalog) -> None:
    add(cat, ["/p/a.jpg"])
    seen = cat.data_version()
    cat.get([1]), cat.count(), cat.generation  # reads change nothing
    assert cat.data_version() == seen
    add(cat, ["/p/b.jpg"])  # this process's own writer
    after_own = cat.data_version()
    assert after_own != seen
    with Catalog(cat.path) as other:  # another writer (as another process would be)
        other.set_meta("note", "x")
    assert cat.data_version() != after_own
    cat.close()
    with pytest.raises(IndexStoreError, match="closed"):
        cat.data_version()


def test_query_reads_see_every_commit_and_leave_no_snapshot_open(cat: Catalog) -> None:
    """get and iter_vectors(ids=) go through a private sqlite3 connection: each read sees what any
    connection committed before it, and none keeps a read transaction open (a WAL checkpoint
    completes right after)."""
    (a,) = add(cat, ["/p/a.jpg"])
    assert [r.path for r in cat.get([a])] == ["/p/a.jpg"] and len(list(cat.iter_vectors(ids=[a]))) == 1
    with Catalog(cat.path) as other:  # another writer (as another process would be)
        (b,) = add(other, ["/p/b.jpg"])
        assert [r.path for r in cat.get([a, b])] == ["/p/a.jpg", "/p/b.jpg"]
        assert next(cat.iter_vectors(ids=[a, b]))[0].tolist() == [a, b]
        with other.transaction() as tx:
            tx.remove([a])
        assert [r.id for r in cat.get([a, b])] == [b]
    writer = sqlite3.connect(cat.path)
    try:
        busy, _, _ = writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        writer.close()
    assert busy == 0
    cat.close()
    with pytest.raises(IndexStoreError, match="closed"):
        cat.get([b])


def test_get_returns_every_field(cat: Catalog) -> None:
    fields = {"width": 4000, "height": 3000, "format": "JPEG", "taken_at": 12.5, "camera_make": "Canon",
              "camera_model": "EOS R5"}
    (image_id,) = add(cat, ["/p/\udcff-raw.jpg"], content_hash="abc", **fields)
    (got,) = cat.get([image_id])
    assert got == cat.get_by_path("/p/\udcff-raw.jpg")
    assert (got.path, got.width, got.camera_model, got.status) == ("/p/\udcff-raw.jpg", 4000, "EOS R5", "ok")


def test_failures(cat: Catalog) -> None:
    with cat.transaction() as tx:
        tx.record_failure("/p/b.jpg", "truncated")
        tx.record_failure("/p/a.jpg", "not an image")
        tx.record_failure("/p/b.jpg", "still truncated")  # replaces
        tx.record_failure("/p/\udcff.jpg", "truncated")  # not UTF-8
    assert cat.failure_count() == 3
    with cat.transaction() as tx:
        tx.clear_failures(["/p/\udcff.jpg"])
    assert cat.failure_count() == 2
    reasons = [(p, r) for p, r, _ in cat.failures()]
    assert reasons == [("/p/a.jpg", "not an image"), ("/p/b.jpg", "still truncated")]
    with cat.transaction() as tx:
        tx.clear_failures(["/p/a.jpg", "/p/never.jpg"])
        tx.clear_failures([])
    assert [p for p, _, _ in cat.failures()] == ["/p/b.jpg"]


# --- paths and filters -------------------------------------------------------------------


def test_non_utf8_and_unicode_paths_round_trip(cat: Catalog) -> None:
    latin1 = os.fsdecode(b"/photos/caf\xe9/\xff.jpg")  # not UTF-8: lone surrogates in the str
    chinese = "/photos/海边/日落.jpg"
    with cat.transaction() as tx:
        ids = tx.add([record(latin1, content_hash="1"), record(chinese, content_hash="2")], unit(2))
    assert set(cat.file_states()) == {latin1, chinese}
    assert cat.get_by_path(latin1).id == ids[0]  # type: ignore[union-attr]
    assert [r.path for r in cat.get(ids)] == [latin1, chinese]
    assert cat.filter_ids(under=os.fsdecode(b"/photos/caf\xe9")).tolist() == [ids[0]]
    assert cat.filter_ids(under="/photos/海边").tolist() == [ids[1]]
    with cat.transaction() as tx:
        tx.record_failure(latin1, "bad")
    assert cat.failures()[0][0] == latin1


def test_filter_ids_folder_prefix_is_component_wise(cat: Catalog) -> None:
    paths = [
        "/a/b/x.jpg", "/a/b/c/d.jpg", "/a/bc.jpg", "/a/b.jpg", "/a/b-1/e.jpg", "/a/b0/f.jpg", "/z/g.jpg",
    ]  # fmt: skip
    ids = dict(zip(paths, add(cat, paths)))

    def under(folder: str) -> set[str]:
        found = set(cat.filter_ids(under=folder).tolist())
        return {p for p, i in ids.items() if i in found}

    assert under("/a/b") == {"/a/b/x.jpg", "/a/b/c/d.jpg"}
    assert under("/a/b/") == under("/a/b")
    assert under("/a") == set(paths) - {"/z/g.jpg"}
    assert under("/") == set(paths)
    assert under("/a/b/x.jpg") == {"/a/b/x.jpg"}  # a file is "under" itself
    assert under("/nowhere") == set()
    assert set(cat.file_states(under="/a/b")) == {"/a/b/x.jpg", "/a/b/c/d.jpg"}
    assert cat.filter_ids().tolist() == sorted(ids.values())


def test_filter_ids_dates_fall_back_to_mtime(cat: Catalog) -> None:
    with cat.transaction() as tx:
        ids = tx.add(
            [
                record("/p/exif-2020.jpg", taken_at=2020.0, mtime=9999.0),
                record("/p/no-exif.jpg", taken_at=None, mtime=2021.0),
                record("/p/exif-2022.jpg", taken_at=2022.0, mtime=2021.0),
                record("/q/no-exif.jpg", mtime=2020.5),
            ],
            unit(4),
        )
    old, plain, new, other = ids
    assert cat.filter_ids(taken_from=2021.0).tolist() == [plain, new]
    assert cat.filter_ids(taken_to=2021.0).tolist() == [old, other]  # half-open: 2021.0 excluded
    assert cat.filter_ids(taken_from=2020.0, taken_to=2022.0).tolist() == [old, plain, other]
    assert cat.filter_ids(under="/p", taken_from=2020.0, taken_to=2022.0).tolist() == [old, plain]
    assert cat.filter_ids(taken_from=3000.0).tolist() == []
    # the same filters applied to given ids only (empty slots -1 and unknown ids are no images)
    for where in ({"taken_from": 2021.0}, {"taken_to": 2021.0}, {"under": "/p", "taken_from": 2020.0, "taken_to": 2022.0},
                  {}):
        assert cat.filter_among([new, -1, old, 10**9, other], **where) == set(cat.filter_ids(**where).tolist()) - {plain}
    assert cat.filter_among([]) == set() and cat.filter_among([-1]) == set()


# --- vectors -----------------------------------------------------------------------------


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("dim", [768, 16])
def test_int8_storage_keeps_cosine(dim: int) -> None:
    vecs = unit(2000, dim=dim, seed=4)
    back = as_stored(vecs)
    blobs = catalog_module.encode_vectors(vecs)
    assert all(len(b) == 4 + dim for b in blobs)  # float32 scale + one byte per dimension
    np.testing.assert_array_equal(catalog_module.decode_vectors(blobs, dim), back)
    cosine = _cosine(vecs, back)
    assert cosine.min() >= 0.9998 and cosine.mean() >= 0.99995  # measured: 0.99990 / 0.99997 at d=768
    step = np.abs(vecs).max(axis=1, keepdims=True) / 127
    assert (np.abs(back - vecs) <= step / 2 * 1.0001).all()  # each component off by half a step at most
    np.testing.assert_array_equal(as_stored(back), back)  # storing a stored vector changes nothing


def test_int8_storage_keeps_rankings() -> None:
    rng = np.random.default_rng(5)
    centres = unit(20, dim=768, seed=6)
    corpus = centres[rng.integers(0, 20, 5000)] + 0.04 * rng.standard_normal((5000, 768)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)  # clustered, like real embeddings
    queries = corpus[rng.integers(0, 5000, 50)] + 0.02 * rng.standard_normal((50, 768)).astype(np.float32)
    exact = np.argsort(-(queries @ corpus.T), axis=1)[:, :10]
    stored = np.argsort(-(queries @ as_stored(corpus).T), axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, stored)])
    assert overlap >= 0.98  # measured 0.99; 6-bit codes give 0.95, 4-bit 0.81


def test_zero_and_extreme_vectors_round_trip() -> None:
    vecs = np.zeros((3, 8), np.float32)
    vecs[1, 3] = -1.0
    vecs[2] = np.linspace(-3e4, 1e-30, 8)
    back = catalog_module.decode_vectors(catalog_module.encode_vectors(vecs), 8)
    np.testing.assert_array_equal(back[0], 0.0)
    np.testing.assert_array_equal(back[1], vecs[1])
    assert back[2, 0] == np.float32(-3e4) and np.isfinite(back).all()
    with pytest.raises(IndexStoreError, match="not 9-dimensional"):
        catalog_module.decode_vectors(catalog_module.encode_vectors(vecs), 9)
    assert catalog_module.encode_vectors(vecs[:0]) == [] and as_stored(vecs[:0]).shape == (0, 8)  # no rows


def test_iter_vectors_batches_and_selection(cat: Catalog) -> None:
    ids = add(cat, [f"/p/{i:03}.jpg" for i in range(27)])
    with cat.transaction() as tx:
        tx.remove([ids[0], ids[11]])  # gaps, at the start and across a batch boundary
    ids = ids[1:11] + ids[12:]
    batches = list(cat.iter_vectors(batch=10))
    assert [len(b[0]) for b in batches] == [10, 10, 5]
    assert np.concatenate([b[0] for b in batches]).tolist() == ids
    assert all(b[1].dtype == np.float32 and b[1].shape[1] == DIM for b in batches)
    one_by_one = np.concatenate([v for _, v in cat.iter_vectors(ids=ids)])  # the other read path
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), one_by_one)
    picked = list(cat.iter_vectors(batch=3, ids=[ids[7], 999, ids[2], ids[7], ids[20]]))
    assert [b[0].tolist() for b in picked] == [[ids[2], ids[7], ids[20]]]
    np.testing.assert_array_equal(picked[0][1][1], all_vectors(cat)[ids[7]])


def test_integrity_finds_problems(cat: Catalog) -> None:
    ids = add(cat, ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"])
    assert cat.integrity() == [] and cat.integrity(full=True) == []
    with sqlite3.connect(cat.path) as raw:
        raw.execute("DELETE FROM vectors WHERE image_id = ?", (ids[1],))
        raw.execute("UPDATE vectors SET vector = x'0000' WHERE image_id = ?", (ids[2],))
    problems = cat.integrity()
    assert any("1 image(s) without a vector" in p and str(ids[1]) in p for p in problems)
    assert any("not 16-dimensional" in p and str(ids[2]) in p for p in problems)
    with pytest.raises(IndexStoreError, match="16-dimensional"):
        list(cat.iter_vectors())


# --- files, versions, processes ----------------------------------------------------------


def test_reopen_and_readonly(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    with pytest.raises(IndexStoreError, match="no catalogue"):
        Catalog(path, readonly=True)
    with Catalog(path) as cat:
        add(cat, ["/p/a.jpg"])
    with Catalog(path, readonly=True) as ro:
        assert ro.count() == 1 and ro.dimension == DIM
        assert ro.get_by_path("/p/a.jpg") is not None
        with pytest.raises(IndexStoreError, match="read-only"):
            ro.set_meta("k", "v")
    with Catalog(path) as cat:
        assert add(cat, ["/p/b.jpg"]) == [2]
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_closed_catalog_refuses(cat: Catalog) -> None:
    cat.close()
    with pytest.raises(IndexStoreError, match="closed"):
        cat.count()


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    path.write_bytes(b"this is not sqlite at all\n" * 100)
    with pytest.raises(IndexStoreError, match="not a SQLite database"):
        Catalog(path)


def test_truncated_database(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    with Catalog(path) as cat:
        add(cat, [f"/p/{i:05}.jpg" for i in range(3000)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexStoreError, match="malformed|damaged"):
        Catalog(path)


def test_foreign_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE photos (x)")
    with pytest.raises(IndexStoreError, match="not an altsearch catalogue"):
        Catalog(path)


def _set_schema_version(path: Path, version: int) -> None:
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    raw.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    Catalog(path).close()
    _set_schema_version(path, SCHEMA_VERSION + 1)
    newer = rf"newer altsearch \(schema {SCHEMA_VERSION + 1} > {SCHEMA_VERSION}\); upgrade altsearch"
    with pytest.raises(SchemaVersionError, match=newer):
        Catalog(path)


def _make_v1(path: Path, vecs: np.ndarray, paths: list[str] | None = None) -> list[int]:
    """A schema-1 catalogue: today's tables, vectors as little-endian float16 without a header."""
    paths = paths or [f"/p/{i:04}.jpg" for i in range(len(vecs))]
    with Catalog(path) as cat, cat.transaction() as tx:
        ids = tx.add([record(p) for p in paths], vecs)
    with sqlite3.connect(path) as raw:
        raw.executemany(
            "UPDATE vectors SET vector = ? WHERE image_id = ?",
            [(v.astype("<f2").tobytes(), i) for i, v in zip(ids, vecs)],
        )
    raw.close()
    _set_schema_version(path, 1)
    return ids


def _make_v0(path: Path) -> None:
    """A fake schema-0 catalogue: schema 1 without the failures table."""
    _make_v1(path, unit(1))
    with sqlite3.connect(path) as raw:
        raw.execute("DROP TABLE failures")
    raw.close()
    _set_schema_version(path, 0)


def test_older_schema_is_migrated_after_a_backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "catalog.sqlite"
    _make_v0(path)
    ran: list[int] = []

    def v0_to_v1(conn) -> None:  # noqa: ANN001
        ran.append(0)
        failures.create(conn)

    monkeypatch.setattr(catalog_module, "MIGRATIONS", {**catalog_module.MIGRATIONS, 0: v0_to_v1})
    with Catalog(path) as cat:
        assert ran == [0]
        assert cat.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert cat.count() == 1 and cat.integrity() == []  # both steps ran: 0 -> 1 -> 2
        with cat.transaction() as tx:
            tx.record_failure("/p/x.jpg", "works now")
    backup = tmp_path / "catalog.sqlite.bak-v0"
    with sqlite3.connect(backup) as raw:
        assert raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("0",)
        assert raw.execute("SELECT count(*) FROM images").fetchone() == (1,)
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    raw.close()
    assert "failures" not in tables
    with Catalog(path) as cat:  # opening again migrates nothing
        assert ran == [0]


def test_failed_migration_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "catalog.sqlite"
    _make_v0(path)

    def broken(conn) -> None:  # noqa: ANN001
        failures.create(conn)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(catalog_module, "MIGRATIONS", {0: broken})
    with pytest.raises(IndexStoreError, match="disk I/O error"):
        Catalog(path)
    monkeypatch.setattr(catalog_module, "MIGRATIONS", {})
    with pytest.raises(IndexStoreError, match="no migration from catalogue schema 0"):
        Catalog(path)
    with pytest.raises(IndexStoreError, match="open it writable once to migrate"):
        Catalog(path, readonly=True)
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("0",)
        assert raw.execute("SELECT count(*) FROM sqlite_master WHERE name = 'failures'").fetchone() == (0,)
    raw.close()


def test_float16_catalogue_is_reencoded_and_its_vector_file_caught_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from altsearch.vectors import VectorIndex

    monkeypatch.setattr(catalog_module, "_MIGRATE_BATCH", 7)  # several batches
    path, faiss_path = tmp_path / "catalog.sqlite", tmp_path / "vectors.faiss"
    vecs = unit(48, dim=64, seed=8)
    paths = [f"/photos/{i:02}/IMG_{i:04}.jpg" for i in range(48)]
    ids = _make_v1(path, vecs, paths)
    half = vecs.astype(np.float16).astype(np.float32)  # what schema 1 gave back
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE vectors SET vector = x'00' WHERE image_id = ?", (ids[-1],))  # damaged: left alone
        v1_generation = int(raw.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
        catalog_id = raw.execute("SELECT value FROM meta WHERE key = 'catalog_id'").fetchone()[0]
    raw.close()
    VectorIndex.build(np.array(ids[:-1]), half[:-1], kind="ivf", device="cpu").save(
        faiss_path, generation=v1_generation, catalog_id=catalog_id
    )  # the vector file schema 1 saved beside it (an approximate kind: a flat index has no file now)

    with Catalog(path) as cat:
        assert cat.get_meta("schema_version") == "2" and cat.generation == v1_generation + 1
        assert [r.path for r in cat.get(ids)] == paths and cat.catalog_id == catalog_id
        got_ids, got = next(cat.iter_vectors(ids=ids[:-1]))
        assert got_ids.tolist() == ids[:-1]
        np.testing.assert_array_equal(got, as_stored(half[:-1]))
        assert _cosine(got, vecs[:-1]).min() >= 0.9999
        assert cat.vector_ids(changed_since=v1_generation).tolist() == ids[:-1]  # all rewritten
        assert cat.integrity() == [f"1 vector(s) not 64-dimensional int8, e.g. ids [{ids[-1]}]"]
        with cat.transaction() as tx:  # the damaged image is dropped
            tx.remove([ids[-1]])

        index = VectorIndex.open(faiss_path, cat, device="cpu")
        assert index.header is not None and index.nlist == 1  # the saved file, caught up rather than rebuilt
        assert index.generation == cat.generation
        np.testing.assert_array_equal(index.reconstruct(np.array(ids[:-1])), got)
        queries = unit(5, dim=64, seed=9)
        scores, found = index.search(queries, 5)
        expected = np.argsort(-(queries @ got.T), axis=1)[:, :5]
        np.testing.assert_array_equal(found, np.array(ids)[expected])
        np.testing.assert_allclose(scores, np.sort(queries @ got.T, axis=1)[:, ::-1][:, :5], rtol=1e-5)
    backup = tmp_path / "catalog.sqlite.bak-v1"
    with sqlite3.connect(backup) as raw:
        assert raw.execute("SELECT length(vector) FROM vectors WHERE image_id = 1").fetchone() == (128,)
    raw.close()


def test_migration_gives_the_space_back(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    _make_v1(path, unit(1000, dim=256, seed=10))  # 512-byte float16 vectors
    Catalog(path).close()
    before = (tmp_path / "catalog.sqlite.bak-v1").stat().st_size
    assert not (tmp_path / "catalog.sqlite-wal").exists() or (tmp_path / "catalog.sqlite-wal").stat().st_size == 0
    assert path.stat().st_size < 0.75 * before  # 260-byte vectors, their pages compacted (measured 0.66)


def test_threads_read_concurrently(cat: Catalog) -> None:
    ids = add(cat, [f"/p/{i:04}.jpg" for i in range(200)])
    expected = cat.file_states()

    def read(i: int) -> bool:
        return cat.file_states() == expected and [r.id for r in cat.get(ids[i : i + 5])] == ids[i : i + 5]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(read, range(64)))


def _reader_process(path: str, ready, stop, results) -> None:  # noqa: ANN001
    """Reads in a loop (bounded) while another process writes; reports errors instead of dying."""
    try:
        with Catalog(Path(path), readonly=True) as cat:
            ready.set()
            rounds = 0
            while not stop.is_set() and rounds < 5000:
                states = cat.file_states()
                vector_ids = cat.vector_ids()
                for ids, vecs in cat.iter_vectors(batch=64):
                    assert vecs.shape == (len(ids), DIM)
                assert len(vector_ids) >= len(states) - 50  # a commit may land between the two reads
                rounds += 1
        results.put(("ok", rounds))
    except BaseException as err:  # noqa: BLE001 - the parent asserts on whatever happened
        results.put(("error", repr(err)))


def test_reader_in_another_process_never_fails_while_writing(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    with Catalog(path) as cat:
        add(cat, ["/seed.jpg"])
        ctx = multiprocessing.get_context("spawn")
        ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
        reader = ctx.Process(target=_reader_process, args=(str(path), ready, stop, results))
        reader.start()
        try:
            assert ready.wait(60), "reader process did not start"
            for round_ in range(40):
                paths = [f"/w/{round_:02}/{i:02}.jpg" for i in range(50)]
                ids = add(cat, paths, seed=round_)
                with cat.transaction() as tx:
                    tx.remove(ids[:10])
        finally:
            stop.set()
            outcome = results.get(timeout=60)
            reader.join(timeout=30)
        assert outcome[0] == "ok", outcome[1]
        assert outcome[1] >= 1
        assert cat.count() == 1 + 40 * 40


def test_threads_write_one_at_a_time(cat: Catalog) -> None:
    barrier = threading.Barrier(4)

    def write(t: int) -> list[int]:
        barrier.wait()
        return add(cat, [f"/t{t}/{i}.jpg" for i in range(20)], seed=t)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(write, range(4)))
    all_ids = sorted(i for ids in results for i in ids)
    assert all_ids == list(range(1, 81))
    assert cat.integrity() == []


def test_vector_ids_changed_since(cat: Catalog) -> None:
    a, b, c = add(cat, ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"])
    saved = cat.generation
    assert cat.vector_ids(changed_since=saved).tolist() == []
    with cat.transaction() as tx:
        assert tx.generation == saved + 1
        tx.update(a, {"size": 1}, unit(1, seed=5)[0])  # new vector
        tx.update(b, {"size": 1})  # fields only
        tx.move(c, "/q/c.jpg", 1, 1.0)
        (d,) = tx.add([record("/p/d.jpg")], unit(1, seed=6))
    assert cat.generation == saved + 1
    assert cat.vector_ids(changed_since=saved).tolist() == [a, d]
    assert cat.vector_ids(changed_since=0).tolist() == [a, b, c, d]
    assert cat.vector_ids().tolist() == [a, b, c, d]


def removed(cat: Catalog, since: int) -> list[int] | None:
    ids = cat.removed_ids(since=since)
    return None if ids is None else ids.tolist()


def test_every_removal_is_logged_with_its_generation_whoever_removes(cat: Catalog) -> None:
    a, b, c, d = add(cat, ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg", "/p/d.jpg"])
    assert removed(cat, 0) == []  # nothing was ever removed
    with cat.transaction() as tx:  # new and rewritten vectors are no removal
        tx.update(a, {"size": 1}, unit(1, seed=5)[0])
        tx.add([record("/p/e.jpg")], unit(1, seed=6))
    assert removed(cat, 0) == []
    with cat.transaction() as tx:
        tx.remove([d, b])
        removed_at = tx.generation
    assert removed(cat, removed_at - 1) == [b, d] and removed(cat, removed_at) == []
    assert removed(cat, 0) == [b, d]
    # a writer that knows nothing of the mark or the log (an older altsearch): the cascade from
    # images fires both triggers too
    with sqlite3.connect(cat.path) as raw:
        raw.execute("PRAGMA foreign_keys = ON")
        raw.execute("DELETE FROM images WHERE id = ?", (c,))
        raw.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
    raw.close()
    assert cat.vector_ids().tolist() == [a, d + 1]
    assert removed(cat, cat.generation - 1) == [c] and removed(cat, cat.generation) == []
    assert removed(cat, removed_at - 1) == [b, c, d]


def drop_removal_log(path: Path, *, mark: bool) -> None:
    """Make the catalogue at `path` as altsearch made them before the removal log (and before the
    removal mark too, with mark=True)."""
    with sqlite3.connect(path) as raw:
        raw.execute(f"DROP TRIGGER {catalog_module._LOG_TRIGGER}")
        raw.execute("DROP TABLE removed_vectors")
        raw.execute("DELETE FROM meta WHERE key = ?", (catalog_module.REMOVAL_LOG_FROM,))
        if mark:
            raw.execute(f"DROP TRIGGER {catalog_module._REMOVAL_TRIGGER}")
            raw.execute("DELETE FROM meta WHERE key = ?", (catalog_module.REMOVED_META,))
    raw.close()


def test_a_catalogue_from_before_the_removal_mark_gets_it_when_opened_writable(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    with Catalog(path) as cat:
        add(cat, ["/p/a.jpg", "/p/b.jpg"])
        with cat.transaction() as tx:
            tx.remove([1])
        generation = cat.generation
    drop_removal_log(path, mark=True)
    with Catalog(path, readonly=True) as old:  # what was removed, and when, is unknown
        assert removed(old, generation) is None and removed(old, 10**9) is None
    with Catalog(path) as cat:  # opening writes nothing (a reader may not be able to write)
        assert removed(cat, generation) is None and cat.get_meta(catalog_module.REMOVED_META) is None
        with pytest.raises(ZeroDivisionError), cat.transaction() as tx:
            tx.set_meta("note", "x")
            1 / 0
        assert cat.get_meta(catalog_module.REMOVED_META) is None  # rolled back with the rest: tried again
        assert cat.get_meta(catalog_module.REMOVAL_LOG_FROM) is None
        with cat.transaction() as tx:  # a writer's first transaction adds the triggers: "now at the latest"
            tx.set_meta("note", "x")
        assert removed(cat, generation - 1) is None and removed(cat, generation) == []
        assert cat.generation == generation + 1  # set_meta changed something
        with cat.transaction() as tx:
            tx.remove([2])
        assert removed(cat, generation + 1) == [2] and removed(cat, cat.generation) == []
        assert removed(cat, generation - 1) is None


def test_a_catalogue_with_the_mark_but_no_log_gets_the_log_when_opened_writable(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    with Catalog(path) as cat:
        add(cat, ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"])
        with cat.transaction() as tx:
            tx.remove([1])
        removed_at = cat.generation
        add(cat, ["/p/d.jpg"])
    drop_removal_log(path, mark=False)
    with Catalog(path, readonly=True) as old:
        assert removed(old, removed_at) == []  # the mark: nothing removed since
        assert removed(old, removed_at - 1) is None  # something was, but which is not logged
    with Catalog(path) as cat:
        with cat.transaction() as tx:
            tx.remove([3])
        assert removed(cat, cat.generation - 1) == [3]  # logged from the generation the log began at
        assert removed(cat, removed_at) is None  # what came before it is not
        assert cat.get_meta(catalog_module.REMOVAL_LOG_FROM) == str(cat.generation - 1)


def test_the_removal_log_is_pruned_by_whole_generations(cat: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog_module, "REMOVAL_LOG_MAX", 4)
    ids = add(cat, [f"/p/{i}.jpg" for i in range(12)])
    gens = []
    for chunk in ([ids[0], ids[1]], [ids[2]], [ids[3], ids[4]]):  # 5 rows: one over the limit
        with cat.transaction() as tx:
            tx.remove(chunk)
        gens.append(cat.generation)
    # the oldest generations go until at most 2 rows are left: the last removal's two
    assert cat.get_meta(catalog_module.REMOVAL_LOG_FROM) == str(gens[1])
    assert removed(cat, gens[1]) == [ids[3], ids[4]]
    assert removed(cat, gens[0]) is None and removed(cat, gens[0] - 1) is None
    with cat.transaction() as tx:  # more than the limit at once: nothing of it is kept
        tx.remove(ids[5:10])
    assert cat.get_meta(catalog_module.REMOVAL_LOG_FROM) == str(cat.generation)
    assert removed(cat, cat.generation - 1) is None and removed(cat, cat.generation) == []
    with sqlite3.connect(cat.path) as raw:
        assert raw.execute("SELECT count(*) FROM removed_vectors").fetchone() == (0,)
    raw.close()
    with cat.transaction() as tx:
        tx.remove([ids[10]])
    assert removed(cat, cat.generation - 1) == [ids[10]]


def test_a_log_longer_than_its_limit_is_not_read(cat: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = add(cat, [f"/p/{i}.jpg" for i in range(6)])
    since = cat.generation
    with cat.transaction() as tx:
        tx.remove(ids[:5])
    assert removed(cat, since) == ids[:5]
    monkeypatch.setattr(catalog_module, "REMOVAL_LOG_MAX", 4)  # as if written before a lower limit
    assert removed(cat, since) is None  # listing every id costs no more than reading such a log


def plain_vectors(cat: Catalog, where: str = "", params: tuple = ()) -> dict[int, np.ndarray]:
    """image_id -> vector by plain SQL, one row at a time: the reference for the aggregated reads."""
    with sqlite3.connect(cat.path) as raw:
        rows = raw.execute(f"SELECT image_id, vector FROM vectors {where} ORDER BY image_id", params).fetchall()
    return {i: catalog_module.decode_vectors([blob], DIM)[0] for i, blob in rows}


def gappy(cat: Catalog) -> list[int]:
    """60 images written by several transactions, with ids missing at the start, in the middle and at
    the end, a vector replaced and ids beyond 2**32; returns the generations after each write."""
    add(cat, [f"/p/{i:03}.jpg" for i in range(30)])
    generations = [cat.generation]
    with cat.transaction() as tx:
        tx.remove([1, 2, 13, 14, 15, 29, 30])
    generations.append(cat.generation)
    with sqlite3.connect(cat.path) as raw:  # ids continue after the largest one ever used
        raw.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'images'", (2**33,))
    add(cat, [f"/q/{i:03}.jpg" for i in range(30)], seed=1)
    generations.append(cat.generation)
    with cat.transaction() as tx:
        tx.update(7, {}, unit(1, seed=2)[0])
        tx.move(8, "/r/8.jpg", 1, 1.0)  # not a new vector
        tx.remove([2**33 + 30])
    generations.append(cat.generation)
    return generations


@pytest.mark.parametrize("span", [None, 1, 7])
def test_vector_ids_are_those_plain_sql_lists(cat: Catalog, monkeypatch: pytest.MonkeyPatch, span: int | None) -> None:
    """Listed a range of ids at a time (in few ranges up to 33.5M images; here in ranges of 1 and 7
    ids too, and over a gap of 2**33 ids), as plain SQL lists them."""
    if span is not None:
        monkeypatch.setattr(catalog_module, "_ID_SPAN", span)
    empty = cat.vector_ids()
    assert empty.dtype == np.int64 and empty.tolist() == [] and cat.vector_ids(changed_since=0).tolist() == []
    generations = gappy(cat)
    every = sorted(plain_vectors(cat))
    assert every[:2] == [3, 4] and every[-1] == 2**33 + 29 and 13 not in every and len(every) == 52
    assert cat.vector_ids().dtype == np.int64 and cat.vector_ids().tolist() == every
    for since in [-1, 0, *generations, generations[-1] + 1]:
        expected = sorted(plain_vectors(cat, "WHERE generation > ?", (since,)))
        assert cat.vector_ids(changed_since=since).tolist() == expected, since
    assert cat.vector_ids(changed_since=generations[-2]).tolist() == [7]  # the boundary: > not >=


def test_listing_vector_ids_reads_the_small_covering_index(cat: Catalog) -> None:
    """Not the vectors table itself, whose pages hold every vector (1.5 GB at 1M x 768)."""
    gappy(cat)
    with sqlite3.connect(cat.path) as raw:
        for sql, params in ((catalog_module._VECTOR_IDS, (0, 100)), (catalog_module._VECTOR_IDS_SINCE, (0, 100, 1))):
            plan = " ".join(row[-1] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}", params))
            assert "COVERING INDEX ix_vectors_generation" in plan, plan


def test_iter_vectors_of_ids_are_what_plain_sql_reads(cat: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    gappy(cat)
    reference = plain_vectors(cat)
    present = sorted(reference)
    wanted = [999, *present[::-1], present[5], 13, 2**33 + 30, 2**40, 0]  # unsorted, repeated, missing
    monkeypatch.setattr(catalog_module, "_IN_CHUNK", 4)  # several IN lists per batch
    for batch, quick_rows in ((1, 4096), (3, 4096), (7, 4), (10_000, 4096), (10_000, 4)):
        monkeypatch.setattr(catalog_module, "_QUICK_ROWS", quick_rows)  # 4: the larger batches use SQLAlchemy
        parts = list(cat.iter_vectors(batch=batch, ids=wanted))
        assert all(len(ids) <= batch and ids.dtype == np.int64 and vecs.dtype == np.float32 for ids, vecs in parts)
        ids = np.concatenate([ids for ids, _ in parts])
        assert ids.tolist() == present, batch
        np.testing.assert_array_equal(np.concatenate([v for _, v in parts]), np.stack([reference[i] for i in present]))
    assert list(cat.iter_vectors(ids=[13, 2**40])) == [] and list(cat.iter_vectors(ids=[])) == []
    batches = list(cat.iter_vectors(batch=5))  # every vector: keyed on the last id of each batch
    assert np.concatenate([ids for ids, _ in batches]).tolist() == present


@pytest.mark.parametrize("by_id", [False, True], ids=["all", "ids"])
def test_rows_deleted_while_iterating_are_skipped(cat: Catalog, by_id: bool) -> None:
    gappy(cat)
    present = sorted(plain_vectors(cat))
    reads = cat.iter_vectors(batch=10, ids=present if by_id else None)
    first, _ = next(reads)
    gone = [int(first[-1]), present[15], present[-1]]  # one read already, two in later batches
    with cat.transaction() as tx:
        tx.remove(gone)
    rest = np.concatenate([ids for ids, _ in reads]).tolist()
    assert first.tolist() + rest == [i for i in present if i not in gone[1:]]


def test_lock_held_too_long_raises_index_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog_module, "BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "catalog.sqlite"
    with Catalog(path) as cat:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process writing
        try:
            assert cat.count() == 0  # readers are not blocked (WAL)
            with pytest.raises(IndexLockedError, match="locked by another process"):
                add(cat, ["/p/a.jpg"])
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert add(cat, ["/p/a.jpg"]) == [1]


def test_format_md_documents_every_table_column_trigger_and_meta_key(cat: Catalog) -> None:
    """docs/format.md is what other tools read a catalogue by: what a new catalogue holds is there."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text(encoding="utf-8")
    add(cat, ["/p/a.jpg"])  # a first write: the dimension and the triggers are in place
    with sqlite3.connect(cat.path) as raw:
        tables = [name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                  if not name.startswith("sqlite_")]
        columns = {t: [row[1] for row in raw.execute(f"PRAGMA table_info({t})")] for t in tables}
        triggers = [name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]
        keys = [key for (key,) in raw.execute("SELECT key FROM meta")]
    raw.close()
    assert {"images", "vectors", "failures", "meta", "removed_vectors"} <= set(tables)
    assert {"vectors_removal_mark", "vectors_removal_log"} <= set(triggers)
    named = {name for line in doc.splitlines() if line.startswith("| `")  # first cells of table rows
             for name in line.split("|")[1].replace("`", "").replace(" ", "").split(",")}
    missing = [f"table {t}" for t in tables if f"`{t}`:" not in doc]
    missing += [f"column {t}.{c}" for t in tables if t != "meta" for c in columns[t] if c not in named]
    missing += [f"trigger {t}" for t in triggers if f"`{t}`" not in doc]
    missing += [f"meta key {k}" for k in keys if k not in named]
    assert not missing, f"docs/format.md does not document: {missing}"
