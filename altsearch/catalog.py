"""The catalogue: one SQLite file (through SQLAlchemy Core) that is the truth about an index.

It holds every image's row, its vector (int8 codes and a scale), the files that failed, and the
index's meta data.
The vector index is derived from the `vectors` table: a flat one is built from it whenever the index
is opened, an approximate one's FAISS file can always be rebuilt from it.
The on-disk format is documented in docs/format.md.

Reads may run from several threads at once (the pool hands each thread its own connection); writes
go through `Catalog.transaction()`, one SQLite transaction each, serialised by a lock.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.pool import QueuePool

from altsearch import ids as idset
from altsearch.errors import IndexLockedError, IndexStoreError, ModelMismatchError, SchemaVersionError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 1: float16 vectors; 2: int8 vectors with a float32 scale
BUSY_TIMEOUT_S = 30.0  # a reader or a second writer waits this long for a lock before failing
PAGE_SIZE = 8192  # 10 int8 768-d vector rows (~785 B each) per page; 4 KiB to 64 KiB pages differ by < 1 %
VECTOR_SCALE = np.dtype("<f4")  # each vector row: this scale, then `dimension` int8 codes
_IN_CHUNK = 5000  # ids per `IN (...)` list, well below SQLite's bound-parameter limit
_MIGRATE_BATCH = 20_000  # vectors re-encoded per read while migrating (~30 MB of float16 at d=768)

metadata = sa.MetaData()

images = sa.Table(
    "images",
    metadata,
    # AUTOINCREMENT: an id is never reused, so a stale FAISS file can never map a deleted image's
    # vector onto a new image.
    sa.Column("id", sa.Integer, primary_key=True),
    # UTF-8 bytes of the path str, surrogateescape for names that are not valid UTF-8 (= os.fsencode
    # on POSIX): lossless, and a folder prefix of a path is a byte prefix of its encoding.
    sa.Column("path", sa.LargeBinary, nullable=False, unique=True),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("mtime", sa.Float, nullable=False),
    sa.Column("content_hash", sa.Text, nullable=False, index=True),
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("format", sa.Text),
    sa.Column("taken_at", sa.Float),
    sa.Column("camera_make", sa.Text),
    sa.Column("camera_model", sa.Text),
    sa.Column("status", sa.Text, nullable=False, server_default="ok"),
    sa.Column("added_at", sa.Float, nullable=False),
    sqlite_autoincrement=True,
)
# The date filter's own expression, so `filter_ids(taken_from=..., taken_to=...)` is an index range scan.
_when = sa.func.coalesce(images.c.taken_at, images.c.mtime)
sa.Index("ix_images_when", _when)

vectors = sa.Table(
    "vectors",
    metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("vector", sa.LargeBinary, nullable=False),
    # the catalogue generation whose transaction wrote this vector: a FAISS file saved at
    # generation G lacks exactly the vectors with generation > G (plus ids it still has but the
    # catalogue dropped), which is what reconciling re-adds
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
)
# Also a small covering index of every image_id: listing ids scans it instead of every vector
# page (1.5 GB at a million 768-d vectors).
sa.Index("ix_vectors_generation", vectors.c.generation)

failures = sa.Table(
    "failures",
    metadata,
    sa.Column("path", sa.LargeBinary, primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# Every deleted vector row, logged by the trigger _LOG_TRIGGER (see REMOVAL_LOG_FROM): a FAISS index
# reflecting generation G removes the ids logged after G instead of listing every id on both sides.
# One B-tree (no rowid), ordered by generation: a reader's range is a seek.
removed_vectors = sa.Table(
    "removed_vectors",
    metadata,
    sa.Column("generation", sa.Integer, primary_key=True),  # the transaction that deleted the vector
    sa.Column("image_id", sa.Integer, primary_key=True),
    sqlite_with_rowid=False,
)

# Reads of many rows aggregate them inside SQLite, one result row per statement: ids as the
# group_concat of their decimal text, vectors as the concatenation of their blobs (the CAST gives them
# back as bytes; the two group_concat see the rows in one pass, so ids and vectors line up). The
# sqlite3 module releases and re-takes the GIL around each row it steps to; in a thread beside a busy
# one (the CLI builds a flat index while the model loads) each re-take can wait a whole switch
# interval. Built from 100k x 768 vectors read row by row, a flat index took 0.7 s alone, 2.8 s beside
# the CLI's model load and 12 s to minutes beside a thread that ran Python code without pause; read
# this way, 1.6 s beside the model load. Listing the ids of 1M vectors took 1.8 s row by row and 27 s
# to over two minutes beside such a thread; aggregated, 0.24 s and 0.3-0.6 s (docs/format.md).
# Every vector, a batch at a time:
_ALL_VECTORS = (
    "SELECT count(*), group_concat(image_id), CAST(group_concat(vector, '') AS BLOB) "
    "FROM (SELECT image_id, vector FROM vectors WHERE image_id > ? ORDER BY image_id LIMIT ?)"
)
# The vectors of some ids, `IN ({})` an `_IN_CHUNK` of them at a time:
_SOME_VECTORS = (
    "SELECT count(*), group_concat(image_id), CAST(group_concat(vector, '') AS BLOB) "
    "FROM (SELECT image_id, vector FROM vectors WHERE image_id IN ({}) ORDER BY image_id)"
)
# The ids in a range of _ID_SPAN ids per statement, from the covering index `ix_vectors_generation`
# (9 MB at 1M vectors; a range of the primary key would read every vector page: 0.13 s against 0.04 s
# at 300k vectors, cached, and 1.2 s against 0.05 s not), for `changed_since` the index's range of
# generations. One string of up to 20 bytes per id: a range keeps it below SQLite's string limit
# (1e9 bytes by default), which a single statement over every id would reach at some 100M vectors.
_VECTOR_IDS = (
    "SELECT count(*), group_concat(image_id) FROM vectors INDEXED BY ix_vectors_generation "
    "WHERE image_id BETWEEN ? AND ?"
)
_VECTOR_IDS_SINCE = f"{_VECTOR_IDS} AND generation > ?"
_FIRST_VECTOR_ID = "SELECT min(image_id) FROM vectors WHERE image_id > ?"  # a seek in the primary key
# Every deleted vector row (an image removed, its vector with it) sets the meta value REMOVED_META to
# the generation its transaction commits as (the stored one + 1: transactions bump it last). A trigger,
# so that whoever deletes, an older altsearch included, leaves the mark: a FAISS index reflecting
# generation G then knows without listing every id whether it can hold ids the catalogue lost
# (`Catalog.removed_ids`), which is what catching up with a commit cost at scale.
REMOVED_META = "vectors_removed_at"
_REMOVAL_TRIGGER = "vectors_removal_mark"
_NEXT_GENERATION = "SELECT CAST(value AS INTEGER) + 1 FROM meta WHERE key = 'generation'"
_CREATE_REMOVAL_TRIGGER = (  # the WHEN writes once per transaction: deleting 100k rows took 0.25 s more, not 0.6
    f"CREATE TRIGGER IF NOT EXISTS {_REMOVAL_TRIGGER} AFTER DELETE ON vectors "
    f"WHEN (SELECT CAST(value AS INTEGER) FROM meta WHERE key = '{REMOVED_META}') IS NOT ({_NEXT_GENERATION}) "
    f"BEGIN INSERT OR REPLACE INTO meta (key, value) VALUES ('{REMOVED_META}', ({_NEXT_GENERATION})); END"
)
# The removal log: every vector row deleted by a transaction after the generation in the meta value
# REMOVAL_LOG_FROM is in `removed_vectors`, written by a trigger as the removal mark is (any writer,
# an older altsearch included, fills it once a writer of this version has added the trigger). A
# writer whose transaction removed vectors prunes the log's oldest generations once it holds more than
# REMOVAL_LOG_MAX rows, down to half that, and moves REMOVAL_LOG_FROM up: an index older than that
# lists every id, once, as it did before the log.
REMOVAL_LOG_FROM = "removal_log_from"
REMOVAL_LOG_MAX = 1 << 20  # ~16 MB of log; reading it all costs what listing a million vector ids does
_LOG_TRIGGER = "vectors_removal_log"
_CREATE_LOG_TRIGGER = (  # INSERT OR IGNORE: a row deleted, put back and deleted again in one transaction
    f"CREATE TRIGGER IF NOT EXISTS {_LOG_TRIGGER} AFTER DELETE ON vectors "
    f"BEGIN INSERT OR IGNORE INTO removed_vectors (generation, image_id) "
    f"VALUES (({_NEXT_GENERATION}), OLD.image_id); END"
)
_LOG_COUNT_SINCE = "SELECT count(*) FROM removed_vectors WHERE generation > ?"
_LOG_IDS_SINCE = "SELECT group_concat(image_id) FROM removed_vectors WHERE generation > ?"
_ID_SPAN = 1 << 25  # ids per listing statement: 33.5M, one statement up to that many images
_RECORD_FIELDS = (
    "path", "size", "mtime", "content_hash", "width", "height", "format",
    "taken_at", "camera_make", "camera_model", "status",
)  # fmt: skip
_RECORD_FIELD_SET = frozenset(_RECORD_FIELDS)
_REQUIRED_FIELDS = frozenset({"path", "size", "mtime", "content_hash"})
_INSERT_IMAGE = (
    f"INSERT INTO images (id, {', '.join(_RECORD_FIELDS)}, added_at) "
    f"VALUES ({', '.join('?' * (len(_RECORD_FIELDS) + 2))})"
)
_INSERT_VECTOR = "INSERT INTO vectors (image_id, vector, generation) VALUES (?, ?, ?)"
_DELETE_FAILURE = "DELETE FROM failures WHERE path = ?"


@dataclass(frozen=True)
class ImageRecord:
    id: int
    path: str
    size: int
    mtime: float
    content_hash: str
    width: int | None
    height: int | None
    format: str | None
    taken_at: float | None
    camera_make: str | None
    camera_model: str | None
    status: str
    added_at: float


# --- encodings ---------------------------------------------------------------------------


def encode_path(path: str | os.PathLike[str]) -> bytes:
    """The stored form of a path: UTF-8 with surrogateescape (os.fsencode's bytes on POSIX)."""
    return os.fspath(path).encode("utf-8", "surrogateescape")


def decode_path(blob: bytes) -> str:
    return blob.decode("utf-8", "surrogateescape")


def encode_vectors(vecs: np.ndarray) -> list[bytes]:
    """One blob per row: a little-endian float32 scale, then the row's `dim` int8 codes.

    scale = max|x| / 127 and codes = round(x / scale), so the largest component is +-127 exactly and
    every component is off by at most scale / 2; a zero row stores scale 0 and zero codes. The
    scale is computed in float64 then rounded, which makes encoding a decoded row give the same blob.
    """
    x = np.asarray(vecs, dtype=np.float32)
    scale = (np.abs(x).max(axis=1, initial=0.0).astype(np.float64) / 127).astype(np.float32)
    divisor = np.where(scale > 0, scale, np.float32(1))[:, None]
    width = VECTOR_SCALE.itemsize + x.shape[1]
    rows = np.empty((len(x), width), dtype=np.uint8)
    rows[:, : VECTOR_SCALE.itemsize] = scale.astype(VECTOR_SCALE).view(np.uint8).reshape(len(x), VECTOR_SCALE.itemsize)
    rows[:, VECTOR_SCALE.itemsize :] = np.clip(np.rint(x / divisor), -127, 127).astype(np.int8).view(np.uint8)
    joined = rows.tobytes()
    return [joined[i : i + width] for i in range(0, len(joined), width)]


def vector_blob_size(dim: int) -> int:
    """The stored length of one `dim`-dimensional vector, in bytes."""
    return VECTOR_SCALE.itemsize + dim


def decode_vectors(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    """float32 (N, dim) = codes * scale; a blob of the wrong length raises IndexStoreError."""
    return _decode_joined(b"".join(blobs), len(blobs), dim)


def _decode_joined(joined: bytes, n: int, dim: int) -> np.ndarray:
    """`decode_vectors` of n blobs given as their concatenation."""
    width = vector_blob_size(dim)
    if len(joined) != n * width:
        raise IndexStoreError(f"stored vectors are not {dim}-dimensional; run integrity checks")
    rows = np.frombuffer(joined, dtype=np.uint8).reshape(n, width)
    scale = rows[:, : VECTOR_SCALE.itemsize].copy().view(VECTOR_SCALE).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    # one pass, no float32 copy of the codes first: half the time (opening a flat index decodes them all)
    return np.multiply(rows[:, VECTOR_SCALE.itemsize :].view(np.int8), scale, out=out)


def as_stored(vecs: np.ndarray) -> np.ndarray:
    """The float32 values the catalogue gives back for `vecs` (an int8 round trip; cosine to the
    input >= 0.9999 for 768-d unit vectors).

    Adding these to the vector index, rather than the model's raw output, makes an index rebuilt
    from the catalogue score exactly like the one built during ingestion.
    """
    x = np.asarray(vecs, dtype=np.float32)
    return decode_vectors(encode_vectors(x.reshape(-1, x.shape[-1])), x.shape[-1]).reshape(x.shape)


def _folder_range(under: str) -> tuple[bytes, bytes, bytes]:
    """(exact, low, high): paths equal to `under` or in [low, high) lie under the folder."""
    sep = os.sep.encode()
    folder = encode_path(under).rstrip(sep)
    return folder, folder + sep, folder + bytes([sep[0] + 1])


def _under(column: sa.Column, folder: str) -> sa.ColumnElement[bool]:
    """`column` (an encoded path) is `folder` or lies under it (see _folder_range)."""
    exact, low, high = _folder_range(folder)
    return sa.or_(column == exact, sa.and_(column >= low, column < high))


# --- migrations --------------------------------------------------------------------------


def _v1_float16_to_int8(conn: Connection) -> None:
    """Schema 1 -> 2: every vector re-encoded from float16 to int8 + scale, in batches.

    The rewritten vectors get a new catalogue generation, so a FAISS file saved before the
    migration counts them as changed and re-adds them (as `IndexStore` reconciles any write). Rows
    whose length is not `dimension` float16 values are left as they are, for the integrity check.
    """
    dimension = conn.execute(sa.select(meta.c.value).where(meta.c.key == "dimension")).scalar_one_or_none()
    if not dimension:
        return  # no vector stored yet (the integrity check reports vectors without a dimension)
    dim, generation = int(dimension), _generation(conn) + 1
    select = (
        "SELECT image_id, vector FROM vectors WHERE image_id > ? AND length(vector) = ? ORDER BY image_id LIMIT ?"
    )
    update = "UPDATE vectors SET vector = ?, generation = ? WHERE image_id = ?"
    last = -1
    while rows := conn.exec_driver_sql(select, (last, 2 * dim, _MIGRATE_BATCH)).all():
        half = np.frombuffer(b"".join(blob for _, blob in rows), dtype="<f2").reshape(len(rows), dim)
        blobs = encode_vectors(half.astype(np.float32))
        conn.exec_driver_sql(update, [(blob, generation, image_id) for (image_id, _), blob in zip(rows, blobs)])
        last = rows[-1][0]
    _put_meta(conn, "generation", str(generation))
    _put_meta(conn, "updated_at", str(time.time()))


# MIGRATIONS[v] upgrades a catalogue from schema v to v + 1; it runs inside the transaction that
# also records the new schema_version, after a backup copy of the file was made.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _v1_float16_to_int8}


# --- the connection ----------------------------------------------------------------------


def _make_engine(path: Path, readonly: bool) -> sa.Engine:
    uri = path.absolute().as_uri() + ("?mode=ro" if readonly else "")

    def connect() -> sqlite3.Connection:
        # isolation_level=None: the driver never opens transactions by itself; `_begin` does.
        con = sqlite3.connect(
            uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        con.execute("PRAGMA foreign_keys = ON")
        # WAL + FULL: a committed chunk is on disk before the engine writes a FAISS file naming its
        # ids, so a power cut can never leave the FAISS file ahead of the catalogue. One fsync per
        # chunk commit is nothing next to embedding the chunk.
        con.execute("PRAGMA synchronous = FULL")
        return con

    engine = sa.create_engine(
        "sqlite+pysqlite://",
        creator=connect,
        poolclass=QueuePool,
        pool_size=4,
        max_overflow=28,
        pool_timeout=BUSY_TIMEOUT_S,
    )

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # Writers take the write lock up front (IMMEDIATE), so two writers queue on busy_timeout
        # instead of failing when a read lock cannot be upgraded.
        write = conn.get_execution_options().get("altsearch_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _message(err: BaseException) -> str:
    orig = getattr(err, "orig", None) or err
    return str(orig).splitlines()[0] if str(orig) else type(orig).__name__


@contextmanager
def _translated(path: Path, doing: str) -> Iterator[None]:
    """Turn SQLite's errors into the altsearch hierarchy, naming the file and the operation."""
    try:
        yield
    except (sa_exc.OperationalError, sqlite3.OperationalError) as err:
        text = _message(err)
        if "locked" in text or "busy" in text:
            raise IndexLockedError(
                f"catalogue {path} stayed locked by another process for {BUSY_TIMEOUT_S:.0f} s "
                f"while {doing}"
            ) from err
        raise IndexStoreError(f"catalogue {path}: {text} (while {doing}){_hint(text)}") from err
    except (sa_exc.DBAPIError, sqlite3.DatabaseError) as err:
        text = _message(err)
        raise IndexStoreError(f"catalogue {path}: {text} (while {doing}){_hint(text)}") from err


def _hint(text: str) -> str:
    if "not a database" in text or "malformed" in text:
        return (
            "; the file is damaged or not a SQLite database: restore it, or delete the index folder and re-index"
        )
    return ""


# --- writes ------------------------------------------------------------------------------


class Tx:
    """The writes of one open transaction; obtained from `Catalog.transaction()` only."""

    def __init__(self, conn: Connection, dim: int | None, generation: int) -> None:
        self._conn = conn
        self.dim = dim
        self.generation = generation  # the catalogue generation this transaction commits as
        self.changed = False
        self.removed = 0  # images removed (with their vectors)
        self.open = True

    def add(self, records: Sequence[Mapping[str, object]], vecs: np.ndarray) -> list[int]:
        """Insert images with their vectors; returns their new ids, in order."""
        self._check_open()
        vecs = self._checked_vectors(vecs, len(records))
        if not records:
            return []
        first = self._next_id()
        ids = list(range(first, first + len(records)))
        now = time.time()
        # Plain parameter tuples through the driver's executemany: building SQLAlchemy's per-row
        # dicts cost more than SQLite's insert itself.
        self._conn.exec_driver_sql(_INSERT_IMAGE, [(i, *_image_params(rec), now) for i, rec in zip(ids, records)])
        generation = self.generation
        rows = [(i, b, generation) for i, b in zip(ids, encode_vectors(vecs))]
        self._conn.exec_driver_sql(_INSERT_VECTOR, rows)
        self.changed = True
        return ids

    def update(self, image_id: int, fields: Mapping[str, object], vector: np.ndarray | None = None) -> None:
        """Change an image's fields (a re-embedded file: size, mtime, hash, metadata) and its vector."""
        self._check_open()
        values = _field_values(fields, required=frozenset())
        if values:
            self._update_image(image_id, values)
        elif not self._exists(image_id):
            raise IndexStoreError(f"no image with id {image_id} in the catalogue")
        if vector is not None:
            blob = encode_vectors(self._checked_vectors(np.reshape(vector, (1, -1)), 1))[0]
            values = {"vector": blob, "generation": self.generation}
            stmt = sa.update(vectors).where(vectors.c.image_id == image_id).values(**values)
            if self._conn.execute(stmt).rowcount == 0:
                self._conn.execute(vectors.insert().values(image_id=image_id, **values))
        self.changed = True

    def move(self, image_id: int, new_path: str, size: int, mtime: float) -> None:
        """A renamed or moved file: new path, size and mtime; its vector stays."""
        self._check_open()
        self._update_image(image_id, {"path": encode_path(new_path), "size": size, "mtime": mtime})
        self.changed = True

    def remove(self, ids: Sequence[int]) -> int:
        """Delete images (their vectors go with them); returns how many rows existed."""
        self._check_open()
        removed = 0
        for chunk in _chunks([int(i) for i in ids]):
            removed += self._conn.execute(sa.delete(images).where(images.c.id.in_(chunk))).rowcount
        self.changed = self.changed or removed > 0
        self.removed += removed
        return removed

    def record_failure(self, path: str, reason: str) -> None:
        self._check_open()
        row = {"path": encode_path(path), "reason": reason, "at": time.time()}
        self._conn.execute(failures.insert().prefix_with("OR REPLACE"), row)
        self.changed = True

    def clear_failures(self, paths: Sequence[str]) -> None:
        """Forget the failures recorded for these paths (those without one are ignored)."""
        self._check_open()
        if paths:
            # one driver executemany: a SQLAlchemy statement per path cost ~1.6 ms each, per indexed file
            self._conn.exec_driver_sql(_DELETE_FAILURE, [(encode_path(p),) for p in paths])
            self.changed = True

    def clear_failures_under(self, folder: str) -> int:
        """Forget the failures recorded for `folder` and every path under it (component-wise, as
        `Catalog.filter_ids(under=)` matches); returns how many."""
        self._check_open()
        cleared = self._conn.execute(sa.delete(failures).where(_under(failures.c.path, folder))).rowcount
        self.changed = self.changed or cleared > 0
        return cleared

    def set_meta(self, key: str, value: str) -> None:
        self._check_open()
        _put_meta(self._conn, key, value)
        if key == "dimension":
            self.dim = int(value)
        self.changed = True

    # -- helpers

    def _check_open(self) -> None:
        if not self.open:
            raise IndexStoreError("this transaction has ended; open a new one with Catalog.transaction()")

    def _checked_vectors(self, vecs: np.ndarray, n: int) -> np.ndarray:
        vecs = np.asarray(vecs, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != n:
            raise ValueError(f"expected vectors of shape ({n}, D), got {vecs.shape}")
        if not np.isfinite(vecs).all():
            raise ValueError("vectors contain NaN or infinity")
        if self.dim is None:
            self.dim = vecs.shape[1]
            _put_meta(self._conn, "dimension", str(self.dim))
        elif vecs.shape[1] != self.dim:
            raise ModelMismatchError(
                f"vectors have {vecs.shape[1]} dimensions but this index holds {self.dim}-dimensional "
                "ones; use the model the index was built with"
            )
        return vecs

    def _next_id(self) -> int:
        # Explicit ids (no RETURNING, so any SQLite 3 works) that respect AUTOINCREMENT's high-water mark.
        seq = self._conn.exec_driver_sql(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'images'), 0), "
            "coalesce((SELECT max(id) FROM images), 0))"
        ).scalar_one()
        return int(seq) + 1

    def _exists(self, image_id: int) -> bool:
        stmt = sa.select(images.c.id).where(images.c.id == image_id)
        return self._conn.execute(stmt).first() is not None

    def _update_image(self, image_id: int, values: dict[str, object]) -> None:
        stmt = sa.update(images).where(images.c.id == image_id).values(**values)
        if self._conn.execute(stmt).rowcount == 0:
            raise IndexStoreError(f"no image with id {image_id} in the catalogue")


_INT_FIELDS = ("size", "width", "height")
_FLOAT_FIELDS = ("mtime", "taken_at")


def _field_values(fields: Mapping[str, object], required: frozenset[str]) -> dict[str, object]:
    """Validated column values (numpy scalars made plain, the path encoded)."""
    unknown = set(fields) - set(_RECORD_FIELDS)
    if unknown:
        raise ValueError(f"unknown image fields: {sorted(unknown)}")
    missing = required - set(fields)
    if missing:
        raise ValueError(f"image record lacks {sorted(missing)}")
    values = dict(fields)
    for name, kind in [(n, int) for n in _INT_FIELDS] + [(n, float) for n in _FLOAT_FIELDS]:
        if values.get(name) is not None:
            values[name] = kind(values[name])  # type: ignore[call-overload]
    if "path" in values:
        values["path"] = encode_path(values["path"])  # type: ignore[arg-type]
    return values


def _image_params(record: Mapping[str, object]) -> tuple[object, ...]:
    """A new image's values in `_RECORD_FIELDS` order, checked and converted as `_field_values`
    does (absent optional fields None, status "ok")."""
    keys = record.keys()
    if not keys <= _RECORD_FIELD_SET or not _REQUIRED_FIELDS <= keys:
        _field_values(record, _REQUIRED_FIELDS)  # raises the error that names the fields
    get = record.get
    return (
        encode_path(record["path"]),  # type: ignore[arg-type]
        _plain(int, record["size"]),
        _plain(float, record["mtime"]),
        record["content_hash"],
        _plain(int, get("width")),
        _plain(int, get("height")),
        get("format"),
        _plain(float, get("taken_at")),
        get("camera_make"),
        get("camera_model"),
        get("status", "ok"),
    )


def _plain(kind: type, value: object) -> object:
    return None if value is None else kind(value)


def _put_meta(conn: Connection, key: str, value: str) -> None:
    conn.execute(meta.insert().prefix_with("OR REPLACE"), {"key": key, "value": str(value)})


def _chunks(seq: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(seq), _IN_CHUNK):
        yield seq[start : start + _IN_CHUNK]


def _filter_sql(under: str | None, taken_from: float | None, taken_to: float | None) -> tuple[str, list]:
    """(" AND ..." conditions on `images`, their parameters) for the images under a folder (as _under) and
    taken in a time range (as _when, which ix_images_when indexes); see Catalog.filter_ids."""
    conditions, params = [], []
    if under is not None:
        conditions.append("(path = ? OR (path >= ? AND path < ?))")
        params += _folder_range(under)
    if taken_from is not None:
        conditions.append("coalesce(taken_at, mtime) >= ?")
        params.append(taken_from)
    if taken_to is not None:
        conditions.append("coalesce(taken_at, mtime) < ?")
        params.append(taken_to)
    return "".join(f" AND {c}" for c in conditions), params


def _parse_ids(id_list: str | None, n: int) -> np.ndarray:
    """The int64 ids of a group_concat of n ids (None when n is 0), in its order."""
    if not n:
        return np.empty(0, dtype=np.int64)
    ids = np.fromstring(id_list, dtype=np.int64, sep=",")  # 6x faster than str.split at 1M ids
    if len(ids) != n:
        raise IndexStoreError(f"read {len(ids)} ids where SQLite counted {n}")
    return ids


def _aggregated(
    conn: Connection | sqlite3.Connection, sql: str, params: tuple[object, ...]
) -> tuple[np.ndarray, bytes]:
    """(ids, their vector blobs joined) from one statement that aggregates its rows as
    `_ALL_VECTORS` does, through SQLAlchemy or straight through sqlite3 (`Catalog._quick`)."""
    run = conn.execute if isinstance(conn, sqlite3.Connection) else conn.exec_driver_sql
    ((n, id_list, joined),) = run(sql, params).fetchall()
    return _parse_ids(id_list, n), joined or b""


def _by_id(ids: np.ndarray, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vecs) in ascending id order. SQLite aggregates in its subquery's order, which sorts
    them; made sure of."""
    if (ids[1:] < ids[:-1]).any():
        order = np.argsort(ids)
        return ids[order], vecs[order]
    return ids, vecs


# The vector of the first image holding some content (an indexing run reuses it for a duplicate).
_VECTOR_FOR_HASH = (
    "SELECT v.vector FROM images AS i JOIN vectors AS v ON v.image_id = i.id "
    "WHERE i.content_hash = ? AND i.id != ? ORDER BY i.id LIMIT 1"
)

_QUICK_ROWS = 4096  # at most this many vectors are read through Catalog._quick in one go

_RECORD_COLUMNS = ", ".join(f.name for f in fields(ImageRecord))
_SELECT_RECORDS = f"SELECT {_RECORD_COLUMNS} FROM images"


def _record(row: Sequence[object]) -> ImageRecord:
    """An ImageRecord from a row of `_SELECT_RECORDS` (its columns in the record's field order)."""
    return ImageRecord(row[0], decode_path(row[1]), *row[2:])  # type: ignore[arg-type]


def _placeholders(n: int) -> str:
    """``?, ?, ...`` for an ``IN (...)`` of n values, bound through the driver."""
    return ",".join("?" * n)


# --- the catalogue -----------------------------------------------------------------------


class Catalog:
    """One index's `catalog.sqlite`. Creates the file and its tables if missing (unless readonly)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._write_lock = threading.Lock()
        self._quick_lock = threading.Lock()
        self._quick_con: sqlite3.Connection | None = None
        self._closed = False
        self._marked = False  # whether the removal mark's trigger is known to be in the file
        if readonly and not self.path.is_file():
            raise IndexStoreError(f"no catalogue at {self.path}")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._engine = _make_engine(self.path, readonly)
        try:
            with _translated(self.path, "opening it"):
                self._open_schema()
            self._dim = self._stored_dimension()
        except BaseException:
            self._engine.dispose()
            raise

    # -- life cycle

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine.dispose()
            with self._quick_lock:
                if self._quick_con is not None:
                    self._quick_con.close()
                    self._quick_con = None

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_schema(self) -> None:
        version = self._schema_version()
        if version is None:
            self._create()
        elif version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"index written by a newer altsearch (schema {version} > {SCHEMA_VERSION}); upgrade altsearch"
            )
        elif version < SCHEMA_VERSION:
            self._migrate(version)

    def _schema_version(self) -> int | None:
        """The stored schema version; None for an empty file; IndexStoreError for a foreign one."""
        with self._engine.connect() as conn:
            tables = set(conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'").scalars())
            if not tables:
                return None
            if "meta" not in tables:
                raise IndexStoreError(f"{self.path} is a SQLite file but not an altsearch catalogue")
            stmt = sa.select(meta.c.value).where(meta.c.key == "schema_version")
            value = conn.execute(stmt).scalar_one_or_none()
        if value is None or not value.isdigit():
            raise IndexStoreError(f"{self.path} has no valid schema_version; it is not an altsearch catalogue")
        return int(value)

    def _create(self) -> None:
        if self.readonly:
            raise IndexStoreError(f"{self.path} is empty; open it writable once to create the catalogue")
        raw = self._engine.raw_connection()  # outside any transaction, as these pragmas need
        try:
            raw.driver_connection.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # only works on an empty file
            raw.driver_connection.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file
        finally:
            raw.close()
        now = str(time.time())
        with self._write() as conn:
            metadata.create_all(conn)
            initial = {
                "schema_version": str(SCHEMA_VERSION),
                "catalog_id": uuid.uuid4().hex,
                "generation": "0",
                "created_at": now,
                "updated_at": now,
                REMOVED_META: "0",  # nothing removed yet
                REMOVAL_LOG_FROM: "0",  # every removal logged
            }
            for key, value in initial.items():
                conn.execute(meta.insert().prefix_with("OR IGNORE"), {"key": key, "value": value})
            conn.exec_driver_sql(_CREATE_REMOVAL_TRIGGER)
            conn.exec_driver_sql(_CREATE_LOG_TRIGGER)
        log.info("created catalogue %s", self.path)

    def _migrate(self, version: int) -> None:
        if self.readonly:
            raise IndexStoreError(
                f"{self.path} uses schema {version}; open it writable once to migrate it to {SCHEMA_VERSION}"
            )
        backup = self.path.with_name(f"{self.path.name}.bak-v{version}")
        self._backup_to(backup)
        log.info("migrating %s from schema %d to %d (backup: %s)", self.path, version, SCHEMA_VERSION, backup)
        for step in range(version, SCHEMA_VERSION):
            migration = MIGRATIONS.get(step)
            if migration is None:
                raise IndexStoreError(f"no migration from catalogue schema {step}; restore from {backup}")
            with self._write() as conn:
                migration(conn)
                _put_meta(conn, "schema_version", str(step + 1))
        self._compact()

    def _compact(self) -> None:
        """VACUUM after a migration: rows it shrank (schema 2's vectors) leave every page part empty,
        and later rows, appended at the end, never fill them. Failing (a full disk) costs only space."""
        raw = self._engine.raw_connection()  # outside any transaction, as VACUUM needs
        try:
            raw.driver_connection.execute("VACUUM")
            raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the log held a whole copy
        except sqlite3.OperationalError as err:
            log.warning("could not compact %s after migrating it (%s); it works as it is", self.path, err)
        finally:
            raw.close()

    def _backup_to(self, target: Path) -> None:
        """A consistent copy (main file + WAL) through SQLite's online backup."""
        with self._engine.connect() as conn:
            source = conn.connection.driver_connection
            dest = sqlite3.connect(target)
            try:
                source.backup(dest)  # type: ignore[union-attr]
            finally:
                dest.close()

    def _stored_dimension(self) -> int | None:
        value = self.get_meta("dimension")
        return int(value) if value else None

    # -- connections

    @contextmanager
    def _read(self, doing: str) -> Iterator[Connection]:
        if self._closed:
            raise IndexStoreError(f"catalogue {self.path} is closed")
        with _translated(self.path, doing), self._engine.connect() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect().execution_options(altsearch_write=True) as conn, conn.begin():
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One SQLite transaction: everything done through the Tx commits together or not at all.

        A transaction that changed anything also bumps the `generation` meta value (and
        `updated_at`), so a FAISS file saved with a generation can be told current or stale.
        """
        if self.readonly:
            raise IndexStoreError(f"catalogue {self.path} was opened read-only")
        if self._closed:
            raise IndexStoreError(f"catalogue {self.path} is closed")
        with self._write_lock:
            with _translated(self.path, "writing"), self._write() as conn:
                if not self._marked:
                    _mark_removals(conn)
                tx = Tx(conn, self._dim, _generation(conn) + 1)
                try:
                    yield tx
                    if tx.removed:
                        _prune_removal_log(conn)
                    if tx.changed:
                        _put_meta(conn, "generation", str(tx.generation))
                        _put_meta(conn, "updated_at", str(time.time()))
                finally:
                    tx.open = False
            self._dim = tx.dim  # only once committed
            self._marked = True  # the triggers: there before, or added in what just committed

    # -- meta

    def get_meta(self, key: str) -> str | None:
        with self._read("reading meta") as conn:
            return conn.execute(sa.select(meta.c.value).where(meta.c.key == key)).scalar_one_or_none()

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as tx:
            tx.set_meta(key, value)

    def all_meta(self) -> dict[str, str]:
        with self._read("reading meta") as conn:
            return {key: value for key, value in conn.execute(sa.select(meta.c.key, meta.c.value))}

    def data_version(self) -> int:
        """A number that changes whenever any other connection (any process) commits to the
        catalogue: SQLite's ``PRAGMA data_version`` on a private read-only connection, which never
        writes. Six microseconds against half a millisecond for reading `generation`, so readers
        can ask before every query whether anything could have changed."""
        with self._quick("reading its version") as con:
            return int(con.execute("PRAGMA data_version").fetchone()[0])

    @contextmanager
    def _quick(self, doing: str) -> Iterator[sqlite3.Connection]:
        """The catalogue's private read-only connection (plain sqlite3, opened on first use, one thread
        at a time) for the reads made on every query. Through SQLAlchemy, the connection checkout,
        its rollback and the result rows took 0.35 ms to fetch a query's 10 hits, ten times SQLite's own
        work. Whoever uses it reads each statement to its end, so it never holds a read transaction
        open (which would keep later commits out of its view and block WAL checkpoints)."""
        with self._quick_lock:
            if self._quick_con is None:
                if self._closed:
                    raise IndexStoreError(f"catalogue {self.path} is closed")
                with _translated(self.path, "opening it"):
                    self._quick_con = sqlite3.connect(
                        self.path.absolute().as_uri() + "?mode=ro", uri=True, check_same_thread=False
                    )
            with _translated(self.path, doing):
                yield self._quick_con

    @property
    def generation(self) -> int:
        """Bumped by every committed transaction that changed something; save it with the FAISS
        file, then `vector_ids(changed_since=it)` names the vectors written after that save."""
        return int(self.get_meta("generation") or 0)

    def removed_ids(self, *, since: int) -> np.ndarray | None:
        """Sorted int64 ids of the vectors deleted by transactions after generation `since`; None when
        that is not known: the log (REMOVAL_LOG_FROM) starts later, holds more than REMOVAL_LOG_MAX
        rows after it, or no writer of this version has changed the catalogue yet. Empty at once when
        the removal mark (REMOVED_META) says nothing was deleted after `since`."""
        keys = (REMOVED_META, REMOVAL_LOG_FROM)
        with self._read("reading the removal log") as conn:  # one snapshot: the meta and the log agree
            rows = conn.execute(sa.select(meta.c.key, meta.c.value).where(meta.c.key.in_(keys)))
            found = {key: value for key, value in rows}
            mark, start = found.get(REMOVED_META), found.get(REMOVAL_LOG_FROM)
            if mark is not None and int(mark) <= since:
                return np.empty(0, dtype=np.int64)
            if start is None or int(start) > since:
                return None
            n = conn.exec_driver_sql(_LOG_COUNT_SINCE, (since,)).scalar_one()
            if n > REMOVAL_LOG_MAX:  # one transaction removed that many: listing costs no more
                return None
            id_list = conn.exec_driver_sql(_LOG_IDS_SINCE, (since,)).scalar_one() if n else None
        return idset.unique(_parse_ids(id_list, n))

    @property
    def catalog_id(self) -> str:
        """A random id fixed at creation: tells this catalogue's FAISS file from another's."""
        return self.get_meta("catalog_id") or ""

    @property
    def dimension(self) -> int | None:
        """The vector length recorded in the meta table (None before any is recorded)."""
        if self._dim is None:
            self._dim = self._stored_dimension()
        return self._dim

    # -- images

    def file_states(self, under: str | None = None, *, hashes: bool = True) -> dict[str, tuple]:
        """path -> (id, size, mtime, content_hash) for every image (or those under a folder); without
        ``hashes``, path -> (id, size, mtime): a third less memory for an indexing run's plan, which needs
        the hashes of the few files that changed or vanished only (``get``)."""
        c = images.c
        stmt = sa.select(c.path, c.id, c.size, c.mtime, *([c.content_hash] if hashes else []))
        if under is not None:
            stmt = stmt.where(_under(c.path, under))
        with self._read("listing files") as conn:
            cursor = conn.execute(stmt).cursor  # plain tuples: no Row per image
            return {decode_path(row[0]): row[1:] for row in cursor}

    def holds(self, path: str) -> bool:
        """Whether an image, or a failure recorded for a file, lies at `path` or under it (as
        `filter_ids(under=)` matches)."""
        found = sa.select(sa.or_(sa.exists().where(_under(images.c.path, path)),
                                 sa.exists().where(_under(failures.c.path, path))))
        with self._read("looking up a path") as conn:
            return bool(conn.execute(found).scalar_one())

    def vector_for_hash(self, content_hash: str, exclude: int | None = None) -> np.ndarray | None:
        """The float32 vector stored for the lowest-id image with this content hash (other than the one
        with id ``exclude``), or None. An indexing run asks once per decoded file that it has not
        embedded itself, so it goes through the quick connection: 14 us when no image has the hash,
        58 us when one has, against 0.40 and 0.56 ms through SQLAlchemy (20,000 images)."""
        with self._quick("looking up a content hash") as con:
            row = con.execute(_VECTOR_FOR_HASH, (content_hash, -1 if exclude is None else int(exclude))).fetchone()
        return None if row is None else self._decode(row[0], 1)[0]

    def get(self, ids: Sequence[int]) -> list[ImageRecord]:
        """Records in the order of `ids`; ids not in the catalogue are skipped."""
        wanted = [int(i) for i in ids]
        found: dict[int, ImageRecord] = {}
        with self._quick("reading images") as con:  # once per query: see _quick
            for chunk in _chunks(sorted(set(wanted))):
                sql = f"{_SELECT_RECORDS} WHERE id IN ({_placeholders(len(chunk))})"
                found.update((rec.id, rec) for rec in map(_record, con.execute(sql, chunk).fetchall()))
        return [found[i] for i in wanted if i in found]

    def get_by_path(self, path: str) -> ImageRecord | None:
        with self._read("reading an image") as conn:
            row = conn.exec_driver_sql(f"{_SELECT_RECORDS} WHERE path = ?", (encode_path(path),)).first()
        return None if row is None else _record(row)

    def count(self) -> int:
        with self._read("counting images") as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(images)).scalar_one()

    def filter_ids(
        self, *, under: str | None = None, taken_from: float | None = None, taken_to: float | None = None
    ) -> np.ndarray:
        """Sorted int64 ids of the images matching every given filter (all ids when none is given).

        under: an absolute folder; matches the folder's files at any depth, component-wise
            ("/a/b" matches "/a/b/x.jpg", not "/a/bc.jpg"), and the path itself.
        taken_from <= when < taken_to (Unix seconds, either bound optional), where `when` is the
            EXIF taken_at and the file's mtime for images without one.
        """
        where, params = _filter_sql(under, taken_from, taken_to)
        # unordered: lets SQLite answer from a covering index; aggregated in SQLite, one row: see _ALL_VECTORS
        sql = f"SELECT count(*), group_concat(id) FROM (SELECT id FROM images WHERE 1{where})"
        with self._read("filtering images") as conn:
            n, id_list = conn.exec_driver_sql(sql, tuple(params)).one()
        return np.sort(_parse_ids(id_list, n))

    def filter_among(
        self, ids: Sequence[int] | np.ndarray, *, under: str | None = None, taken_from: float | None = None,
        taken_to: float | None = None
    ) -> set[int]:
        """Those of ``ids`` that are images matching every given filter (as ``filter_ids``): one lookup by
        id each, however many images the filter matches (500 ids: 1.5 ms at 1M images, through the
        quick connection; 3.5 ms through SQLAlchemy, which a query with a filter would pay each time)."""
        wanted = sorted({int(i) for i in ids if i >= 0})
        if not wanted:
            return set()
        where, params = _filter_sql(under, taken_from, taken_to)
        found: set[int] = set()
        with self._quick("filtering images") as con:
            for chunk in _chunks(wanted):
                sql = f"SELECT id FROM images WHERE id IN ({_placeholders(len(chunk))}){where}"
                found.update(row[0] for row in con.execute(sql, [*chunk, *params]))
        return found

    # -- failures

    def failure_count(self) -> int:
        with self._read("counting failures") as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(failures)).scalar_one()

    def failures(self) -> list[tuple[str, str, float]]:
        """(path, reason, when) for every file that could not be indexed, by path."""
        stmt = sa.select(failures.c.path, failures.c.reason, failures.c.at).order_by(failures.c.path)
        with self._read("reading failures") as conn:
            return [(decode_path(p), r, a) for p, r, a in conn.execute(stmt)]

    # -- vectors

    def iter_vectors(
        self, batch: int = 65536, ids: Sequence[int] | np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64 (n,), vectors float32 (n, D)) in batches, by ascending id.

        With `ids`, only those (missing ones skipped). Each batch is its own read, so a long
        iteration never holds a snapshot that would keep the WAL from being checkpointed.
        """
        if batch < 1:
            raise ValueError("batch must be >= 1")
        if ids is None:
            yield from self._iter_all_vectors(batch)
            return
        wanted = idset.unique(ids).tolist()
        for start in range(0, len(wanted), batch):
            # every re-ranked search comes here for ~100 ids (through the quick connection),
            # reconciling for up to all of them (through SQLAlchemy, leaving the quick one free)
            reader = self._quick if min(batch, len(wanted) - start) <= _QUICK_ROWS else self._read
            with reader("reading vectors") as conn:
                parts = [
                    _aggregated(conn, _SOME_VECTORS.format(_placeholders(len(part))), tuple(part))
                    for part in _chunks(wanted[start : start + batch])
                ]
            found = np.concatenate([part_ids for part_ids, _ in parts])
            if len(found):
                yield _by_id(found, self._decode(b"".join(joined for _, joined in parts), len(found)))

    def _iter_all_vectors(self, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        last = -1
        while True:
            with self._read("reading vectors") as conn:
                ids, joined = _aggregated(conn, _ALL_VECTORS, (last, batch))
            if not len(ids):
                return
            ids, vecs = _by_id(ids, self._decode(joined, len(ids)))
            last = int(ids[-1])
            yield ids, vecs

    def _decode(self, joined: bytes, n: int) -> np.ndarray:
        dim = self.dimension
        if dim is None:
            raise IndexStoreError(f"catalogue {self.path} holds vectors but no dimension in its meta table")
        return _decode_joined(joined, n, dim)

    def vector_ids(self, *, changed_since: int | None = None) -> np.ndarray:
        """Sorted int64 ids of every stored vector, or of those written (added or replaced) by
        transactions after generation `changed_since`."""
        parts = []
        with self._read("listing vectors") as conn:  # one snapshot for every range
            low = conn.exec_driver_sql(_FIRST_VECTOR_ID, (-1,)).scalar()
            while low is not None:
                high = min(low + _ID_SPAN - 1, 2**63 - 1)
                sql, params = (_VECTOR_IDS, (low, high))
                if changed_since is not None:
                    sql, params = _VECTOR_IDS_SINCE, (low, high, changed_since)
                n, id_list = conn.exec_driver_sql(sql, params).one()
                parts.append(_parse_ids(id_list, n))
                low = conn.exec_driver_sql(_FIRST_VECTOR_ID, (high,)).scalar()  # over any gap in the ids
        return np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)

    # -- checks

    def integrity(self, *, full: bool = False) -> list[str]:
        """Problems found, one line each; [] when the catalogue is sound.

        Runs SQLite's quick_check (integrity_check with full=True, which also checks every index
        against its table), then looks for images without a vector, vectors without an image, and
        vectors whose length does not match the recorded dimension.
        """
        problems: list[str] = []
        with self._read("checking integrity") as conn:
            pragma = "integrity_check" if full else "quick_check"
            result = list(conn.exec_driver_sql(f"PRAGMA {pragma}").scalars())
            if result != ["ok"]:
                problems += [f"sqlite {pragma}: {line}" for line in result]
            problems += _orphans(conn)
            problems += _bad_lengths(conn, self.get_meta("dimension"))
        return problems


def _mark_removals(conn: Connection) -> None:
    """Give a catalogue made before the removal mark or the removal log its trigger (and table), in a
    writer's transaction (readers never write: they see no mark or log, and compare every id). What
    was removed before is unknown, so the mark says "at the current generation" and the log starts
    there: an index reflecting an older one compares every id once."""
    find = "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?"
    if conn.exec_driver_sql(find, (_REMOVAL_TRIGGER,)).first() is None:
        conn.exec_driver_sql(_CREATE_REMOVAL_TRIGGER)
        _put_meta(conn, REMOVED_META, str(_generation(conn)))
    if conn.exec_driver_sql(find, (_LOG_TRIGGER,)).first() is None:
        removed_vectors.create(conn, checkfirst=True)
        conn.exec_driver_sql("DELETE FROM removed_vectors")  # left by a trigger since dropped by hand
        conn.exec_driver_sql(_CREATE_LOG_TRIGGER)
        _put_meta(conn, REMOVAL_LOG_FROM, str(_generation(conn)))


def _prune_removal_log(conn: Connection) -> None:
    """Keep the removal log within REMOVAL_LOG_MAX rows: past it, drop its oldest generations down to
    at most half that many rows (whole generations, so what is left is every removal after the new
    REMOVAL_LOG_FROM)."""
    if conn.exec_driver_sql("SELECT count(*) FROM removed_vectors").scalar_one() <= REMOVAL_LOG_MAX:
        return
    keep = REMOVAL_LOG_MAX // 2
    cut = conn.exec_driver_sql(
        "SELECT generation FROM removed_vectors ORDER BY generation DESC LIMIT 1 OFFSET ?", (keep,)
    ).scalar_one()
    conn.exec_driver_sql("DELETE FROM removed_vectors WHERE generation <= ?", (cut,))
    _put_meta(conn, REMOVAL_LOG_FROM, str(cut))
    log.info("removal log pruned: it now holds the removals after generation %d", cut)


def _generation(conn: Connection) -> int:
    stmt = sa.select(meta.c.value).where(meta.c.key == "generation")
    return int(conn.execute(stmt).scalar_one_or_none() or 0)


def _sample(conn: Connection, sql: str) -> tuple[int, list[int]]:
    count = conn.exec_driver_sql(f"SELECT count(*) FROM ({sql})").scalar_one()
    examples = list(conn.exec_driver_sql(f"{sql} LIMIT 5").scalars()) if count else []
    return count, examples


def _orphans(conn: Connection) -> list[str]:
    problems = []
    count, ids = _sample(
        conn, "SELECT id FROM images WHERE NOT EXISTS (SELECT 1 FROM vectors WHERE image_id = images.id)"
    )
    if count:
        problems.append(f"{count} image(s) without a vector, e.g. ids {ids}")
    count, ids = _sample(
        conn, "SELECT image_id FROM vectors WHERE NOT EXISTS (SELECT 1 FROM images WHERE id = vectors.image_id)"
    )
    if count:
        problems.append(f"{count} vector(s) without an image, e.g. ids {ids}")
    return problems


def _bad_lengths(conn: Connection, dimension: str | None) -> list[str]:
    if not dimension:
        has_vectors = conn.exec_driver_sql("SELECT EXISTS (SELECT 1 FROM vectors)").scalar_one()
        return ["vectors are stored but the meta table records no dimension"] if has_vectors else []
    size = vector_blob_size(int(dimension))
    count, ids = _sample(conn, f"SELECT image_id FROM vectors WHERE length(vector) != {size}")
    if count:
        return [f"{count} vector(s) not {dimension}-dimensional int8, e.g. ids {ids}"]
    return []
