"""Bringing a folder's images into an index: scan, diff against the catalogue, decode, embed, commit.

Work lands in chunks: one SQLite transaction holds a chunk's catalogue rows *and* their vectors, so a run
that is killed resumes where it stopped, with nothing lost or twice. The in-memory FAISS index follows
each commit; its file is written atomically every few seconds and at the end (a file that lags behind is
caught up from the catalogue on the next open, see :mod:`altsearch.store`).

A file whose content is already in the index (a byte-identical duplicate, or a file that was moved or
renamed) reuses the stored vector: the model runs once per distinct content.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from . import faults
from .decode import DEFAULT_DRAFT, DecodePool, Decoded, hash_file
from .scan import FileEntry, ScanProblem, scan

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    """What one ``index`` run did. ``added + updated + moved + unchanged`` are images now indexed."""

    folder: str
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    duplicates: int = 0  # added or updated files whose content was already embedded (no model run)
    embedded: int = 0  # images that went through the model
    seconds: float = 0.0
    interrupted: bool = False
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        d["images_per_second"] = round(self.images_per_second, 2)
        d["seconds"] = round(self.seconds, 3)
        return d


@dataclass(frozen=True)
class Progress:
    """Handed to the ``progress`` callback: ``phase`` is ``scan``, ``embed`` or ``done``."""

    phase: str
    done: int
    total: int | None
    report: IndexReport


@dataclass
class _Work:
    entry: FileEntry
    replaces: int | None  # catalogue id of the old version of a changed file


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _inside_any(path: str, folders: set[str]) -> bool:
    """Whether ``path`` is one of ``folders`` or lies below one of them."""
    while True:
        if path in folders:
            return True
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent


class Ingestor:
    def __init__(self, store, model, *, batch_size: int | None = None, workers: int | None = None,
                 draft: bool = True, chunk_size: int = 512, commit_seconds: float = 5.0,
                 save_seconds: float = 60.0, progress: Callable[[Progress], None] | None = None):
        self.store = store
        self.model = model
        self.batch_size = batch_size or (64 if model.device.type == "cuda" else 16)
        self.workers = workers
        self.draft = DEFAULT_DRAFT if draft else None
        self.chunk_size = chunk_size
        self.commit_seconds = commit_seconds
        self.save_seconds = save_seconds
        self.progress = progress or (lambda p: None)
        self._rows: list[tuple[_Work, Decoded, np.ndarray]] = []
        self._failures: list[tuple[str, str, int | None]] = []
        self._last_commit = self._last_save = time.monotonic()

    # -- the run ---------------------------------------------------------------------------------

    def run(self, root: str, *, include_hidden: bool = False, follow_symlinks: bool = True) -> IndexReport:
        root = os.path.abspath(os.path.expanduser(root))
        report = IndexReport(folder=root)
        t0 = time.perf_counter()
        try:
            work = self._plan(root, report, include_hidden, follow_symlinks)
            self._embed(work, report)
        except KeyboardInterrupt:
            report.interrupted = True
            log.warning("interrupted: committing what is finished")
        finally:
            self._commit(report)
            if not report.interrupted:
                self.store.maybe_rebuild()
            self.store.save_vectors()
            report.seconds = time.perf_counter() - t0
            self.progress(Progress("done", report.embedded, report.embedded, report))
        return report

    def _plan(self, root: str, report: IndexReport, include_hidden: bool, follow_symlinks: bool) -> list[_Work]:
        """Scan, then settle everything that needs no model: unchanged, touched, moved, removed."""
        cat = self.store.catalog
        known = cat.file_states(under=root)
        seen: set[str] = set()
        new: list[FileEntry] = []
        changed: list[tuple[FileEntry, tuple]] = []
        for n, item in enumerate(scan(root, include_hidden=include_hidden, follow_symlinks=follow_symlinks), 1):
            if isinstance(item, ScanProblem):
                self._failures.append((item.path, item.reason, None))
                continue
            seen.add(item.path)
            state = known.get(item.path)
            if state is None:
                new.append(item)
            elif state[1] == item.size and state[2] == item.mtime:
                report.unchanged += 1
            else:
                changed.append((item, state))
            if n % 1000 == 0:
                self.progress(Progress("scan", n, None, report))
        # A folder that could not be listed this time (permissions, an unmounted disk behind a link) hides
        # its files; they are kept, not taken for deleted.
        unseen = {p for p, _, _ in self._failures}
        hidden = {p for p in known if p not in seen and _inside_any(p, unseen)}
        report.unchanged += len(hidden)
        missing = {p: s for p, s in known.items() if p not in seen and p not in hidden}

        work: list[_Work] = []
        touched: list[tuple[int, FileEntry]] = []
        for entry, (image_id, _, _, old_hash) in changed:
            if self._hash(entry) == old_hash:
                touched.append((image_id, entry))  # same bytes, new mtime: nothing to embed
                report.unchanged += 1
            else:
                work.append(_Work(entry, replaces=image_id))

        # A new file is a moved one when a vanished file had the same size and content.
        by_size: dict[int, list[str]] = defaultdict(list)
        for path, (_, size, _, _) in missing.items():
            by_size[size].append(path)
        moves: list[tuple[int, FileEntry]] = []
        for entry in new:
            candidates = [p for p in by_size.get(entry.size, ()) if p in missing]
            digest = self._hash(entry) if candidates else None
            match = next((p for p in candidates if missing[p][3] == digest), None)
            if match is None:
                work.append(_Work(entry, replaces=None))
            else:
                moves.append((missing.pop(match)[0], entry))

        removed = [s[0] for s in missing.values()]
        gone_failures = [p for p, _, _ in cat.failures() if _under(p, root) and p not in seen]

        def bookkeeping(tx):
            for image_id, e in touched:
                tx.update(image_id, {"size": e.size, "mtime": e.mtime}, None)
            for image_id, e in moves:
                tx.move(image_id, e.path, e.size, e.mtime)
            if removed:
                tx.remove(removed)
            for path in gone_failures:
                tx.clear_failure(path)

        self.store.commit(bookkeeping, removed_ids=removed)
        report.moved, report.removed = len(moves), len(removed)
        return work

    def _hash(self, entry: FileEntry) -> str | None:
        try:
            return hash_file(entry.path)
        except OSError:
            return None  # vanished or unreadable: the decode step records why

    def _embed(self, work: list[_Work], report: IndexReport) -> None:
        if not work:
            return
        by_path = {w.entry.path: w for w in work}
        cat = self.store.catalog
        embedded_here: dict[str, np.ndarray] = {}  # content hash -> vector, this run
        batch: list[tuple[_Work, Decoded]] = []
        waiting: dict[str, list[tuple[_Work, Decoded]]] = defaultdict(list)  # same content as a batched file
        total = len(work)

        def flush():
            if not batch:
                return
            vecs = self.model.encode_pixels(np.stack([d.pixels for _, d in batch]))
            report.embedded += len(batch)
            for (w, d), v in zip(batch, vecs):
                embedded_here[d.content_hash] = v
                self._rows.append((w, d, v))
                for w2, d2 in waiting.pop(d.content_hash, ()):
                    self._rows.append((w2, d2, v))
                    report.duplicates += 1
            batch.clear()

        with DecodePool(self.model.preprocess_config, workers=self.workers, draft=self.draft) as pool:
            for n, d in enumerate(pool.imap(list(by_path)), 1):
                faults.point("decoded")
                w = by_path[d.path]
                if d.error is not None:
                    self._failures.append((d.path, d.error, w.replaces))
                elif d.content_hash in embedded_here:
                    self._rows.append((w, d, embedded_here[d.content_hash]))
                    report.duplicates += 1
                elif any(d.content_hash == bd.content_hash for _, bd in batch):
                    waiting[d.content_hash].append((w, d))
                else:
                    stored = self.store.vector_for_hash(d.content_hash, exclude=w.replaces)
                    if stored is not None:
                        self._rows.append((w, d, stored))
                        embedded_here[d.content_hash] = stored
                        report.duplicates += 1
                    else:
                        batch.append((w, d))
                if len(batch) >= self.batch_size:
                    flush()
                self._maybe_commit(report)
                if n % 8 == 0 or n == total:
                    self.progress(Progress("embed", n, total, report))
            flush()

    # -- committing ------------------------------------------------------------------------------

    def _maybe_commit(self, report: IndexReport) -> None:
        now = time.monotonic()
        if len(self._rows) + len(self._failures) >= self.chunk_size or now - self._last_commit >= self.commit_seconds:
            self._commit(report)
        if now - self._last_save >= self.save_seconds:
            self.store.save_vectors()
            self._last_save = time.monotonic()

    def _commit(self, report: IndexReport) -> None:
        rows, failures = self._rows, self._failures
        if not rows and not failures:
            return
        self._rows, self._failures = [], []
        replaced = [w.replaces for w, _, _ in rows if w.replaces is not None]
        replaced += [r for _, _, r in failures if r is not None]
        fresh = [(w, d, v) for w, d, v in rows]
        records = [_record(w.entry, d) for w, d, _ in fresh]
        vectors = np.stack([v for _, _, v in fresh]) if fresh else None
        new_ids: list[int] = []

        def chunk(tx):
            if replaced:
                tx.remove(replaced)
            if fresh:
                new_ids.extend(tx.add(records, vectors))
                for w, _, _ in fresh:
                    tx.clear_failure(w.entry.path)
            for path, reason, _ in failures:
                tx.record_failure(path, reason)

        self.store.commit(chunk, removed_ids=replaced, added=(new_ids, vectors))
        for w, _, _ in fresh:
            if w.replaces is None:
                report.added += 1
            else:
                report.updated += 1
        report.failed += len(failures)
        report.failures.extend((p, r) for p, r, _ in failures)
        self._last_commit = time.monotonic()


def _record(entry: FileEntry, d: Decoded) -> dict:
    m = d.meta
    return {"path": entry.path, "size": entry.size, "mtime": entry.mtime, "content_hash": d.content_hash,
            "width": m.width, "height": m.height, "format": m.format, "taken_at": m.taken_at,
            "camera_make": m.camera_make, "camera_model": m.camera_model, "status": "ok"}
