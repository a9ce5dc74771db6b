"""Indexing throughput and query latency of altsearch, measured through its public API.

Two tables (docs/indexing.md explains them and holds the figures of a run):

1. Indexing. A folder of camera-sized JPEGs (default 48 at 4000x3000, quality 90: smooth gradients,
   shapes, mild grain, an EXIF date; generated once and cached in ``--workdir``) is indexed into a
   fresh index per configuration with ``Engine.open(dir, model=..., device=...).index(folder,
   workers=W, draft=D)``: reduced-size JPEG decoding (draft) on and off x decode workers (default
   0, 1, 2), after one warm-up run on two of the photos. images/s is ``report.embedded /
   report.seconds`` (median over ``--repeats`` rounds, configurations interleaved); "x base" divides
   by the baseline (draft off, 0 workers) of the same run; CPU ms/image is the user + system time of
   this process and its decode workers. With the tiny random model (the default) the model costs
   next to nothing, so the figures are the scan-decode-commit pipeline's ceiling; ``--model`` runs a
   real checkpoint instead.

2. Query latency at ``--sizes`` vectors (default 10k and 1M), for each of ``--dims`` (default: the
   model's; other values use a tiny checkpoint with that projection size) and ``--kinds``. Index
   folders are filled directly, without running the model: catalogue rows through
   ``Catalog.transaction()`` / ``Tx.add`` (fake paths, random unit vectors in clusters on a 32-d
   subspace), then the FAISS file built with ``VectorIndex.build`` and saved with the catalogue's
   generation and id, as ``IndexStore.save_vectors`` does; they are cached in ``--workdir``. Then:
   - open: ``Engine.open`` plus the first touch of the vector file (load, checksum, catching up with
     the catalogue); whether the saved file was used as it is, or rebuilt, is reported;
   - first: the first ``Engine.search`` in the process (it loads the text tower);
   - warm p50/p95: ``Engine.search`` over ``--queries`` queries in the same process, after the first;
     "text" is ``model.encode_text`` alone and "faiss" the vector search alone;
   - cold: wall time of a fresh ``python -m altsearch search ... --index DIR --json`` (median of
     ``--cold-repeats``), beside the time of ``python -c "import torch, faiss, altsearch.engine"``.

Run from the repository root (opt-in; tests/test_bench_index.py runs a tiny configuration):

    .venv/bin/python benchmarks/bench_index.py --workdir /tmp/bench-index --repeats 3
    .venv/bin/python benchmarks/bench_index.py --workdir /tmp/bench-index --skip-index --dims 24,768

Decode workers are started with ``spawn``, which re-imports this file in each of them: keep the
top level free of heavy imports (torch and altsearch are imported inside the functions).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny checkpoint comes from tests/checkpoints.py

# Queries made of words and characters the tiny tokenizer knows (any text works with a real model).
QUERIES = [
    "sunset over the sea", "海边的日落", "a cat on the beach", "一只猫", "snow mountain at night",
    "城市夜晚", "red flower", "a dog in the snow", "green tree in the city", "blue car", "山 photo",
    "people on the beach + sunset",
]

RENDER_SCALE = 8  # photo content is drawn at 1/8 size and upscaled: smooth and fast to make
GRAIN = 8  # +- grey levels of the fine and of the coarse grain added at full size
FILL_CHUNK = 50_000  # catalogue rows per Tx.add call
TX_ROWS = 250_000  # catalogue rows per transaction (one commit, one fsync)
CLUSTER_SIZE = 500  # vectors per cluster, on average
CLUSTER_SPREAD = 0.75  # noise norm around a cluster centre: cosine to the centre ~ 0.8
LATENT_DIM = 32  # clusters lie on a subspace of this many dimensions (real embeddings have a low
# intrinsic dimension); 768-d clusters of independent directions are so far apart that the IVF
# build tunes nprobe down to a single list
QUERY_INDEX_FORMAT = 2  # bump when the fill changes, so cached query indexes are rebuilt
T0 = 1_600_000_000.0  # fake capture times start here (2020-09-13)


# -- photos -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoSpec:
    count: int
    width: int
    height: int
    quality: int

    @property
    def folder_name(self) -> str:
        return f"photos-{self.width}x{self.height}-q{self.quality}-n{self.count}"


class PhotoRenderer:
    """Camera-sized pictures: a gradient with shapes, drawn small, blurred, upscaled, grain added."""

    def __init__(self, width: int, height: int, seed: int = 0):
        from PIL import Image

        rng = np.random.default_rng(seed)
        self.size = (width, height)
        levels = 2 * GRAIN + 1
        self.fine = Image.fromarray(rng.integers(0, levels, (height, width, 3), dtype=np.uint8))
        small = rng.integers(0, levels, (max(1, height // 4), max(1, width // 4), 3), dtype=np.uint8)
        self.coarse = Image.fromarray(small).resize(self.size, Image.Resampling.BILINEAR)

    def render(self, seed: int):
        from PIL import Image, ImageChops, ImageDraw, ImageFilter

        rng = np.random.default_rng(seed)
        width, height = self.size
        w, h = max(8, width // RENDER_SCALE), max(8, height // RENDER_SCALE)
        top, bottom, side = rng.integers(0, 256, (3, 3))
        y = np.linspace(0, 1, h)[:, None, None]
        x = np.linspace(0, 1, w)[None, :, None]
        mix = rng.uniform(0.2, 0.8)
        sky = top * (1 - y) + bottom * y * mix + side * x * (1 - mix)  # (h, w, 3)
        img = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 10))):
            x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
            x1, y1 = x0 + int(rng.integers(w // 12 + 1, w // 2 + 2)), y0 + int(rng.integers(h // 12 + 1, h // 2 + 2))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
        img = img.filter(ImageFilter.GaussianBlur(1.5)).resize(self.size, Image.Resampling.BICUBIC)
        for grain in (self.fine, self.coarse):
            shifted = ImageChops.offset(grain, int(rng.integers(0, width)), int(rng.integers(0, height)))
            img = ImageChops.add(img, shifted, offset=-GRAIN)
        return img


def make_photos(workdir: Path, spec: PhotoSpec) -> list[Path]:
    """The spec's JPEGs under ``workdir``; files already there are reused, missing ones made."""
    from tests.photos import exif_bytes

    folder = workdir / spec.folder_name
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"IMG_{i:04d}.jpg" for i in range(spec.count)]
    missing = [(i, p) for i, p in enumerate(paths) if not p.is_file()]
    if not missing:
        return paths
    t0 = time.perf_counter()
    renderer = PhotoRenderer(spec.width, spec.height)
    for i, path in missing:
        taken = datetime.datetime(2020 + i % 5, 1 + i % 12, 1 + i % 28, 8 + i % 12, i % 60)
        tmp = path.with_name("." + path.name + ".tmp")  # hidden: never scanned
        renderer.render(i).save(tmp, "JPEG", quality=spec.quality,
                                exif=exif_bytes(taken, "Benchmark", "Synthetic 12MP"))
        os.replace(tmp, path)
    mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
    print(f"made {len(missing)} photos in {folder} ({time.perf_counter() - t0:.1f} s, {mb:.2f} MB each)",
          flush=True)
    return paths


# -- models -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """What an index records about its model, and what Engine.open is given."""

    source: str  # passed as Engine.open(model=...)
    model_id: str  # the catalogue's model_id (Model.source)
    fingerprint: str
    dimension: int


def model_ref(source: str) -> ModelRef:
    from altsearch import load_model

    model = load_model(source, device="cpu")
    return ModelRef(source, model.source, model.fingerprint, model.dimension)


def tiny_model(workdir: Path, dim: int | None = None) -> ModelRef:
    """The tests' tiny random checkpoint (24-d joint space, or ``dim``), written once into ``workdir``."""
    from tests.checkpoints import write_checkpoint

    folder = workdir / ("tiny-altclip" if dim is None else f"tiny-altclip-d{dim}")
    if not (folder / "config.json").is_file():
        write_checkpoint(folder, seed=0, **({} if dim is None else {"projection_dim": dim}))
    return model_ref(str(folder))


# -- 1. indexing ------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the decode workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def index_once(photos: Path, scratch: Path, model: str, device: str, *, draft: bool, workers: int,
               batch_size: int | None):
    """Index ``photos`` into a fresh index folder; returns (IndexReport, CPU seconds it took)."""
    from altsearch import Engine

    folder = Path(tempfile.mkdtemp(prefix="index-", dir=scratch))
    try:
        with Engine.open(folder, model=model, device=device) as engine:
            engine.model.load(["vision"])  # the weights are read before the clock starts
            cpu = _cpu_seconds()
            report = engine.index(photos, workers=workers, draft=draft, batch_size=batch_size)
            return report, _cpu_seconds() - cpu  # the pool has joined its workers by now
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_indexing(args: argparse.Namespace, photos: Path, count: int, model: ModelRef, work: Path) -> list[dict]:
    configs = [(draft, w) for draft in (False, True) for w in args.workers]
    base = (False, 0) if 0 in args.workers else configs[0]
    rates: dict[tuple[bool, int], list[float]] = {c: [] for c in configs}
    seconds: dict[tuple[bool, int], list[float]] = {c: [] for c in configs}
    cpu: dict[tuple[bool, int], list[float]] = {c: [] for c in configs}
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    _read_all(photos)  # every configuration reads the files from the page cache
    warmup = scratch / "warmup"  # first-use costs (lazy imports, torch kernels) are not the baseline's
    warmup.mkdir()
    for p in sorted(photos.glob("*.jpg"))[:2]:
        shutil.copyfile(p, warmup / p.name)
    index_once(warmup, scratch, model.source, args.device, draft=True, workers=0, batch_size=args.batch_size)
    for round_ in range(args.repeats):
        for draft, workers in configs:
            report, cpu_s = index_once(photos, scratch, model.source, args.device, draft=draft, workers=workers,
                                       batch_size=args.batch_size)
            if report.embedded != count or report.failed:
                raise SystemExit(f"indexing embedded {report.embedded} of {count} photos, "
                                 f"{report.failed} failed: {report.failures[:3]}")
            rates[(draft, workers)].append(report.embedded / report.seconds)
            seconds[(draft, workers)].append(report.seconds)
            cpu[(draft, workers)].append(cpu_s)
            print(f"  round {round_ + 1}: draft {'on ' if draft else 'off'} workers {workers}: "
                  f"{report.embedded / report.seconds:6.2f} images/s, {1e3 * cpu_s / count:.0f} CPU ms/image",
                  flush=True)
    base_rate = statistics.median(rates[base])
    return [{"draft": draft, "workers": workers, "images": count,
             "seconds": statistics.median(seconds[(draft, workers)]),
             "images_per_s": statistics.median(rates[(draft, workers)]),
             "vs_base": statistics.median(rates[(draft, workers)]) / base_rate,
             "cpu_ms_per_image": 1e3 * statistics.median(cpu[(draft, workers)]) / count,
             "runs": rates[(draft, workers)]}
            for draft, workers in configs]


def _read_all(folder: Path) -> None:
    for p in sorted(folder.iterdir()):
        if p.is_file():
            p.read_bytes()


# -- 2. query indexes -------------------------------------------------------------------------------


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class ClusteredVectors:
    """Random unit vectors in ``clusters`` clusters, on a random ``min(dim, LATENT_DIM)``-dimensional
    subspace of the ``dim``-dimensional space: a random centre plus isotropic noise of norm ~``spread``
    within the subspace (cosine to the centre ~0.8), mapped by an isometry, so unit length is kept."""

    def __init__(self, rng: np.random.Generator, clusters: int, dim: int, spread: float = CLUSTER_SPREAD):
        self.rng = rng
        self.spread = spread
        latent = min(dim, LATENT_DIM)
        self.centers = _unit_rows(rng.standard_normal((clusters, latent), dtype=np.float32))
        if latent == dim:
            self.basis = None
        else:  # orthonormal rows: (latent, dim)
            q, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
            self.basis = np.ascontiguousarray(q.T, dtype=np.float32)

    def _lift(self, x: np.ndarray) -> np.ndarray:
        return x if self.basis is None else _unit_rows(x @ self.basis)  # unit already, up to rounding

    @property
    def directions(self) -> np.ndarray:
        """The cluster centres in the full space, (clusters, dim)."""
        return self._lift(self.centers)

    def sample(self, n: int) -> np.ndarray:
        """(n, dim) float32 unit vectors."""
        latent = self.centers.shape[1]
        x = self.centers[self.rng.integers(0, len(self.centers), n)]
        x += self.rng.standard_normal((n, latent), dtype=np.float32) * np.float32(self.spread / np.sqrt(latent))
        return self._lift(_unit_rows(x))


def fake_records(start: int, n: int) -> list[dict]:
    return [{"path": f"/bench/photos/{2000 + i % 25}/{i // 1000:04d}/IMG_{i:08d}.jpg",
             "size": 2_000_000 + (i * 7919) % 3_000_000, "mtime": T0 + 60.0 * i,
             "content_hash": f"{i:032x}", "width": 4000, "height": 3000, "format": "JPEG",
             "taken_at": T0 + 60.0 * i, "camera_make": "Benchmark", "camera_model": "Synthetic 12MP"}
            for i in range(start, start + n)]


def build_query_index(folder: Path, n: int, model: ModelRef, seed: int = 0, kind: str = "auto") -> dict:
    """An index folder of ``n`` fake images with clustered vectors of the model's dimension, that
    ``Engine.open(folder)`` accepts as it is; ``kind`` as in ``VectorIndex.build``. Returns the fill
    and build figures."""
    from altsearch.catalog import Catalog, as_stored
    from altsearch.store import CATALOG_FILE, VECTORS_FILE
    from altsearch.vectors import VectorIndex

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    source = ClusteredVectors(rng, max(1, n // CLUSTER_SIZE), model.dimension)
    ids = np.empty(n, np.int64)
    stored = np.empty((n, model.dimension), np.float32)  # what the catalogue hands back (fp16 round trip)
    t0 = time.perf_counter()
    with Catalog(folder / CATALOG_FILE) as cat:
        with cat.transaction() as tx:
            tx.set_meta("model_id", model.model_id)
            tx.set_meta("model_fingerprint", model.fingerprint)
            tx.set_meta("dimension", str(model.dimension))
        for start in range(0, n, TX_ROWS):
            with cat.transaction() as tx:
                for s in range(start, min(n, start + TX_ROWS), FILL_CHUNK):
                    m = min(FILL_CHUNK, n - s)
                    vecs = source.sample(m)
                    ids[s:s + m] = tx.add(fake_records(s, m), vecs)
                    stored[s:s + m] = as_stored(vecs)
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = VectorIndex.build(ids, stored, kind=kind, device="cpu", seed=seed)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.save(folder / VECTORS_FILE, generation=cat.generation, catalog_id=cat.catalog_id)
        save_s = time.perf_counter() - t0
    return {"n": n, "dim": model.dimension, "fingerprint": model.fingerprint, "seed": seed,
            "format": QUERY_INDEX_FORMAT, "fill_s": fill_s, "build_s": build_s, "save_s": save_s,
            "kind": index.kind, "nlist": index.nlist, "nprobe": index.nprobe,
            "catalog_mb": _size_mb(folder / CATALOG_FILE), "vectors_mb": _size_mb(folder / VECTORS_FILE)}


def cached_query_index(work: Path, n: int, model: ModelRef, kind: str) -> tuple[Path, dict]:
    """The query index for (n, model, kind) in ``work``, built unless a complete one is there."""
    folder = work / (f"query-{n}-d{model.dimension}" + ("" if kind == "auto" else f"-{kind}"))
    spec_file = folder.with_name(folder.name + ".json")  # written last: its presence means complete
    want = {"n": n, "dim": model.dimension, "fingerprint": model.fingerprint, "seed": 0,
            "format": QUERY_INDEX_FORMAT, "requested_kind": kind}
    if spec_file.is_file():
        info = json.loads(spec_file.read_text())
        if {k: info.get(k) for k in want} == want and folder.is_dir():
            print(f"reusing {folder}", flush=True)
            return folder, {**info, "cached": True}
    print(f"filling {folder} ({n} vectors, d={model.dimension}) ...", flush=True)
    spec_file.unlink(missing_ok=True)
    info = {**build_query_index(folder, n, model, kind=kind), "requested_kind": kind}
    spec_file.write_text(json.dumps(info, indent=1))
    return folder, {**info, "cached": False}


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


# -- 2. query latency -------------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return times


def _sha256_seconds(path: Path) -> float:
    t0 = time.perf_counter()
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return time.perf_counter() - t0


def measure_warm(folder: Path, n: int, model: ModelRef, args: argparse.Namespace) -> dict:
    """Open, first query and warm latencies in this process."""
    from altsearch import Engine
    from altsearch.store import VECTORS_FILE

    vec_file = folder / VECTORS_FILE
    mtime = vec_file.stat().st_mtime_ns
    collect = _Collect()
    lib_log = logging.getLogger("altsearch")
    lib_log.addHandler(collect)
    level = lib_log.level
    lib_log.setLevel(logging.INFO)
    try:
        t0 = time.perf_counter()
        engine = Engine.open(folder, model=model.source, device=args.device, create=False)
        vectors = engine.store.vectors  # the vector file is loaded (and checked) on first use
        open_s = time.perf_counter() - t0
    finally:
        lib_log.removeHandler(collect)
        lib_log.setLevel(level)
    with engine:
        # a rebuilt index has no header; a reconciled one logs what it added or removed
        as_saved = (vectors.header is not None and vectors.header.generation == engine.store.generation
                    and len(vectors) == n and not collect.messages)
        id_scan_s = min(_timed(lambda i: engine.store.catalog.vector_ids(), 3))
        t0 = time.perf_counter()
        first = engine.search(QUERIES[0], k=args.k)
        first_s = time.perf_counter() - t0
        if len(first) != min(args.k, n):
            raise SystemExit(f"search in {folder} returned {len(first)} hits, expected {args.k}")
        queries = [QUERIES[(i + 1) % len(QUERIES)] for i in range(args.queries)]
        search = _timed(lambda i: engine.search(queries[i], k=args.k), args.queries)
        text = _timed(lambda i: engine.model.encode_text([queries[i]]), args.queries)
        qvecs = engine.model.encode_text(queries)
        faiss_t = _timed(lambda i: vectors.search(qvecs[i:i + 1], args.k), args.queries)
    return {
        "open_s": open_s, "first_query_s": first_s, "vector_file_as_saved": as_saved, "opened_kind": vectors.kind,
        "log": collect.messages, "vector_file_rewritten": vec_file.stat().st_mtime_ns != mtime,
        "sha256_s": _sha256_seconds(vec_file), "id_scan_s": id_scan_s,
        "warm_p50_ms": 1e3 * _pct(search, 50), "warm_p95_ms": 1e3 * _pct(search, 95),
        "text_p50_ms": 1e3 * _pct(text, 50), "text_p95_ms": 1e3 * _pct(text, 95),
        "faiss_p50_ms": 1e3 * _pct(faiss_t, 50), "faiss_p95_ms": 1e3 * _pct(faiss_t, 95),
    }


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def _cli_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALTSEARCH_")}
    env.update(ALTSEARCH_HOME=str(work / "home"), HF_HUB_OFFLINE="1", NO_COLOR="1")
    return env


def evict(paths: list[Path]) -> None:
    """Drop these files (folders: their files) from the page cache."""
    for p in paths:
        for f in (sorted(p.iterdir()) if p.is_dir() else [p]):
            if not f.is_file():
                continue
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure_cold(folder: Path, model: ModelRef, args: argparse.Namespace, work: Path) -> dict:
    """Wall time of a fresh ``python -m altsearch search`` (median of ``--cold-repeats``)."""
    env = _cli_env(work)
    runs = []
    for i in range(args.cold_repeats):
        cmd = [sys.executable, "-m", "altsearch", "search", QUERIES[i % len(QUERIES)], "--index", str(folder),
               "--json", "-k", str(args.k), "--device", args.device]
        if args.evict:
            evict([folder, Path(model.model_id)])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
        runs.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        hits = json.loads(proc.stdout)
        if len(hits) != args.k or not all("score" in h for h in hits):
            raise SystemExit(f"the CLI returned {len(hits)} hits, expected {args.k}")
    return {"cold_s": statistics.median(runs), "cold_runs": runs}


def measure_imports(args: argparse.Namespace, work: Path) -> float:
    """What a fresh process spends importing what a search needs (median of ``--cold-repeats``)."""
    code = "import torch, faiss, altsearch.engine, altsearch.model"
    times = []
    for _ in range(args.cold_repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_cli_env(work))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_queries(args: argparse.Namespace, models: list[ModelRef], work: Path) -> list[dict]:
    rows = []
    for model in models:
        for n in args.sizes:
            for kind in args.kinds:
                folder, info = cached_query_index(work, n, model, kind)
                print(f"measuring {n} vectors, d={model.dimension}, {info['kind']} ...", flush=True)
                rows.append({**info, **measure_warm(folder, n, model, args), **measure_cold(folder, model, args, work)})
    return rows


# -- report -----------------------------------------------------------------------------------------


def machine(args: argparse.Namespace) -> dict:
    import faiss
    import PIL
    import torch
    from PIL import features

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = 0.0
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
        "memory_gib": round(mem, 1), "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "pillow": PIL.__version__, "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "numpy": np.__version__, "sqlite": sqlite3.sqlite_version, "device": args.device,
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "MKL_", "OPENBLAS_"))},
        "altsearch_commit": _commit(), "loadavg_start": _loadavg(),
    }


def _commit() -> str | None:
    """The repository's HEAD, with "+dirty" when altsearch/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "altsearch"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def render_machine(info: dict) -> str:
    return (f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
            f"{info['memory_gib']} GiB; load average {info['loadavg_start']} at start, {info.get('loadavg_end')} "
            f"at end\nsoftware: Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads, "
            f"device {info['device']}), faiss {info['faiss']} ({info['faiss_gpus']} GPUs), Pillow {info['pillow']} "
            f"(libjpeg-turbo: {info['libjpeg_turbo']}), numpy {info['numpy']}, SQLite {info['sqlite']}; "
            f"OpenMP/BLAS environment {info['omp_env'] or 'unset'}; altsearch {info['altsearch_commit']}; "
            f"{info['date']}")


def render_indexing(rows: list[dict], photo: dict) -> str:
    lines = [f"indexing {rows[0]['images']} JPEGs of {photo['width']}x{photo['height']} "
             f"({photo['mb_each']:.2f} MB each), model {photo['model']}, batch size {photo['batch_size']}",
             "", "| reduced-size decoding | workers | seconds | images/s | x base | CPU ms/image |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'on' if r['draft'] else 'off'} | {r['workers']} | {r['seconds']:.2f} | "
                     f"{r['images_per_s']:.2f} | {r['vs_base']:.2f} | {r['cpu_ms_per_image']:.0f} |")
    best = max(rows, key=lambda r: r["images_per_s"])
    base = next(r for r in rows if r["vs_base"] == 1.0)
    lines += ["", f"summary: best {best['images_per_s']:.1f} images/s (reduced-size decoding "
                  f"{'on' if best['draft'] else 'off'}, {best['workers']} workers) = {best['vs_base']:.2f}x the "
                  f"baseline ({base['images_per_s']:.1f} images/s, decoding off, {base['workers']} workers)"]
    return "\n".join(lines)


def render_queries(rows: list[dict], imports_s: float) -> str:
    lines = ["| vectors | d | index | fill s | build s | open s | first s | warm p50 ms | warm p95 ms | "
             "text p50 ms | faiss p50 ms | cold s |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kind = r["kind"] if r["kind"] == "flat" else f"ivf{r['nlist']} nprobe {r['nprobe']}"
        if r["opened_kind"] != r["kind"]:
            kind += f", opened as {r['opened_kind']}"
        lines.append(f"| {r['n']:,} | {r['dim']} | {kind} | {r['fill_s']:.1f}{'*' if r['cached'] else ''} | "
                     f"{r['build_s']:.1f} | {r['open_s']:.3f} | {r['first_query_s']:.3f} | {r['warm_p50_ms']:.2f} | "
                     f"{r['warm_p95_ms']:.2f} | {r['text_p50_ms']:.2f} | {r['faiss_p50_ms']:.3f} | "
                     f"{r['cold_s']:.2f} |")
    lines.append("")
    if any(r["cached"] for r in rows):
        lines.append("(* fill and build figures from the run that made the cached index)")
    lines.append(f"cold = a fresh `python -m altsearch search` process; of that, importing torch, faiss and "
                 f"altsearch alone takes {imports_s:.2f} s")
    for r in rows:
        used = "used as saved" if r["vector_file_as_saved"] else f"NOT used as saved ({'; '.join(r['log'])})"
        lines.append(f"summary: {r['n']:,} x {r['dim']}: warm query p50 {r['warm_p50_ms']:.1f} ms "
                     f"(text encoder {r['text_p50_ms']:.1f} ms, faiss {r['faiss_p50_ms']:.2f} ms), cold CLI "
                     f"{r['cold_s']:.2f} s; vector file {r['vectors_mb']:.0f} MB "
                     f"{used}; its SHA-256 alone {r['sha256_s']:.3f} s, listing the catalogue's vector ids "
                     f"{r['id_scan_s']:.3f} s")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if not kinds or set(kinds) - {"auto", "flat", "ivf"}:
        raise argparse.ArgumentTypeError(f"expected auto, flat and/or ivf, got {text!r}")
    return kinds


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError("photos must be at least 16x16")
    return w, h


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="cache for photos, checkpoints and query indexes "
                                                "(kept; default: a temporary folder, removed)")
    p.add_argument("--images", type=int, default=48, help="photos to index (default: 48)")
    p.add_argument("--size", type=_size, default=(4000, 3000), help="photo size WxH (default: 4000x3000)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default: 90)")
    p.add_argument("--workers", type=_ints, default=[0, 1, 2], help="decode workers to try (default: 0,1,2)")
    p.add_argument("--batch-size", type=int, help="images per model batch (default: the library's)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the indexing configurations (median)")
    p.add_argument("--sizes", type=_ints, default=[10_000, 1_000_000],
                   help="query index sizes in vectors (default: 10000,1000000)")
    p.add_argument("--dims", type=_ints, help="vector dimensions of the query indexes (default: the model's; "
                                              "other values use a tiny checkpoint with that projection size)")
    p.add_argument("--kinds", type=_kinds, default=["auto"],
                   help="vector index kinds of the query indexes: auto (what `altsearch optimize` picks: exact up "
                        "to 200k, IVF above), flat, ivf; comma-separated (default: auto)")
    p.add_argument("--queries", type=int, default=50, help="warm queries per index (default: 50)")
    p.add_argument("--cold-repeats", type=int, default=3, help="fresh CLI processes per index (median; default 3)")
    p.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    p.add_argument("--model", help="a real checkpoint (hub id or folder) instead of the tiny random one")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--evict", action="store_true", help="drop the index and model files from the page cache "
                                                        "before each cold query")
    p.add_argument("--skip-index", action="store_true", help="skip the indexing table")
    p.add_argument("--skip-query", action="store_true", help="skip the query table")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    if args.images < 1 or args.repeats < 1 or args.queries < 1 or args.cold_repeats < 1 or args.k < 1:
        p.error("--images, --repeats, --queries, --cold-repeats and -k must be at least 1")
    if min(args.sizes) < args.k:
        p.error("every --sizes value must be at least -k")
    if "ivf" in args.kinds:
        from altsearch.vectors import TRAIN_PER_LIST

        if min(args.sizes) < TRAIN_PER_LIST:
            p.error(f"an IVF index needs at least {TRAIN_PER_LIST} vectors")
    if args.model and args.dims:
        p.error("--dims makes tiny checkpoints; it does not go with --model")
    return args


def run(args: argparse.Namespace, work: Path) -> dict:
    info = machine(args)
    print(render_machine(info), flush=True)
    base = model_ref(args.model) if args.model else tiny_model(work)
    report: dict = {"machine": info, "model": base.model_id}
    if not args.skip_index:
        spec = PhotoSpec(args.images, *args.size, args.quality)
        paths = make_photos(work, spec)
        print("indexing ...", flush=True)
        rows = bench_indexing(args, paths[0].parent, len(paths), base, work)
        photo = {"width": spec.width, "height": spec.height, "quality": spec.quality,
                 "mb_each": sum(p.stat().st_size for p in paths) / len(paths) / 1e6,
                 "model": "tiny random" if not args.model else args.model,
                 "batch_size": args.batch_size or "default"}
        report.update(photos=photo, indexing=rows)
    if not args.skip_query:
        dims = args.dims or [base.dimension]
        models = [base if d == base.dimension else tiny_model(work, d) for d in dims]
        report["queries"] = bench_queries(args, models, work)
        report["imports_s"] = measure_imports(args, work)
    info["loadavg_end"] = _loadavg()
    print("\n" + render_machine(info))
    if "indexing" in report:
        print("\n" + render_indexing(report["indexing"], report["photos"]))
    if "queries" in report:
        print("\n" + render_queries(report["queries"], report["imports_s"]))
    return report


def main(argv=None) -> None:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args, work)
    finally:
        shutil.rmtree(work / "scratch", ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
