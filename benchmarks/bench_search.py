"""Vector search latency, recall@10 and bytes per vector: exact (flat) against approximate (ivf,
ivfpq with exact re-rank), on clustered embedding-like data, at 10k, 100k and 1M vectors.

For each of ``--sizes`` n, in one process:

1. Data (``make_data``): ``--clusters`` centres (default 4,000) and n + ``--queries`` points around
   them in ``--dim`` dimensions (default 768), unit length, stored as the catalogue stores vectors
   (int8 with a per-vector scale; the float32 values used everywhere are those int8 values times
   their scale). The data is anisotropic like real CLIP embeddings, whose variance is concentrated
   in a few directions and which share a common mean direction:
   - a per-dimension standard deviation ``(1 + j) ** -SPECTRUM_DECAY`` (j = 0..d-1) assigned to
     the dimensions in a shuffled order (FAISS PQ does not rotate, and real embeddings do not sort
     their variance by coordinate);
   - centres = spectrum-shaped Gaussian directions plus a common offset of norm ``OFFSET``,
     normalised (random pairs of points then have a cosine of about 0.4);
   - points = a uniformly chosen centre + ``SPREAD`` x spectrum-shaped Gaussian noise, normalised.
   The queries are the last ``--queries`` points: drawn the same way, held out of the index.
2. The ground truth: each query's exact top 10, found by a scan of the vectors a batch at a time
   (as float32, the int8 values times their scale).
3. Each of ``--kinds``, built by ``VectorIndex.from_catalog(kind=...)`` from the int8 vectors as a
   catalogue serves them (``Int8Vectors``), so as altsearch builds an index: a flat one batch by
   batch; an IVF kind trained on a sample, filled batch by batch, nprobe tuned (the build's seed is
   altsearch's, 0; ``--seed`` seeds the data). Build seconds; the process's peak resident memory
   during the build (the int8 data included); bytes per vector of the FAISS file (the serialised
   index over n); recall@10 over the queries; single-query latency p50/p95 over
   ``--latency-queries`` queries, one query per call, with 1 FAISS thread and with the default
   thread count (printed). Since ``VectorIndex.search`` runs a single query with one FAISS thread
   whatever the count set, the two columns now measure the same thing; figures from before that
   differ. The flat index is the baseline of the "x exact" ratios (exact p50 / this p50). With
   ``--device cuda`` each index searches where altsearch would put it (column "searched on"): on
   FAISS's GPU build when there is one; else the flat index on torch's GPU and the IVF kinds on
   the CPU. "ivfpq" searches re-rank their candidates against the int8 vectors held in a numpy
   array in memory (``refine``), so its latency includes the re-rank.
4. ``--store-size`` (default 10,000; 0 skips): the same through ``IndexStore``: a catalogue filled
   with n rows, the index rebuilt as flat and as ivfpq, and ``IndexStore.search`` timed, where the
   re-rank reads the candidates' vectors from the catalogue (SQLite) instead of memory. Also
   prints the catalogue's bytes per image.

A size whose int8 data would not fit in the available memory is skipped, with the reason printed,
and so is a kind whose index would not fit beside it: the data takes n x d bytes (7.7 GB at 10M x
768), a flat or ivf index 4 bytes per component more (31 GB at 10M), an ivfpq index about 150
bytes per vector: at 10M x 768 the ivfpq build peaked at 10.1 GB resident, the data included.
Figures depend on the machine's load: the load average is printed with each table.

Run from the repository root (tests/test_bench_search.py runs a tiny configuration):

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_search.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_search.py --sizes 50000,100000,200000 --kinds flat,ivfpq
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_query import CLUSTER_SIZE, ClusteredVectors  # noqa: E402
from benchlib import cpu_name  # noqa: E402

from altsearch.sysmem import available_memory  # noqa: E402

SPECTRUM_DECAY = 0.5  # per-dimension std (1 + j) ** -0.5: variance ~ 1 / (1 + j)
OFFSET = 1.0  # norm of the common mean direction added to the (unit) centres
SPREAD = 0.6  # noise scale around a centre (the noise has the centres' spectrum, unit norm at 1.0)
DATA_CHUNK = 65536  # vectors drawn per generator (make_data)


def make_data(n: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes (n, dim), float32 scales (n,)) of unit vectors clustered as the docstring says;
    vector i is codes[i] * scales[i]."""
    rng = np.random.default_rng(seed)
    sigma = (1.0 + np.arange(dim)) ** -SPECTRUM_DECAY
    sigma = (sigma / np.linalg.norm(sigma))[rng.permutation(dim)].astype(np.float32)
    mean = rng.standard_normal(dim).astype(np.float32) * sigma
    centres = rng.standard_normal((clusters, dim)).astype(np.float32) * sigma
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    centres += OFFSET * mean / np.linalg.norm(mean)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    codes = np.empty((n, dim), np.int8)
    scales = np.empty(n, np.float32)
    starts = range(0, n, DATA_CHUNK)

    def chunk(start: int, seed: np.random.SeedSequence) -> None:
        part = np.random.default_rng(seed)
        m = min(n, start + DATA_CHUNK) - start
        x = centres[part.integers(0, clusters, m)] + SPREAD * part.standard_normal((m, dim), np.float32) * sigma
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        scale = np.abs(x).max(axis=1) / 127.0
        codes[start : start + m] = np.round(x / scale[:, None])
        scales[start : start + m] = scale

    # Chunk i draws from its own generator (seeded from `seed` and i), so the data does not depend on
    # the thread count; numpy releases the GIL while it draws and computes, so the chunks run in
    # parallel: 10M x 768 took ~5.5 minutes on one thread.
    with ThreadPoolExecutor(max(1, min(len(starts), os.cpu_count() or 1))) as pool:
        list(pool.map(chunk, starts, np.random.SeedSequence([seed, 1]).spawn(len(starts))))
    return codes, scales


def make_latent_data(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, float32 scales) as ``make_data`` gives them, of bench_query's vectors instead: n //
    CLUSTER_SIZE clusters on a 32-d subspace, denser as n grows, so that at millions of vectors many
    have near-twins (as burst shots and copies do) that PQ codes cannot tell apart."""
    source = ClusteredVectors(np.random.default_rng(seed), max(1, n // CLUSTER_SIZE), dim)
    codes = np.empty((n, dim), np.int8)
    scales = np.empty(n, np.float32)
    for start in range(0, n, DATA_CHUNK):
        x = source.sample(min(n, start + DATA_CHUNK) - start)
        scale = np.abs(x).max(axis=1) / 127.0
        codes[start : start + len(x)] = np.round(x / scale[:, None])
        scales[start : start + len(x)] = scale
    return codes, scales


def as_float(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scales[:, None]


class Int8Vectors:
    """Vectors 0..n-1 held as the catalogue holds them (int8 codes, a float32 scale each), read through
    the interface ``VectorIndex.from_catalog`` reads a catalogue by (``vectors.VectorSource``): the
    indexes are built as altsearch builds them, batch by batch, without every vector as float32."""

    generation = 0
    catalog_id = "bench"

    def __init__(self, codes: np.ndarray, scales: np.ndarray) -> None:
        self.codes, self.scales = codes, scales
        self.dimension = codes.shape[1]

    def vector_ids(self, *, changed_since: int | None = None) -> np.ndarray:
        return np.arange(len(self.codes), dtype=np.int64)

    def removed_ids(self, *, since: int) -> np.ndarray:
        return np.empty(0, dtype=np.int64)  # never changes

    def iter_vectors(self, batch: int = 65536, ids: np.ndarray | None = None):
        if ids is None:
            for start in range(0, len(self.codes), batch):
                stop = min(len(self.codes), start + batch)
                yield np.arange(start, stop, dtype=np.int64), as_float(self.codes[start:stop], self.scales[start:stop])
            return
        wanted = np.unique(np.asarray(ids, dtype=np.int64))
        wanted = wanted[(wanted >= 0) & (wanted < len(self.codes))]
        for start in range(0, len(wanted), batch):
            part = wanted[start : start + batch]
            yield part, as_float(self.codes[part], self.scales[part])

    def refine(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The true vectors of these ids (a vectors.Refine: the search's re-rank reads them here)."""
        return ids, as_float(self.codes[ids], self.scales[ids])


def exact_top(queries: np.ndarray, source: Int8Vectors, k: int = 10) -> np.ndarray:
    """The ids of each query's exact top k (inner product), scanning the vectors a batch at a time."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vecs in source.iter_vectors(batch=65536):
        scores, positions = faiss.knn(queries, vecs, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, ids[positions])
    heap.finalize()
    return heap.I


def index_bytes(kind: str, n: int, dim: int) -> int:
    """About what an index of `kind` over n vectors holds in memory (float32 vectors; ivfpq: codes and
    ids, and the spare capacity of lists grown while building)."""
    from altsearch.vectors import pq_m_for

    return n * dim * 4 if kind in ("flat", "ivf") else n * (pq_m_for(dim) + 8 + 48)


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident size (Linux: VmHWM), so that the next `_peak_rss` is the peak
    since now; False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_bytes(path: str, key: str) -> int | None:
    """The figure ``key`` of a /proc file that gives it in kB (meminfo, status), in bytes; None where
    there is no such file."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int | None:
    return _proc_bytes("/proc/self/status", "VmHWM")


def file_bytes(index) -> int:
    """Size of the FAISS file of `index`, counted while serialising it (nothing kept)."""
    import faiss

    total = 0

    def count(data: bytes) -> int:
        nonlocal total
        total += len(data)
        return len(data)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total


def latency(search, queries: np.ndarray, threads: int) -> tuple[float, float]:
    """(p50, p95) seconds of search(one query) over the queries, with `threads` FAISS threads."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        search(queries[:1])  # warm-up
        times = []
        for q in queries:
            start = time.perf_counter()
            search(q[None, :])
            times.append(time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(before)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def bench_size(n: int, args: argparse.Namespace, threads: int) -> dict:
    from altsearch.vectors import VectorIndex, recall_at_k

    need = (n + args.queries) * args.dim  # the int8 data (the indexes are checked one by one below)
    have = available_memory()
    if have is not None and need > 0.8 * have:
        return {"n": n, "skipped": f"needs ~{need / 1e9:.0f} GB of memory, {have / 1e9:.0f} GB available"}
    start = time.perf_counter()
    if args.data == "latent":
        codes, scales = make_latent_data(n + args.queries, args.dim, args.seed)
    else:
        codes, scales = make_data(n + args.queries, args.dim, args.clusters, args.seed)
    queries = as_float(codes[n:], scales[n:])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    source = Int8Vectors(codes[:n], scales[:n])
    made_s = time.perf_counter() - start
    start = time.perf_counter()
    truth = exact_top(queries, source)
    truth_s = time.perf_counter() - start
    lat_q = queries[: args.latency_queries]
    rows = []
    exact = {}
    for kind in args.kinds:
        need, have = index_bytes(kind, n, args.dim), available_memory()
        if have is not None and need > 0.8 * have:
            rows.append({"kind": kind, "skipped": f"needs ~{need / 1e9:.0f} GB more memory, {have / 1e9:.0f} GB available"})
            continue
        measured_peak = _reset_peak_rss()
        start = time.perf_counter()
        index = VectorIndex.from_catalog(source, kind=kind, device=args.device)
        build_s = time.perf_counter() - start
        peak = _peak_rss() if measured_peak else None
        refine = source.refine if kind == "ivfpq" else None
        _, found = index.search(queries, 10, refine=refine)
        row = {
            "kind": kind, "build_s": build_s, "bytes_per_vector": file_bytes(index._cpu) / n,
            "nlist": index.nlist, "nprobe": index.nprobe, "rerank": index.rerank,
            "recall_at_10": recall_at_k(truth, found, 10), "searched_on": index.device, "build_peak_rss": peak,
        }  # fmt: skip
        rows.append(time_searches(row, index, refine, lat_q, threads))
        if kind == "flat":
            exact.update({label: row[f"p50_{label}"] for label in ("1", "n")})
        if kind == "ivfpq":
            rows.append(narrowest_width(index, source, queries, truth, lat_q, threads))
        del index
    for row in rows:
        for label in ("1", "n"):
            if "skipped" not in row:
                row[f"x_exact_{label}"] = exact[label] / row[f"p50_{label}"] if label in exact else None
    return {"n": n, "dim": args.dim, "data_s": made_s, "truth_s": truth_s, "data_bytes": codes.nbytes + scales.nbytes,
            "threads": threads, "rows": rows, "load": os.getloadavg()}  # fmt: skip


def time_searches(row: dict, index, refine, queries: np.ndarray, threads: int) -> dict:
    for label, t in (("1", 1), ("n", threads)):
        row[f"p50_{label}"], row[f"p95_{label}"] = latency(lambda q: index.search(q, 10, refine=refine), queries, t)
    return row


def narrowest_width(index, source: Int8Vectors, queries: np.ndarray, truth: np.ndarray, lat_q: np.ndarray,
                    threads: int) -> dict:
    """The baseline of the re-rank width's tuning: the same ivfpq index with nprobe tuned as altsearch
    tuned it before, for the narrowest width alone (on TUNE_QUERIES probe queries made as the build
    makes them, with their own exact top 10)."""
    from altsearch import vectors
    from altsearch.vectors import recall_at_k

    rng = np.random.default_rng(1)
    n = len(source.codes)
    probe = vectors._probe_queries(source.refine, n, rng)  # ids are positions here
    start = time.perf_counter()
    tuned = index._cpu.nprobe, index.rerank
    nprobe, width = vectors._tune(index._cpu, exact_top(probe, source), probe, source.refine,
                                  widths=vectors.RERANK_WIDTHS[:1])
    tune_s = time.perf_counter() - start
    index._cpu.nprobe, index.rerank = nprobe, width
    try:
        _, found = index.search(queries, 10, refine=source.refine)
        row = {"kind": "ivfpq", "baseline": True, "build_s": tune_s, "bytes_per_vector": None, "nlist": index.nlist,
               "nprobe": nprobe, "rerank": width, "recall_at_10": recall_at_k(truth, found, 10),
               "searched_on": index.device, "build_peak_rss": None}
        return time_searches(row, index, source.refine, lat_q, threads)
    finally:
        index._cpu.nprobe, index.rerank = tuned


def bench_store(n: int, args: argparse.Namespace) -> dict:
    """IndexStore.search at n vectors, flat and ivfpq (re-ranking from the catalogue)."""
    from altsearch.store import CATALOG_FILE, IndexStore

    codes, scales = make_data(n + args.latency_queries, args.dim, args.clusters, args.seed)
    queries = as_float(codes[n:], scales[n:])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    out: dict = {"n": n, "dim": args.dim}
    with tempfile.TemporaryDirectory() as tmp:
        store = IndexStore(Path(tmp), device=args.device)
        store.bind_model("bench", "bench", args.dim)
        start = time.perf_counter()
        for s in range(0, n, 50_000):
            part = as_float(codes[s : min(n, s + 50_000)], scales[s : min(n, s + 50_000)])
            records = [{"path": f"/photos/{i:08}.jpg", "size": 1, "mtime": 1.0, "content_hash": f"{i}"}
                       for i in range(s, s + len(part))]
            with store.catalog.transaction() as tx:
                tx.add(records, part)
        out["fill_s"] = time.perf_counter() - start
        for kind in ("flat", "ivfpq"):
            index = store.rebuild(kind)
            out[f"{kind}_p50"], out[f"{kind}_p95"] = latency(lambda q: store.search(q, 10), queries, 1)
            if kind == "ivfpq":
                out["pq_only_p50"], _ = latency(lambda q: index.search(q, 10), queries, 1)
        store.close()  # the last connection checkpoints the WAL into the file
        out["catalog_bytes_per_image"] = sum(p.stat().st_size for p in Path(tmp).glob(CATALOG_FILE + "*")) / n
    out["load"] = os.getloadavg()
    return out


def print_size(result: dict) -> None:
    n = result["n"]
    if "skipped" in result:
        print(f"\n### {n:,} vectors: skipped ({result['skipped']})")
        return
    t = result["threads"]
    print(f"\n### {n:,} x {result['dim']} (data made in {result['data_s']:.1f} s, {result['data_bytes'] / 1e9:.2f} GB "
          f"as int8; exact top 10 of the queries by a scan, {result['truth_s']:.1f} s; "
          f"load average {result['load'][0]:.1f}, {result['load'][1]:.1f}, {result['load'][2]:.1f})\n")
    print(f"| kind | searched on | build s | build peak RSS GB | bytes/vector | nlist | nprobe | re-rank | recall@10 "
          f"| p50 ms (1 thr) | p95 ms (1 thr) | x exact (1 thr) | p50 ms ({t} thr) | p95 ms ({t} thr) | x exact ({t} thr) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        name = "ivfpq + re-rank" if r["kind"] == "ivfpq" else r["kind"]
        if r.get("baseline"):
            name += ", tuned for the narrowest width only (before)"
        if "skipped" in r:
            print(f"| {name} | skipped: {r['skipped']} |" + " |" * 13)
            continue
        ratio = ["-" if r[f"x_exact_{x}"] is None else f"{r[f'x_exact_{x}']:.1f}" for x in ("1", "n")]
        peak = "-" if r["build_peak_rss"] is None else f"{r['build_peak_rss'] / 1e9:.2f}"
        size = "-" if r["bytes_per_vector"] is None else f"{r['bytes_per_vector']:.0f}"
        print(f"| {name} | {r['searched_on']} | {r['build_s']:.1f} | {peak} | {size} | {r['nlist']} "
              f"| {r['nprobe']} | {r['rerank'] or '-'} | {r['recall_at_10']:.3f} | {r['p50_1'] * 1e3:.2f} "
              f"| {r['p95_1'] * 1e3:.2f} | {ratio[0]} | {r['p50_n'] * 1e3:.2f} | {r['p95_n'] * 1e3:.2f} | {ratio[1]} |")
    print("\nbuild peak RSS: the process's peak resident memory while the index was built, the int8 data included; "
          "re-rank: the candidates an ivfpq search re-ranks for a top 10, tuned with nprobe; the \"before\" row is "
          "the same index with nprobe tuned for the narrowest width alone, as altsearch did before (its build s: "
          "that tuning's seconds)")
    tuned = [r for r in result["rows"] if r["kind"] == "ivfpq" and "skipped" not in r]
    if len(tuned) == 2:
        now, before = tuned
        print(f"\nre-rank width tuned: recall@10 {now['recall_at_10']:.3f} against {before['recall_at_10']:.3f}, "
              f"p50 {now['p50_1'] * 1e3:.2f} against {before['p50_1'] * 1e3:.2f} ms "
              f"(before / now: {before['p50_1'] / now['p50_1']:.2f}x)")


def print_store(result: dict) -> None:
    print(f"\n### Through IndexStore: {result['n']:,} x {result['dim']}, 1 thread "
          f"(load average {result['load'][0]:.1f}); catalogue filled in {result['fill_s']:.1f} s, "
          f"{result['catalog_bytes_per_image']:.0f} bytes/image\n")
    print("| search | p50 ms | p95 ms |")
    print("|---|---:|---:|")
    print(f"| IndexStore.search, flat | {result['flat_p50'] * 1e3:.2f} | {result['flat_p95'] * 1e3:.2f} |")
    print(f"| IndexStore.search, ivfpq, re-rank from the catalogue | {result['ivfpq_p50'] * 1e3:.2f} "
          f"| {result['ivfpq_p95'] * 1e3:.2f} |")
    print(f"| VectorIndex.search, ivfpq, PQ scores only (no re-rank) | {result['pq_only_p50'] * 1e3:.2f} | |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated vector counts")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--kinds", default="flat,ivf,ivfpq", help="comma-separated; flat is the baseline")
    parser.add_argument("--clusters", type=int, default=4000, help="centres of the spectrum data")
    parser.add_argument("--data", choices=("spectrum", "latent"), default="spectrum",
                        help="spectrum (make_data) or latent: bench_query's vectors, n / 500 clusters on a 32-d "
                             "subspace, with the near-twins of a dense collection")
    parser.add_argument("--queries", type=int, default=200, help="held-out queries for recall@10")
    parser.add_argument("--latency-queries", type=int, default=50, help="single queries timed per row")
    parser.add_argument("--store-size", type=int, default=10_000, help="IndexStore run at this size; 0 skips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), or auto / cuda / cuda:N: search where altsearch would on that device")
    parser.add_argument("--json", action="store_true", help="print the results as JSON as well")
    args = parser.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    if "flat" not in args.kinds:
        args.kinds.insert(0, "flat")  # the baseline of every ratio
    args.latency_queries = min(args.latency_queries, args.queries)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    import faiss

    if args.device != "cpu":
        import torch  # noqa: F401 - an exact index searches on torch's GPU only where torch is loaded

    threads = faiss.omp_get_max_threads()
    print(f"# bench_search: {cpu_name()}, {os.cpu_count()} cores, "
          f"faiss {faiss.__version__}, {threads} FAISS threads by default, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, device {args.device}")
    results = {"sizes": [], "store": None}
    for n in (int(s) for s in args.sizes.split(",") if s):
        result = bench_size(n, args, threads)
        print_size(result)
        results["sizes"].append(result)
    if args.store_size:
        results["store"] = bench_store(args.store_size, args)
        print_store(results["store"])
    if args.json:
        print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
