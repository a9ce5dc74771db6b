"""The vector index: an ID-mapped FAISS inner-product index over the catalogue's image ids.

Three kinds:
- "flat": exact search, IndexIDMap2 over IndexFlatIP. Used up to EXACT_MAX vectors. It is never
  saved: `open` builds it from the catalogue's vectors (int8, dequantised), 0.7 s at 100k x 768
  against 0.5 s to check and read a float32 file of it, and 3 KB per image less on disk.
- "ivfpq": approximate and compact, IndexIVFPQ (inner product, spherical k-means, residuals
  product-quantised into `pq_m_for(d)` bytes). It
  finds `candidates_for(k, rerank)` candidates, which `search` re-ranks exactly against the true
  vectors given by its `refine` argument (IndexStore reads them from the catalogue), so the scores
  returned are exact inner products. nprobe and the re-rank width are tuned together at build time
  for recall@10 after re-ranking (`_tune`). What `build(kind="auto")` picks beyond EXACT_MAX.
- "ivf": approximate, IndexIVFFlat (float32 vectors kept in full, so no re-ranking), with nprobe
  tuned at build time for recall@10. Chosen only explicitly (`optimize`, which IndexStore records so
  that later rebuilds keep the kind); saved IVF files keep working.
Unlike HNSW, both IVF kinds support removal, move to the GPU, and build fast. Neither keeps a
direct map (FAISS's id -> list position table): removing or replacing ids scans the lists' ids
instead (~3 ms per call at 1M vectors, in FAISS's threads), where a hashtable map would cost ~40
bytes per vector in memory, 16 in the file, and rebuilding 10M entries whenever the file is read.

The CPU index is always the master copy (it is what is saved); with a GPU, searches run on a
copy made with `faiss.index_cpu_to_gpu`, remade after the next add or remove. Where FAISS has no
GPU (its CPU build, or a GPU build that needs another CUDA than torch's) but torch sees one, an
exact index searches on a copy of its vectors in torch instead (`TorchExact`): one matrix product
and a top-k, float32 as in FAISS.

A saved index (ivf or ivfpq) is two files: the FAISS file itself (readable by `faiss.read_index`)
and a JSON header beside it (`<name>.json`) holding kind, dimension, count, size and SHA-256 of
the FAISS file, the catalogue generation it reflects, and the tuned nprobe and re-rank width.
Loading checks the checksum before FAISS parses a byte. A flat file saved by an older altsearch
is passed over (`open`). See docs/format.md.

Searches may run from several threads at once; add and remove must not overlap a search.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import faiss
import numpy as np

from altsearch import faults
from altsearch import ids as idset
from altsearch.errors import IndexStoreError, IndexTooLargeError

log = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "ivfpq")
APPROXIMATE = ("ivf", "ivfpq")  # the kinds that are saved to a file; flat is built from the catalogue
# Exact search up to here. A flat search reads every vector, so its time grows with n; an ivfpq
# search costs a scan of nprobe lists of PQ codes plus a re-rank of its candidates; on clustered
# data the build tunes nprobe to 20-30 % of the lists at 10k-100k vectors, 3 % at 1M. Measured with
# benchmarks/bench_search.py (d=768, one thread, a busy 2-core VM): flat 6.6 ms at 10k, ~65 ms at
# 100k, 173 ms at 200k, 850 ms at 1M; ivfpq 26 ms at 100k, 11 ms at 1M. Up to 100k, exactness
# costs about what encoding the query text does and the approximate index would win less than 3x,
# so it is not worth its misses; beyond, exact search dominates the query and its 3 KB per vector
# the index's size (ivfpq: 130 bytes).
EXACT_MAX = 100_000
PQ_SUB_DIMS = 8  # dimensions per PQ sub-quantizer (one byte each): M = d / 8, 96 bytes at d=768
PQ_MIN_M = 16  # but at least this many (or d): a small d has little to save and much to lose
PQ_NBITS = 8
# The M k-means runs (2**PQ_NBITS centroids each) that train the PQ are the slow part of an ivfpq
# build; their time grows with points x iterations. The codes only pick candidates for an exact
# re-rank, so a coarser training costs little recall.
PQ_TRAIN_PER_CODE = 32
PQ_TRAIN_ITER = 10
# An ivfpq search re-ranks `width` candidates for k <= 10, k / 10 times more beyond (candidates_for).
# The build tunes the width with nprobe: PQ codes cannot order near-twins (burst shots, copies), so
# on dense data no nprobe reaches the target with the narrowest width (3M clustered vectors: recall@10
# 0.966 at most with 100 candidates, 0.99 with 1,000 at fewer lists).
RERANK_WIDTHS = (100, 300, 1000)
# What re-ranking one candidate costs (reading its vector from the catalogue, ~5 us) in PQ codes
# scanned (~60-70 ns each), measured on a 1M x 768 index (Zen 3): the tuner's unit of cost.
READ_COST = 80
PQ_TRAIN = PQ_TRAIN_PER_CODE * 2**PQ_NBITS  # training points for the PQ codebooks
RECALL_TARGET = 0.95  # what "auto" promises for recall@10 against exact search
TUNE_TARGET = 0.97  # what nprobe is tuned for on synthetic queries, leaving a margin for real ones
TUNE_QUERIES = 256
PLATEAU = 0.005  # recall@10 this close to the best any nprobe reaches counts as reaching it
TRAIN_PER_LIST = 40  # k-means training points per inverted list (FAISS wants at least 39)
BITMAP_BYTES_PER_ID = 4  # an id filter is a bitmap while that small (see id_selector), else a hash set
GPU_MAX_K = 2048  # FAISS GPU k-selection limit (also bounds nprobe)
REBUILD_GROWTH = 4.0  # rebuild an IVF whose size moved this factor away from its build size
FLAT_ID_MAP_BYTES = 48  # an IndexIDMap2 reverse-map entry (a node of a C++ unordered_map)
HEADER_FORMAT = 2  # 2: `rerank`
_HASH_CHUNK = 1 << 22
# Vectors read from the catalogue per step while an index is built: a flat index adds them, an IVF
# adds them and scores its probe queries against them. A flat build of 100k x 768 took 0.7 s with
# any batch from 2k to 128k, and kept the least memory resident after it with this one: 310 MB,
# against 375 MB with 8192 and 400 MB with 65536 (freed but fragmented heap; a decoded batch of
# 16384 x 768 float32 is 50 MB, which glibc maps and unmaps on its own). An ivfpq build of 300k x 768
# peaked at 525 MB resident with it, 727 MB with 65536 (22.6 s against 23.8 s).
_READ_BATCH = 16384
_TORCH_SCORES_MAX = 1 << 28  # scores computed at once by a torch search (1 GB of float32): queries go in chunks


@dataclass(frozen=True)
class IndexHeader:
    """The JSON sidecar of a saved FAISS file."""

    kind: str
    dim: int
    count: int
    size_bytes: int  # of the FAISS file
    sha256: str  # of the FAISS file
    generation: int  # catalogue generation the saved index reflects (see Catalog.generation)
    catalog_id: str  # the catalogue it belongs to
    built_count: int  # vectors when the index was built (IVF: trained)
    nlist: int  # IVF lists (0 in the flat files of older versions)
    nprobe: int  # IVF lists probed per query (0 likewise)
    faiss_version: str
    saved_at: float
    format: int = HEADER_FORMAT
    rerank: int = 0  # ivfpq: candidates re-ranked for a top 10 (format 2; 0 in format 1: RERANK_WIDTHS[0])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: Path) -> IndexHeader:
        try:
            data = json.loads(text)
            newer = isinstance(data, dict) and isinstance(data.get("format"), int) and data["format"] > HEADER_FORMAT
            header = None if newer else cls(**data)
        except (ValueError, TypeError) as err:
            raise IndexStoreError(f"vector index header {where} is damaged ({err}); rebuild the index") from err
        if header is None:  # checked first: a newer format may have fields this version does not know
            raise IndexStoreError(f"vector index header {where} is from a newer altsearch; upgrade altsearch")
        if header.kind not in KINDS:
            raise IndexStoreError(f"vector index header {where} names an unknown kind {header.kind!r}")
        return header


def header_path(path: Path) -> Path:
    """Where the JSON header of the FAISS file `path` lives."""
    return path.with_name(path.name + ".json")


def read_header(path: Path) -> IndexHeader:
    """The header saved with `path`, without reading or checking the FAISS file itself (its kind
    may be "flat": older versions of altsearch saved flat indexes too; see `saved_kind`)."""
    where = header_path(Path(path))
    try:
        text = where.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IndexStoreError(f"vector index {path} has no header {where.name}; rebuild the index") from None
    except (OSError, UnicodeDecodeError) as err:
        raise IndexStoreError(f"cannot read vector index header {where}: {err}") from err
    return IndexHeader.from_json(text, where)


def saved_kind(path: Path) -> str | None:
    """The kind of the index saved at `path`, as its header states it; None when neither the FAISS
    file nor its header is there. IndexStoreError for a header that is missing beside its file, or
    unreadable. "flat" is a file an older altsearch saved: flat indexes are built from the
    catalogue now, so such a file is stale (passed over by `open`, deleted by the next writer)."""
    path = Path(path)
    if not path.exists() and not header_path(path).exists():
        return None
    return read_header(path).kind


def remove_saved(path: Path) -> None:
    """Delete the index saved at `path`, if any: the FAISS file, then its header, then fsync the
    folder. A crash in between leaves a header without its file, which `open` passes over."""
    path = Path(path)
    if not path.exists() and not header_path(path).exists():
        return
    path.unlink(missing_ok=True)
    header_path(path).unlink(missing_ok=True)
    _fsync_folder(path.parent)


Refine = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""The true vectors of some ids: sorted unique int64 ids -> (the ids found, float32 (n, D) vectors);
ids it does not find (deleted meanwhile) are left out. An ivfpq search re-ranks with one."""

Keep = Callable[[np.ndarray], Iterable[int]]
"""A filter known by the ids it keeps: sorted unique int64 candidate ids -> those of them it keeps
(`VectorIndex.search_kept`)."""

# What a build from the catalogue reports, as progress(step, done, total): "load" (vectors read into an
# exact index, of total), "train" (an IVF's k-means on its sample: 0 then 1 of 1), "add" (vectors
# added to an IVF, of total) and "tune" (nprobe steps searched, of at most total; the last call has
# done == total). At 10M an ivfpq takes ~20 minutes on 2 cores, most of it adding.
BuildProgress = Callable[[str, int, "int | None"], None]


def _quiet(step: str, done: int, total: int | None) -> None:
    pass


class VectorSource(Protocol):
    """What rebuilding and reconciling need from the catalogue (altsearch.catalog.Catalog)."""

    @property
    def generation(self) -> int: ...
    @property
    def catalog_id(self) -> str: ...
    @property
    def dimension(self) -> int | None: ...
    def vector_ids(self, *, changed_since: int | None = None) -> np.ndarray: ...
    def removed_ids(self, *, since: int) -> np.ndarray | None: ...
    def iter_vectors(
        self, batch: int = ..., ids: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


# --- small functions ---------------------------------------------------------------------


def kind_for(n: int) -> str:
    """The kind `build(kind="auto")` picks for n vectors."""
    return "flat" if n <= EXACT_MAX else "ivfpq"


def flat_bytes(dim: int) -> int:
    """About what an exact (flat) index holds in memory per vector: float32 components, the id, and
    IndexIDMap2's entry from id to position."""
    return 4 * dim + 8 + FLAT_ID_MAP_BYTES


def pq_m_for(dim: int) -> int:
    """PQ sub-quantizers (bytes per code) for dim: the largest divisor of dim that is at most
    max(dim / PQ_SUB_DIMS, min(dim, PQ_MIN_M)): 96 at d=768, 16 at d=32, d itself below 16."""
    most = max(dim // PQ_SUB_DIMS, min(dim, PQ_MIN_M))
    return max(m for m in range(1, most + 1) if dim % m == 0)


def candidates_for(k: int, width: int = RERANK_WIDTHS[0]) -> int:
    """How many candidates an ivfpq search re-ranks for the top k, given its tuned `width` (the
    candidates for a top 10)."""
    return max(width, -(-width * k // 10))


def nlist_for(n: int) -> int:
    """IVF lists for n vectors: 2 sqrt(n) (k-means training, the slow part of a build, grows with
    lists x training points; fewer, longer lists are made up for by a larger tuned nprobe)."""
    return max(1, min(int(2 * math.sqrt(n)), n // TRAIN_PER_LIST))


def gpu_for(device: str) -> int | None:
    """The GPU FAISS should search on for a device string (auto, cpu, cuda, cuda:N, mps), or None."""
    if device in ("cpu", "mps"):
        return None
    if device == "auto" or device in ("cuda", "gpu"):
        wanted = 0
    elif device.startswith("cuda:") and device[5:].isdigit():
        wanted = int(device[5:])
    else:
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)")
    gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    if wanted < gpus:
        return wanted
    if device != "auto":
        log.warning("device %r asked for, but FAISS sees %d GPU(s): its searches run on the CPU (an exact "
                    "index searches on torch's GPU where torch sees one)", device, gpus)
    return None


def torch_gpu_for(device: str) -> str | None:
    """The torch GPU ("cuda:N") an exact index may search on for a device string, or None: only
    where torch is imported already (a process that encodes queries has it, and one that only reads
    the index does not import it for this) and sees that GPU."""
    if device in ("cpu", "mps"):
        return None
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    wanted = int(device[5:]) if device.startswith("cuda:") else 0
    return f"cuda:{wanted}" if wanted < torch.cuda.device_count() else None


class TorchExact:
    """An exact index's vectors on a torch device: inner-product top-k, as FAISS's flat index gives,
    from one float32 matrix product per chunk of queries and ``torch.topk``. Read-only: an index
    remakes it after an add or remove. Several threads may search at once."""

    def __init__(self, ids: np.ndarray, vecs: np.ndarray, device: str) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)
        self.vecs = torch.from_numpy(np.ascontiguousarray(vecs, dtype=np.float32)).to(self.device)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k), ids (Q, k)), best first; k <= len(self)."""
        torch = self._torch
        step = max(1, _TORCH_SCORES_MAX // max(len(self), 1))
        scores, ids = [], []
        with torch.inference_mode():
            for start in range(0, len(queries), step):
                q = torch.from_numpy(np.ascontiguousarray(queries[start:start + step])).to(self.device)
                top = torch.topk(q @ self.vecs.T, k, dim=1)
                scores.append(top.values.cpu().numpy())
                ids.append(self.ids[top.indices].cpu().numpy())
        return np.concatenate(scores), np.concatenate(ids)


@contextmanager
def _one_thread_for_one_query(queries: int) -> Iterator[None]:
    """FAISS's CPU search of a single query gains nothing from its other threads, and waking them
    costs: a flat search of 100,000 x 768 took 26 ms with 2 threads against 20.5 ms with 1 (10,000:
    3.2 against 1.8 ms; 2-core VM, OMP_WAIT_POLICY=PASSIVE as the CLI sets it), and an IVF search
    the same either way. So one query runs with one thread. OpenMP keeps the thread count per
    calling thread, so other threads' searches and builds keep theirs."""
    before = faiss.omp_get_max_threads() if queries == 1 else 1
    if before == 1:
        yield
        return
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |exact top-k & approx top-k| / |exact top-k| (ids < 0 are empty slots)."""
    exact = np.asarray(exact_ids)[:, :k]
    approx = np.asarray(approx_ids)[:, :k]
    if exact.shape[0] != approx.shape[0]:
        raise ValueError(f"{exact.shape[0]} exact rows but {approx.shape[0]} approximate rows")
    found = ((exact[:, :, None] == approx[:, None, :]) & (exact[:, :, None] >= 0)).any(axis=2)
    wanted = (exact >= 0).sum(axis=1)
    rows = wanted > 0
    if not rows.any():
        return 1.0
    return float((found.sum(axis=1)[rows] / wanted[rows]).mean())


def exact_search(
    queries: np.ndarray, ids: np.ndarray, vecs: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k in numpy: (scores (Q, k), ids (Q, k)), best first, padded."""
    scores = np.asarray(queries, dtype=np.float32) @ np.asarray(vecs, dtype=np.float32).T  # (Q, N)
    n = scores.shape[1]
    top = min(k, n)
    out_scores = np.full((scores.shape[0], k), -np.inf, dtype=np.float32)
    out_ids = np.full((scores.shape[0], k), -1, dtype=np.int64)
    if top == 0:
        return out_scores, out_ids
    part = np.argpartition(-scores, top - 1, axis=1)[:, :top]  # (Q, top), unordered
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    out_scores[:, :top] = np.take_along_axis(part_scores, order, axis=1)
    out_ids[:, :top] = np.asarray(ids, dtype=np.int64)[np.take_along_axis(part, order, axis=1)]
    return out_scores, out_ids


def _lookup(sorted_ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions, found): where each of `wanted` (any shape) is in the ascending `sorted_ids`, and
    whether it is there at all (positions of missing ones are meaningless)."""
    if not len(sorted_ids):
        return np.zeros(wanted.shape, np.intp), np.zeros(wanted.shape, bool)
    pos = np.searchsorted(sorted_ids, wanted).clip(max=len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == wanted


def refine_from(ids: np.ndarray, vecs: np.ndarray) -> Refine:
    """A Refine over vectors held in memory (vecs[i] is the vector of ids[i])."""
    order = np.argsort(ids)
    sorted_ids = np.asarray(ids, dtype=np.int64)[order]

    def refine(wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos, found = _lookup(sorted_ids, wanted)
        return wanted[found], np.asarray(vecs[order[pos[found]]], dtype=np.float32)

    return refine


def rerank(
    queries: np.ndarray, candidates: np.ndarray, k: int, refine: Refine
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query among its row of candidate ids (-1: none), scored against the
    vectors `refine` gives: (scores (Q, k), ids (Q, k)), best first; candidates it lacks are dropped."""
    return _best(exact_scores(queries, candidates, refine), candidates, k)


def exact_scores(queries: np.ndarray, candidates: np.ndarray, refine: Refine) -> np.ndarray:
    """(Q, R) inner products of each query with its row of candidate ids' vectors as `refine` gives
    them; -inf for an empty slot (-1) or an id `refine` lacks. Rows go _READ_BATCH candidates at a
    time: the vectors read and gathered for them stay ~50 MB at 768-d, however many queries and
    candidates (the build's tuning scores 256 queries x 1,000)."""
    scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
    step = max(1, _READ_BATCH // max(1, candidates.shape[1]))
    for start in range(0, len(queries), step):
        rows = slice(start, start + step)
        part = candidates[rows]
        got_ids, got_vecs = refine(idset.unique(part[part >= 0]))
        got_ids = np.asarray(got_ids, dtype=np.int64)
        if not len(got_ids):
            continue
        got_vecs = np.asarray(got_vecs, dtype=np.float32).reshape(len(got_ids), queries.shape[1])
        order = np.argsort(got_ids)
        got_ids, got_vecs = got_ids[order], got_vecs[order]
        pos, found = _lookup(got_ids, part)
        got = np.matmul(got_vecs[pos], queries[rows, :, None])[:, :, 0]  # (rows, R)
        scores[rows] = np.where((part >= 0) & found, got, -np.inf)
    return scores


def _best(scores: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k of each row of (scores, candidate ids), best first; -inf scores give id -1."""
    top = min(k, candidates.shape[1])
    best = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    out_scores = np.take_along_axis(scores, best, axis=1)
    out_ids = np.where(np.isfinite(out_scores), np.take_along_axis(candidates, best, axis=1), -1)
    return out_scores, out_ids


def read_vectors(catalog: VectorSource, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids found, float32 vectors) of these sorted ids as the catalogue stores them (a Refine over
    it): filled into arrays made once, read in batches so that what reading and decoding a batch
    allocates stays small beside them; ids deleted meanwhile are left out."""
    ids = np.empty(len(wanted), dtype=np.int64)
    vecs = np.empty((len(wanted), catalog.dimension or 0), dtype=np.float32)
    filled = 0
    for batch_ids, batch_vecs in catalog.iter_vectors(batch=_READ_BATCH, ids=wanted):
        ids[filled : filled + len(batch_ids)] = batch_ids
        vecs[filled : filled + len(batch_ids)] = batch_vecs
        filled += len(batch_ids)
    return ids[:filled], vecs[:filled]


def _belongs_to(index: VectorIndex, catalog: VectorSource) -> bool:
    header = index.header
    return (
        header is not None
        and header.catalog_id == catalog.catalog_id
        and header.generation <= catalog.generation
        and catalog.dimension in (None, index.dim)
    )


def _trusted_file(path: Path, catalog: VectorSource, device: str) -> tuple[VectorIndex | None, str, int]:
    """(the index saved at `path`, "", 0) if there is one that belongs to this catalogue (see
    VectorIndex.open); else (None, why not, the logging level to say it at: 0 when there simply is
    no file)."""
    try:
        kind = saved_kind(path)
        if kind is None:
            return None, f"there is no {path.name}", 0
        if kind not in APPROXIMATE:
            return None, (f"{path} holds a {kind} index saved by an older altsearch, which is passed over (the "
                          "next writer deletes it)"), logging.INFO
        index = VectorIndex.load(path, device=device)
    except IndexStoreError as err:
        return None, str(err), logging.WARNING
    if not _belongs_to(index, catalog):
        return None, f"vector index {path} does not match its catalogue", logging.WARNING
    return index, "", 0


def _flat_too_large(n: int, dim: int, max_bytes: int | None) -> IndexTooLargeError | None:
    """The error for an exact index of n vectors that would hold more than `max_bytes`, else None."""
    need = n * flat_bytes(dim)
    if max_bytes is None or need <= max_bytes:
        return None
    return IndexTooLargeError(f"an exact index of its {n:,} vectors would take {need / 1e9:.1f} GB of memory, "
                              f"more than the {max_bytes / 1e9:.1f} GB it may use")


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) results with empty slots as id -1, score -inf."""
    out_scores = np.full((ids.shape[0], k), -np.inf, dtype=np.float32)
    out_ids = np.full((ids.shape[0], k), -1, dtype=np.int64)
    out_scores[:, : ids.shape[1]] = np.where(ids >= 0, scores, -np.inf)
    out_ids[:, : ids.shape[1]] = ids
    return out_scores, out_ids


def _nothing(queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) results with every slot empty."""
    return np.full((queries, k), -np.inf, np.float32), np.full((queries, k), -1, np.int64)


def _as_vectors(vecs: np.ndarray, dim: int, what: str) -> np.ndarray:
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    if vecs.ndim != 2 or vecs.shape[1] != dim:
        raise ValueError(f"{what} must have shape (N, {dim}), got {vecs.shape}")
    if not np.isfinite(vecs).all():
        raise ValueError(f"{what} contain NaN or infinity")
    return vecs


def id_selector(ids: np.ndarray) -> tuple[faiss.IDSelector, np.ndarray | None]:
    """A FAISS selector of these ids (any order), and the bitmap it reads (None for a set), which
    must stay referenced while it is used. A bitmap of every id up to the largest where that takes at
    most BITMAP_BYTES_PER_ID bytes per id: built in 1.8 ms for a million ids, where FAISS's hash set
    (IDSelectorBatch) took 70 ms, and quicker to test during a search. A set otherwise (a few ids,
    or ids far apart)."""
    top = int(ids.max()) + 1 if len(ids) else 0
    if not len(ids) or (top + 7) // 8 > BITMAP_BYTES_PER_ID * len(ids):
        return faiss.IDSelectorBatch(ids), None
    mask = np.zeros(top, dtype=bool)
    mask[ids] = True
    bits = np.packbits(mask, bitorder="little")  # id i: bit i % 8 of byte i // 8, as FAISS reads it
    return faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)), bits


class Allowed:
    """The ids a search may return (`VectorIndex.search(allowed=)`), made ready once for any number of
    searches: sorted and distinct, their FAISS selector built by the first search that needs one, and
    whether they include every id of an index remembered until that index changes (a search allowed
    everything needs no selector: `--under` the one folder indexed, dates spanning them all). A caller
    that repeats a filter keeps one (the engine does); an array of ids is made into one per search.
    Safe to share between threads."""

    def __init__(self, ids: np.ndarray | list[int]) -> None:
        self.ids = idset.unique(_as_ids(ids))
        self._lock = threading.Lock()
        self._selector: tuple[faiss.IDSelector, np.ndarray | None] | None = None  # with its bitmap
        self._covers: tuple[object, bool] | None = None  # (an index's state, whether every id of it is here)

    def __len__(self) -> int:
        return len(self.ids)

    def selector(self) -> faiss.IDSelector:
        """The FAISS selector of these ids (see id_selector), built once; valid as long as this object."""
        with self._lock:
            if self._selector is None:
                self._selector = id_selector(self.ids)
            return self._selector[0]

    def covers(self, index: VectorIndex) -> bool:
        """Whether every id of `index` is allowed; checked once per state of the index (one pass over
        its ids: ~10 ms at 1M), and only when there are at least as many ids here as there."""
        n = len(index)
        if len(self.ids) < n:
            return False
        state = index._state
        with self._lock:
            if self._covers is not None and self._covers[0] is state:
                return self._covers[1]
        covered = n == 0 or _all_in(index._id_parts(), self.ids)
        with self._lock:
            self._covers = (state, covered)
        return covered


def _all_in(parts: Iterable[np.ndarray], sorted_ids: np.ndarray) -> bool:
    """Whether every id of `parts` (arrays of ids) is in `sorted_ids` (ascending, distinct), stopping at
    the first part that has one it lacks: through a table of a byte per id up to the largest where
    that takes at most BITMAP_BYTES_PER_ID bytes per id, as id_selector's bitmap does (3M ids in an
    ivfpq's lists: 4 ms for the table, 21 ms for the lists; np.isin took 25-140 ms more, the first
    time in a process the most), else by binary search."""
    if not len(sorted_ids):
        return all(not len(part) for part in parts)
    top = int(sorted_ids[-1])
    if top + 1 <= BITMAP_BYTES_PER_ID * len(sorted_ids):
        table = np.zeros(top + 1, dtype=bool)
        table[sorted_ids] = True
        return all(not len(part) or (int(part.max()) <= top and bool(table[part].all())) for part in parts)
    return all(bool(_lookup(sorted_ids, part)[1].all()) for part in parts)


def _as_ids(ids: np.ndarray | list[int]) -> np.ndarray:
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if (ids < 0).any():
        raise ValueError("ids must be >= 0")
    return ids


# --- IVF building ------------------------------------------------------------------------


class _Rows(Protocol):
    """The vectors an IVF is built from, read in parts, so that a build never needs them all in
    memory at once: `ids` lists them (unique int64, in a fixed order), `read` gives the vectors at
    some positions of that list, `batches` every vector once, in batches, `refine` the true vectors
    of some ids (for the ivfpq re-rank while nprobe is tuned)."""

    ids: np.ndarray
    dim: int

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) at these ascending positions of `ids`; ids gone since are left out."""
        ...

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...
    def refine(self) -> Refine: ...


class _ArrayRows:
    """Rows held in arrays."""

    def __init__(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        self.ids, self._vecs = ids, vecs
        self.dim = vecs.shape[1]

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.ids[positions], self._vecs[positions]

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self.ids), _READ_BATCH):
            yield self.ids[start : start + _READ_BATCH], self._vecs[start : start + _READ_BATCH]

    def refine(self) -> Refine:
        return refine_from(self.ids, self._vecs)


class _CatalogRows:
    """The vectors of a catalogue (its int8 codes, decoded batch by batch as they are read)."""

    def __init__(self, catalog: VectorSource, ids: np.ndarray) -> None:
        self.ids, self._catalog = ids, catalog
        self.dim = int(catalog.dimension)  # type: ignore[arg-type]

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return read_vectors(self._catalog, self.ids[positions])  # rows deleted since the listing: skipped

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # every stored vector, by id: rows written after `ids` was listed are read too, and rows
        # deleted meanwhile may be; reconciling from the generation read first mends both
        return self._catalog.iter_vectors(batch=_READ_BATCH)

    def refine(self) -> Refine:
        return functools.partial(read_vectors, self._catalog)


def _new_ivf(dim: int, nlist: int, kind: str) -> faiss.IndexIVF:
    if kind == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    # residuals to the list centroid, PQ-coded in pq_m_for(dim) bytes
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, pq_m_for(dim), PQ_NBITS, faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.max_points_per_centroid = PQ_TRAIN_PER_CODE  # FAISS subsamples the rest
    index.pq.cp.niter = PQ_TRAIN_ITER
    index.pq.cp.min_points_per_centroid = 1  # no warning on stderr below 39 points per code: the
    # tuning (`_tune`) measures what the codes are worth after re-ranking
    return index


def _build_ivf(rows: _Rows, kind: str, seed: int, progress: BuildProgress = _quiet) -> tuple[faiss.IndexIVF, int]:
    """(index, re-rank width): an IVF of `kind` over `rows`, trained on a sample of them, filled batch
    by batch, with the nprobe (and for ivfpq the re-rank width) that reach TUNE_TARGET recall@10 on
    probe queries at the least cost (`_tune`). Memory: the training sample (TRAIN_PER_LIST vectors
    per list, at least PQ_TRAIN; ~780 MB at 10M x 768), one batch and the index itself, never every
    vector at once. Reports its steps to `progress` (see BuildProgress)."""
    n = len(rows.ids)
    least = TRAIN_PER_LIST if kind == "ivf" else 2**PQ_NBITS  # one training point per PQ code
    if n < least:
        raise ValueError(f"an {kind} index needs at least {least} vectors, got {n}")
    rng = np.random.default_rng(seed)
    nlist = nlist_for(n)
    index = _new_ivf(rows.dim, nlist, kind)
    wanted = nlist * TRAIN_PER_LIST if kind == "ivf" else max(nlist * TRAIN_PER_LIST, PQ_TRAIN)
    progress("train", 0, 1)
    _, sample = rows.read(np.sort(rng.choice(n, size=min(n, wanted), replace=False)))
    # spherical k-means: IVF with inner product normalises its centroids
    index.train(_as_vectors(sample, rows.dim, "vectors"))
    del sample
    progress("train", 1, 1)
    queries = _probe_queries(rows.read, n, rng)
    k = min(10, n)
    truth = faiss.ResultHeap(len(queries), k, keep_max=True)  # the exact top k, gathered batch by batch
    progress("add", 0, n)
    for ids, vecs in rows.batches():
        ids, vecs = _as_ids(ids), _as_vectors(vecs, rows.dim, "vectors")
        index.add_with_ids(vecs, ids)
        scores, positions = faiss.knn(queries, vecs, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        truth.add_result(scores, ids[positions])
        progress("add", min(int(index.ntotal), n), n)  # rows written since the listing may add a few more
    truth.finalize()
    index.nprobe, width = _tune(index, truth.I, queries, rows.refine() if kind == "ivfpq" else None,
                                progress=progress)
    return index, width


def _probe_queries(
    read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], n: int, rng: np.random.Generator
) -> np.ndarray:
    """TUNE_QUERIES stand-ins for real queries (fewer below that many vectors): stored vectors, picked
    at random among positions 0..n-1 and read with `read(positions)`, blurred by isotropic noise of
    equal norm. A zero vector (the catalogue stores one as it is given) would make no query: it is
    left out."""
    _, picks = read(np.sort(rng.choice(n, size=min(TUNE_QUERIES, n), replace=False)))
    picks = picks[np.linalg.norm(picks, axis=1) > 0]
    noise = rng.standard_normal(picks.shape).astype(np.float32)
    noise *= np.linalg.norm(picks, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
    queries = picks + noise
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def _nprobe_steps(nlist: int) -> list[int]:
    steps = sorted({int(round(2 ** (i / 2))) for i in range(2 * int(math.log2(nlist)) + 2)} | {nlist})
    return [s for s in steps if s <= nlist]


@dataclass(frozen=True)
class _Tried:
    nprobe: int
    width: int  # candidates re-ranked (0: none, an ivf index)
    recall: float
    cost: float  # per query, in PQ codes scanned (see READ_COST)

    def __str__(self) -> str:
        return f"nprobe {self.nprobe}" + (f", {self.width} candidates re-ranked" if self.width else "")


def _tune(
    index: faiss.IndexIVF, exact: np.ndarray, queries: np.ndarray, refine: Refine | None,
    widths: tuple[int, ...] = RERANK_WIDTHS, progress: BuildProgress = _quiet,
) -> tuple[int, int]:
    """(nprobe, width): the cheapest pair whose recall@10 against `exact` (each query's true top
    ids) reaches TUNE_TARGET, an ivfpq's `width` candidates (one of `widths`) being re-ranked with
    `refine` as its searches re-rank them (an ivf index re-ranks nothing: width 0). The cost of a
    query is the codes its nprobe lists hold plus READ_COST per re-ranked candidate.

    Where no pair reaches the target (PQ codes that cannot rank near-twins into the candidates,
    whatever the lists probed), the cheapest pair within PLATEAU of the best recall seen: probing
    every list would cost 1,000x more time (176 ms a query at 3M, against 5.6 ms) for no better
    recall. Every nprobe step is searched once with the widest width; a narrower width's candidates
    are the first ones of it (FAISS orders them by their PQ score), and a candidate's vector is read
    only for the widths that could still beat the cheapest pair found. `progress` hears of each
    nprobe step ("tune", steps done, steps at most)."""
    k = exact.shape[1]
    per_list = index.ntotal / index.nlist
    widths = sorted({min(candidates_for(k, w), index.ntotal) for w in widths}) if refine is not None else [0]
    tried: list[_Tried] = []
    cheapest = math.inf  # of the pairs that reach the target

    def cost(nprobe: int, width: int) -> float:
        return nprobe * per_list + READ_COST * width

    steps = _nprobe_steps(index.nlist)
    for step, nprobe in enumerate(steps):
        progress("tune", step, len(steps))
        if cost(nprobe, widths[0]) >= cheapest:
            break  # every pair left costs more than one that reaches the target
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        _, found = index.search(queries, widths[-1] or k, params=params)
        scores = np.empty(found.shape, np.float32)
        done = 0  # candidate columns scored
        for width in widths:
            if cost(nprobe, width) >= cheapest:
                break
            if refine is None:
                top = found
            else:
                scores[:, done:width] = exact_scores(queries, found[:, done:width], refine)
                done = width
                _, top = _best(scores[:, :width], found[:, :width], k)
            tried.append(_Tried(nprobe, width, recall_at_k(exact, top, k), cost(nprobe, width)))
            if tried[-1].recall >= TUNE_TARGET:
                cheapest = tried[-1].cost
                break  # a wider width at this nprobe costs more
    progress("tune", len(steps), len(steps))
    reached = [t for t in tried if t.recall >= TUNE_TARGET]
    if reached:
        pick = min(reached, key=lambda t: t.cost)
        log.info("%s, %d vectors: %s: recall@10 %.3f", type(index).__name__, index.ntotal, pick, pick.recall)
        return pick.nprobe, pick.width
    best = max(t.recall for t in tried)
    pick = min((t for t in tried if t.recall >= best - PLATEAU), key=lambda t: t.cost)
    log.warning("%s, %d vectors: no nprobe reaches recall@10 %.2f on the probe queries; %s: %.3f (the best: %.3f)",
                type(index).__name__, index.ntotal, TUNE_TARGET, pick, pick.recall, best)
    return pick.nprobe, pick.width


# --- the index ---------------------------------------------------------------------------


class VectorIndex:
    """An ID-mapped inner-product FAISS index (see the module docstring)."""

    def __init__(
        self,
        index: faiss.Index,
        kind: str,
        *,
        device: str = "auto",
        built_count: int = 0,
        rerank: int = 0,
        header: IndexHeader | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r} (use one of {KINDS})")
        self._cpu = index
        self.kind = kind
        self.dim = int(index.d)
        self.built_count = built_count
        # ivfpq: the candidates a search re-ranks for a top 10 (tuned at build time; 0, as in files
        # of older versions: the narrowest of RERANK_WIDTHS); 0 for the other kinds
        self.rerank = (rerank or RERANK_WIDTHS[0]) if kind == "ivfpq" else 0
        self.header = header  # as saved or loaded; None for an index never saved
        # the catalogue generation this index reflects, when known (from_catalog, reconcile, load)
        self.generation: int | None = header.generation if header is not None else None
        self._gpu = gpu_for(device)
        self._gpu_index: faiss.Index | None = None
        self._gpu_resources: object | None = None
        self._asked = device
        self._torch_off = False  # set when a copy in torch failed: this index searches with FAISS
        self._torch_index: TorchExact | None = None
        self._lock = threading.Lock()
        self._state = object()  # replaced by every add and remove: what Allowed.covers remembers

    # -- construction

    @classmethod
    def create(cls, dim: int, *, kind: str = "flat", device: str = "auto") -> VectorIndex:
        """An empty exact index (an IVF cannot exist before it is trained: use `build`)."""
        if kind != "flat":
            raise ValueError(f"only a flat index can be created empty; build a {kind!r} index from vectors")
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), "flat", device=device)

    @classmethod
    def build(
        cls, ids: np.ndarray, vecs: np.ndarray, *, kind: str = "auto", device: str = "auto", seed: int = 0
    ) -> VectorIndex:
        """An index over these vectors; "auto" is exact flat up to EXACT_MAX vectors, else ivfpq.
        An IVF kind gets the nprobe that reaches TUNE_TARGET recall@10 on probe queries, measured
        for ivfpq after re-ranking against `vecs` (deterministic for a given seed)."""
        ids = _as_ids(ids)
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if vecs.ndim != 2 or len(vecs) != len(ids):
            raise ValueError(f"expected vectors of shape ({len(ids)}, D), got {vecs.shape}")
        kind = kind_for(len(ids)) if kind == "auto" else kind
        if kind == "flat":
            index = cls.create(vecs.shape[1], device=device)
            index.add(ids, vecs)
            index.built_count = len(ids)
            return index
        if kind not in APPROXIMATE:
            raise ValueError(f"unknown index kind {kind!r} (use auto or one of {KINDS})")
        vecs = _as_vectors(vecs, vecs.shape[1], "vectors")
        if len(idset.unique(ids)) != len(ids):
            raise ValueError("ids repeat")
        index, width = _build_ivf(_ArrayRows(ids, vecs), kind, seed)
        return cls(index, kind, device=device, built_count=len(ids), rerank=width)

    @classmethod
    def from_catalog(
        cls, catalog: VectorSource, *, kind: str = "auto", device: str = "auto", max_bytes: int | None = None,
        progress: BuildProgress | None = None,
    ) -> VectorIndex:
        """A fresh index over every vector in the catalogue; its `generation` is the catalogue's when
        reading began. A flat index is filled batch by batch as the vectors are read. An IVF kind is
        built as `build` builds it, from a sample read by id (training) and then every vector, batch
        by batch: it never holds them all in memory (see `_build_ivf`). A flat index that would hold
        more than `max_bytes` (None: no limit) raises IndexTooLargeError before a vector is read (the
        ids are counted first), or as soon as it would, if the catalogue grew meanwhile. The steps are
        reported to `progress` (see BuildProgress): an exact index's "load" 0 once it is being built."""
        if catalog.dimension is None:
            raise IndexStoreError("the catalogue records no vector dimension yet (its 'dimension' meta value)")
        generation = catalog.generation
        counted = kind != "flat" or progress is not None or max_bytes is not None  # listing 100k ids: ~20 ms
        wanted = catalog.vector_ids() if counted else None
        progress = progress or _quiet
        kind = kind_for(len(wanted)) if kind == "auto" else kind
        if kind == "flat":  # rows written meanwhile may be read too: reconciling re-adds them
            index = cls.create(catalog.dimension, device=device)
            total = None if wanted is None else len(wanted)
            if total is not None and (err := _flat_too_large(total, catalog.dimension, max_bytes)):
                raise err
            progress("load", 0, total)
            for ids, vecs in catalog.iter_vectors(batch=_READ_BATCH):  # grown since a check, it stops here
                if _flat_too_large(len(index) + len(ids), catalog.dimension, max_bytes):
                    n = max(len(catalog.vector_ids()), len(index) + len(ids))  # at least what was too many
                    del index  # else the error's traceback keeps this frame, and the gigabytes read so far
                    raise _flat_too_large(n, catalog.dimension, max_bytes)
                index.add(ids, vecs)
                progress("load", len(index), None if total is None else max(total, len(index)))
            index.built_count = len(index)
        elif kind in APPROXIMATE:
            ivf, width = _build_ivf(_CatalogRows(catalog, wanted), kind, seed=0, progress=progress)
            index = cls(ivf, kind, device=device, built_count=len(wanted), rerank=width)
        else:
            raise ValueError(f"unknown index kind {kind!r} (use auto or one of {KINDS})")
        index.generation = generation
        return index

    @classmethod
    def open(
        cls, path: Path, catalog: VectorSource, *, device: str = "auto", max_flat_bytes: int | None = None
    ) -> VectorIndex:
        """The approximate index saved at `path` brought up to date with the catalogue, or else a
        flat index built from the catalogue.

        A saved file is used as it is when it reflects the catalogue's current generation, and
        reconciled when it belongs to this catalogue and is behind it. Without one the index is
        flat, which is how an index of up to EXACT_MAX vectors lives (nothing on disk), and also
        what a missing, damaged, foreign, ahead (a catalogue restored from a backup is older than
        its FAISS file: ids may mean other images) or other-dimensional file gives: exact, and built
        in seconds at any size. A flat file an older altsearch saved is passed over. Switching kind
        as the index grows or shrinks is the writer's call (IndexStore.maybe_rebuild); a kind chosen
        with `optimize` is kept.

        A flat index that would hold more than `max_flat_bytes` (None: no limit) is not built:
        IndexTooLargeError says why no file could be used and what the flat index would take.
        """
        path = Path(path)
        index, why, level = _trusted_file(path, catalog, device)
        if index is None:

            def building(step: str, done: int, total: int | None) -> None:
                if done == 0:  # said once the size is known to fit, not before a refusal
                    log.log(level, "%s; building a flat vector index from the catalogue", why)

            try:
                return cls.from_catalog(catalog, kind="flat", device=device, max_bytes=max_flat_bytes,
                                        progress=building if level else None)
            except IndexTooLargeError as err:
                raise IndexTooLargeError(f"{why}, and {err}") from None
        if index.generation != catalog.generation:  # else saved for exactly this catalogue state
            added, removed = index.reconcile(catalog, since_generation=index.generation or 0)
            if added or removed:
                log.info("vector index %s: %d vectors added or replaced, %d removed", path, added, removed)
        return index

    def reconcile(self, catalog: VectorSource, *, since_generation: int) -> tuple[int, int]:
        """Make this index hold exactly the catalogue's vectors, given that it reflected the
        catalogue at `since_generation`: ids the catalogue lacks are removed; ids it lacks, and
        vectors rewritten after that generation, are (re)added. Returns (added, removed).

        Only what changed is read: the vectors written since (the ids the index could lack, or
        holds outdated) and the ids the catalogue logged as deleted since (`removed_ids`). Where
        the log does not reach back that far, every id is listed on both sides and compared (a
        catch-up that lists took 0.29 s at 1M vectors and 0.81 s at 3M, against 0.06 and 0.10 s
        from the log: docs/performance.md)."""
        generation = catalog.generation  # read first: later writes are caught next time
        todo = catalog.vector_ids(changed_since=since_generation)
        gone = catalog.removed_ids(since=since_generation)
        removed = 0
        if gone is None:
            wanted = catalog.vector_ids()
            have = self.ids()
            removed = self.remove(idset.difference(have, wanted))
            todo = idset.union(idset.difference(wanted, have), todo)
        elif len(gone):
            removed = self.remove(gone)  # before adding: an id logged gone and written again is added
        added = 0
        for ids, vecs in catalog.iter_vectors(ids=todo):
            self.add(ids, vecs)
            added += len(ids)
        self.generation = generation
        return added, removed

    # -- contents

    def __len__(self) -> int:
        return int(self._cpu.ntotal)

    @property
    def nlist(self) -> int:
        return int(self._cpu.nlist) if self.kind in APPROXIMATE else 0

    @property
    def nprobe(self) -> int:
        return int(self._cpu.nprobe) if self.kind in APPROXIMATE else 0

    @property
    def device(self) -> str:
        """Where an unfiltered search runs now: "cpu", or a GPU ("cuda:N") through FAISS or, for an
        exact index where FAISS has none, through torch."""
        if self._gpu is not None:
            return f"cuda:{self._gpu}"
        return self._torch_device() or "cpu"

    def _torch_device(self) -> str | None:
        if self.kind != "flat" or self._torch_off:
            return None
        return torch_gpu_for(self._asked)

    def needs_rebuild(self, chosen: str | None = None) -> bool:
        """Whether the index should be rebuilt, as the kind `chosen` with `optimize` (None: none
        chosen, the size decides): when it is not of the chosen kind, or, with none chosen, when
        `build(kind="auto")` would now switch between exact and approximate search; and when an IVF's
        size has moved REBUILD_GROWTH-fold away from the size it was trained for."""
        n = len(self)
        if chosen is not None and self.kind != chosen:
            return True
        if chosen is None and (self.kind == "flat") != (kind_for(n) == "flat"):
            return True
        if self.kind in APPROXIMATE:
            built = max(self.built_count, 1)
            return n > built * REBUILD_GROWTH or n * REBUILD_GROWTH < built
        return False

    def ids(self) -> np.ndarray:
        """Every id in the index, sorted (int64)."""
        return np.sort(self._raw_ids())

    def _raw_ids(self) -> np.ndarray:
        if self.kind == "flat":
            return faiss.vector_to_array(self._cpu.id_map).astype(np.int64)
        parts = [ids.copy() for _, ids in self._lists()]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def _id_parts(self) -> Iterator[np.ndarray]:
        """Every id in the index, a part at a time (an IVF's lists, as views: nothing is gathered)."""
        if self.kind == "flat":
            yield self._raw_ids()
        else:
            yield from (ids for _, ids in self._lists())

    def _lists(self) -> Iterator[tuple[int, np.ndarray]]:
        """(list number, its ids: a view of FAISS's memory, valid until the next change) of each
        non-empty inverted list of an IVF kind."""
        invlists = self._cpu.invlists
        for lst in range(self._cpu.nlist):
            if size := invlists.list_size(lst):
                yield lst, faiss.rev_swig_ptr(invlists.get_ids(lst), size)

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Add vectors under these ids; ids already in the index are replaced."""
        ids = _as_ids(ids)
        vecs = _as_vectors(vecs, self.dim, "vectors")
        if len(vecs) != len(ids):
            raise ValueError(f"{len(ids)} ids for {len(vecs)} vectors")
        if len(idset.unique(ids)) != len(ids):
            raise ValueError("ids repeat")
        if not len(ids):
            return
        with self._lock:
            if self.kind != "flat":
                self._remove(ids)  # replaced: one scan of the lists' ids, absent ones ignored
            elif len(present := ids[np.isin(ids, self._raw_ids())]):
                self._remove(present)  # IndexIDMap2 rebuilds its id table on every removal
            self._cpu.add_with_ids(vecs, ids)
            self._gpu_index = self._torch_index = None
            self._state = object()

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Remove these ids (absent ones are ignored); returns how many were removed."""
        ids = idset.unique(_as_ids(ids))
        if not len(ids):
            return 0
        with self._lock:
            removed = self._remove(ids)
            self._gpu_index = self._torch_index = None
            self._state = object()
        return removed

    def _remove(self, ids: np.ndarray) -> int:
        # every stored id is tested against the set: one pass, whatever len(ids)
        selector, _bits = id_selector(ids)
        return int(self._cpu.remove_ids(selector))

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of these ids (float32 (N, D)); an absent id raises KeyError. An ivfpq
        index holds lossy codes, not vectors: read those from the catalogue (ValueError here)."""
        if self.kind == "ivfpq":
            raise ValueError("an ivfpq index keeps compressed codes only; read vectors from the catalogue")
        ids = _as_ids(ids)
        if self.kind == "flat":
            missing = idset.difference(ids, self._raw_ids())
            if len(missing):
                raise KeyError(f"ids not in the vector index: {missing[:5].tolist()}")
            return self._cpu.reconstruct_batch(ids) if len(ids) else np.empty((0, self.dim), np.float32)
        # an ivf list's codes are its float32 vectors; with no direct map, the lists are searched
        wanted, where = np.unique(ids, return_inverse=True)
        vecs = np.empty((len(wanted), self.dim), np.float32)
        found = np.zeros(len(wanted), bool)
        invlists = self._cpu.invlists
        for lst, list_ids in self._lists() if len(wanted) else ():
            at = np.minimum(np.searchsorted(wanted, list_ids), len(wanted) - 1)
            hit = wanted[at] == list_ids
            if hit.any():
                codes = faiss.rev_swig_ptr(invlists.get_codes(lst), len(list_ids) * invlists.code_size)
                vecs[at[hit]] = codes.view(np.float32).reshape(len(list_ids), self.dim)[hit]
                found[at[hit]] = True
        if not found.all():
            raise KeyError(f"ids not in the vector index: {wanted[~found][:5].tolist()}")
        return vecs[where.reshape(-1)]

    # -- search

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        allowed: Allowed | np.ndarray | list[int] | None = None,
        refine: Refine | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 (Q, k), ids int64 (Q, k)), best first; empty slots are id -1, score -inf.

        `allowed` restricts the results to those ids (an `Allowed`, or ids in any order; a FAISS ID
        selector, on the CPU copy): exact for a flat index; an IVF probes 1/f times more lists when a
        fraction f of its ids is allowed, which is every list (exact again) once f <= nprobe / nlist.
        Ids that include every id of the index search as if none were given.

        `refine` gives the true vectors of ids. An ivfpq index finds `candidates_for(k, self.rerank)` candidates
        and returns the top k of them by their exact inner product with `refine`'s vectors;
        without it, by their PQ estimates. The other kinds hold exact vectors and ignore it.
        """
        queries, top = self._query_top(queries, k)
        if top == 0 or not len(queries):
            return _nothing(len(queries), k)
        wide = self._candidates(top)
        if allowed is not None and not isinstance(allowed, Allowed):
            allowed = Allowed(allowed)
        if allowed is not None and allowed.covers(self):
            allowed = None  # every id is allowed: no selector to test, and the GPU copy may answer
        with _one_thread_for_one_query(len(queries)):
            if allowed is not None:
                scores, ids = self._search_allowed(queries, wide, allowed)
            else:
                scores, ids = self._searcher(wide).search(queries, wide)
        if self.kind == "ivfpq":
            scores, ids = rerank(queries, ids, top, refine) if refine is not None else (scores[:, :top], ids[:, :top])
        return _pad(scores, ids, k)

    def search_kept(
        self, queries: np.ndarray, k: int, keep: Keep, *, depth: int, refine: Refine | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As `search` restricted to the ids `keep` keeps, asking it only about ``depth`` times the
        candidates an unfiltered search takes (for an ivfpq, those it re-ranks; else the top k),
        found unfiltered: those it keeps, in the order the index ranked them, are the candidates.
        Returns (scores, ids, complete): ``complete`` (Q,) tells each query that found as many
        candidates as an unfiltered search takes, so that its answer is as good as one; another one's
        is short (none at all when no query is complete: nothing is re-ranked), and an `allowed` search
        must answer it. A filter that allows a fraction f of the images leaves about f x depth times
        the candidates: enough where f >= 1 / depth. `keep` is asked about the best 2 x the candidates
        first, and about the rest only for a query that kept enough of those to get there."""
        queries, top = self._query_top(queries, k)
        if top == 0 or not len(queries):
            return *_nothing(len(queries), k), np.zeros(len(queries), bool)
        wide = self._candidates(top)
        deep = max(1, min(wide * depth, len(self)))
        with _one_thread_for_one_query(len(queries)):
            scores, ids = self._searcher(deep).search(queries, deep)
        # `keep` is asked about the best 2 x wide first (each id costs it a lookup), the rest only for a
        # query that has not kept enough of them yet but, at the rate it kept them, would
        mask = np.zeros(ids.shape, bool)
        asking = np.ones(len(queries), bool)
        start = 0
        for end in sorted({min(2 * wide, deep), deep}):
            part = ids[asking, start:end]
            kept = np.fromiter(keep(idset.unique(part[part >= 0])), np.int64)
            mask[asking, start:end] = np.isin(part, kept) & (part >= 0)
            so_far = mask.sum(axis=1)
            asking &= (so_far < wide) & (so_far * deep >= wide * end)
            start = end
            if not asking.any():
                break
        complete = mask.sum(axis=1) >= wide
        if not complete.any():
            return *_nothing(len(queries), k), complete
        found = np.full((len(queries), wide), -1, np.int64)
        found_scores = np.full((len(queries), wide), -np.inf, np.float32)
        for row in range(len(queries)):
            cols = np.flatnonzero(mask[row])[:wide]
            found[row, :len(cols)], found_scores[row, :len(cols)] = ids[row, cols], scores[row, cols]
        if self.kind == "ivfpq" and refine is not None:
            found_scores, found = rerank(queries, found, top, refine)
        return *_pad(found_scores[:, :top], found[:, :top], k), complete

    def _query_top(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """A search's queries, checked, and the top it can give (k, or fewer in a smaller index)."""
        queries = _as_vectors(queries, self.dim, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return queries, min(k, len(self))

    def _candidates(self, top: int) -> int:
        """The candidates a search for the best ``top`` takes: those an ivfpq re-ranks, else ``top``."""
        return min(candidates_for(top, self.rerank), len(self)) if self.kind == "ivfpq" else top

    def _search_allowed(self, queries: np.ndarray, k: int, allowed: Allowed) -> tuple[np.ndarray, np.ndarray]:
        selector = allowed.selector()  # `allowed` holds it and its bitmap until the search returns
        if self.kind == "flat":
            params = faiss.SearchParameters(sel=selector)
        else:  # a fraction f of the ids allowed: probe 1/f times more lists to meet as many of them
            nprobe = min(self.nlist, math.ceil(self.nprobe * len(self) / max(len(allowed), 1)))
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        return self._cpu.search(queries, k, params=params)

    def _searcher(self, k: int) -> faiss.Index | TorchExact:
        """The GPU copy when there is one and it can answer, else the CPU master."""
        if self._gpu is None:
            return self._torch_copy() or self._cpu
        if k > GPU_MAX_K or self.nprobe > GPU_MAX_K:
            return self._cpu
        with self._lock:
            if self._gpu_index is None:
                self._gpu_index = self._to_gpu()
            return self._gpu_index if self._gpu_index is not None else self._cpu

    def _torch_copy(self) -> TorchExact | None:
        """The vectors of an exact index on torch's GPU, where FAISS has none and torch has one."""
        device = self._torch_device()
        if device is None:
            return None
        with self._lock:
            if self._torch_index is None:
                try:
                    n = self._cpu.ntotal
                    self._torch_index = TorchExact(self._raw_ids(), self._cpu.index.reconstruct_n(0, n), device)
                except RuntimeError as err:  # out of GPU memory, a broken CUDA: FAISS on the CPU answers
                    log.warning("could not copy the vectors to %s (%s); searching on the CPU", device, err)
                    self._torch_off = True
                    return None
            return self._torch_index

    def _to_gpu(self) -> faiss.Index | None:
        try:
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
            options = faiss.GpuClonerOptions()
            options.useFloat16LookupTables = True  # what fits IVFPQ's larger codes; re-ranking follows
            return faiss.index_cpu_to_gpu(self._gpu_resources, self._gpu, self._cpu, options)
        except (RuntimeError, AttributeError) as err:
            log.warning("could not copy the vector index to GPU %s (%s); searching on the CPU", self._gpu, err)
            self._gpu = None
            return None

    # -- files

    def save(self, path: Path, *, generation: int | None = None, catalog_id: str = "") -> IndexHeader:
        """Write the FAISS file and its header atomically (temp file, fsync, rename, fsync folder).
        Only an approximate index is saved (ValueError for a flat one: `open` builds that from the
        catalogue).

        generation: the catalogue generation this index reflects (default: `self.generation`,
        else 0); catalog_id: the catalogue's `catalog_id`. `open` relies on both.

        Between the two renames a crash leaves a new FAISS file beside the old header: `load` then
        reports a checksum mismatch, and `open` builds a flat index from the catalogue instead.
        """
        if self.kind not in APPROXIMATE:
            raise ValueError(f"a {self.kind} index is not saved: it is built from the catalogue when opened")
        path = Path(path)
        with self._lock:
            faiss_tmp, size, digest = _write_temp(path, lambda f: _write_faiss(self._cpu, f))
            header = IndexHeader(
                kind=self.kind, dim=self.dim, count=len(self), size_bytes=size, sha256=digest,
                generation=int(generation if generation is not None else self.generation or 0),
                catalog_id=catalog_id, built_count=self.built_count,
                nlist=self.nlist, nprobe=self.nprobe, rerank=self.rerank, faiss_version=faiss.__version__,
                saved_at=time.time(),
            )  # fmt: skip
        try:
            json_tmp, _, _ = _write_temp(path, lambda f: f.write(header.to_json().encode()))
        except BaseException:
            faiss_tmp.unlink(missing_ok=True)
            raise
        faults.point("save-temp")
        os.replace(faiss_tmp, path)
        faults.point("save-replace")
        os.replace(json_tmp, header_path(path))
        _fsync_folder(path.parent)
        self.header = header
        self.generation = header.generation
        return header

    @classmethod
    def load(cls, path: Path, *, device: str = "auto") -> VectorIndex:
        """Read a saved index; its `header` says which catalogue generation it reflects.

        Raises IndexStoreError for a missing, truncated, altered or foreign file, or a flat one (an
        older altsearch's); the checksum is verified before FAISS parses anything. Nothing is unpickled.
        """
        path = Path(path)
        header = read_header(path)
        if header.kind not in APPROXIMATE:
            raise IndexStoreError(f"vector index {path} is a {header.kind} index saved by an older altsearch; "
                                  "flat indexes are built from the catalogue")
        try:
            with path.open("rb") as f:
                _verify(f, header, path)
                index = _read_faiss(f, path)
        except OSError as err:
            raise IndexStoreError(f"cannot read vector index {path}: {err}") from err
        _check_matches(index, header, path)
        # an older altsearch kept a hashtable direct map (~40 bytes per vector): dropped, and the
        # next save leaves it out
        index.set_direct_map_type(faiss.DirectMap.NoMap)
        return cls(index, header.kind, device=device, built_count=header.built_count, rerank=header.rerank,
                   header=header)


# --- file helpers ------------------------------------------------------------------------


class _HashingWriter:
    """A file wrapper that hashes and counts what goes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


def _write_temp(path: Path, fill: Callable[[_HashingWriter], object]) -> tuple[Path, int, str]:
    """Fill a temp file beside `path` and fsync it; returns (temp path, size, sha256)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            fill(writer)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, writer.size, writer.sha.hexdigest()


def _write_faiss(index: faiss.Index, writer: _HashingWriter) -> None:
    faiss.write_index(index, faiss.PyCallbackIOWriter(writer.write))


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open a folder (Windows) order renames themselves
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _verify(f: BinaryIO, header: IndexHeader, path: Path) -> None:
    size = os.fstat(f.fileno()).st_size
    if size != header.size_bytes:
        raise IndexStoreError(
            f"vector index {path} is {size} bytes, its header says {header.size_bytes}: "
            "truncated or replaced; rebuild the index"
        )
    sha = hashlib.sha256()
    while chunk := f.read(_HASH_CHUNK):
        sha.update(chunk)
    if sha.hexdigest() != header.sha256:
        raise IndexStoreError(f"vector index {path} does not match its checksum: damaged; rebuild the index")
    f.seek(0)


def _read_faiss(f: BinaryIO, path: Path) -> faiss.Index:
    try:
        return faiss.read_index(faiss.PyCallbackIOReader(f.read))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise IndexStoreError(f"vector index {path} is not a readable FAISS file ({first})") from err


_FAISS_CLASS = {"ivf": faiss.IndexIVFFlat, "ivfpq": faiss.IndexIVFPQ}


def _check_matches(index: faiss.Index, header: IndexHeader, path: Path) -> None:
    if not isinstance(index, _FAISS_CLASS[header.kind]):
        raise IndexStoreError(f"vector index {path} holds a {type(index).__name__}, not a {header.kind} index")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexStoreError(f"vector index {path} is not an inner-product {header.kind} index")
    if index.d != header.dim or index.ntotal != header.count:
        raise IndexStoreError(
            f"vector index {path} holds {index.ntotal} x {index.d}, "
            f"its header says {header.count} x {header.dim}"
        )
