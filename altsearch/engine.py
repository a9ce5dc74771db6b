"""The Python API: an index folder plus the model that fills and queries it."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import ids as idset
from .errors import AltsearchError, IndexTooLargeError, ModelMismatchError, ModelNotFoundError, QueryError
from .home import WriteLock, index_dir
from .query import Query, Term, combine, parse_query
from .store import HASH_META, IndexStore
from .vectors import APPROXIMATE, Allowed, BuildProgress

if TYPE_CHECKING:  # the ingestion code is imported when indexing starts, not by every search
    from .ingest import IndexReport, Progress

log = logging.getLogger(__name__)

POST_FILTER_DEPTH = 5
"""A new filter on an approximate index is first applied to this many times the candidates of an
unfiltered search: enough of them are left where it allows a fifth of the images or more, or fewer
images that the query ranks high (see Engine._filtered)."""


@dataclass(frozen=True)
class Hit:
    """One search result. ``score`` is the cosine similarity (higher is closer)."""

    id: int
    path: str
    score: float
    taken_at: float | None
    mtime: float
    size: int
    width: int | None
    height: int | None
    format: str | None

    @property
    def date(self) -> dt.datetime:
        """When the photo was taken (EXIF), else when the file was last modified (UTC)."""
        return dt.datetime.fromtimestamp(self.taken_at if self.taken_at is not None else self.mtime,
                                         tz=dt.timezone.utc)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["score"] = round(self.score, 6)
        d["date"] = self.date.isoformat()
        return d


def to_timestamp(value, *, end: bool = False) -> float | None:
    """Accept a POSIX timestamp, a date/datetime, or ISO text (``2024``, ``2024-06``, ``2024-06-01``,
    ``2024-06-01T12:00``). With ``end=True`` a partial date means the end of that period."""
    if value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()
    if isinstance(value, dt.date):
        value = value.isoformat()
    text = str(value).strip()
    for fmt, step in (("%Y", "year"), ("%Y-%m", "month"), ("%Y-%m-%d", "day")):
        try:
            start = dt.datetime.strptime(text, fmt).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            continue
        if not end:
            return start.timestamp()
        if step == "year":
            nxt = start.replace(year=start.year + 1)
        elif step == "month":
            nxt = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
        else:
            nxt = start + dt.timedelta(days=1)
        return nxt.timestamp() - 1e-6
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(f"not a date: {text!r} (use YYYY, YYYY-MM, YYYY-MM-DD or an ISO date-time)") from None
    return to_timestamp(parsed)


def _refuse_in_starting_worker() -> None:
    """A decode worker process starts by running the parent's main script again (Python's spawn start
    method); a script whose work is not under ``if __name__ == "__main__":`` would open the index in
    each worker and wait on, or take, the parent's write lock. Say so there, in one line. (Processes
    a program starts for its own work are left alone.)"""
    mp = sys.modules.get("multiprocessing")  # a spawned process has imported it; no other need to
    if mp is None:
        return
    me = mp.current_process()
    if not getattr(me, "_inheriting", False):
        return
    from .decode import WORKER_NAME

    if me.name.startswith(WORKER_NAME + "-"):
        raise AltsearchError("altsearch.Engine.open was called while a worker process was starting: Python "
                             "starts one by running the main script again, so keep the script's work under "
                             "`if __name__ == \"__main__\":`")


class Engine:
    """An index of images and the AltCLIP model that embeds them.

    >>> with Engine.open("photos") as engine:          # doctest: +SKIP
    ...     engine.index("~/Pictures")
    ...     hits = engine.search("海边的日落", k=10)
    """

    def __init__(self, store: IndexStore, *, model=None, device: str = "auto", dtype: str = "auto",
                 quantize: str | None = None):
        self.store = store
        self._model = model if not isinstance(model, (str, os.PathLike)) else None
        self._model_source = None if self._model is not None else model
        self._device = device
        self._dtype = dtype
        self._quantize = quantize
        self._files = None  # the model's files and identity (model.files.ModelFiles), located without torch
        self._bound = False
        # the last filter read: (its terms, the catalogue's data_version when read, its ids); see _filtered
        self._last_filter: tuple[tuple, int, Allowed] | None = None

    @classmethod
    def open(cls, index: str | os.PathLike | None = None, *, model=None, device: str = "auto",
             dtype: str = "auto", quantize: str | None = None, create: bool = True) -> "Engine":
        """Open (or create) the index ``index``: a name under the altsearch home, or a folder.

        ``model`` is a hub id, a folder or a loaded :class:`~altsearch.Model`; by default the model the
        index was built with (``BAAI/AltCLIP`` for a new index). ``quantize="int8"`` loads it with
        int8 Linear layers (CPU only; see :func:`~altsearch.load_model`).
        """
        _refuse_in_starting_worker()
        store = IndexStore(index_dir(index), create=create, device=device)
        return cls(store, model=model, device=device, dtype=dtype, quantize=quantize)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    @property
    def path(self) -> Path:
        return self.store.folder

    # -- the model --------------------------------------------------------------------------------

    @property
    def model(self):
        """The model, loaded on first use and checked against the one that built the index (an index
        nothing was indexed into yet takes the model of its first indexing run, not of a search)."""
        if self._model is None:
            from .model import load_model

            with self._locating() as source:
                # located files are reused; else load_model checks device and dtype before any download
                self._model = load_model(self._files or source, device=self._device, dtype=self._dtype,
                                         quantize=self._quantize)
        self._check_model(self._model)
        return self._model

    def _model_files(self):
        """The model's files and identity (`model.files.ModelFiles`), found without importing torch or
        loading a tower, and checked against the index's model as ``model`` is."""
        if self._files is None:
            from .model.files import locate

            with self._locating() as source:
                self._files = locate(source)
        self._check_model(self._files)
        return self._files

    @contextmanager
    def _locating(self) -> Iterator[str]:
        """The source of the model to use; a model that cannot be found, where the index's own record
        named it, is said to be the index's, with how to point at where it is now."""
        from .model.resolve import DEFAULT_MODEL

        recorded = self.store.catalog.get_meta("model_id")
        try:
            yield self._model_source or recorded or DEFAULT_MODEL
        except ModelNotFoundError as err:
            if self._model_source is None and recorded is not None:  # the index's own record led here
                raise ModelNotFoundError(f"{err} (the model this index was built with; if its files are "
                                         f"elsewhere now, pass their folder as the model: --model "
                                         f"FOLDER, or Engine.open(..., model=FOLDER))") from None
            raise

    def _check_model(self, m) -> None:
        if not self._bound:  # the recorded model never changes once set: check it once per engine
            self._bound = self.store.bind_model(m.source, m.fingerprint, m.dimension, record=False)

    # -- building ---------------------------------------------------------------------------------

    def index(self, folder: str | os.PathLike, *, progress: Callable[[Progress], None] | None = None,
              batch_size: int | None = None, workers: int | None = None, draft: bool = True,
              decode: str = "auto", include_hidden: bool = False, follow_symlinks: bool = True) -> IndexReport:
        """Bring ``folder`` into the index: new files embedded, changed ones re-embedded, moved ones
        followed, deleted ones dropped. Safe to interrupt; the next run resumes.

        ``decode``: where JPEGs are decoded, "auto" (on the GPU when the model runs on CUDA, nvImageCodec
        or torchvision is installed and enough files need embedding), "cpu" or "gpu"."""
        from .ingest import Ingestor

        folder = Path(folder).expanduser()
        if not folder.exists():
            raise AltsearchError(f"folder not found: {folder}")
        with WriteLock(self.path):
            # checked against the index's model now, loaded only if the run finds files to embed (and
            # recorded as the index's by the run, if it is new)
            model, load = (self.model, None) if self._model is not None else (self._model_files(), lambda: self.model)
            try:
                ingestor = Ingestor(self.store, model, load=load, batch_size=batch_size, workers=workers,
                                    draft=draft, decode=decode, progress=progress)
            except ValueError as exc:
                raise AltsearchError(str(exc)) from None
            return ingestor.run(str(folder), include_hidden=include_hidden, follow_symlinks=follow_symlinks)

    def remove(self, paths: str | os.PathLike | Iterable[str | os.PathLike], *,
               progress: BuildProgress | None = None) -> int:
        """Drop a file, or every file under a folder, from the index, with the failures recorded
        there (``altsearch errors``); ``paths`` is one path or several. Returns how many images were
        dropped. ``progress`` hears of a rebuild of the vector index this may need first (see
        ``optimize``)."""
        if isinstance(paths, (str, bytes, os.PathLike)):
            paths = [paths]  # one path, not its characters (the root "/" among them: every image)
        roots = []
        for p in paths:
            p = os.fsdecode(p)
            if not p:
                raise AltsearchError("an empty path names no file or folder to remove")
            roots.append(os.path.abspath(os.path.expanduser(p)))
        with WriteLock(self.path):
            ids = idset.unique(np.concatenate([self.store.catalog.filter_ids(under=r) for r in roots]
                                              or [np.zeros(0, np.int64)]))

            def drop(tx) -> None:
                tx.remove(ids.tolist())
                for root in roots:
                    tx.clear_failures_under(root)

            if len(ids):
                self.store.writable_vectors(progress)
            self.store.commit(drop, removed_ids=ids)  # failures alone: the vector index is left unopened
            if len(ids):
                self.store.save_vectors()
            return len(ids)

    def optimize(self, kind: str = "auto", *, progress: BuildProgress | None = None) -> dict:
        """Rebuild the vector index from stored vectors: ``kind="auto"`` chooses exact or approximate
        search by size; ``"flat"``, ``"ivfpq"`` or ``"ivf"`` is kept by later indexing runs and repairs
        (recorded in the catalogue) until an ``optimize("auto")``.

        ``progress(step, done, total)`` hears how the build goes: ``step`` is ``load`` (vectors read
        into an exact index), ``train`` (an approximate index's clustering, 0 then 1 of 1), ``add``
        (vectors added to it) or ``tune`` (its search settings measured); ``done`` counts within the
        step, of ``total`` (None: not known)."""
        with WriteLock(self.path):
            index = self.store.optimize(kind, progress)
            return {"kind": index.kind, "vectors": len(index)}

    def check(self, *, repair: bool = False, progress: BuildProgress | None = None) -> list[str]:
        """Problems in the catalogue or the vector file; with ``repair`` the vector index (and its file,
        if its kind has one) is rebuilt from the catalogue's stored vectors, reporting to ``progress``
        as ``optimize`` does. Returns the problems found (before any repair)."""
        problems = self.store.check()
        if repair and problems:
            with WriteLock(self.path):
                self.store.repair(progress)
        return problems

    # -- querying ---------------------------------------------------------------------------------

    def search(self, query: str, k: int = 10, *, under: str | os.PathLike | None = None,
               taken_from=None, taken_to=None, min_score: float | None = None) -> list[Hit]:
        """Images best matching ``query``: text in any XLM-R language, image paths, ``#id`` terms, with
        ``+``/``-`` and ``:weight`` (``"beach + sunset - people"``). Best first."""
        q = parse_query(query) if isinstance(query, str) else query
        vector = self._query_vector(q)
        exclude = {t.value for t in q.terms if t.kind == "id"} if len(q.terms) == 1 else set()
        return self._nearest(vector, k, under=under, taken_from=taken_from, taken_to=taken_to,
                             min_score=min_score, exclude=exclude)

    def similar(self, image: str | os.PathLike | int, k: int = 10, **filters) -> list[Hit]:
        """Images that look like ``image``: a file (indexed or not), or an indexed image by its catalogue
        id (``42``, or ``"#42"`` as queries and the CLI name it)."""
        if isinstance(image, str) and image.startswith("#") and image[1:].isdigit():
            image = int(image[1:])
        if isinstance(image, (int, np.integer)):
            term = Term("id", int(image), 1.0)
            exclude = {int(image)}
        else:
            path = os.path.abspath(os.path.expanduser(os.fspath(image)))
            term = Term("image", path, 1.0)
            rec = self.store.catalog.get_by_path(path)
            exclude = {rec.id} if rec is not None else set()
        return self._nearest(self._query_vector(Query((term,))), k, exclude=exclude, **filters)

    def _query_vector(self, q: Query) -> np.ndarray:
        texts = [t for t in q.terms if t.kind == "text"]
        images = [t for t in q.terms if t.kind == "image"]
        ids = [t for t in q.terms if t.kind == "id"]
        parts, weights = [], []
        if texts:
            parts.append(self.model.encode_text([t.value for t in texts]))
            weights += [t.weight for t in texts]
        if images:
            from .decode import DEFAULT_DRAFT

            parts.append(self.model.encode_image([t.value for t in images], draft=DEFAULT_DRAFT))
            weights += [t.weight for t in images]
        if ids:
            wanted = np.asarray([t.value for t in ids], np.int64)
            found = {}
            for got, vecs in self.store.catalog.iter_vectors(ids=wanted):
                found.update(zip(got.tolist(), vecs))
            lost = [i for i in wanted.tolist() if i not in found]
            if lost:
                raise QueryError(f"no image with id {lost[0]} in the index")
            parts.append(np.stack([found[i] for i in wanted.tolist()]))
            weights += [t.weight for t in ids]
        vectors = np.concatenate(parts).astype(np.float32)
        dim = self.store.dimension
        if dim is not None and vectors.shape[1] != dim:
            raise ModelMismatchError(f"query vectors have {vectors.shape[1]} dimensions, the index {dim}")
        return combine(vectors, weights)

    def _filtered(self, vector: np.ndarray, want: int, where: dict) -> tuple[np.ndarray, np.ndarray]:
        """The best ``want`` images a filter allows: (scores (1, n), ids (1, n)), n <= want.

        The ids a filter allows are read from the catalogue (``Catalog.filter_ids``: at 1M images, 0.1
        s for a filter that matches half of them, 0.2 s for all), and the last filter's are kept until
        the catalogue changes (its ``data_version``, which any commit moves, ours included): a search
        that repeats its filter, as a user refining a query does, skips reading them again, and its
        FAISS selector is built once. A new filter on an approximate index is first applied to the
        candidates of an unfiltered search instead (:data:`POST_FILTER_DEPTH` times as many, one
        catalogue lookup by id): where the filter allows a good share of the images, enough of them
        are there, and its ids are never read."""
        key = tuple(sorted(where.items()))
        version = self.store.catalog.data_version()  # first: a commit after this is seen next time
        last = self._last_filter
        if last is not None and last[0] == key and last[1] == version:
            allowed = last[2]
        else:
            found = self._filtered_after(vector, want, where)
            if found is not None:
                return found
            allowed = Allowed(self.store.catalog.filter_ids(**where))
            self._last_filter = (key, version, allowed)
        if not len(allowed):
            return np.zeros((1, 0), np.float32), np.zeros((1, 0), np.int64)
        return self.store.search(vector[None, :], want, allowed=allowed)

    def _filtered_after(self, vector: np.ndarray, want: int, where: dict) -> tuple[np.ndarray, np.ndarray] | None:
        """The best ``want`` images the filter allows, from :data:`POST_FILTER_DEPTH` times the candidates
        of an unfiltered search of an approximate index (`VectorIndex.search_kept`), or None where the
        filter leaves fewer candidates than that search takes, or the index is exact (its search of the
        allowed ids costs about what this would)."""
        if self.store.dimension is None or self.store.current_vectors().kind not in APPROXIMATE:
            return None
        scores, ids, complete = self.store.search_kept(
            vector[None, :], want, lambda found: self.store.catalog.filter_among(found, **where), depth=POST_FILTER_DEPTH)
        return (scores, ids) if complete[0] else None

    def _nearest(self, vector: np.ndarray, k: int, *, under=None, taken_from=None, taken_to=None,
                 min_score: float | None = None, exclude: set[int] = frozenset()) -> list[Hit]:
        if k <= 0:
            raise QueryError(f"k must be positive, got {k}")
        cat = self.store.catalog
        if under is not None or taken_from is not None or taken_to is not None:
            where = {"under": os.path.abspath(os.path.expanduser(os.fspath(under))) if under is not None else None,
                     "taken_from": to_timestamp(taken_from), "taken_to": to_timestamp(taken_to, end=True)}
            scores, ids = self._filtered(vector, k + len(exclude), where)
        else:
            scores, ids = self.store.search(vector[None, :], k + len(exclude))
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0])
                 if i >= 0 and int(i) not in exclude and (min_score is None or s >= min_score)][:k]
        records = {r.id: r for r in cat.get([i for i, _ in pairs])}
        return [Hit(id=i, path=records[i].path, score=s, taken_at=records[i].taken_at, mtime=records[i].mtime,
                    size=records[i].size, width=records[i].width, height=records[i].height,
                    format=records[i].format)
                for i, s in pairs if i in records]

    # -- reporting --------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counts and identity of the index (no model is loaded)."""
        cat = self.store.catalog
        path = self.store.folder
        sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
        vectors, problem = None, None
        try:
            vectors = self.store.current_vectors() if self.store.dimension is not None else None
        except IndexTooLargeError as err:  # stats are how one finds out: they do not fail on it
            problem = str(err)
        approximate = vectors is not None and vectors.kind in APPROXIMATE
        return {
            "index": str(path),
            "images": cat.count(),
            "vectors": len(vectors) if vectors is not None else (None if problem else 0),
            "failures": cat.failure_count(),
            "model": cat.get_meta("model_id"),
            "model_fingerprint": cat.get_meta("model_fingerprint"),
            "dimension": self.store.dimension,
            "vector_index": vectors.kind if vectors is not None else None,
            "vector_index_chosen": self.store.chosen_kind or "auto",
            # an approximate index's lists, lists probed per query, and (ivfpq) candidates re-ranked
            # for a top 10, as tuned when it was built; None for an exact one
            "vector_nlist": vectors.nlist if approximate else None,
            "vector_nprobe": vectors.nprobe if approximate else None,
            "vector_rerank": (vectors.rerank or None) if approximate else None,
            "vector_index_problem": problem,  # why no vector index could be opened (searches fail with it)
            "content_hash": cat.get_meta(HASH_META),
            "bytes_on_disk": sum(sizes.values()),
            "schema_version": cat.get_meta("schema_version"),
        }

    def failures(self) -> list[dict]:
        """Files that could not be indexed, with the reason and when it was recorded."""
        return [{"path": p, "reason": r, "at": t} for p, r, t in self.store.catalog.failures()]


__all__ = ["Engine", "Hit", "to_timestamp"]
