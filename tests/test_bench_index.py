"""benchmarks/bench_index.py keeps working: its photos, its directly filled query indexes, a tiny run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from altsearch import Engine

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_index.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_index", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_photos_are_distinct_grainy_jpegs_made_once(bench, tmp_path):
    spec = bench.PhotoSpec(count=2, width=400, height=300, quality=90)
    paths = bench.make_photos(tmp_path, spec)
    assert [p.name for p in paths] == ["IMG_0000.jpg", "IMG_0001.jpg"]
    arrays = []
    for p in paths:
        with Image.open(p) as im:
            assert (im.format, im.size) == ("JPEG", (400, 300))
            assert im.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal)
            arrays.append(np.asarray(im, dtype=np.float32))
    assert np.abs(arrays[0] - arrays[1]).mean() > 10  # different pictures
    grain = np.abs(np.diff(arrays[0], axis=1)).mean()
    assert 1 < grain < 20  # neither flat colour nor noise alone
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert bench.make_photos(tmp_path, spec) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps  # cached, not redrawn


def test_vectors_are_unit_length_clustered_and_of_low_intrinsic_dimension(bench):
    source = bench.ClusteredVectors(np.random.default_rng(0), 8, 64)
    x = source.sample(2000)
    assert x.shape == (2000, 64) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert np.median((x @ source.directions.T).max(axis=1)) > 0.7  # each vector sits near a centre ...
    other = bench.ClusteredVectors(np.random.default_rng(1), 8, 64).directions
    assert np.median((x @ other.T).max(axis=1)) < 0.6  # ... and not near unrelated directions
    assert np.linalg.matrix_rank(x[:200]) == bench.LATENT_DIM < 64


def test_filled_index_opens_as_saved_and_searches_exactly(bench, tmp_path, tiny_checkpoint):
    model = bench.model_ref(str(tiny_checkpoint))
    folder = tmp_path / "q"
    info = bench.build_query_index(folder, 300, model)
    assert (info["n"], info["dim"], info["kind"]) == (300, 24, "flat")
    with Engine.open(folder, model=str(tiny_checkpoint), device="cpu", create=False) as engine:
        vectors = engine.store.vectors
        # loaded from the file (a rebuilt index has no header), not caught up from the catalogue
        assert vectors.header is not None and vectors.header.generation == engine.store.generation
        assert engine.stats()["images"] == engine.stats()["vectors"] == 300
        hits = engine.search("sunset over the sea", k=5)
        q = engine.model.encode_text(["sunset over the sea"])[0]
        ids, vecs = next(engine.store.catalog.iter_vectors())
        assert [h.id for h in hits] == ids[np.argsort(-(vecs @ q))[:5]].tolist()
        assert hits[0].path.startswith("/bench/photos/") and hits[0].width == 4000


def test_tiny_run_prints_both_tables(tmp_path):
    out = tmp_path / "report.json"
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--images", "2", "--size", "320x240", "--workers", "0,1", "--sizes", "200",
         "--queries", "3", "--cold-repeats", "1", "--workdir", str(work), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for needle in ("machine:", "torch", "faiss", "reduced-size decoding", "images/s", "warm p50", "cold s",
                   "summary: best", "used as saved"):
        assert needle in proc.stdout, needle
    report = json.loads(out.read_text())
    rows = {(r["draft"], r["workers"]): r for r in report["indexing"]}
    assert set(rows) == {(False, 0), (False, 1), (True, 0), (True, 1)}
    assert rows[(False, 0)]["vs_base"] == 1.0
    assert all(r["images"] == 2 and r["images_per_s"] > 0 for r in rows.values())
    (query,) = report["queries"]
    assert (query["n"], query["dim"], query["kind"]) == (200, 24, "flat")
    assert query["vector_file_as_saved"] and query["opened_kind"] == "flat" and not query["vector_file_rewritten"]
    assert 0 < query["text_p50_ms"] and query["warm_p50_ms"] <= query["warm_p95_ms"] and query["cold_s"] > 0
    assert not (work / "scratch").exists()  # per-configuration indexes are removed
    assert (work / "query-200-d24.json").is_file()  # the filled index is kept for a later run
