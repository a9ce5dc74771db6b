"""One index on disk: the catalogue (the truth) and the FAISS file derived from it.

The FAISS file records the catalogue ``generation`` it reflects. Every commit bumps the generation in
the same transaction as its rows, so on open a lagging or damaged vector file is noticed and caught up
from the vectors stored in the catalogue, without running the model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .catalog import Catalog
from .errors import IndexStoreError, ModelMismatchError
from .vectors import VectorIndex

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite"
VECTORS_FILE = "vectors.faiss"


class IndexStore:
    def __init__(self, folder: Path, *, create: bool = True, readonly: bool = False, device: str = "auto"):
        self.folder = Path(folder)
        db = self.folder / CATALOG_FILE
        if not db.is_file():
            if not create or readonly:
                raise IndexStoreError(f"no index at {self.folder} (create one with: altsearch index FOLDER "
                                      f"--index {self.folder})")
            self.folder.mkdir(parents=True, exist_ok=True)
        self.readonly = readonly
        self.device = device
        self.catalog = Catalog(db, readonly=readonly)
        self._vectors: VectorIndex | None = None
        self._lock = threading.RLock()
        self._saved_generation: int | None = None

    def close(self) -> None:
        self.catalog.close()

    # -- model identity ---------------------------------------------------------------------------

    @property
    def dimension(self) -> int | None:
        d = self.catalog.get_meta("dimension")
        return int(d) if d else None

    def bind_model(self, model_id: str, fingerprint: str, dimension: int) -> None:
        """Record the model of a new index, or refuse one that differs from the recorded model."""
        recorded = self.catalog.get_meta("model_fingerprint")
        if recorded is None:
            if self.readonly:
                return
            self.catalog.set_meta("model_id", model_id)
            self.catalog.set_meta("model_fingerprint", fingerprint)
            self.catalog.set_meta("dimension", str(dimension))
            return
        if recorded != fingerprint:
            raise ModelMismatchError(
                f"index {self.folder} was built with model {self.catalog.get_meta('model_id')} "
                f"(fingerprint {recorded}), not {model_id} ({fingerprint}); use that model, or another index")

    # -- generation and vectors --------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self.catalog.generation

    @property
    def vectors(self) -> VectorIndex:
        with self._lock:
            if self._vectors is None:
                self._vectors = self._open_vectors()
            return self._vectors

    def _open_vectors(self) -> VectorIndex:
        path = self.folder / VECTORS_FILE
        dim = self.dimension
        if path.is_file():
            try:
                index = self._load_file(self.device)
            except IndexStoreError as e:
                log.warning("%s; rebuilding it from the catalogue", e)
            else:
                self._saved_generation = index.header.generation
                if self._saved_generation != self.generation or len(index) != self.catalog.count():
                    self.reconcile(index)
                return index
        if dim is None:
            return VectorIndex.create(self.catalog_dimension(), device=self.device)
        return self.rebuild()

    def _load_file(self, device: str) -> VectorIndex:
        path = self.folder / VECTORS_FILE
        index = VectorIndex.load(path, device=device)
        if index.header.catalog_id != self.catalog.catalog_id:
            raise IndexStoreError(f"{path} belongs to another catalogue")
        return index

    def catalog_dimension(self) -> int:
        d = self.dimension
        if d is None:
            raise IndexStoreError(f"index {self.folder} has no model recorded yet (index a folder first)")
        return d

    def reconcile(self, index: VectorIndex) -> tuple[int, int]:
        """Make ``index`` hold exactly the catalogue's vectors: add the missing, drop the extra."""
        have = index.ids()
        want = self.catalog.vector_ids()
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if len(extra):
            index.remove(extra)
        for ids, vecs in self.catalog.iter_vectors(ids=missing) if len(missing) else ():
            index.add(ids, vecs)
        if len(extra) or len(missing):
            log.info("vector file caught up with the catalogue: %d added, %d removed", len(missing), len(extra))
        return len(missing), len(extra)

    def rebuild(self, kind: str = "auto") -> VectorIndex:
        """A new vector index built from the vectors stored in the catalogue (never re-runs the model)."""
        ids_parts, vec_parts = [], []
        for ids, vecs in self.catalog.iter_vectors():
            ids_parts.append(ids)
            vec_parts.append(vecs)
        dim = self.catalog_dimension()
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        vecs = np.concatenate(vec_parts) if vec_parts else np.zeros((0, dim), np.float32)
        index = VectorIndex.build(ids, vecs, kind=kind, device=self.device)
        with self._lock:
            self._vectors = index
        return index

    def commit(self, fn: Callable, *, removed_ids=(), added=None) -> None:
        """Run ``fn(tx)`` in one catalogue transaction (which bumps the generation), then apply the
        vector changes to the in-memory index."""
        vectors = self.vectors  # opened (and caught up) before the catalogue moves on
        with self.catalog.transaction() as tx:
            fn(tx)
        with self._lock:
            if len(removed_ids):
                vectors.remove(np.asarray(removed_ids, np.int64))
            if added is not None and len(added[0]):
                vectors.add(np.asarray(added[0], np.int64), np.asarray(added[1], np.float32))

    def save_vectors(self) -> None:
        """Write the vector file atomically if it lags behind the catalogue."""
        if self.readonly or self._vectors is None:
            return
        generation = self.generation
        if generation == self._saved_generation and (self.folder / VECTORS_FILE).is_file():
            return
        with self._lock:
            self._vectors.save(self.folder / VECTORS_FILE, generation=generation,
                               catalog_id=self.catalog.catalog_id)
            self._saved_generation = generation

    def vector_for_hash(self, content_hash: str | None, exclude: int | None = None) -> np.ndarray | None:
        """The stored vector of an indexed file with this content, if there is one."""
        if not content_hash:
            return None
        ids = [i for i in self.catalog.ids_by_hash(content_hash) if i != exclude]
        if not ids:
            return None
        for _, vecs in self.catalog.iter_vectors(ids=np.asarray(ids[:1], np.int64)):
            return vecs[0]
        return None

    # -- health ---------------------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Problems found in the catalogue and in how the vector file agrees with it ([] when clean)."""
        problems = list(self.catalog.integrity())
        path = self.folder / VECTORS_FILE
        if not path.is_file():
            if self.catalog.count():
                problems.append(f"{VECTORS_FILE} is missing")
            return problems
        try:
            index = self._load_file("cpu")
        except IndexStoreError as e:
            return problems + [str(e)]
        have, want = index.ids(), self.catalog.vector_ids()
        extra = np.setdiff1d(have, want)
        missing = np.setdiff1d(want, have)
        if len(missing):
            problems.append(f"{VECTORS_FILE} lacks {len(missing)} of the catalogue's vectors")
        if len(extra):
            problems.append(f"{VECTORS_FILE} holds {len(extra)} vectors of images no longer in the catalogue")
        if len(have) != len(np.unique(have)):
            problems.append(f"{VECTORS_FILE} holds duplicate ids")
        return problems

    def repair(self) -> VectorIndex:
        """Rebuild the vector file from the catalogue's stored vectors and write it."""
        self.rebuild(kind=self._vectors.kind if self._vectors is not None else "auto")
        self._saved_generation = None
        self.save_vectors()
        return self._vectors
