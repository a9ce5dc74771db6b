"""Bytes per indexed image: the catalogue, the vector file, and the memory a searching process holds.

For each of ``--sizes`` (default 10k, 100k, 1M images of ``--dim``-dimensional vectors, default 768),
an index folder is filled the way the product stores one, without running the model: catalogue
rows through ``Catalog.transaction()`` / ``Tx.add`` (camera-like paths such as
``/home/user/Pictures/2023/07/IMG_20230714_183012.jpg``, EXIF-like metadata, a 128-bit hex content
hash) with clustered unit vectors (bench_query.py's ``ClusteredVectors``), then the vector index as
``altsearch optimize`` makes it (``IndexStore.rebuild("auto")`` and ``.save_vectors()``): up to
EXACT_MAX images a flat index, which has no file (it is built from the catalogue when the index is
opened), beyond it an ivfpq saved to ``vectors.faiss``. Columns:

- catalogue, vector file, total: on-disk bytes of ``catalog.sqlite`` (checkpointed, no WAL) and of
  ``vectors.faiss`` + its header (none for flat), divided by the number of images;
- RSS: the resident memory a fresh process gains by opening the index with ``IndexStore`` and
  answering one search (vector search plus the catalogue rows of the hits), divided by the number
  of images. It is what a searching process holds per image: the vector index (a flat one as float32
  vectors built from the catalogue's int8 ones) and SQLite's page cache;
- open s: seconds that process took to open the vector index: for flat, reading and dequantising
  every vector from the catalogue; for ivfpq, checking and reading the file. RSS and open s are
  medians of OPEN_REPEATS processes, run once the build's writes are flushed to disk, alternating
  with the baseline's;
- baseline: the previous layouts, measured in the same run: the same catalogue rows with float16
  vectors (schema 1, written into a scratch SQLite file) beside the vector file that layout saved
  (flat: the float32 FAISS file, its 350-byte header left out; ivfpq: the same index with the
  hashtable direct map altsearch kept until 2026-11, saved with its header); "x" is baseline total /
  our total (> 1: ours is smaller). "f32" is raw float32 vectors alone, ``n * d * 4`` bytes, for
  reference;
- baseline open s (ivfpq): seconds a fresh process took to check and read that baseline file as
  altsearch read it then (SHA-256, then FAISS parsing it, id map included).

A last line fits ``bytes/image = a + b / n`` to the measured totals of the sizes whose vector file
is the kind 10M images get (ivfpq) and extrapolates to 10M images; that figure is extrapolated,
not measured (``--sizes 10000000`` measures it).

Run from the repository root (opt-in; tests/test_bench_bytes.py runs a tiny configuration):

    .venv/bin/python benchmarks/bench_bytes.py
    .venv/bin/python benchmarks/bench_bytes.py --sizes 10000,100000 --dim 768 --workdir /tmp/bench-bytes

The 1M size took 2 min 43 s on an idle 2-core VM, at most 1.0 GB of memory (the ivfpq index is
built from the catalogue a batch at a time) and ~3.5 GB of disk; 10M took 42 minutes, 2.8 GB and
31 GB of disk. Nothing is kept unless ``--workdir`` is given (then its index folders are removed
too, one size at a time: they are never reused).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import machine, render_machine  # noqa: E402
from benchlib import int_list, workdir  # noqa: E402
from bench_query import CLUSTER_SIZE, ClusteredVectors  # noqa: E402
from bench_search import file_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE_VECTORS = "baseline-vectors.faiss"  # the previous layout's ivfpq file, beside ours
OPEN_REPEATS = 3  # fresh processes opening each layout's index (figures: the median)
FILL_CHUNK = 50_000  # catalogue rows per Tx.add call
TX_ROWS = 250_000  # catalogue rows per transaction
T0 = 1_420_070_400.0  # 2015-01-01, the first fake photo
CAMERAS = [("Apple", "iPhone 13 Pro"), ("Canon", "Canon EOS 80D"), ("SONY", "ILCE-7M3"),
           ("samsung", "SM-G991B"), ("Google", "Pixel 7"), ("NIKON CORPORATION", "NIKON D750")]
FORMATS = [("JPEG", 4032, 3024), ("JPEG", 6000, 4000), ("HEIF", 4032, 3024), ("PNG", 1170, 2532)]


def fake_records(start: int, n: int) -> list[dict]:
    """Catalogue records of photos taken one every ~3 minutes from 2015, in year/month folders."""
    out = []
    for i in range(start, start + n):
        taken = T0 + 173.0 * i
        stamp = time.gmtime(taken)
        make, model = CAMERAS[i % len(CAMERAS)]
        fmt, width, height = FORMATS[(i // 7) % len(FORMATS)]
        ext = {"JPEG": "jpg", "HEIF": "heic", "PNG": "png"}[fmt]
        name = time.strftime("IMG_%Y%m%d_%H%M%S", stamp) + f"_{i % 1000:03d}.{ext}"
        out.append({"path": f"/home/user/Pictures/{stamp.tm_year}/{stamp.tm_mon:02d}/{name}",
                    "size": 1_500_000 + (i * 7919) % 4_000_000, "mtime": taken + 3600.0 + (i % 97) / 7,
                    "content_hash": f"{(i * 0x9E3779B97F4A7C15 + 12345) % 2**128:032x}",
                    "width": width, "height": height, "format": fmt,
                    "taken_at": None if i % 10 == 9 else taken, "camera_make": make, "camera_model": model})
    return out


def build_index(folder: Path, n: int, dim: int, seed: int = 0) -> dict:
    """The index folder of ``n`` fake images; returns its figures and the float16 baseline's."""
    import faiss

    from altsearch.catalog import Catalog
    from altsearch.store import CATALOG_FILE, VECTORS_FILE, IndexStore

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    source = ClusteredVectors(np.random.default_rng(seed), max(1, n // CLUSTER_SIZE), dim)
    baseline = Float16Catalog(folder / "baseline-schema1.sqlite")
    add_s = 0.0
    with Catalog(folder / CATALOG_FILE) as cat:
        with cat.transaction() as tx:
            tx.set_meta("model_id", "benchmark")
            tx.set_meta("dimension", str(dim))
        for start in range(0, n, TX_ROWS):
            with cat.transaction() as tx:
                for s in range(start, min(n, start + TX_ROWS), FILL_CHUNK):
                    m = min(FILL_CHUNK, n - s)
                    records, vecs = fake_records(s, m), source.sample(m)
                    t0 = time.perf_counter()
                    tx.add(records, vecs)
                    add_s += time.perf_counter() - t0
                    baseline.add(records, vecs, tx.generation)
    baseline.close()
    store = IndexStore(folder, create=False, device="cpu")
    try:
        t0 = time.perf_counter()
        index = store.rebuild("auto")
        build_s = time.perf_counter() - t0
        store.save_vectors()
        kind = index.kind
        if kind == "flat":  # the previous layout saved a flat index too: this FAISS index, float32
            baseline_vector_bytes = file_bytes(index._cpu)
        else:  # ... and kept a hashtable direct map in an approximate one
            index._cpu.set_direct_map_type(faiss.DirectMap.Hashtable)
            index.save(folder / BASELINE_VECTORS, generation=index.generation)
            baseline_vector_bytes = _pair_bytes(folder / BASELINE_VECTORS)
        del index
    finally:
        store.close()
    return {"n": n, "dim": dim, "kind": kind, "catalog_bytes": _checkpointed_size(folder / CATALOG_FILE),
            "vector_bytes": _pair_bytes(folder / VECTORS_FILE),
            "baseline_catalog_bytes": _checkpointed_size(baseline.path),
            "baseline_vector_bytes": baseline_vector_bytes, "add_rows_per_s": n / add_s, "build_s": build_s}


def _pair_bytes(path: Path) -> int:
    """Bytes of a saved vector index: the FAISS file and its header (0 when there is none)."""
    from altsearch.vectors import header_path

    return sum(f.stat().st_size for f in (path, header_path(path)) if f.exists())


class Float16Catalog:
    """The previous catalogue layout (schema 1: float16 vectors), written beside ours for the baseline:
    the same tables, indexes, page size and rows, only the vector encoding differs."""

    def __init__(self, path: Path) -> None:
        import sqlalchemy as sa

        from altsearch import catalog

        self.path = path
        self._con = sqlite3.connect(path, isolation_level=None)
        self._con.execute(f"PRAGMA page_size = {catalog.PAGE_SIZE}")
        self._con.execute("PRAGMA journal_mode = WAL")
        engine = sa.create_engine("sqlite://", creator=lambda: self._con)
        with engine.begin() as conn:
            catalog.metadata.create_all(conn)
        self._now = time.time()

    def add(self, records: list[dict], vecs: np.ndarray, generation: int) -> None:
        from altsearch.catalog import encode_path

        first = self._con.execute("SELECT coalesce(max(id), 0) + 1 FROM images").fetchone()[0]
        rows = [(first + j, encode_path(r["path"]), r["size"], r["mtime"], r["content_hash"], r["width"],
                 r["height"], r["format"], r["taken_at"], r["camera_make"], r["camera_model"], "ok", self._now)
                for j, r in enumerate(records)]
        half = np.ascontiguousarray(vecs, dtype="<f2")
        self._con.execute("BEGIN")
        self._con.executemany("INSERT INTO images (id, path, size, mtime, content_hash, width, height, format, "
                              "taken_at, camera_make, camera_model, status, added_at) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        self._con.executemany("INSERT INTO vectors (image_id, vector, generation) VALUES (?, ?, ?)",
                              [(first + j, row.tobytes(), generation) for j, row in enumerate(half)])
        self._con.execute("COMMIT")

    def close(self) -> None:
        self._con.close()


def _checkpointed_size(path: Path) -> int:
    """The file's size once its WAL is folded in (as it is after the last connection closes)."""
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


_RSS_PROBE = r"""
import json, sys, time
import numpy as np
from altsearch.store import IndexStore

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

dim = int(sys.argv[2])
query = np.random.default_rng(1).standard_normal((1, dim)).astype(np.float32)
query /= np.linalg.norm(query)
before = rss()
store = IndexStore(sys.argv[1], create=False, device="cpu")
t0 = time.perf_counter()
vectors = store.vectors
open_s = time.perf_counter() - t0
scores, ids = store.search(query, 10)
records = store.catalog.get(ids[0].tolist())
assert len(records) == 10, len(records)
print(json.dumps({"rss_growth": rss() - before, "vectors": len(vectors), "kind": vectors.kind, "open_s": open_s}))
"""

_BASELINE_OPEN_PROBE = r"""
import json, sys, time
from pathlib import Path
from altsearch import vectors

path = Path(sys.argv[1])
t0 = time.perf_counter()
header = vectors.read_header(path)
with path.open("rb") as f:  # as VectorIndex.load read a file before it dropped the id map
    vectors._verify(f, header, path)
    index = vectors._read_faiss(f, path)
print(json.dumps({"baseline_open_s": time.perf_counter() - t0, "baseline_id_map": index.direct_map.type}))
"""


def _probe(code: str, *args: str) -> dict:
    """The JSON line a fresh Python process running `code` prints last."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"a probe process failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_rss(folder: Path, dim: int) -> dict:
    """RSS growth of a fresh process that opens the index and answers one search (after its imports)."""
    return _probe(_RSS_PROBE, str(folder), str(dim))


def measure_opens(folder: Path, dim: int, repeats: int = OPEN_REPEATS) -> dict:
    """The probes, each `repeats` times, ours and the baseline's alternating once what the build
    wrote is on disk (writing it back would slow whichever came first); the median of each figure."""
    os.sync()
    ours, base = [], []
    for _ in range(repeats):
        ours.append(measure_rss(folder, dim))
        base.append(measure_baseline_open(folder))
    row = {**ours[0], **base[0]}
    for key in ("rss_growth", "open_s", "baseline_open_s"):
        values = [r[key] for r in ours + base if r.get(key) is not None]
        row[key] = float(np.median(values)) if values else None
    row["rss_growth"] = int(row["rss_growth"])
    return row


def measure_baseline_open(folder: Path) -> dict:
    """Seconds a fresh process takes to check and read the previous layout's ivfpq file, if any."""
    if not (folder / BASELINE_VECTORS).exists():
        return {"baseline_open_s": None}
    return _probe(_BASELINE_OPEN_PROBE, str(folder / BASELINE_VECTORS))


def fit(rows: list[dict], kind: str) -> tuple[float, float] | None:
    """(a, b) of total bytes/image = a + b / n, least squares over the rows of vector-file `kind`
    (another kind has another cost per image); None with fewer than two such sizes."""
    rows = [r for r in rows if r["kind"] == kind]
    if len({r["n"] for r in rows}) < 2:
        return None
    n = np.array([r["n"] for r in rows], np.float64)
    per = np.array([r["total_per_image"] for r in rows])
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), 1 / n], axis=1), per, rcond=None)
    return float(a), float(b)


def table_row(r: dict) -> str:
    return (f"| {r['n']:,} | {r['kind']} | {r['catalog_per_image']:,.0f} | {r['vector_per_image']:,.0f} | "
            f"{r['total_per_image']:,.0f} | {r['rss_per_image']:,.0f} | {r['open_s']:.2f} | "
            f"{'' if r['baseline_open_s'] is None else format(r['baseline_open_s'], '.2f')} | "
            f"{r['baseline_catalog_per_image']:,.0f} | {r['baseline_per_image']:,.0f} | {r['vs_baseline']:.2f} | "
            f"{r['f32_per_image']:,.0f} |")


def render(rows: list[dict], dim: int) -> str:
    lines = [f"bytes per indexed image, d={dim}", "",
             "| images | vector index | catalogue B/image | vector file B/image | total B/image | RSS B/image | "
             "open s | baseline open s | baseline catalogue B/image (fp16) | baseline total B/image | x baseline | "
             "f32 vectors B/image |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [table_row(r) for r in rows]
    lines.append("")
    lines.append("RSS = resident memory a fresh process gains opening the index (IndexStore) and answering one "
                 "search with its catalogue rows, / images; open s = its seconds to open the vector index (flat: "
                 "built from the catalogue; no file); baseline = the same rows with float16 catalogue vectors "
                 "(schema 1) + the vector file that layout saved (flat: float32; ivfpq: with a hashtable id map), "
                 "written in this run; baseline open s = a fresh process checking and reading that ivfpq file")
    from altsearch.vectors import kind_for

    big = kind_for(10_000_000)
    coef = fit(rows, big)
    if coef is None:
        lines.append(f"fit: fewer than two sizes with the {big} vector file that 10,000,000 images get; no extrapolation")
    else:
        a, b = coef
        lines.append(f"fit over the {big} rows: total bytes/image = {a:,.0f} {'-' if b < 0 else '+'} {abs(b):,.0f} / n; "
                     f"extrapolated (not measured) to 10,000,000 images: {a + b / 1e7:,.0f} B/image")
    for r in rows:
        lines.append(f"summary: {r['n']:,} images: {r['total_per_image']:,.0f} B/image on disk "
                     f"({r['catalog_per_image']:,.0f} catalogue + {r['vector_per_image']:,.0f} {r['kind']} vector "
                     f"file) = {r['vs_baseline']:.2f}x smaller than the float16 layout; {r['rss_per_image']:,.0f} "
                     f"B/image resident, the vector index opened in {r['open_s']:.2f} s"
                     + ("" if r["baseline_open_s"] is None else f" (previous layout: {r['baseline_open_s']:.2f} s)")
                     + "; Tx.add "
                     f"{r['add_rows_per_s']:,.0f} rows/s")
    return "\n".join(lines)


def run_size(n: int, dim: int, work: Path) -> dict:
    folder = work / f"bytes-{n}-d{dim}"
    print(f"filling {folder} ({n:,} images, d={dim}) ...", flush=True)
    try:
        row = build_index(folder, n, dim)
        row.update(measure_opens(folder, dim))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    total = row["catalog_bytes"] + row["vector_bytes"]
    baseline = row["baseline_catalog_bytes"] + row["baseline_vector_bytes"]
    row.update(catalog_per_image=row["catalog_bytes"] / n, vector_per_image=row["vector_bytes"] / n,
               total_per_image=total / n, rss_per_image=row["rss_growth"] / n,
               baseline_catalog_per_image=row["baseline_catalog_bytes"] / n, baseline_per_image=baseline / n,
               vs_baseline=baseline / total, f32_per_image=4.0 * dim)
    return row



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int_list(10), default=[10_000, 100_000, 1_000_000],
                   help="index sizes in images (default: 10000,100000,1000000)")
    p.add_argument("--dim", type=int, default=768, help="vector dimension (default: 768, AltCLIP's)")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary folder, removed)")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    if args.dim < 1:
        p.error("--dim must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    info = machine(argparse.Namespace(device="cpu", threads=0))
    print(render_machine(info), flush=True)
    rows = []
    with workdir(args.workdir, "bench-bytes-") as work:
        for n in args.sizes:
            rows.append(run_size(n, args.dim, work))
            print(table_row(rows[-1]), flush=True)
    info["loadavg_end"] = list(os.getloadavg())
    print("\n" + render_machine(info) + "\n\n" + render(rows, args.dim))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
