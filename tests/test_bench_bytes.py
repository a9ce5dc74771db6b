"""benchmarks/bench_bytes.py keeps working: its fake photo records, its float16 baseline, a tiny run."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from altsearch.catalog import Catalog
from tests.benchscripts import bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_bytes.py"


@pytest.fixture(scope="module")
def bench():
    with bench_script("bench_bytes") as module:
        yield module


def test_records_look_like_a_photo_library(bench):
    records = bench.fake_records(0, 300)
    paths = [r["path"] for r in records]
    assert len(set(paths)) == 300 and len({r["content_hash"] for r in records}) == 300
    assert paths[0] == "/home/user/Pictures/2015/01/IMG_20150101_000000_000.jpg"
    assert all(len(r["content_hash"]) == 32 for r in records)  # blake2b-128 hex, as decode.py writes
    assert {r["format"] for r in records} == {"JPEG", "HEIF", "PNG"}
    assert sum(r["taken_at"] is None for r in records) == 30


def test_index_and_baseline_hold_the_same_rows(bench, tmp_path):
    row = bench.build_index(tmp_path / "idx", 500, 32)
    assert row["kind"] == "flat" and row["n"] == 500
    with Catalog(tmp_path / "idx" / "catalog.sqlite", readonly=True) as cat:
        assert cat.count() == 500 and cat.integrity() == []
        ids, vecs = next(cat.iter_vectors())
    with sqlite3.connect(tmp_path / "idx" / "baseline-schema1.sqlite") as raw:
        assert raw.execute("SELECT count(*) FROM images").fetchone() == (500,)
        half = raw.execute("SELECT vector FROM vectors ORDER BY image_id").fetchall()
    raw.close()
    baseline = np.frombuffer(b"".join(b for (b,) in half), "<f2").reshape(500, 32).astype(np.float32)
    cosine = (baseline * vecs).sum(1) / np.linalg.norm(baseline, axis=1) / np.linalg.norm(vecs, axis=1)
    assert cosine.min() > 0.999  # the same vectors, in the two encodings
    assert row["baseline_catalog_bytes"] > row["catalog_bytes"]


def test_tiny_run_prints_the_table(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "300,1200", "--dim", "64", "--workdir", str(tmp_path / "w"),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for needle in ("load average", "| images |", "x baseline", "vector file that 10,000,000 images get; no extrapolation", "RSS"):
        assert needle in proc.stdout, needle
    rows = json.loads(out.read_text())["rows"]
    assert [r["n"] for r in rows] == [300, 1200]
    for r in rows:
        assert r["vectors"] == r["n"] and r["rss_growth"] > 0 and r["open_s"] > 0
        assert r["kind"] == "flat" and r["vector_bytes"] == 0  # built from the catalogue when opened
        assert r["baseline_vector_bytes"] > r["n"] * 64 * 4  # the float32 file the previous layout saved
        assert r["total_per_image"] == pytest.approx(r["catalog_per_image"] + r["vector_per_image"])
        assert r["vs_baseline"] > 1
    saved = rows[1]["baseline_catalog_per_image"] - rows[1]["catalog_per_image"]
    assert 40 < saved < 90  # float16 (128 B) -> int8 + scale (68 B) per vector, and nothing else changed
    assert not list((tmp_path / "w").iterdir())  # index folders are removed


def test_a_compact_index_is_measured_against_the_layout_with_an_id_map(bench, tmp_path, monkeypatch):
    """Beyond EXACT_MAX the row is an ivfpq file; its baseline is the same index saved with the
    hashtable direct map altsearch used to keep (16 bytes per vector more), opened as it was."""
    from altsearch import vectors

    monkeypatch.setattr(vectors, "EXACT_MAX", 1000)
    row = bench.run_size(1200, 32, tmp_path)
    assert row["kind"] == "ivfpq" and row["vectors"] == 1200 and row["vector_bytes"] > 1200 * 8
    assert row["baseline_vector_bytes"] > row["vector_bytes"] + 15 * 1200  # 16, give or take the headers
    assert row["baseline_catalog_bytes"] > row["catalog_bytes"] and row["vs_baseline"] > 1
    assert row["open_s"] > 0 and row["baseline_open_s"] > 0 and row["baseline_id_map"] != 0  # NoMap is 0
    assert "| 1,200 | ivfpq |" in bench.render([row], 32) and "previous layout:" in bench.render([row], 32)
    assert not list(tmp_path.iterdir())


def test_the_10m_extrapolation_fits_only_the_kind_10m_images_get(bench):
    flat = [{"n": n, "kind": "flat", "total_per_image": 4200.0} for n in (10_000, 100_000)]
    compact = [{"n": n, "kind": "ivfpq", "total_per_image": 1100.0 + 3e7 / n} for n in (200_000, 1_000_000)]
    a, b = bench.fit(flat + compact, "ivfpq")
    assert a == pytest.approx(1100.0) and b == pytest.approx(3e7)
    assert bench.fit(flat + compact[:1], "ivfpq") is None  # one size cannot be fitted
