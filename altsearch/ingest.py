"""Bringing a folder's images into an index: scan, diff against the catalogue, decode, embed, commit.

Work lands in chunks: one SQLite transaction holds a chunk's catalogue rows *and* their vectors, so a run
that is killed resumes where it stopped, with nothing lost or twice. The in-memory FAISS index follows
each commit; its file is written atomically every few seconds and at the end (a file that lags behind is
caught up from the catalogue on the next open, see :mod:`altsearch.store`).

A file whose content is already in the index (a byte-identical duplicate, or a file that was moved or
renamed) reuses the stored vector: the model runs once per distinct content.

The scan runs in a thread of its own (:class:`_Walk`). A new file can only be a catalogued file moved if
one the scan has not met yet has its size; any other new file goes to the decoders at once: a first run,
or one resumed past what it committed, embeds while it scans. Changed files, new ones that may be moved
ones, moves, deletions and touched files are settled when the scan is over (``Ingestor._finish_scan``).

The pipeline: decode workers (:class:`~altsearch.decode.DecodePool`) keep one batch plus two files per
worker decoded ahead of the model, so a batch is ready when the model asks for it. With ``overlap``
(the default on a GPU) the model also runs in a thread of its own, one batch at a time, while this
thread gathers the next batch, and each chunk is committed by a writer thread while the model works
on; at most one batch is in the model and one chunk in the writer, and a chunk's rows and vectors still
land in one transaction. Without it (the default on a CPU, where the model takes seconds per batch and
commits cost nothing beside it) everything but the scan runs in the calling thread, so a Ctrl-C stops the model and
rolls back a commit at once.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from . import faults
from .decode import (
    DECODE_CHOICES,
    DEFAULT_DRAFT,
    DEFAULT_HASH,
    HASH_KINDS,
    LEGACY_HASH,
    DecodePool,
    Decoded,
    default_workers,
    hash_file,
)
from .errors import IndexStoreError
from .scan import FileEntry, ScanProblem, scan
from .store import HASH_META
from .vectors import BuildProgress

log = logging.getLogger(__name__)


STAGES = ("decode", "model", "commit")


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
    dropped: int = 0  # of the failed: files indexed before that changed and can no longer be read (entry removed)
    duplicates: int = 0  # added or updated files whose content was already embedded (no model run)
    embedded: int = 0  # images that went through the model
    decoder: str = "cpu"  # where JPEGs were decoded: "cpu", or "gpu" (JPEGs; other formats on the CPU)
    jpeg_library: str | None = None  # with "gpu": the library that decoded them (nvimgcodec, torchvision)
    seconds: float = 0.0
    interrupted: bool = False
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    waited: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    """Seconds the run's own thread spent on each stage of embedding, waiting for it or (where it runs in
    that thread) doing it: "decode" (the next decoded file), "model" (a batch's vectors), "commit" (a
    chunk written). Where one stage dwarfs the others, it bounds the run."""

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        d["waited"] = {k: round(v, 3) for k, v in self.waited.items()}
        d["images_per_second"] = round(self.images_per_second, 2)
        d["seconds"] = round(self.seconds, 3)
        return d


@dataclass(frozen=True)
class Progress:
    """Handed to the ``progress`` callback: ``phase`` is ``scan``, ``embed``, ``vectors`` or ``done``.

    ``vectors``: the vector index is being rebuilt from the stored vectors (the model does not run):
    before the scan where its approximate file was lost and an exact stand-in would not fit in
    memory, after the last commit where the index outgrew its kind. ``step`` says which part (see
    vectors.BuildProgress: ``load``, ``train``, ``add``, ``tune``), ``done`` and ``total`` count
    within it."""

    phase: str
    done: int
    total: int | None
    report: IndexReport
    step: str = ""
    found: int | None = None
    """``embed``: files to embed that the scan has found so far; while it goes on, ``total`` is None."""


@dataclass(slots=True)
class _Work:
    entry: FileEntry
    replaces: int | None  # catalogue id of the old version of a changed file


PLAN_AHEAD = 1_000_000
"""New files the scan may find ahead of the decoders (about 280 bytes each: 280 MB at most). Up to this
many new files, the scan of a first run is over, and the run's total known, long before the files are
embedded; beyond it the scan waits for the decoders, and the total is known for the last million."""


class _Walk:
    """One run's scan in a thread of its own (``thread``), sorting what it meets against the catalogue's
    files under the folder (``known``, emptied as they are met; what is left at the end vanished).

    A new file can only be a catalogued file moved if one not met yet has its size (a move keeps the
    bytes). So a new file of a size no unmet catalogued file has (all of them, once every catalogued
    file is met) is handed to the run at once through ``queue`` (at most ``ahead`` waiting; :data:`_END`
    last): a first run, or one resumed past what it had committed (a file of it deleted meanwhile
    included), or one over new photos beside deleted ones, embeds while it scans. Other new files
    (``new``) and changed ones (``changed``) wait for the end of the scan (``Ingestor._finish_scan``).
    The thread touches nothing but this object; its lists are read once it has ended."""

    def __init__(self, items: Iterator[FileEntry | ScanProblem], known: dict[str, tuple],
                 failed_before: set[str], ahead: int):
        self.items = items
        self.known = known
        self.failed_before = failed_before
        self.failed_seen: set[str] = set()  # of failed_before
        self.new: list[FileEntry] = []
        self.changed: list[tuple[FileEntry, int]] = []  # (file, catalogue id)
        self.problems: list[tuple[str, str]] = []  # (path, reason) of each ScanProblem
        self.unchanged = 0
        self.scanned = 0  # entries met (files and problems)
        self.handed = 0  # new files put in the queue
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._sizes: np.ndarray | None = None  # sorted sizes of the unmet catalogued files, when last taken
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="altsearch-scan", daemon=True)

    def _run(self) -> None:
        known = self.known
        try:
            for item in self.items:
                if self._stopping.is_set():
                    return
                self.scanned += 1
                if isinstance(item, ScanProblem):
                    self.problems.append((item.path, item.reason))
                    continue
                if item.path in self.failed_before:
                    self.failed_seen.add(item.path)
                state = known.pop(item.path, None)
                if state is None:
                    if self._may_be_moved(item.size):
                        self.new.append(item)
                    else:
                        self._put(_Work(item, replaces=None))
                        self.handed += 1
                elif state[1] == item.size and state[2] == item.mtime:
                    self.unchanged += 1
                else:
                    self.changed.append((item, state[0]))
        except BaseException as exc:  # raised in the run's thread (_finish_scan)
            self.error = exc
        finally:
            close = getattr(self.items, "close", None)
            if close is not None:
                close()
            self._put(_END)

    def _may_be_moved(self, size: int) -> bool:
        """Whether a catalogued file not met yet may have ``size``. The sizes are taken again whenever
        half of those last taken have been met (never, for a scan that meets no new file)."""
        known = self.known
        if not known:
            return False
        if self._sizes is None or len(known) <= len(self._sizes) // 2:
            sizes = np.fromiter((state[1] for state in known.values()), dtype=np.int64, count=len(known))
            sizes.sort()
            self._sizes = sizes
        i = int(np.searchsorted(self._sizes, size))
        return i < len(self._sizes) and int(self._sizes[i]) == size

    def _put(self, item: object) -> None:
        while not self._stopping.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                pass

    def stop(self) -> None:
        """End the scan early (if it has not ended) and wait for its thread."""
        self._stopping.set()
        self.thread.join()


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


GPU_DECODE_MIN = 2000
"""With ``decode="auto"``, JPEGs are decoded on the GPU only when at least this many files need embedding:
starting GPU decoding (importing the library, starting nvJPEG) took ~6 s on an H100 host, where ingestion
then ran at 417 photos/s against 169/s decoding on the CPU (now 692 against 193), so it pays from about
1,700 photos on (now about 1,600)."""
CPU_BATCH_SIZE = 16
"""Images per model batch on a CPU: per-batch overhead is small there, and the first chunk commits sooner."""
CUDA_MAX_BATCH = 256
"""The largest batch chosen on CUDA: beyond it ViT-L/14 runs no faster, and a chunk waits longer."""


def content_hash_kind(catalog) -> str:
    """The content hash this catalogue's files are hashed with (its meta ``content_hash``), recorded on
    first use: :data:`~altsearch.decode.DEFAULT_HASH` for a catalogue without images, and
    :data:`~altsearch.decode.LEGACY_HASH` for one filled before the key existed, so that the hashes
    it holds keep matching their files."""
    kind = catalog.get_meta(HASH_META)
    if kind is None:
        kind = LEGACY_HASH if catalog.count() else DEFAULT_HASH
        catalog.set_meta(HASH_META, kind)
    if kind not in HASH_KINDS:
        raise IndexStoreError(f"the catalogue's files were hashed with {kind!r}, which this version of "
                              f"altsearch does not know (it knows {', '.join(HASH_KINDS)}): upgrade altsearch")
    return kind


def default_batch_size(model) -> int:
    """Images per model batch: 16 on a CPU; on CUDA as many as fit in the free device memory once the
    vision tower is loaded, up to 256 (:meth:`altsearch.Model.suggest_batch_size`)."""
    return model.suggest_batch_size(maximum=CUDA_MAX_BATCH, cpu_batch=CPU_BATCH_SIZE)


class _Stage:
    """Runs calls in a thread of its own (``threaded``, which may be decided after the stage is entered:
    the thread starts with the first call), one after the other, or at once in the caller's thread;
    either way the caller gets a :class:`Future`."""

    def __init__(self, name: str, threaded: bool):
        self.name = name
        self.threaded = threaded
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> _Stage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, fn: Callable, *args) -> Future:
        if self.threaded:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix=self.name)
            return self._pool.submit(fn, *args)
        future: Future = Future()
        future.set_result(fn(*args))  # an error raises here, in the caller's thread
        return future


@dataclass
class _Written:
    """What one committed chunk did, for the report."""

    added: int
    updated: int
    failures: list[tuple[str, str]]
    dropped: int = 0
    hashes: list[str] = field(default_factory=list)  # content hashes of the rows written


class Ingestor:
    """One indexing run's machinery (see the module docstring).

    ``workers``: decode processes (default :func:`~altsearch.decode.default_workers` for the model's
    device). ``batch_size``: images per model batch (default :func:`default_batch_size`).
    ``overlap``: run the model and the commits in threads of their own (default: on CUDA).
    ``decode``: "auto" (JPEGs on the GPU when the model runs on CUDA, nvImageCodec or torchvision is
    installed and at least :data:`GPU_DECODE_MIN` files need embedding; else the CPU), "cpu" or "gpu"
    (:mod:`altsearch.gpudecode`); on the GPU, ``workers`` is the number of reader threads.

    ``model`` is the loaded :class:`~altsearch.Model`, or, with ``load``, what identifies one without
    loading it (:class:`~altsearch.model.files.ModelFiles`): ``load()`` then gives the model once the
    run has files to embed, so a run that finds nothing new never imports torch. The settings that
    follow from the model's device (``workers``, ``batch_size``, ``overlap``, where JPEGs decode) are
    settled then.
    """

    def __init__(self, store, model, *, load: Callable[[], object] | None = None, batch_size: int | None = None,
                 workers: int | None = None, draft: bool = True, chunk_size: int = 512,
                 commit_seconds: float = 5.0, save_seconds: float = 60.0, overlap: bool | None = None,
                 decode: str = "auto", progress: Callable[[Progress], None] | None = None):
        if decode not in DECODE_CHOICES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
        self.decode = decode
        self.store = store
        self.identity = model  # source, fingerprint, dimension: what the index records
        self.model = model if load is None else None
        self._load = load
        self._asked = {"batch_size": batch_size, "workers": workers, "overlap": overlap}
        self.batch_size: int | None = None
        self.workers: int | None = None
        self.overlap: bool | None = None
        self._gpu_decode = False
        self._readers = workers  # for the GPU decoder: None is its own default
        self.draft = DEFAULT_DRAFT if draft else None
        self.chunk_size = chunk_size
        self.commit_seconds = commit_seconds
        self.save_seconds = save_seconds
        self.progress = progress or (lambda p: None)
        self._rows: list[tuple[_Work, Decoded, np.ndarray]] = []
        # The vectors this run made or took from the catalogue, by content hash, until the chunk that
        # stores them is committed; from then on a duplicate finds them in the catalogue. (Holding all
        # of them, 3 KB per file, took a first run over a million new files 3 GB.)
        self._unstored: dict[str, np.ndarray] = {}
        self._lookup = False  # whether the catalogue may hold a vector this run did not make
        self._failures: list[tuple[str, str, int | None]] = []
        self._total: int | None = None  # files to embed, once the scan is over
        self._rest: deque[_Work] | None = None  # files to embed that waited for the end of the scan
        self._writer = _Stage("altsearch-writer", False)
        self._writing: Future | None = None  # the chunk the writer has, not yet in the report
        self._last_commit = self._last_save = time.monotonic()
        self.hash_kind = DEFAULT_HASH  # the catalogue's, read when a run starts
        if self.model is not None or decode == "gpu":
            self._take_model()  # a "gpu" that cannot be honoured is refused here, before the scan

    def _take_model(self) -> None:
        """Load the model if it is not yet, and settle what follows from its device (once)."""
        if self.batch_size is not None:
            return
        from .gpudecode import choose_decoder

        if self.model is None:
            self.model = self._load()
        model, asked = self.model, self._asked
        on_cuda = model.device.type == "cuda"
        # whether JPEGs may go to the GPU ("gpu" that cannot be honoured raises)
        self._gpu_decode = choose_decoder(self.decode, model.device, model.preprocess_config) == "gpu"
        self.workers = default_workers(model_on_cpu=not on_cuda) if asked["workers"] is None else asked["workers"]
        self.overlap = on_cuda if asked["overlap"] is None else asked["overlap"]
        self._writer.threaded = self.overlap
        self.batch_size = asked["batch_size"] or default_batch_size(model)

    # -- the run ---------------------------------------------------------------------------------

    def run(self, root: str, *, include_hidden: bool = False, follow_symlinks: bool = True) -> IndexReport:
        root = os.path.abspath(os.path.expanduser(root))
        report = IndexReport(folder=root)
        t0 = time.perf_counter()
        self.hash_kind = content_hash_kind(self.store.catalog)
        m = self.identity  # a new index records the model of its first run (one that differs is refused)
        self.store.bind_model(m.source, m.fingerprint, m.dimension)
        rebuilding = self._rebuilding(report)
        if self.store.dimension is not None and not self.store.built_when_needed():
            self.store.writable_vectors(rebuilding)  # rebuilt first if only an approximate index fits in memory
        items = scan(root, include_hidden=include_hidden, follow_symlinks=follow_symlinks)  # a bad root raises here
        with _Stage("altsearch-writer", bool(self.overlap)) as self._writer:
            walk = self._start_scan(root, items)
            try:
                self._embed(self._feed(walk, report), walk, report)
            except KeyboardInterrupt:
                report.interrupted = True
                log.warning("interrupted: committing what is finished")
            finally:
                walk.stop()
                if self._rest is None:  # stopped before the end of the scan: count what it had met
                    report.unchanged += walk.unchanged
                self._settle_writing(report)
                self._commit(report)  # here, not in the writer: a Ctrl-C rolls the transaction back
                if not report.interrupted:
                    self.store.maybe_rebuild(rebuilding)
                self.store.save_vectors()
                report.seconds = time.perf_counter() - t0
                self.progress(Progress("done", report.embedded, report.embedded, report))
        return report

    def _rebuilding(self, report: IndexReport) -> BuildProgress:
        def progress(step: str, done: int, total: int | None) -> None:
            self.progress(Progress("vectors", done, total, report, step))
        return progress

    def _start_scan(self, root: str, items: Iterator[FileEntry | ScanProblem]) -> _Walk:
        """Start scanning ``root`` in a thread of its own, against what the catalogue holds under it."""
        cat = self.store.catalog
        # Each file the scan meets is taken out of `known`, which ends with the catalogued files not
        # met. Hashes are read later, for the files that changed or vanished: a run over millions of
        # unchanged files holds path, id, size and mtime of each, and nothing else.
        known = cat.file_states(under=root, hashes=False)
        failed_before = {p for p, _, _ in cat.failures() if _under(p, root)}
        self._total, self._rest = None, None
        walk = _Walk(items, known, failed_before, PLAN_AHEAD)
        walk.thread.start()
        return walk

    def _feed(self, walk: _Walk, report: IndexReport) -> Iterator[_Work]:
        """The files to embed, in this thread: those the scan hands over as it goes, then, once it is
        over, the rest (changed files, and new ones that turned out not to be moved)."""
        shown = 0
        embedding = False  # from the first file handed on, the run reports its embedding
        while True:
            try:
                item = walk.queue.get(timeout=0.2)
            except queue.Empty:
                if not embedding and walk.scanned >= shown + 1000:
                    shown = walk.scanned
                    self.progress(Progress("scan", shown, None, report))
                continue
            if item is _END:
                break
            embedding = True
            yield item
        self._finish_scan(walk, report)
        rest = self._rest
        while rest:
            yield rest.popleft()

    def _finish_scan(self, walk: _Walk, report: IndexReport) -> None:
        """Once the scan is over (at once if ``walk.thread`` still runs: it is waited for): settle
        everything that needs no model (unchanged, touched, moved, removed), commit it, and line up the
        files left to embed in ``self._rest``; ``self._total`` is then the run's files to embed."""
        if self._rest is not None:
            return
        walk.thread.join()
        if walk.error is not None:
            raise walk.error
        cat = self.store.catalog
        known = walk.known
        report.unchanged += walk.unchanged
        self._failures.extend((path, reason, None) for path, reason in walk.problems)
        # A folder that could not be listed this time (permissions, an unmounted disk behind a link) hides
        # its files; they are kept, not taken for deleted.
        unseen = {p for p, _ in walk.problems}
        hidden = {p for p in known if _inside_any(p, unseen)} if unseen else set()
        report.unchanged += len(hidden)
        missing = {p: s for p, s in known.items() if p not in hidden}
        walk.known = {}
        new, changed = walk.new, walk.changed
        # the old hashes: of changed files (same bytes again is a touch), and of vanished ones where a
        # new file may be one of them moved
        looked_up = [i for _, i in changed] + ([s[0] for s in missing.values()] if new else [])
        old_hashes = {r.id: r.content_hash for r in cat.get(looked_up)}

        work: deque[_Work] = deque()
        touched: list[tuple[int, FileEntry]] = []
        for entry, image_id in changed:
            old_hash = old_hashes.get(image_id)
            if old_hash is not None and self._hash(entry) == old_hash:
                touched.append((image_id, entry))  # same bytes, new mtime: nothing to embed
                report.unchanged += 1
            else:
                work.append(_Work(entry, replaces=image_id))

        # A new file is a moved one when a vanished file had the same size and content.
        by_size: dict[int, list[str]] = defaultdict(list)
        for path, (_, size, _) in missing.items():
            by_size[size].append(path)
        moves: list[tuple[int, FileEntry]] = []
        for entry in new:
            candidates = [p for p in by_size.get(entry.size, ()) if p in missing]
            digest = self._hash(entry) if candidates else None
            match = next((p for p in candidates if old_hashes.get(missing[p][0]) == digest), None)
            if match is None:
                work.append(_Work(entry, replaces=None))
            else:
                moves.append((missing.pop(match)[0], entry))

        removed = [s[0] for s in missing.values()]
        gone_failures = sorted(walk.failed_before - walk.failed_seen)

        def bookkeeping(tx):
            for image_id, e in touched:
                tx.update(image_id, {"size": e.size, "mtime": e.mtime}, None)
            for image_id, e in moves:
                tx.move(image_id, e.path, e.size, e.mtime)
            if removed:
                tx.remove(removed)
            tx.clear_failures(gone_failures)

        if touched or moves or removed or gone_failures:  # a first run has none of these
            self._settle_writing(report)  # the writer's chunk first: one commit at a time
            self.store.commit(bookkeeping, removed_ids=removed)
        report.moved, report.removed = len(moves), len(removed)
        self._total = walk.handed + len(work)
        self._rest = work

    def _hash(self, entry: FileEntry) -> str | None:
        try:
            return hash_file(entry.path, self.hash_kind)
        except OSError:
            return None  # vanished or unreadable: the decode step records why

    def _embed(self, feed: Iterator[_Work], walk: _Walk, report: IndexReport) -> None:
        first = next(feed, None)
        if first is None:
            return  # nothing to embed: the model is never loaded
        self._take_model()
        faults.point("embedding")
        head = [first]
        if self._gpu_decode and self.decode == "auto":  # whether enough files come to pay for the GPU decoder
            head.extend(itertools.islice(feed, GPU_DECODE_MIN - 1))
        report.decoder, decoder = self._decoder(len(head))
        report.jpeg_library = decoder.library if report.decoder == "gpu" else None  # type: ignore[attr-defined]
        decoding: dict[str, _Work] = {}  # handed to the decoder, not yet back

        def paths() -> Iterator[str]:
            for w in itertools.chain(head, feed):
                decoding[w.entry.path] = w
                yield w.entry.path
            head.clear()

        # Only an index that held images before this run can hold a vector not in self._unstored, until
        # this run commits its first vectors (_settle).
        self._lookup = self.store.catalog.count() > 0
        unstored = self._unstored
        queued: dict[str, list[tuple[_Work, Decoded]]] = {}  # hash of a file not yet embedded -> its twins
        batch: list[tuple[_Work, Decoded]] = []
        in_model: list[tuple[list[tuple[_Work, Decoded]], Future]] = []  # at most one batch

        def collect() -> None:
            """Take the batch in the model: its vectors, and those of its files' twins."""
            done, future = in_model[0]
            with _waiting(report, "model"):
                vecs = future.result()
            in_model.clear()
            report.embedded += len(done)
            for (w, d), v in zip(done, vecs):
                unstored[d.content_hash] = v
                self._rows.append((w, d, v))
                for twin in queued.pop(d.content_hash):
                    self._rows.append((*twin, v))
                    report.duplicates += 1

        def flush() -> None:
            """Hand ``batch`` to the model; then take the previous batch, which ran while this one filled."""
            if not batch:
                return
            pixels = _stack([d.pixels for _, d in batch])
            with _waiting(report, "model"):  # in this thread when the model does not run in its own
                future = model.submit(self.model.encode_pixels, pixels)
            if in_model:
                collect()
            in_model.append((batch.copy(), future))
            batch.clear()
            if future.done():
                collect()

        with _Stage("altsearch-model", self.overlap) as model, decoder as pool:
            try:
                for n, d in enumerate(_timed(pool.imap(paths()), report, "decode"), 1):
                    faults.point("decoded")
                    w = decoding.pop(d.path)
                    if d.error is not None:
                        self._failures.append((d.path, d.error, w.replaces))
                    elif d.content_hash in unstored:
                        self._rows.append((w, d, unstored[d.content_hash]))
                        report.duplicates += 1
                    elif d.content_hash in queued:
                        queued[d.content_hash].append((w, d))
                    else:
                        stored = (self.store.vector_for_hash(d.content_hash, exclude=w.replaces)
                                  if self._lookup else None)
                        if stored is not None:
                            self._rows.append((w, d, stored))
                            unstored[d.content_hash] = stored
                            report.duplicates += 1
                        else:
                            batch.append((w, d))
                            queued[d.content_hash] = []
                    if len(batch) >= self.batch_size:
                        flush()
                    self._maybe_commit(report)
                    if self._total is None and not walk.thread.is_alive():
                        self._finish_scan(walk, report)  # the total is known: say so now, not at the end
                    if n % 8 == 0 or n == self._total:
                        found = walk.handed if self._total is None else self._total
                        self.progress(Progress("embed", n, self._total, report, found=found))
                flush()
            finally:
                if in_model:
                    with _waiting(report, "model"):
                        failed = in_model[0][1].exception() is not None  # waits for the model
                    if not failed:
                        collect()

    def _decoder(self, files: int) -> tuple[str, object]:
        """Where this run decodes JPEGs ("cpu" or "gpu") and its decoder, for ``files`` to embed. "auto"
        keeps a run of fewer than GPU_DECODE_MIN files on the CPU: starting the GPU's JPEG library would
        cost more than it saves."""
        cfg = self.model.preprocess_config
        if self._gpu_decode and (self.decode == "gpu" or files >= GPU_DECODE_MIN):
            from .gpudecode import GpuDecoder

            try:
                return "gpu", GpuDecoder(cfg, self.model.device, readers=self._readers or None, draft=self.draft,
                                         hash_kind=self.hash_kind)
            except RuntimeError as exc:  # found but not importable (a torchvision built for another torch)
                if self.decode == "gpu":
                    raise
                log.warning("decoding JPEGs on the CPU: %s", exc)
        ahead = self.batch_size + 2 * max(self.workers, 1)  # decoded and waiting: a batch, and then some
        return "cpu", DecodePool(cfg, workers=self.workers, draft=self.draft, max_in_flight=ahead,
                                 hash_kind=self.hash_kind)

    # -- committing ------------------------------------------------------------------------------

    def _maybe_commit(self, report: IndexReport) -> None:
        now = time.monotonic()
        save = now - self._last_save >= self.save_seconds
        if save or len(self._rows) + len(self._failures) >= self.chunk_size or now - self._last_commit >= self.commit_seconds:
            self._commit_soon(report, save)

    def _commit_soon(self, report: IndexReport, save: bool) -> None:
        """Settle the writer's last chunk (written while this one filled), then hand it the finished rows."""
        self._settle_writing(report)
        with _waiting(report, "commit"):  # in this thread when the writer does not run in its own
            self._writing = self._writer.submit(self._write, *self._take(), save)
        if self._writing.done():
            self._settle_writing(report)
        self._last_commit = time.monotonic()
        if save:
            self._last_save = self._last_commit

    def _settle_writing(self, report: IndexReport) -> None:
        """Wait for the writer's chunk and count it in the report (its error raises here)."""
        future, self._writing = self._writing, None
        if future is not None:
            with _waiting(report, "commit"):
                written = future.result()
            self._settle(report, written)

    def _commit(self, report: IndexReport) -> None:
        """Commit the finished rows in this thread."""
        self._settle(report, self._write(*self._take(), False))
        self._last_commit = time.monotonic()

    def _settle(self, report: IndexReport, written: _Written) -> None:
        """Count a committed chunk in the report; its vectors are the catalogue's to give from now on."""
        report.added += written.added
        report.updated += written.updated
        report.failed += len(written.failures)
        report.dropped += written.dropped
        report.failures.extend(written.failures)
        for content_hash in written.hashes:
            self._unstored.pop(content_hash, None)
        self._lookup = self._lookup or bool(written.hashes)

    def _take(self) -> tuple[list, list]:
        rows, failures = self._rows, self._failures
        self._rows, self._failures = [], []
        return rows, failures

    def _write(self, rows: list[tuple[_Work, Decoded, np.ndarray]], failures: list[tuple[str, str, int | None]],
               save: bool) -> _Written:
        """One transaction: the rows with their vectors, the failures; then the vector file if ``save``."""
        dropped = [r for _, _, r in failures if r is not None]  # indexed files that now fail
        written = _Written(0, 0, [(p, r) for p, r, _ in failures], len(dropped))
        if rows or failures:
            replaced = [w.replaces for w, _, _ in rows if w.replaces is not None] + dropped
            records = [_record(w.entry, d) for w, d, _ in rows]
            vectors = np.stack([v for _, _, v in rows]) if rows else None
            new_ids: list[int] = []

            def chunk(tx):
                if replaced:
                    tx.remove(replaced)
                if rows:
                    new_ids.extend(tx.add(records, vectors))
                    tx.clear_failures([w.entry.path for w, _, _ in rows])
                for path, reason, _ in failures:
                    tx.record_failure(path, reason)

            self.store.commit(chunk, removed_ids=replaced, added=(new_ids, vectors))
            written.updated = sum(w.replaces is not None for w, _, _ in rows)
            written.added = len(rows) - written.updated
            written.hashes = [d.content_hash for _, d, _ in rows]
        if save:
            self.store.save_vectors()
        return written


def _stack(pixels: list) -> np.ndarray:
    """One batch of crops: numpy from the CPU decoders; a tensor on the model's device when any came
    from the GPU decoder (the files it left to the CPU are copied up). One call per batch where
    possible: a torch call per image waits for the GIL each time while reader threads hold it."""
    if all(isinstance(p, np.ndarray) for p in pixels):
        return np.stack(pixels)
    import torch

    device = next(p.device for p in pixels if isinstance(p, torch.Tensor))
    return torch.stack([p if isinstance(p, torch.Tensor) else torch.from_numpy(p).to(device) for p in pixels])


@contextmanager
def _waiting(report: IndexReport, stage: str) -> Iterator[None]:
    """Add the time inside the block to ``report.waited[stage]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        report.waited[stage] += time.perf_counter() - t0


def _timed(items: Iterable, report: IndexReport, stage: str) -> Iterator:
    """``items`` one by one, the time spent getting each added to ``report.waited[stage]``."""
    it = iter(items)
    try:
        while True:
            with _waiting(report, stage):
                item = next(it, _END)
            if item is _END:
                return
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


_END = object()


def _record(entry: FileEntry, d: Decoded) -> dict:
    m = d.meta
    return {"path": entry.path, "size": entry.size, "mtime": entry.mtime, "content_hash": d.content_hash,
            "width": m.width, "height": m.height, "format": m.format, "taken_at": m.taken_at,
            "camera_make": m.camera_make, "camera_model": m.camera_model, "status": "ok"}
