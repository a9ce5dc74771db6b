"""Decode image files in worker processes: bytes -> hash, metadata and a 224x224 uint8 crop.

Ingestion hands :class:`DecodePool` an iterable of paths and gets one :class:`Decoded` per path,
in the order of the paths, whatever order the workers finish in: batches are then made of the same
files in every run, and a photo's vector does not depend on timing (on the CPU a row's last bit
depends on the rows batched with it; with int8, far more than the last bit). Each file is read
once; the hash, the EXIF metadata and the pixels all come from those bytes. Bad files never raise:
they come back with ``error`` set to a one-line reason.

Workers are started with the ``spawn`` method and import only numpy + Pillow (via
:mod:`altsearch.model.preprocess`); the normalisation to model input happens in the parent, on the
model's device (:class:`altsearch.model.preprocess.Normalizer`). Note that ``spawn`` re-imports the
parent's ``__main__`` module in each worker, so entry-point modules should keep heavy imports lazy,
and a script's work must sit under ``if __name__ == "__main__":``. A pool checks that its first
worker starts before it is given a file: workers that cannot start (such a script, re-run in them,
fails) are :class:`WorkerStartError`, never a failure of the files.

JPEGs are decoded at reduced DCT scale (:data:`DEFAULT_DRAFT`): libjpeg's 1/2, 1/4 or 1/8 scaling
is chosen so that the shortest edge stays >= ``DRAFT_SCALE * 224`` = 448 px, then PIL's bicubic takes
it to 224. A 12 Mpx photo decodes at 1/4 scale (1008 x 756), about 6x faster than a full decode, and
its 224 crop differs from the full decode's by ~0.2 grey levels on average (PSNR ~56 dB; measured in
tests/model/test_preprocess.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from multiprocessing.context import SpawnContext, SpawnProcess

import numpy as np
from PIL import ExifTags, Image

from altsearch.errors import AltsearchError, ImageError
from altsearch.model.preprocess import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    PreprocessConfig,
    decode_bytes,
    read_image_bytes,
    resize_crop,
)

log = logging.getLogger(__name__)

DRAFT_SCALE = 2
"""JPEGs are decoded with their shortest edge >= DRAFT_SCALE x the resize target."""
DEFAULT_DRAFT = DRAFT_SCALE * PreprocessConfig.shortest_edge
"""448 for CLIP's 224: the ``draft`` ingestion decodes with."""
CRASHED = "decoder crashed"
"""The error of a path whose decoding killed its worker process (segfault, OOM kill)."""
_PARENT_POLL_S = 0.5  # how often a worker checks that its parent is still alive

HASH_KINDS = ("sha256-128", "blake2b-128")
"""The content hashes a catalogue can use (its meta ``content_hash``), each 128 bits in hex."""
DECODE_CHOICES = ("auto", "cpu", "gpu")  # where an indexing run decodes JPEGs (see altsearch.gpudecode)
DEFAULT_HASH = "sha256-128"
"""What new catalogues use: SHA-256 runs on the SHA extensions of x86 CPUs (AMD since Zen, Intel since
Ice Lake / Goldmont) and ARMv8 through OpenSSL, 2.2x BLAKE2b's speed here (1.21 against 0.54 GB/s)."""
LEGACY_HASH = "blake2b-128"
"""What catalogues made before the ``content_hash`` meta existed hold; they keep it."""
_HASH_BYTES = 16
_CHUNK = 1 << 20
_WORKERS_PER_IN_FLIGHT = 4
_CPU_MODEL_CORES_FOR_A_WORKER = 2  # with a model on the CPU, a decode worker only on more cores than this
WORKER_NAME = "altsearch-decode"  # the name of each worker process, set before it runs anything


class _WorkerProcess(SpawnProcess):
    """A decode worker, started with spawn (fork is unsafe once torch, with its threads and CUDA, is
    loaded in the parent) and named so that code running while it starts (the parent's main script,
    which spawn runs again) can tell that it runs in one (see Engine.open)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name = f"{WORKER_NAME}-{self.name.rpartition('-')[2]}"


class _WorkerContext(SpawnContext):
    Process = _WorkerProcess
# Test hook: a worker process exits abruptly when this variable is set and the file name contains
# its value (see tests/test_decode.py). Read only in worker processes, never in-process.
CRASH_HOOK_ENV = "ALTSEARCH_TEST_DECODER_CRASH_ON"

_EXIF_DATE_FORMAT = "%Y:%m:%d %H:%M:%S"


@dataclass(frozen=True)
class ImageMeta:
    """What an image file says about itself.

    ``width``/``height`` are the full-resolution size as displayed (after EXIF orientation), not the
    draft-decoded size. ``taken_at`` is EXIF DateTimeOriginal (else DateTime) as a POSIX timestamp;
    with an EXIF OffsetTime* it is exact, without one the naive camera clock is read as UTC.
    """

    width: int
    height: int
    format: str | None
    taken_at: float | None
    camera_make: str | None
    camera_model: str | None


@dataclass(frozen=True)
class Decoded:
    """The outcome for one path: pixels + metadata, or an error (``pixels`` is None)."""

    path: str
    content_hash: str | None  # hex content hash of the file's bytes (hash_bytes); None when it could not be read
    pixels: np.ndarray | None  # uint8 (crop_h, crop_w, 3)
    meta: ImageMeta | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


def check_hash_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`HASH_KINDS`, else ValueError."""
    if kind not in HASH_KINDS:
        raise ValueError(f"unknown content hash {kind!r} (known: {', '.join(HASH_KINDS)})")
    return kind


def _digest(kind: str):
    if check_hash_kind(kind) == "sha256-128":
        return hashlib.sha256()
    return hashlib.blake2b(digest_size=_HASH_BYTES)


def hash_bytes(data: bytes, kind: str = DEFAULT_HASH) -> str:
    """The content hash of a file's bytes: 128 bits of ``kind`` (one of :data:`HASH_KINDS`), hex."""
    digest = _digest(kind)
    digest.update(data)
    return digest.digest()[:_HASH_BYTES].hex()


def hash_file(path: str | os.PathLike[str], kind: str = DEFAULT_HASH) -> str:
    """The same hash as :func:`hash_bytes` of the file's bytes, streamed; raises OSError if unreadable."""
    digest = _digest(kind)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()[:_HASH_BYTES].hex()


def read_file(path: str) -> bytes | Decoded:
    """The bytes of a regular file (:func:`~altsearch.model.preprocess.read_image_bytes`), or the
    :class:`Decoded` error that says why they could not be read."""
    try:
        return read_image_bytes(path)
    except ImageError as exc:
        gone = isinstance(exc.__cause__, FileNotFoundError)  # scanned, then deleted before its turn
        return Decoded(path, None, None, None, "file vanished" if gone else str(exc))


def decode_one(
    path: str | os.PathLike[str],
    cfg: PreprocessConfig,
    draft: int | None = DEFAULT_DRAFT,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    hash_kind: str = DEFAULT_HASH,
) -> Decoded:
    """Read, hash (:func:`hash_bytes` with ``hash_kind``) and decode one file. Never raises for a bad or
    missing file."""
    name = os.fspath(path)
    data = read_file(name)
    if isinstance(data, Decoded):
        return data
    return decode_data(name, hash_bytes(data, hash_kind), data, cfg, draft, max_pixels=max_pixels)


def decode_data(path: str, content_hash: str, data: bytes, cfg: PreprocessConfig, draft: int | None, *,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """A file's bytes decoded to a crop and its metadata, or the error that says why not."""
    try:
        decoded = decode_bytes(data, draft=draft, max_pixels=max_pixels)
    except ImageError as exc:
        return Decoded(path, content_hash, None, None, str(exc))
    return Decoded(path, content_hash, resize_crop(decoded.image, cfg), image_meta(decoded), None)


# --- metadata ------------------------------------------------------------------------------


def image_meta(decoded: DecodedImage) -> ImageMeta:
    width, height = decoded.header_size
    if orientation_code(decoded.exif) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
        width, height = height, width
    exif = decoded.exif
    return ImageMeta(
        width=width,
        height=height,
        format=decoded.format,
        taken_at=_taken_at(exif) if exif is not None else None,
        camera_make=_text(exif.get(ExifTags.Base.Make)) if exif is not None else None,
        camera_model=_text(exif.get(ExifTags.Base.Model)) if exif is not None else None,
    )


def orientation_code(exif: Image.Exif | None) -> int | None:
    """The EXIF orientation (1-8), or None."""
    value = exif.get(ExifTags.Base.Orientation) if exif is not None else None
    return value if isinstance(value, int) else None


def _taken_at(exif: Image.Exif) -> float | None:
    try:
        sub = exif.get_ifd(ExifTags.IFD.Exif)
    except (KeyError, ValueError, TypeError, SyntaxError, OSError) as exc:
        log.debug("unreadable EXIF sub-IFD: %s", exc)
        sub = {}
    candidates = (
        (sub.get(ExifTags.Base.DateTimeOriginal), sub.get(ExifTags.Base.OffsetTimeOriginal)),
        (exif.get(ExifTags.Base.DateTime), sub.get(ExifTags.Base.OffsetTime)),
    )
    for stamp, offset in candidates:
        moment = _parse_exif_time(_text(stamp), _text(offset))
        if moment is not None:
            return moment.timestamp()
    return None


def _parse_exif_time(stamp: str | None, offset: str | None) -> datetime | None:
    if not stamp:
        return None
    try:
        naive = datetime.strptime(stamp[:19], _EXIF_DATE_FORMAT)
    except ValueError:
        return None  # "0000:00:00 00:00:00", blanks, garbage
    return naive.replace(tzinfo=_parse_offset(offset) or timezone.utc)


def _parse_offset(offset: str | None) -> timezone | None:
    """``"+08:00"`` -> UTC+8; anything else -> None."""
    if not offset or len(offset) != 6 or offset[0] not in "+-" or offset[3] != ":":
        return None
    try:
        hours, minutes = int(offset[1:3]), int(offset[4:6])
    except ValueError:
        return None
    if hours > 23 or minutes > 59:
        return None
    sign = -1 if offset[0] == "-" else 1
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value or None


# --- the pool ------------------------------------------------------------------------------


def available_cores() -> int:
    """The cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def default_workers(*, model_on_cpu: bool = False) -> int:
    """Decode processes to run beside a model on a GPU, or on the CPU (``model_on_cpu``).

    Beside a GPU, decoding is the wall: one worker per core, leaving one core for the parent, which
    receives the crops and feeds the GPU (at least one). Beside a model on the CPU, the model is the
    wall (ViT-L/14 takes about 100x longer per image than a reduced-size decode) and takes every
    core: one worker when there are more than two cores; on two or fewer, none, as a worker's start-up
    and per-image pickling cost more than it hides there (measured with benchmarks/bench_index.py).
    """
    cores = available_cores()
    if model_on_cpu:
        return 1 if cores > _CPU_MODEL_CORES_FOR_A_WORKER else 0
    return max(1, cores - 1)


class WorkerStartError(AltsearchError):
    """Decode worker processes exit as they start."""


WORKER_START_HINT = (
    "decode worker processes could not start. Python starts them by running the program's main script "
    "again in each: a script that indexes must keep its work under `if __name__ == \"__main__\":` "
    "(see any error they printed above); or index with workers=0"
)


def _started() -> int:
    return os.getpid()


def _worker_init(parent: int) -> None:
    """Set up a decode worker of the process ``parent``.

    Ctrl-C reaches the whole process group: the parent handles it (committing finished work and shutting
    the pool down), so workers ignore it rather than die mid-file with tracebacks of their own. And a
    worker must not outlive a parent that was killed (SIGKILL runs no clean-up): a daemon thread exits
    the worker as soon as it is re-parented. The parent passes its own pid: if it was killed while
    this worker was still starting, ``os.getppid()`` here would already name the reaper.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _decode_in_worker(path: str, cfg: PreprocessConfig, draft: int | None, max_pixels: int,
                      hash_kind: str) -> Decoded:
    marker = os.environ.get(CRASH_HOOK_ENV)
    if marker and marker in os.path.basename(path):
        os._exit(70)  # test hook: simulate a decoder segfault
    return decode_one(path, cfg, draft, max_pixels=max_pixels, hash_kind=hash_kind)


@dataclass(frozen=True)
class _Job:
    seq: int  # the path's place in the input: outcomes are yielded in this order
    path: str
    generation: int  # which executor ran it
    isolated: bool  # run alone, so a crash can only be its own


class DecodePool:
    """Decode files in ``workers`` processes (0: in this process). Use as a context manager.

    :meth:`imap` yields in input order and keeps at most ``max_in_flight`` paths submitted and not
    yet yielded, consuming its input lazily, so memory stays flat for any number of paths. A slow
    file holds back the outcomes after it, while the other workers go on decoding up to that limit.
    If a worker dies, the pool is restarted and the paths that were in flight are retried one at a
    time: the one that kills its worker again comes back with ``error == "decoder crashed"``, the
    others decode normally.
    """

    def __init__(
        self,
        cfg: PreprocessConfig,
        *,
        workers: int | None = None,
        draft: int | None = DEFAULT_DRAFT,
        max_in_flight: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        hash_kind: str = DEFAULT_HASH,
    ):
        self.cfg = cfg
        self.hash_kind = check_hash_kind(hash_kind)  # an unknown kind fails here, not in every worker
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.max_in_flight = max_in_flight or _WORKERS_PER_IN_FLIGHT * max(self.workers, 1)
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.draft = draft
        self.max_pixels = max_pixels
        self._executor: ProcessPoolExecutor | None = None
        self._generation = 0
        self._started = False  # a worker of this pool has started (checked once, before the first file)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (pending work is cancelled)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def imap(self, paths: Iterable[str | os.PathLike[str]]) -> Iterator[Decoded]:
        """One :class:`Decoded` per path, in the order of ``paths``."""
        if self.workers == 0:
            return (decode_one(p, self.cfg, self.draft, max_pixels=self.max_pixels, hash_kind=self.hash_kind)
                    for p in paths)
        return self._imap_processes(enumerate(paths))

    def _imap_processes(self, source: Iterator[tuple[int, str | os.PathLike[str]]]) -> Iterator[Decoded]:
        pending: dict[Future[Decoded], _Job] = {}
        finished: dict[int, Decoded] = {}  # outcomes held back until those of earlier paths are yielded
        suspects: deque[tuple[int, str]] = deque()  # in flight when a worker died: retried one at a time
        exhausted = False
        following = 0  # the place of the next outcome to yield
        try:
            while True:
                exhausted = self._refill(pending, len(finished), suspects, source, exhausted)
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    outcome = self._outcome(future, job, suspects)
                    if outcome is not None:
                        finished[job.seq] = outcome
                while following in finished:
                    yield finished.pop(following)
                    following += 1
        finally:
            for future in pending:
                future.cancel()

    def _refill(self, pending, held: int, suspects, source, exhausted: bool) -> bool:
        """Submit work while fewer than the in-flight limit are submitted or ``held`` back; returns
        whether ``source`` is exhausted. A suspect goes alone, once nothing else is in flight: the
        outcome waited for is then in flight or a suspect, so the loop always has something to wait on."""
        if suspects:
            if not pending:
                self._submit(pending, *suspects.popleft(), isolated=True)
            return exhausted
        while not exhausted and len(pending) + held < self.max_in_flight:
            try:
                seq, path = next(source)
            except StopIteration:
                return True
            self._submit(pending, seq, os.fspath(path), isolated=False)
        return exhausted

    def _submit(self, pending, seq: int, path: str, *, isolated: bool) -> None:
        for _ in range(2):  # a pool found broken on submit is restarted once
            executor = self._running_executor()
            try:
                future = executor.submit(_decode_in_worker, path, self.cfg, self.draft, self.max_pixels,
                                         self.hash_kind)
            except BrokenProcessPool:
                self._restart(self._generation)
                continue
            pending[future] = _Job(seq, path, self._generation, isolated)
            return
        raise BrokenProcessPool("decode workers could not be started")

    def _outcome(self, future: Future[Decoded], job: _Job, suspects: deque[str]) -> Decoded | None:
        try:
            return future.result()
        except BrokenProcessPool:
            self._restart(job.generation)
        if job.isolated:
            log.warning("decoding %s killed its worker process", job.path)
            return Decoded(job.path, None, None, None, CRASHED)
        suspects.append((job.seq, job.path))
        return None

    def _running_executor(self) -> ProcessPoolExecutor:
        if self._executor is None:
            executor = ProcessPoolExecutor(self.workers, mp_context=_WorkerContext(),
                                           initializer=_worker_init, initargs=(os.getpid(),))
            if not self._started:  # the first pool: a worker that cannot start is not a file's fault
                try:
                    executor.submit(_started).result()
                except BrokenProcessPool:
                    executor.shutdown(wait=False, cancel_futures=True)
                    raise WorkerStartError(WORKER_START_HINT) from None
                self._started = True
            self._executor = executor
        return self._executor

    def _restart(self, broken_generation: int) -> None:
        """Replace the executor that broke (once, however many of its futures report it)."""
        if broken_generation != self._generation:
            return
        log.warning("a decode worker died; restarting the worker pool")
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        self._generation += 1
