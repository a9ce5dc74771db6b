"""One index on disk: the catalogue (the truth) and, for an approximate vector index, the FAISS file
derived from it.

A flat (exact) vector index has no file: it is built in memory from the vectors stored in the
catalogue whenever the index is opened, so it cannot disagree with it. An approximate one is saved:
every catalogue transaction bumps a generation number, and the FAISS file records the generation it
reflects. On open a lagging file is caught up from the catalogue, and a damaged or foreign one is
replaced by a flat index built from it (:meth:`VectorIndex.open`), never by running the model again.
A long-lived reader picks up what another process committed on its next search
(:meth:`IndexStore.refresh`).

The size picks the kind (flat up to EXACT_MAX vectors, else ivfpq) unless one was chosen with
:meth:`IndexStore.optimize`: that choice is recorded in the catalogue, and writers, repairs and
checks keep to it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import faults
from . import ids as idset
from .catalog import Catalog, as_stored
from .errors import AltsearchError, IndexStoreError, IndexTooLargeError, ModelMismatchError
from .home import LOCK_FILE
from .sysmem import available_memory
from .vectors import (APPROXIMATE, KINDS, Allowed, BuildProgress, VectorIndex, header_path, kind_for, read_header,
                      read_vectors, remove_saved, saved_kind)

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite"
VECTORS_FILE = "vectors.faiss"
KIND_META = "vector_kind"  # meta key: the vector index kind chosen with optimize; "auto" or absent: the size picks
HASH_META = "content_hash"  # meta key: the content hash the catalogue's files are hashed with (decode.HASH_KINDS)
# An exact index built in memory may take this share of the memory available when it is built (Linux's
# MemAvailable, or what a container's or unit's memory limit leaves where that is less: sysmem): beyond,
# the index says how to rebuild its approximate file instead of swapping or being killed (10M x 768
# float32: 31 GB).
FLAT_MEMORY_SHARE = 0.75


def flat_memory_limit() -> int | None:
    """The most an exact index built in memory may hold (see FLAT_MEMORY_SHARE); None: no limit known."""
    available = available_memory()
    return None if available is None else int(available * FLAT_MEMORY_SHARE)


@contextmanager
def _writing(folder: Path, doing: str) -> Iterator[None]:
    """An OSError while writing the index (disk full, file too large, read-only) is an IndexStoreError:
    the transaction was rolled back or the old vector file kept, so the index is at its last good state."""
    try:
        yield
    except OSError as err:
        raise IndexStoreError(f"cannot write index {folder} while {doing}: {err.strerror or err}; "
                              "it keeps its last committed state") from err


def _written_before(folder: Path) -> bool:
    """Whether a writer has used this index folder (its lock file or a vector file is there): its
    catalogue was complete then, whereas one killed while it was created has neither beside it."""
    return any((folder / name).exists() for name in (LOCK_FILE, VECTORS_FILE))


def _remove_stale_temps(folder: Path) -> None:
    """Temp files of saves that were killed before their rename (every save runs under the index's
    write lock, so none of them belongs to a live save)."""
    for tmp in folder.glob(f".{VECTORS_FILE}.*.tmp"):
        tmp.unlink(missing_ok=True)


class ReadWriteLock:
    """Many readers (searches) at once, or one writer (add, remove, reconcile)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class IndexStore:
    def __init__(self, folder: Path, *, create: bool = True, device: str = "auto"):
        self.folder = Path(folder)
        db = self.folder / CATALOG_FILE
        if not db.is_file():
            if not create:
                if self.folder.is_dir() and any(self.folder.iterdir()):  # photos named as the index?
                    raise IndexStoreError(
                        f"no index at {self.folder}: the folder holds no altsearch catalogue. --index names "
                        f"where an index is stored (a name, or its own folder), not the photos; to index "
                        f"this folder: altsearch index {self.folder}")
                raise IndexStoreError(f"no index at {self.folder} (create one with: altsearch index FOLDER "
                                      f"--index {self.folder})")
            self.folder.mkdir(parents=True, exist_ok=True)
        elif not create and db.stat().st_size == 0 and _written_before(self.folder):
            # damage, not a catalogue being created: SQLite would silently start a new, empty one
            raise IndexStoreError(f"catalogue {db} is empty (0 bytes) in an index that was written to: it was "
                                  "truncated; restore it, or delete the index folder and re-index")
        self.device = device
        self.catalog = Catalog(db)
        self._vectors: VectorIndex | None = None
        self._seen_version: int | None = None  # catalog.data_version() when the vectors were last known current
        self._rw = ReadWriteLock()
        self._open_lock = threading.Lock()
        self._saved_generation: int | None = None
        # the vector file as this store last read or wrote it (see _file_stamp): another writer's file
        # (its optimize, repair or indexing run) is told apart from ours by it
        self._file_seen: tuple | None = None
        # An exact index that an indexing run grew beyond EXACT_MAX is let go (see commit): until the
        # run's maybe_rebuild builds the approximate one, commits leave the vectors to the catalogue.
        self._released = False

    def close(self) -> None:
        self.catalog.close()

    # -- model identity ---------------------------------------------------------------------------

    @property
    def dimension(self) -> int | None:
        return self.catalog.dimension

    def bind_model(self, model_id: str, fingerprint: str, dimension: int, *, record: bool = True) -> bool:
        """Record the model of a new index (a writer's call; with ``record=False``, as a reader's check,
        a new index stays unbound), or refuse one that differs from the recorded model. Returns whether
        the index is bound to this model now."""
        recorded = self.catalog.get_meta("model_fingerprint")
        if recorded is None:
            if record:
                with self.catalog.transaction() as tx:
                    tx.set_meta("model_id", model_id)
                    tx.set_meta("model_fingerprint", fingerprint)
                    tx.set_meta("dimension", str(dimension))
            return record
        if recorded != fingerprint:
            raise ModelMismatchError(
                f"index {self.folder} was built with model {self.catalog.get_meta('model_id')} "
                f"(fingerprint {recorded}), not {model_id} ({fingerprint}); use that model, or another index")
        return True

    @property
    def generation(self) -> int:
        """The catalogue's generation (bumped by every committed change)."""
        return self.catalog.generation

    # -- vectors ------------------------------------------------------------------------------------

    @property
    def vectors(self) -> VectorIndex:
        """The in-memory vector index, opened (and caught up with the catalogue) on first use."""
        with self._open_lock:
            if self._vectors is None:
                if self.dimension is None:
                    raise IndexStoreError(f"index {self.folder} is empty (index a folder first)")
                self._file_seen = self._file_stamp()  # before: a file saved meanwhile is seen as new next time
                try:
                    index = VectorIndex.open(self.folder / VECTORS_FILE, self.catalog, device=self.device,
                                             max_flat_bytes=flat_memory_limit())
                except IndexTooLargeError as err:
                    raise IndexTooLargeError(f"index {self.folder}: {err}. Rebuild its approximate vector index "
                                             f"from the stored vectors (the model does not run): altsearch check "
                                             f"--repair --index {self.folder}") from None
                self._saved_generation = index.header.generation if index.header else None
                self._vectors = index
                self._released = False
            return self._vectors

    def writable_vectors(self, progress: BuildProgress | None = None) -> VectorIndex:
        """The vector index, for a writer (under the index's write lock) about to change it, up to date
        with the catalogue: a store that searched before another process wrote (a long-lived engine)
        catches up with that process's commits, and reopens the vector file if that process saved or
        deleted it (an optimize to another kind, a repair), so that its own commit and save build on
        the index as it now is, not on the one it read. Where the exact index that stands in for an
        unusable approximate file would not fit in memory, the approximate index is rebuilt from the
        catalogue first, as `check --repair` does (its steps reported to `progress`)."""
        self._forget_if_replaced()
        try:
            return self.current_vectors()
        except IndexTooLargeError as err:
            log.warning("%s: rebuilding it now", err)
            return self.repair(progress)

    def built_when_needed(self) -> bool:
        """Whether a writer that may change no vector can leave the vector index unopened: it is not
        open yet and would be an exact one built from the catalogue's vectors (no vector file, no kind
        chosen, at most EXACT_MAX images), so opening it has nothing to repair or catch up on disk, and
        only costs reading every vector (a re-run of an unchanged 100,000-image library: 0.3 GB and
        most of its time). A commit that changes vectors opens it then."""
        return (self._vectors is None and self.dimension is not None and self._file_stamp() is None
                and self.chosen_kind is None and kind_for(self.catalog.count()) == "flat")

    def current_vectors(self) -> VectorIndex:
        """The vector index, opened on first use and caught up with other processes (`refresh`, which
        may read the vector file again in place of the index it had: the index is taken after it)."""
        self.vectors
        self.refresh()
        return self.vectors

    def _take_up_another_kind(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._file_seen:
            return
        path = self.folder / VECTORS_FILE
        try:
            header = read_header(path) if stamp is not None else None
        except IndexStoreError:
            return  # unreadable: this index goes on, caught up by reconciling
        if header is not None and (stamp[0] is None or header.size_bytes != stamp[0][1]):
            return  # a save caught between renaming the file and its header: look again next time
        saved = header.kind if header is not None else "flat"  # no file: exact, built from the catalogue
        if saved == self._vectors.kind:
            return
        try:
            index = VectorIndex.open(path, self.catalog, device=self.device, max_flat_bytes=flat_memory_limit())
        except IndexTooLargeError as err:
            log.warning("%s; searching with the %s index read before", err, self._vectors.kind)
            return
        if index.kind != saved:
            return  # the file changed again, or could not be used: keep this one
        log.info("%s is now a %s index: reading it in place of the %s one", path, saved, self._vectors.kind)
        with self._open_lock, self._rw.writing():
            self._vectors = index
            self._saved_generation = index.header.generation if index.header else None
            self._file_seen = stamp

    def _forget_if_replaced(self) -> None:
        """Drop the index in memory if another process saved or deleted the vector file since this
        store read it (a writer's call: the next use reads the file as it now is)."""
        if self._vectors is not None and self._file_stamp() != self._file_seen:
            log.info("%s was written by another process: reading it again", self.folder / VECTORS_FILE)
            with self._open_lock, self._rw.writing():
                self._vectors = None
                self._seen_version = None

    def _file_stamp(self) -> tuple | None:
        """(inode, size, mtime in ns) of the vector file and of its header, None without either:
        every save replaces each by a rename, so a save by anyone, or one that was half done when
        this store looked, gives a new stamp."""
        stamp = []
        for path in (self.folder / VECTORS_FILE, header_path(self.folder / VECTORS_FILE)):
            try:
                st = path.stat()
            except FileNotFoundError:
                stamp.append(None)
                continue
            stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamp) if any(stamp) else None

    def refresh(self) -> None:
        """Catch up with what another process committed since this index was read. A vector file of
        another kind that it saved or deleted meanwhile (an indexing run that outgrew exact search and
        rebuilt the index approximate, an optimize) is read in place of the index in memory, which
        would otherwise stay as it was read for as long as this process lives (a long-lived engine
        kept an exact index of millions of vectors); one of the same kind is caught up with instead."""
        if self._vectors is None:
            return
        version = self.catalog.data_version()  # first: a commit after this is caught next time
        if version == self._seen_version:
            return  # nobody committed since the last look (microseconds, against a catalogue read)
        self._take_up_another_kind()
        if self._vectors.generation != self.catalog.generation:
            with self._rw.writing():
                self._vectors.reconcile(self.catalog, since_generation=self._vectors.generation or 0)
        self._seen_version = version

    def search(self, queries: np.ndarray, k: int, *, allowed: Allowed | np.ndarray | None = None):
        """(scores, ids), each (Q, min(k, vectors)): never wider than the index, as k is user input
        (``-k 1000000000`` must not allocate 12 GB of padding). The scores are exact inner products
        with the catalogue's vectors whatever the index kind (a compressed index's candidates are
        re-ranked against them)."""
        if self.dimension is None:  # nothing indexed yet
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        index = self.current_vectors()
        with self._rw.reading():
            return index.search(queries, max(1, min(k, len(index))), allowed=allowed, refine=self.true_vectors)

    def search_kept(self, queries: np.ndarray, k: int, keep, *, depth: int):
        """(scores, ids, complete) of `VectorIndex.search_kept`, as ``search`` does it (never wider than
        the index, re-ranked against the catalogue's vectors)."""
        if self.dimension is None:
            empty = np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
            return *empty, np.zeros(len(queries), bool)
        index = self.current_vectors()
        with self._rw.reading():
            return index.search_kept(queries, max(1, min(k, len(index))), keep, depth=depth,
                                     refine=self.true_vectors)

    def true_vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids found, float32 vectors) of these ids as the catalogue stores them (a vectors.Refine)."""
        return read_vectors(self.catalog, ids)

    def commit(self, fn: Callable, *, removed_ids=(), added=None) -> None:
        """Run ``fn(tx)`` in one catalogue transaction, then apply the vector changes in memory.

        ``added`` is ``(ids, vectors)``; the ids may be filled in by ``fn``. Vectors go into FAISS as the
        catalogue stores them (`catalog.as_stored`: int8-rounded), so a rebuilt index scores exactly like this one.
        A commit that changes no vector (metadata, failures) leaves a vector index not opened yet unopened.

        An exact index with no kind chosen that grows beyond EXACT_MAX here is let go: the indexing run
        that adds the vectors ends with `maybe_rebuild`, which builds the approximate one from the
        catalogue whether or not the exact one is kept, and keeping it would cost 3 KB per vector
        until then (a first run over a million photos: 3 GB). Commits leave the vectors to the
        catalogue meanwhile; a search in the meantime opens the index again.
        """
        vectors = None
        if not self._released and (len(removed_ids) or added is not None or self._vectors is not None):
            vectors = self.current_vectors()  # before the catalogue moves on: the generation stamped
            # below must not skip another process's commits
        with _writing(self.folder, "committing to the catalogue"):
            with self.catalog.transaction() as tx:
                fn(tx)
                faults.point("commit")
            faults.point("committed")
        if vectors is None:
            return
        with self._rw.writing():
            if len(removed_ids):
                vectors.remove(np.asarray(removed_ids, np.int64))
            if added is not None and len(added[0]):
                vectors.add(np.asarray(added[0], np.int64), as_stored(added[1]))
            vectors.generation = self.catalog.generation  # one writer at a time (the write lock)
        if (added is not None and vectors.kind == "flat" and kind_for(len(vectors)) != "flat"
                and self.chosen_kind is None):
            log.info("the exact vector index grew to %d vectors: the approximate one is built at the end of "
                     "the run", len(vectors))
            with self._open_lock, self._rw.writing():
                self._vectors, self._seen_version, self._released = None, None, True

    def save_vectors(self) -> None:
        """Write the vector file atomically if it lags behind the catalogue (a writer's call, under the
        index's write lock; every writer opens the vectors first). A flat index has none, as every open
        builds it from the catalogue: a file there (an approximate index's before a switch to flat, or
        a flat one an older altsearch saved) is stale, and is deleted."""
        if self._vectors is None:
            return
        path = self.folder / VECTORS_FILE
        if self._vectors.kind not in APPROXIMATE:
            with _writing(self.folder, f"deleting the stale {VECTORS_FILE}"):
                _remove_stale_temps(self.folder)
                remove_saved(path)
            self._file_seen = None
            return
        generation = self._vectors.generation
        if generation == self._saved_generation and path.is_file():
            return
        with _writing(self.folder, f"saving {VECTORS_FILE}"), self._rw.reading():
            _remove_stale_temps(self.folder)
            self._vectors.save(path, generation=generation, catalog_id=self.catalog.catalog_id)
        self._saved_generation = generation
        self._file_seen = self._file_stamp()

    def rebuild(self, kind: str = "auto", progress: BuildProgress | None = None) -> VectorIndex:
        """A new vector index built from the vectors stored in the catalogue (the model never runs);
        `kind` is auto or one of vectors.KINDS; its steps are reported to `progress` (see
        vectors.BuildProgress). The current index stays in use if the build fails."""
        if kind != "auto" and kind not in KINDS:
            raise IndexStoreError(f"unknown vector index kind {kind!r} (use auto, {', '.join(KINDS)})")
        if self.dimension is None:
            raise IndexStoreError(f"index {self.folder} is empty (index a folder first)")
        try:
            index = VectorIndex.from_catalog(self.catalog, kind=kind, device=self.device,
                                             max_bytes=flat_memory_limit(), progress=progress)
        except IndexTooLargeError as err:
            hint = "; an approximate index would fit: altsearch optimize --kind auto" if kind == "flat" else ""
            raise IndexTooLargeError(f"cannot build an exact vector index of {self.folder}: {err}{hint}") from None
        except ValueError as err:  # too few vectors for an IVF kind
            raise IndexStoreError(f"cannot build the {kind} vector index of {self.folder}: {err}") from err
        with self._rw.writing():
            self._vectors, self._released = index, False
        self._saved_generation = None
        self._file_seen = self._file_stamp()  # this index supersedes the file as it stands
        return index

    @property
    def chosen_kind(self) -> str | None:
        """The vector index kind chosen with `optimize` (one of vectors.KINDS), which writers, repairs
        and checks keep to; None when the size picks it."""
        value = self.catalog.get_meta(KIND_META)
        if value in KINDS:
            return value
        if value not in (None, "auto"):
            log.warning("index %s records an unknown vector index kind %r: the size picks it", self.folder, value)
        return None

    def optimize(self, kind: str = "auto", progress: BuildProgress | None = None) -> VectorIndex:
        """Rebuild the vector index as `kind` (auto or one of vectors.KINDS), record the choice in the
        catalogue and save the index (a writer's call, under the index's write lock). A kind other
        than auto sticks: later writers and repairs build it again, whatever the size, until an
        optimize with auto lets the size pick again."""
        before = (self._vectors, self._saved_generation, self._file_seen)
        index = self.rebuild(kind, progress)  # refuses a kind it cannot build before anything is recorded
        if self.catalog.get_meta(KIND_META) != kind:
            try:
                self.commit(lambda tx: tx.set_meta(KIND_META, kind))
            except BaseException:
                if not self._recorded(kind):  # (a full disk): the index stays the one the record names
                    with self._rw.writing():
                        self._vectors, self._saved_generation, self._file_seen = before
                raise
        self.save_vectors()  # after the record: the file states the catalogue's generation
        return index

    def _recorded(self, kind: str) -> bool:
        """Whether the catalogue records `kind` as the chosen one (False when it cannot be read)."""
        try:
            return self.catalog.get_meta(KIND_META) == kind
        except AltsearchError:
            return False

    def maybe_rebuild(self, progress: BuildProgress | None = None) -> bool:
        """Rebuild the vector index if it is not of the kind it should be (at the end of an indexing run).

        Without a chosen kind, when it has grown out of its kind (`VectorIndex.needs_rebuild`: exact
        and approximate search switch at EXACT_MAX, an IVF is retrained 4-fold away from its
        training size). With one, when it is of another kind (a missing or damaged file was opened
        flat), or is an IVF 4-fold away from its training size; if the chosen kind cannot be built
        at this size (an ivfpq needs 256 vectors), the index is kept as it is.
        """
        index, chosen = self._vectors, self.chosen_kind
        if index is None and self._released:  # let go by a commit, having grown beyond exact search
            log.info("building the vector index of %s as %s", self.folder, chosen or "auto")
            self.rebuild(chosen or "auto", progress)
            return True
        if index is None or not index.needs_rebuild(chosen):
            return False
        log.info("rebuilding the %s vector index (%d vectors) as %s", index.kind, len(index), chosen or "auto")
        try:
            self.rebuild(chosen or "auto", progress)
        except IndexStoreError as err:
            if chosen is None:
                raise
            log.warning("%s; keeping the %s vector index", err, index.kind)
            return False
        return True

    def vector_for_hash(self, content_hash: str | None, exclude: int | None = None) -> np.ndarray | None:
        """The stored vector of an indexed file with this content, if there is one."""
        return self.catalog.vector_for_hash(content_hash, exclude) if content_hash else None

    # -- health ---------------------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Problems in the catalogue, and between it and the vector file ([] when clean). Without an
        approximate index's file the index is flat, built from the catalogue when opened: it cannot
        disagree with it, but the file is missing where an approximate kind was chosen with optimize,
        or, with none chosen, beyond EXACT_MAX images. A file of a kind other than the chosen one is
        a problem too."""
        problems = list(self.catalog.integrity())
        path = self.folder / VECTORS_FILE
        try:
            kind = saved_kind(path)
            if kind in APPROXIMATE and not path.is_file():
                return problems + [f"{VECTORS_FILE} is missing (its header {path.name}.json is there)"]
            index = VectorIndex.load(path, device="cpu") if kind in APPROXIMATE else None
        except IndexStoreError as e:
            return problems + [str(e)]
        chosen = self.chosen_kind
        if index is None:  # none there, or an older altsearch's flat file, which is passed over
            if chosen in APPROXIMATE:
                problems.append(f"{VECTORS_FILE} is missing: an {chosen} index was chosen with optimize "
                                "(searched exactly, in memory, until it is built)")
            elif chosen is None and kind_for(count := self.catalog.count()) != "flat":
                problems.append(f"{VECTORS_FILE} is missing: {count} images call for an approximate index "
                                "(searched exactly, in memory, until it is built)")
            return problems
        if chosen is not None and index.kind != chosen:
            problems.append(f"{VECTORS_FILE} holds an {index.kind} index, but {chosen} was chosen with optimize")
        header = index.header
        if header.catalog_id != self.catalog.catalog_id:
            return problems + [f"{VECTORS_FILE} belongs to another catalogue"]
        if header.generation > self.catalog.generation:
            problems.append(f"{VECTORS_FILE} is newer than the catalogue (generation {header.generation} > "
                            f"{self.catalog.generation}): was the catalogue restored from a backup?")
        have, want = index.ids(), self.catalog.vector_ids()
        missing, extra = idset.difference(want, have), idset.difference(have, want)
        changed = self.catalog.vector_ids(changed_since=header.generation)
        if len(missing):
            problems.append(f"{VECTORS_FILE} lacks {len(missing)} of the catalogue's vectors")
        if len(extra):
            problems.append(f"{VECTORS_FILE} holds {len(extra)} vectors of images no longer in the catalogue")
        if len(idset.difference(changed, missing)):
            problems.append(f"{VECTORS_FILE} holds outdated vectors for {len(changed)} images")
        return problems

    def repair(self, progress: BuildProgress | None = None) -> VectorIndex:
        """Rebuild the vector index from the catalogue's stored vectors and write its file: as the kind
        chosen with optimize; without one, an approximate index in use keeps its kind, and otherwise
        the size picks it ("auto"). An index in memory that another process's save or deletion of the
        file has outdated is not "in use": the size picks then too, as in a fresh process."""
        self._forget_if_replaced()
        current = self._vectors.kind if self._vectors is not None else None
        index = self.rebuild(self.chosen_kind or (current if current in APPROXIMATE else "auto"), progress)
        self.save_vectors()
        return index
