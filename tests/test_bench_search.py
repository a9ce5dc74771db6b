"""benchmarks/bench_search.py keeps working: its data generator, a tiny run, the memory skip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.benchscripts import bench_script

from altsearch.vectors import RERANK_WIDTHS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_search.py"


@pytest.fixture(scope="module")
def bench():
    with bench_script("bench_search") as module:
        yield module


def test_data_is_clustered_anisotropic_and_stored_as_int8(bench):
    codes, scales = bench.make_data(3000, 64, 30, seed=1)
    assert codes.dtype == np.int8 and codes.shape == (3000, 64) and scales.shape == (3000,)
    vecs = bench.as_float(codes, scales)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=0.02)
    assert (np.abs(codes).max(axis=1) == 127).all()  # each vector uses the full int8 range
    # anisotropic: the top 10 % of principal directions hold far more than 10 % of the variance
    eig = np.linalg.eigvalsh(np.cov(vecs.T))[::-1]
    assert eig[:6].sum() / eig.sum() > 0.3
    # a common mean direction: random pairs are positively correlated, neighbours much more so
    sims = vecs[:500] @ vecs[500:1000].T
    assert 0.2 < sims.mean() < 0.7
    top = np.sort(vecs[:100] @ vecs[100:].T, axis=1)[:, -1]
    assert top.mean() > sims.mean() + 0.2
    again, _ = bench.make_data(3000, 64, 30, seed=1)
    np.testing.assert_array_equal(again, codes)  # deterministic for a seed


def test_latent_data_lies_on_a_subspace_and_is_stored_as_int8(bench):
    codes, scales = bench.make_latent_data(3000, 64, seed=1)
    assert codes.dtype == np.int8 and codes.shape == (3000, 64) and scales.shape == (3000,)
    vecs = bench.as_float(codes, scales)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=0.02)
    singular = np.linalg.svd(vecs, compute_uv=False)
    assert singular[32] < 0.05 * singular[0]  # 32 latent dimensions, then int8 rounding noise
    again, _ = bench.make_latent_data(3000, 64, seed=1)
    np.testing.assert_array_equal(again, codes)


def test_tiny_run_prints_tables_and_ratios(bench, capsys):
    results = bench.main(["--sizes", "2000", "--dim", "32", "--clusters", "40", "--queries", "30",
                          "--latency-queries", "5", "--store-size", "400"])
    out = capsys.readouterr().out
    assert "| kind | searched on | build s | build peak RSS GB | bytes/vector |" in out and "load average" in out
    assert "| ivfpq + re-rank |" in out and "re-rank from the catalogue" in out
    rows = {r["kind"] + (" before" if r.get("baseline") else ""): r for r in results["sizes"][0]["rows"]}
    assert set(rows) == {"flat", "ivf", "ivfpq", "ivfpq before"}
    assert rows["flat"]["recall_at_10"] == 1.0 and rows["flat"]["x_exact_1"] == 1.0
    assert rows["ivfpq"]["recall_at_10"] >= 0.9
    assert rows["ivfpq"]["bytes_per_vector"] < rows["flat"]["bytes_per_vector"] / 2
    # the baseline: the same index, nprobe tuned for the narrowest re-rank width alone
    assert rows["ivfpq"]["rerank"] in RERANK_WIDTHS and rows["ivfpq before"]["rerank"] == RERANK_WIDTHS[0]
    assert rows["ivfpq before"]["nlist"] == rows["ivfpq"]["nlist"] and rows["ivfpq before"]["recall_at_10"] >= 0.9
    assert "| ivfpq + re-rank, tuned for the narrowest width only (before) |" in out
    assert f"re-rank width tuned: recall@10 {rows['ivfpq']['recall_at_10']:.3f} against" in out
    for row in rows.values():
        assert 0 < row["p50_1"] <= row["p95_1"] and row["x_exact_n"] > 0
        assert row["searched_on"] == "cpu"
    store = results["store"]
    assert store["n"] == 400 and store["ivfpq_p50"] > 0 and store["catalog_bytes_per_image"] > 32


def test_on_a_gpu_each_index_searches_where_altsearch_would_put_it(bench, capsys, monkeypatch):
    from altsearch import vectors

    monkeypatch.setattr(vectors, "torch_gpu_for", lambda device: "cpu:0")  # stands in for torch's GPU
    results = bench.main(["--sizes", "2000", "--dim", "32", "--clusters", "40", "--queries", "30",
                          "--latency-queries", "5", "--store-size", "0", "--kinds", "flat,ivf", "--device", "cuda"])
    rows = {r["kind"]: r for r in results["sizes"][0]["rows"]}
    assert rows["flat"]["searched_on"] == "cpu:0"  # torch, FAISS having no GPU here
    assert rows["ivf"]["searched_on"] == "cpu" and rows["flat"]["recall_at_10"] == 1.0
    assert "| flat | cpu:0 |" in capsys.readouterr().out


def test_a_size_that_does_not_fit_is_skipped(bench, capsys, monkeypatch):
    monkeypatch.setattr(bench, "available_memory", lambda: 10**9)
    results = bench.main(["--sizes", "10000000", "--store-size", "0"])
    assert "skipped" in results["sizes"][0]
    assert "10,000,000 vectors: skipped (needs ~8 GB of memory, 1 GB available)" in capsys.readouterr().out


def test_a_kind_that_does_not_fit_is_skipped_and_the_others_run(bench, capsys, monkeypatch):
    """Where the float32 indexes would not fit beside the int8 data (10M x 768 on a 16-32 GB
    machine), the compact one still runs, its ratio to exact search left out."""
    n, dim = 3000, 32
    room = (bench.index_bytes("ivfpq", n, dim) + bench.index_bytes("flat", n, dim)) / 2 / 0.8
    assert bench.index_bytes("ivfpq", n, dim) < 0.8 * room < bench.index_bytes("flat", n, dim)
    monkeypatch.setattr(bench, "available_memory", lambda: room)
    results = bench.main(["--sizes", str(n), "--dim", str(dim), "--clusters", "40", "--queries", "30",
                          "--latency-queries", "5", "--store-size", "0"])
    rows = {r["kind"]: r for r in results["sizes"][0]["rows"]}
    assert "skipped" in rows["flat"] and "skipped" in rows["ivf"]
    assert rows["ivfpq"]["recall_at_10"] >= 0.9 and rows["ivfpq"]["x_exact_1"] is None
    out = capsys.readouterr().out
    assert "| flat | skipped: needs ~0 GB more memory" in out and "| ivfpq + re-rank | cpu |" in out


def test_the_streamed_ground_truth_is_exact_search(bench):
    codes, scales = bench.make_data(5000, 32, 20, seed=2)
    source = bench.Int8Vectors(codes[:4900], scales[:4900])
    queries = bench.as_float(codes[4900:], scales[4900:])
    want = np.argsort(-(queries @ bench.as_float(codes[:4900], scales[:4900]).T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(bench.exact_top(queries, source), want)
    got = [ids for ids, _ in source.iter_vectors(batch=1000, ids=np.array([4899, 3, 3, 7000, 10]))]
    assert [g.tolist() for g in got] == [[3, 10, 4899]]  # sorted, unique, ids it lacks left out


def test_each_build_s_peak_memory_is_its_own(bench):
    """The peak resident size is reset before each build, so a row does not report an earlier peak."""
    if not bench._reset_peak_rss():
        pytest.skip("this system cannot reset a process's peak resident size")
    big = np.ones(200_000_000, np.uint8)  # 200 MB, touched
    high = bench._peak_rss()
    del big
    assert bench._reset_peak_rss()
    assert bench._peak_rss() < high - 150_000_000
