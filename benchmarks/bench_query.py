"""Text-query latency of altsearch, warm and cold, each beside a baseline measured in the same run.

Index folders of ``--sizes`` fake images (default 10k and 1M) are filled without running the model:
catalogue rows through ``Catalog.transaction()`` / ``Tx.add`` (fake paths, unit vectors in clusters
on a 32-d subspace, of the model's dimension), then the vector file through ``Engine.optimize()``
(exact search while small, approximate when large, as the library picks). They are cached in
``--workdir`` with a float32 ``.npy`` copy of the same vectors for the naive baseline.

The model is ``--model tiny`` (the tests' tiny random checkpoint: the encoder costs ~1 ms, so what
search and the catalogue add shows; 24-d vectors), ``tiny768`` (the same towers projecting to
AltCLIP's 768 dimensions: search, catching up and storage at the real vector size), ``tiny-xlmr``
(tiny768 with the real XLM-R tokenizer from ../shared/data/xlm-roberta), ``full`` (a
random checkpoint of the full BAAI/AltCLIP architecture, 3.46 GB, written by
benchmarks/bench_model.py's writer, with the real XLM-R tokenizer from ../shared/data/xlm-roberta)
or a checkpoint folder.

1. Warm, in this process after a first query, in a long-lived process's steady state (the whole
   tokenizer model built, the text weights packed where oneDNN runs: ``Model.pack``):
   ``Engine.search(text, k)`` p50/p95 against the text
   encoder alone (``model.encode_text([text])``, the baseline), the two interleaved query by query;
   ratio = search p50 / encoder p50 (target <= 1.2). Beside it, what one query spends in each other
   step: parsing, tokenizing, the vector search, the catalogue join (``Catalog.get`` of the hits)
   and the check for changes made by other processes (``IndexStore.refresh``).
2. Catching up with another process: each round, another connection commits a chunk of
   CATCH_UP_CHUNK new images (rows and vectors in one transaction, as an indexing run's writer does)
   and removes CATCH_UP_REMOVED images of earlier chunks (deleted files), then this process answers a
   query, which first brings its vector index up to date. Ours (the catalogue's removal log names
   what went) against the same with every id listed on both sides (what altsearch did after a removal
   before the log: the baseline), the two alternating round by round; ratio = baseline p50 / ours.
   The rows are removed afterwards and the vector file saved, so a cached folder stays as it was.
3. Filtered, in this process: a query whose date filter matches FILTER_SHARES of the images, the first
   time with that filter and repeated, against the same query unfiltered (the baseline), interleaved;
   ratios = filtered p50 / unfiltered p50. On an approximate index a new filter is first applied to
   the candidates of an unfiltered search (one catalogue lookup by id); where it leaves too few, as
   the 1 % filter does, its ids are read from the catalogue, and the engine keeps them and their
   FAISS selector for the repeated query until the catalogue changes. Then recall@10 of "more like
   this" queries (``#id``: a stored image's vector) with that filter, each new to the engine, against
   a brute-force search of the images it allows (the stored vectors beside the index), as the engine
   answers them and with the filter's ids read first (``POST_FILTER_DEPTH`` set to 0), the baseline.
4. Cold, fresh processes, median of ``--cold-repeats`` with the kinds interleaved, wall and CPU
   seconds: ``python -c "import torch"`` (the floor of any PyTorch tool), ``python -m altsearch
   search TEXT --index DIR --json`` (ours), the same with ``ALTSEARCH_PIECE_TABLE=0`` (the whole
   tokenizer model built, as before the piece table; the answers must be the same) and a naive script
   (``transformers`` AltCLIPModel.from_pretrained + XLMRobertaTokenizer.from_pretrained +
   get_text_features + numpy brute force over the .npy copy); ratios = whole / ours and naive / ours
   (above 1: ours answers sooner). One ``altsearch search`` with an empty cache is timed apart before
   the rounds: the first query with a tokenizer file on a machine writes its piece table. Use
   ``--model tiny-xlmr`` or ``full`` for the real tokenizer's 250,002 pieces. Then where a cold
   query's time goes: one instrumented fresh process timing each step through the public API, and
   ``python -X importtime -m altsearch search ...`` per imported package.

Run from the repository root (opt-in; tests/test_bench_query.py runs a tiny configuration):

    .venv/bin/python benchmarks/bench_query.py --workdir /tmp/bench-query --sizes 10000
    .venv/bin/python benchmarks/bench_query.py --workdir /tmp/bench-query --model full --sizes 10000

Timings on a shared machine move with its load: the load average is printed with the tables, and
CPU seconds beside wall seconds.
"""

from __future__ import annotations

import os

# As the CLI does: torch's and FAISS's OpenMP threads must not busy-wait against each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkpoints come from tests/checkpoints.py and bench_model.py
sys.path.insert(1, str(ROOT / "benchmarks"))
from benchlib import checkpoint_folder, cpu_name, int_list, loadavg, made_before, run_in_workdir  # noqa: E402

# altsearch.model.tokenizer.PIECES_ENV, spelled here: importing that module imports torch, which the
# instrumented cold child must time itself (tests/test_bench_query.py checks the two agree)
PIECES_ENV = "ALTSEARCH_PIECE_TABLE"

# Queries made of words and characters the tiny tokenizer knows (any text works with a real model).
QUERIES = [
    "sunset over the sea", "海边的日落", "a cat on the beach", "一只猫", "snow mountain at night",
    "城市夜晚", "red flower", "a dog in the snow", "green tree in the city", "blue car", "山 photo",
    "people on the beach + sunset",
]
FILL_CHUNK = 50_000  # catalogue rows per Tx.add call
TX_ROWS = 250_000  # catalogue rows per transaction
CLUSTER_SIZE = 500  # vectors per cluster, on average
CLUSTER_SPREAD = 0.75  # noise norm around a cluster centre: cosine to the centre ~ 0.8
LATENT_DIM = 32  # clusters lie on a subspace of this many dimensions, as real embeddings roughly do
INDEX_FORMAT = 1  # bump when the fill changes, so cached index folders are rebuilt
T0 = 1_600_000_000.0  # fake capture times start here (2020-09-13)
CATCH_UP_CHUNK = 512  # images per committed chunk, as altsearch.ingest.Indexer commits them
CATCH_UP_FIRST = 10**9  # their fake records are numbered from here, past any folder's own
CATCH_UP_REMOVED = 64  # images of earlier chunks each commit removes
FILTER_SHARES = (0.01, 0.5, 0.9, 1.0)  # of the images a date filter matches, in the filtered table
SHOWN_PACKAGES = 12  # the packages that took longest to import, in the import summary

# The naive cold baseline: what a script built on transformers does for one query.
NAIVE = """\
import json, resource, sys
import numpy as np
import torch
from transformers import AltCLIPModel, XLMRobertaTokenizer
ckpt, ids_file, vectors_file, query, k = sys.argv[1:5] + [int(sys.argv[5])]
model = AltCLIPModel.from_pretrained(ckpt).eval()
tokenizer = XLMRobertaTokenizer.from_pretrained(ckpt)
with torch.inference_mode():
    batch = tokenizer([query], padding=True, truncation=True, max_length=77, return_tensors="pt")
    out = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
q = getattr(out, "pooler_output", out)[0].float().numpy()
q /= np.linalg.norm(q)
ids, vectors = np.load(ids_file), np.load(vectors_file)
scores = vectors @ q
top = np.argpartition(-scores, k - 1)[:k]
top = top[np.argsort(-scores[top])]
print(json.dumps({"ids": ids[top].tolist(), "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


# -- models -----------------------------------------------------------------------------------------






def model_identity(folder: Path) -> dict:
    """What an index records about its model (read without loading any tower)."""
    from altsearch import load_model

    model = load_model(folder, device="cpu")
    return {"source": str(folder), "model_id": model.source, "fingerprint": model.fingerprint,
            "dimension": model.dimension}


# -- index folders ----------------------------------------------------------------------------------


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class ClusteredVectors:
    """Unit vectors in ``clusters`` clusters on a random ``min(dim, LATENT_DIM)``-d subspace."""

    def __init__(self, rng: np.random.Generator, clusters: int, dim: int):
        self.rng = rng
        latent = min(dim, LATENT_DIM)
        self.centers = _unit_rows(rng.standard_normal((clusters, latent), dtype=np.float32))
        self.basis = None
        if latent < dim:  # orthonormal rows (latent, dim): an isometry into the full space
            q, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
            self.basis = np.ascontiguousarray(q.T, dtype=np.float32)

    def sample(self, n: int) -> np.ndarray:
        """(n, dim) float32 unit vectors."""
        latent = self.centers.shape[1]
        x = self.centers[self.rng.integers(0, len(self.centers), n)]
        x += self.rng.standard_normal((n, latent), dtype=np.float32) * np.float32(CLUSTER_SPREAD / np.sqrt(latent))
        x = _unit_rows(x)
        return x if self.basis is None else _unit_rows(x @ self.basis)


def fake_records(start: int, n: int) -> list[dict]:
    return [{"path": f"/bench/photos/{2000 + i % 25}/{i // 1000:04d}/IMG_{i:08d}.jpg",
             "size": 2_000_000 + (i * 7919) % 3_000_000, "mtime": T0 + 60.0 * i,
             "content_hash": f"{i:032x}", "width": 4000, "height": 3000, "format": "JPEG",
             "taken_at": T0 + 60.0 * i, "camera_make": "Benchmark", "camera_model": "Synthetic 12MP"}
            for i in range(start, start + n)]


def build_index(folder: Path, n: int, model: dict, seed: int = 0) -> dict:
    """An index folder of ``n`` fake images that ``Engine.open(folder, create=False)`` takes as it is,
    plus ``ids.npy`` / ``vectors.npy`` beside it: the same vectors, as the catalogue stores them."""
    from altsearch import Engine
    from altsearch.catalog import Catalog, as_stored
    from altsearch.store import CATALOG_FILE

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    dim = model["dimension"]
    rng = np.random.default_rng(seed)
    source = ClusteredVectors(rng, max(1, n // CLUSTER_SIZE), dim)
    ids = np.empty(n, np.int64)
    stored = np.lib.format.open_memmap(folder.parent / f"{folder.name}-vectors.npy", "w+", np.float32, (n, dim))
    t0 = time.perf_counter()
    with Catalog(folder / CATALOG_FILE) as cat:
        with cat.transaction() as tx:
            tx.set_meta("model_id", model["model_id"])
            tx.set_meta("model_fingerprint", model["fingerprint"])
            tx.set_meta("dimension", str(dim))
        for start in range(0, n, TX_ROWS):
            with cat.transaction() as tx:
                for s in range(start, min(n, start + TX_ROWS), FILL_CHUNK):
                    m = min(FILL_CHUNK, n - s)
                    vecs = source.sample(m)
                    ids[s:s + m] = tx.add(fake_records(s, m), vecs)
                    stored[s:s + m] = as_stored(vecs)
    fill_s = time.perf_counter() - t0
    stored.flush()
    del stored
    np.save(folder.parent / f"{folder.name}-ids.npy", ids)
    t0 = time.perf_counter()
    with Engine.open(folder, model=model["source"], device="cpu", create=False) as engine:
        built = engine.optimize("auto")
    return {"fill_s": fill_s, "build_s": time.perf_counter() - t0, "kind": built["kind"]}


def cached_index(work: Path, n: int, model: dict) -> tuple[Path, dict]:
    """The index folder for (n, model) in ``work``, built unless a complete one is there."""
    folder = work / f"index-{n}-{model['fingerprint']}"
    spec_file = folder.with_name(folder.name + ".json")
    want = {"n": n, "fingerprint": model["fingerprint"], "format": INDEX_FORMAT}
    if (info := made_before(spec_file, want, folder)) is not None:
        return folder, {**info, "cached": True}
    print(f"filling {folder} ({n:,} vectors, d={model['dimension']}) ...", flush=True)
    info = {**want, **build_index(folder, n, model)}
    spec_file.write_text(json.dumps(info, indent=1))
    return folder, {**info, "cached": False}


# -- warm -------------------------------------------------------------------------------------------


def _ms(values: list[float], q: float = 50) -> float:
    return 1e3 * float(np.percentile(values, q))


def measure_warm(folder: Path, model: dict, args: argparse.Namespace) -> dict:
    """Warm latencies in this process: search vs the encoder alone, interleaved, and the other steps."""
    from altsearch import Engine
    from altsearch.query import parse_query

    with Engine.open(folder, model=model["source"], device=args.device, create=False) as engine:
        t0 = time.perf_counter()
        first = engine.search(QUERIES[0], k=args.k)
        first_s = time.perf_counter() - t0
        if len(first) != args.k:
            raise SystemExit(f"search in {folder} returned {len(first)} hits, expected {args.k}")
        encoder = engine.model
        # The steady state of a long-lived process, which builds the whole tokenizer model after its
        # first tokenizer.PIECES_CALLS calls (the piece table answers those: the cold table's case).
        encoder.tokenizer.load()
        # ... and packs its text weights after its first Model.PACK_CALLS queries (where oneDNN runs).
        encoder.pack(["text"])
        store = engine.store
        vectors = store.vectors
        steps: dict[str, list[float]] = {name: [] for name in (
            "search", "encoder", "search_cpu", "encoder_cpu", "parse", "tokenize", "vector_search", "join",
            "refresh")}

        def timed(name: str, fn, cpu: bool = False):
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            steps[name].append(time.perf_counter() - t0)
            if cpu:
                steps[name + "_cpu"].append(time.process_time() - c0)
            return out

        for i in range(args.queries):
            q = QUERIES[(i + 1) % len(QUERIES)]
            hits = timed("search", lambda: engine.search(q, k=args.k), cpu=True)
            vec = timed("encoder", lambda: encoder.encode_text([q]), cpu=True)
            timed("parse", lambda: parse_query(q))
            timed("tokenize", lambda: encoder.tokenizer.encode([q]))
            timed("vector_search", lambda: vectors.search(vec, args.k))
            timed("join", lambda: store.catalog.get([h.id for h in hits]))
            timed("refresh", store.refresh)
        towers = list(encoder.loaded_towers)
        searched_on = vectors.device
    out = {"first_s": first_s, "towers_loaded": towers, "searched_on": searched_on,
           "packed_layers": dict(encoder.packed_layers), "pack_s": encoder.load_seconds.get("text_pack")}
    for name, values in steps.items():
        out[f"{name}_p50_ms"] = _ms(values)
        out[f"{name}_p95_ms"] = _ms(values, 95)
    out["ratio"] = out["search_p50_ms"] / out["encoder_p50_ms"]
    out["cpu_ratio"] = out["search_cpu_p50_ms"] / out["encoder_cpu_p50_ms"]
    return out


def measure_filtered(folder: Path, model: dict, args: argparse.Namespace) -> list[dict]:
    """Queries with a date filter, the first time with it and repeated, against the same query unfiltered."""
    from altsearch import Engine

    from altsearch import engine as engine_module
    from altsearch.vectors import exact_search, recall_at_k

    rows = []
    stored_ids = np.load(folder.parent / f"{folder.name}-ids.npy")  # image j (row j) was taken at T0 + 60 j
    stored = np.load(folder.parent / f"{folder.name}-vectors.npy", mmap_mode="r")
    with Engine.open(folder, model=model["source"], device=args.device, create=False) as engine:
        n = engine.stats()["images"]
        engine.search(QUERIES[0], k=args.k)  # loaded and warm
        for share in FILTER_SHARES:
            times: dict[str, list[float]] = {"unfiltered": [], "first": [], "repeated": []}
            for i in range(args.catch_up_rounds):
                q = QUERIES[i % len(QUERIES)]
                # each round's filter ends a millisecond later, so it is new to the engine and matches the
                # same images: rows 0 to round(n * share) - 1
                where = {"taken_from": T0, "taken_to": T0 + 60.0 * round(n * share) - 59.5 + i * 1e-3}
                for way in ("unfiltered", "first", "repeated"):
                    t0 = time.perf_counter()
                    hits = engine.search(q, k=args.k, **({} if way == "unfiltered" else where))
                    times[way].append(time.perf_counter() - t0)
                    if way != "unfiltered" and any(not T0 <= h.taken_at < where["taken_to"] for h in hits):
                        raise SystemExit("a filtered query returned an image outside its dates")
            # recall: "more like this" queries ("#id": a stored image's vector, itself left out), each
            # with a filter new to the engine, against a brute-force search of the rows it allows
            # (and the same with the filter's ids read first, as an engine did before it tried the search first)
            allowed_rows = round(n * share)
            picks = np.random.default_rng(allowed_rows).choice(n, args.catch_up_rounds)
            got, got_read = [], []
            for i, j in enumerate(picks):
                for depth, into in ((engine_module.POST_FILTER_DEPTH, got), (0, got_read)):
                    new = (100 + 2 * i + (depth == 0)) * 1e-3  # a filter new to the engine, as above
                    where = {"taken_from": T0, "taken_to": T0 + 60.0 * allowed_rows - 59.5 + new}
                    real_depth, engine_module.POST_FILTER_DEPTH = engine_module.POST_FILTER_DEPTH, depth
                    try:
                        hits = engine.search(f"#{stored_ids[j]}", k=args.k, **where)
                    finally:
                        engine_module.POST_FILTER_DEPTH = real_depth
                    into.append([h.id for h in hits] + [-1] * (args.k - len(hits)))
            # the brute force reads the mapped rows in place, once for all the queries; each query's own
            # image is left out, as the engine leaves it out
            _, best = exact_search(np.asarray(stored[picks]), stored_ids[:allowed_rows], stored[:allowed_rows],
                                   args.k + 1)
            exact = [[h for h in row if h != stored_ids[j]][:args.k] for row, j in zip(best.tolist(), picks)]
            matched = len(engine.store.catalog.filter_ids(**where))  # the same images every round
            row = {"share": share, "matched": matched, **{f"{w}_p50_ms": _ms(v) for w, v in times.items()},
                   "first_recall": recall_at_k(np.array(exact), np.array(got), args.k),
                   "ids_read_recall": recall_at_k(np.array(exact), np.array(got_read), args.k)}
            row["first_ratio"] = row["first_p50_ms"] / row["unfiltered_p50_ms"]
            row["repeated_ratio"] = row["repeated_p50_ms"] / row["unfiltered_p50_ms"]
            rows.append(row)
    return rows


def measure_catch_up(folder: Path, model: dict, args: argparse.Namespace) -> dict:
    """Queries answered right after another connection committed a chunk (images added, others removed):
    ours against listing every id."""
    from altsearch import Engine
    from altsearch.catalog import Catalog
    from altsearch.store import CATALOG_FILE

    source = ClusteredVectors(np.random.default_rng(7), 8, model["dimension"])
    times: dict[str, list[float]] = {"ours": [], "listing": []}
    with Engine.open(folder, model=model["source"], device=args.device, create=False) as engine:
        engine.search(QUERIES[0], k=args.k)  # loaded and warm
        catalog = engine.store.catalog
        writer = Catalog(folder / CATALOG_FILE)
        before = len(engine.store.vectors)
        added: list[int] = []  # every id added, to remove at the end
        live: list[int] = []  # those not removed yet
        try:
            for i in range(-1, 2 * args.catch_up_rounds):  # -1: a first chunk, for the first round to remove from
                way = ("ours", "listing")[i % 2]
                with writer.transaction() as tx:
                    new = tx.add(fake_records(CATCH_UP_FIRST + len(added), CATCH_UP_CHUNK), source.sample(CATCH_UP_CHUNK))
                    if i >= 0:
                        tx.remove(live[:CATCH_UP_REMOVED])
                        del live[:CATCH_UP_REMOVED]
                added += new
                live += new
                if way == "listing" and i >= 0:  # as if the log did not reach back: every id listed and compared
                    catalog.removed_ids = lambda *, since: None  # type: ignore[method-assign]
                t0 = time.perf_counter()
                hits = engine.search(QUERIES[i % len(QUERIES)], k=args.k)
                if i >= 0:
                    times[way].append(time.perf_counter() - t0)
                catalog.__dict__.pop("removed_ids", None)
                if len(engine.store.vectors) != before + len(live) or len(hits) != args.k:
                    raise SystemExit("a query after a commit did not see the catalogue's vectors")
        finally:
            with writer.transaction() as tx:
                tx.remove(added)
            writer.close()
            engine.store.refresh()
            engine.store.save_vectors()  # the folder as cached: its file current again (none for flat)
    out = {f"{way}_p50_ms": _ms(values) for way, values in times.items()}
    out["ratio"] = out["listing_p50_ms"] / out["ours_p50_ms"]
    out["rounds"] = args.catch_up_rounds
    return out


# -- cold -------------------------------------------------------------------------------------------


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALTSEARCH_")}
    env.update(ALTSEARCH_HOME=str(work / "home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_COLOR="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def cache_dir_of(env: dict[str, str]) -> Path:
    """altsearch's cache folder for processes run with ``env`` (under its ALTSEARCH_HOME)."""
    return Path(env["ALTSEARCH_HOME"]) / "cache"


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall and CPU seconds (user + system) of one fresh process, and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, proc.stdout


def cold_commands(folder: Path, ckpt: Path, query: str, args: argparse.Namespace) -> dict[str, list[str]]:
    py = sys.executable
    ours = [py, "-m", "altsearch", "search", query, "--index", str(folder), "--json", "-k", str(args.k),
            "--device", args.device]
    cmds = {
        "torch": [py, "-c", "import torch"],
        "ours": ours,
        "whole": ["env", f"{PIECES_ENV}=0", *ours],
        "help": [py, "-m", "altsearch", "--help"],
    }
    if not args.skip_naive:
        ids, vectors = (folder.parent / f"{folder.name}-{part}.npy" for part in ("ids", "vectors"))
        cmds["naive"] = [py, "-c", NAIVE, str(ckpt), str(ids), str(vectors), query, str(args.k)]
    return cmds


def measure_cold(folder: Path, ckpt: Path, args: argparse.Namespace, work: Path) -> dict:
    """Fresh processes, each kind once per round (interleaved), median over the rounds."""
    env = _env(work)
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    overlap = []
    # The first query with a tokenizer file on this machine writes its piece table (timed apart).
    shutil.rmtree(cache_dir_of(env), ignore_errors=True)
    first_s, _, _ = _run(cold_commands(folder, ckpt, QUERIES[0], args)["ours"], env)
    for r in range(args.cold_repeats):
        query = QUERIES[r % len(QUERIES)]
        outputs = {}
        for name, cmd in cold_commands(folder, ckpt, query, args).items():
            w, c, outputs[name] = _run(cmd, env)
            wall.setdefault(name, []).append(w)
            cpu.setdefault(name, []).append(c)
        ours = [h["id"] for h in json.loads(outputs["ours"])]
        if len(ours) != args.k:
            raise SystemExit(f"the CLI returned {len(ours)} hits, expected {args.k}")
        if json.loads(outputs["whole"]) != json.loads(outputs["ours"]):
            raise SystemExit("the CLI answered differently with the whole tokenizer model")
        if "naive" in outputs:
            naive = json.loads(outputs["naive"])
            overlap.append(len(set(ours) & set(naive["ids"])) / args.k)
            wall.setdefault("naive_maxrss_mib", []).append(naive["maxrss_mib"])
    out = {f"{name}_s": statistics.median(v) for name, v in wall.items() if not name.endswith("_mib")}
    out.update({f"{name}_cpu_s": statistics.median(v) for name, v in cpu.items()})
    out["runs"] = wall
    out["first_s"] = first_s
    out["whole_ratio"] = out["whole_s"] / out["ours_s"]
    if overlap:
        out["naive_maxrss_mib"] = statistics.median(wall["naive_maxrss_mib"])
        out["overlap"] = statistics.mean(overlap)
        out["ratio"] = out["naive_s"] / out["ours_s"]
        out["cpu_ratio"] = out["naive_cpu_s"] / out["ours_cpu_s"]
    return out


def breakdown(folder: Path, ckpt: Path, args: argparse.Namespace, work: Path) -> dict:
    """One instrumented fresh process (``--child``): seconds of each step of a cold query."""
    job = {"index": str(folder), "model": str(ckpt), "device": args.device, "k": args.k, "query": QUERIES[1]}
    _, _, stdout = _run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)], _env(work))
    return json.loads(stdout.strip().splitlines()[-1])


def child(job: dict) -> None:
    """The instrumented cold query, in steps the CLI also takes (run in a fresh process)."""
    steps: dict[str, float] = {}
    t = time.perf_counter()

    def step(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        steps[name] = now - t
        t = now

    import altsearch.cli  # noqa: F401  (typer, rich)
    step("import altsearch.cli (typer, rich)")
    from altsearch import Engine
    step("import altsearch.engine (numpy, SQLAlchemy, FAISS)")
    import altsearch.model.altclip  # noqa: F401
    step("import torch, altsearch.model")
    engine = Engine.open(job["index"], model=job["model"], device=job["device"], create=False)
    step("open the catalogue")
    vectors = engine.store.vectors
    step(f"open the vector file ({vectors.kind}, {len(vectors):,} vectors)")
    model = engine.model
    step("model: config, fingerprint, index check")
    model.load(["text"])
    step("load the text tower")
    tokenizer = model.tokenizer
    step("load the tokenizer")
    model.encode_text([job["query"]])
    step("first text encoding")
    hits = engine.search(job["query"], k=job["k"])
    step("first search (encode again, search, join)")
    engine.close()
    assert len(hits) == job["k"] and tokenizer is not None
    print(json.dumps({"steps": steps, "towers_loaded": list(model.loaded_towers), **_memory()}))


def _memory() -> dict:
    """This process's peak RSS and its resident pages now: anonymous (copies) and file-backed (mapped)."""
    fields = {"VmHWM": "vmhwm_mib", "RssAnon": "rss_anon_mib", "RssFile": "rss_file_mib"}
    out = dict.fromkeys(fields.values(), 0.0)
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.is_file() else []:
        key = line.split(":")[0]
        if key in fields:
            out[fields[key]] = int(line.split()[1]) / 1024
    return out


def import_times(folder: Path, args: argparse.Namespace, work: Path) -> dict:
    """``python -X importtime -m altsearch search``: seconds spent importing, in all and per package."""
    cmd = [sys.executable, "-X", "importtime", "-m", "altsearch", "search", QUERIES[2], "--index", str(folder),
           "--json", "-k", str(args.k), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(work), check=True)
    return parse_importtime(proc.stderr)


def parse_importtime(stderr: str) -> dict:
    """Total import seconds (the top-level imports' cumulative times) and each top-level package's
    share (the self times of its modules: the package's own work, not what it imports from others)."""
    per: dict[str, float] = {}
    total = 0.0
    for m in re.finditer(r"^import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)$", stderr, re.M):
        own, cumulative, indent, name = int(m[1]), int(m[2]), m[3], m[4]
        if len(indent) == 1:  # a top-level import, not counted inside another one
            total += cumulative / 1e6
        package = name.split(".")[0]
        per[package] = per.get(package, 0.0) + own / 1e6
    return {"total_s": total, "packages": dict(sorted(per.items(), key=lambda kv: -kv[1]))}


# -- report -----------------------------------------------------------------------------------------


def machine(args: argparse.Namespace) -> dict:
    import faiss
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = cpu_name()
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "faiss": faiss.__version__, "device": args.device, "loadavg_start": loadavg(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def render(report: dict) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']} "
             f"({m['threads']} threads, device {m['device']}), faiss {m['faiss']}, OMP_WAIT_POLICY="
             f"{m['omp_wait_policy']}; load average {m['loadavg_start']} at start, {m.get('loadavg_end')} at end; "
             f"{m['date']}", f"model: {report['model_label']} (d={report['dimension']})", "",
             "warm text query (one process, after a first query; ms)", "",
             "| vectors | index | encoder p50 | search p50 | search p95 | ratio | CPU ratio | parse | tokenize | "
             "vector search | join | refresh |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        w = r["warm"]
        lines.append(f"| {r['n']:,} | {r['kind']}, on {w['searched_on']} | {w['encoder_p50_ms']:.2f} | {w['search_p50_ms']:.2f} | "
                     f"{w['search_p95_ms']:.2f} | {w['ratio']:.2f} | {w['cpu_ratio']:.2f} | {w['parse_p50_ms']:.3f} | "
                     f"{w['tokenize_p50_ms']:.3f} | {w['vector_search_p50_ms']:.3f} | {w['join_p50_ms']:.3f} | "
                     f"{w['refresh_p50_ms']:.3f} |")
    packed = [f"{r['n']:,}: {sum(r['warm']['packed_layers'].values())} text Linear weights packed in "
              f"{r['warm']['pack_s']:.2f} s" for r in report["rows"] if r["warm"].get("packed_layers")]
    lines += ["", "ratio = search p50 / encoder p50 (target <= 1.2); CPU ratio the same in CPU time (less moved by "
                  "other processes); the last five columns are each step alone, p50; a long-lived process's "
                  "steady state: " + ("; ".join(packed) if packed else "no weights packed (oneDNN not used)"),
              "", "a query right after another process committed a chunk of "
                  f"{CATCH_UP_CHUNK} images and removed {CATCH_UP_REMOVED} (ms, p50 of "
                  f"{report['rows'][0]['catch_up']['rounds']} each)", "",
              "| vectors | index | ours | baseline: every id listed | baseline / ours |", "|---:|---|---:|---:|---:|"]
    for r in report["rows"]:
        u = r["catch_up"]
        lines.append(f"| {r['n']:,} | {r['kind']} | {u['ours_p50_ms']:.1f} | {u['listing_p50_ms']:.1f} | "
                     f"{u['ratio']:.2f} |")
    lines += ["", "ours reads only the vectors written since the index's generation and the ids the catalogue's "
                  "removal log names; the baseline compares every id on both sides, as altsearch did after a removal "
                  "before the log",
              "", f"a query with a date filter (ms, p50 of {report['rows'][0]['catch_up']['rounds']} each, "
                  "interleaved): the first time with the filter, and repeated; recall@10 of 'more like this' "
                  "queries (#id, each with a filter new to the engine) against a brute-force search of the images the "
                  "filter allows, as the engine answers them and with the filter's ids read first (the baseline)", "",
              "| vectors | index | filter matches | baseline: unfiltered | first | repeated | first / baseline | "
              "repeated / baseline | recall@10 | baseline: ids read |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        for f in r["filtered"]:
            lines.append(f"| {r['n']:,} | {r['kind']} | {f['matched']:,} ({f['share']:.0%}) | {f['unfiltered_p50_ms']:.1f} | "
                         f"{f['first_p50_ms']:.1f} | {f['repeated_p50_ms']:.1f} | {f['first_ratio']:.2f} | "
                         f"{f['repeated_ratio']:.2f} | {f['first_recall']:.3f} | {f['ids_read_recall']:.3f} |")
    lines += ["", f"cold text query (fresh processes, median of {report['cold_repeats']}; seconds)", "",
              "| vectors | `import torch` | CPU s | ours: `altsearch search` | CPU s | whole tokenizer model | CPU s "
              "| whole / ours | naive (transformers + numpy) | CPU s | naive / ours | in CPU s | same top-k "
              "| `altsearch --help` |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        c = r["cold"]
        naive = (f"{c['naive_s']:.2f} | {c['naive_cpu_s']:.2f} | {c['ratio']:.2f} | {c['cpu_ratio']:.2f} | "
                 f"{c['overlap']:.0%}" if "naive_s" in c else "- | - | - | - | -")
        lines.append(f"| {r['n']:,} | {c['torch_s']:.2f} | {c['torch_cpu_s']:.2f} | {c['ours_s']:.2f} | "
                     f"{c['ours_cpu_s']:.2f} | {c['whole_s']:.2f} | {c['whole_cpu_s']:.2f} | {c['whole_ratio']:.2f} | "
                     f"{naive} | {c['help_s']:.2f} |")
    lines += ["", f"ours: the tokenizer's piece table read from the cache; whole tokenizer model: the same with "
                  f"{PIECES_ENV}=0; the first query on a machine (it writes the table): "
              + ", ".join(f"{r['cold']['first_s']:.2f} s at {r['n']:,} vectors" for r in report["rows"])]
    for r in report["rows"]:
        b = r["breakdown"]
        lines += ["", f"where a cold query's time goes ({r['n']:,} vectors; one instrumented process, public API; "
                      f"towers loaded: {', '.join(b['towers_loaded'])}; peak RSS {b['vmhwm_mib']:.0f} MiB, at the end "
                      f"{b['rss_anon_mib']:.0f} MiB anonymous + {b['rss_file_mib']:.0f} MiB mapped from files)", "",
                  "| step | s |", "|---|---:|"]
        lines += [f"| {name} | {s:.3f} |" for name, s in b["steps"].items()]
        lines.append(f"| total | {sum(b['steps'].values()):.3f} |")
    imp = report["imports"]
    shown = list(imp["packages"].items())[:SHOWN_PACKAGES]
    lines += ["", f"imports of a cold `altsearch search` (-X importtime): {imp['total_s']:.2f} s in all; by package "
                  "(its own modules): " + ", ".join(f"{k} {v:.2f} s" for k, v in shown)]
    for r in report["rows"]:
        w, c = r["warm"], r["cold"]
        naive = f", {c['ratio']:.2f}x faster than the naive script ({c['naive_s']:.2f} s)" if "ratio" in c else ""
        lines.append(f"summary: {r['n']:,} vectors: warm query p50 {w['search_p50_ms']:.1f} ms = {w['ratio']:.2f}x "
                     f"the text encoder alone ({w['encoder_p50_ms']:.1f} ms); after another process's commit "
                     f"{r['catch_up']['ours_p50_ms']:.1f} ms ({r['catch_up']['ratio']:.2f}x faster than listing "
                     f"every id); cold CLI {c['ours_s']:.2f} s "
                     f"(`import torch` alone {c['torch_s']:.2f} s){naive}")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="cache for checkpoints and index folders (kept; default: a "
                                                "temporary folder, removed)")
    p.add_argument("--sizes", type=int_list(1), default=[10_000, 1_000_000],
                   help="index sizes in vectors (default: 10000,1000000)")
    p.add_argument("--model", default="tiny",
                   help="tiny, tiny768, tiny-xlmr, full or a checkpoint folder (default: tiny)")
    p.add_argument("--queries", type=int, default=50, help="warm queries per index (default: 50)")
    p.add_argument("--catch-up-rounds", type=int, default=5,
                   help="queries after another connection's commit, each way, and filtered queries of "
                        "each kind (default: 5)")
    p.add_argument("--cold-repeats", type=int, default=3, help="fresh processes of each kind (median; default 3)")
    p.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the warm table (default: torch's)")
    p.add_argument("--skip-naive", action="store_true", help="no transformers baseline")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.queries, args.cold_repeats, args.catch_up_rounds, args.k) < 1:
        p.error("--queries, --catch-up-rounds, --cold-repeats and -k must be at least 1")
    if min(args.sizes) < args.k:
        p.error("every --sizes value must be at least -k")
    return args


def run(args: argparse.Namespace, work: Path) -> dict:
    info = machine(args)
    ckpt = checkpoint_folder(args.model, work)
    model = model_identity(ckpt)
    report: dict = {"machine": info, "model": model["model_id"], "dimension": model["dimension"],
                    "model_label": {"tiny": "tiny random", "tiny768": "tiny random, 768-d vectors",
                                    "full": "full-size random AltCLIP"}.get(args.model,
                                                                                                  args.model),
                    "cold_repeats": args.cold_repeats, "rows": []}
    for n in args.sizes:
        folder, built = cached_index(work, n, model)
        print(f"measuring {n:,} vectors ({built['kind']}) ...", flush=True)
        report["rows"].append({"n": n, "kind": built["kind"], "built": built,
                               "warm": measure_warm(folder, model, args),
                               "catch_up": measure_catch_up(folder, model, args),
                               "filtered": measure_filtered(folder, model, args),
                               "cold": measure_cold(folder, ckpt, args, work),
                               "breakdown": breakdown(folder, ckpt, args, work)})
    report["imports"] = import_times(folder, args, work)
    info["loadavg_end"] = loadavg()
    print("\n" + render(report))
    return report


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    run_in_workdir(args, "bench-query-", run)


if __name__ == "__main__":
    main()
