"""benchmarks/bench_query.py keeps working: its index folders, its import summary, a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from altsearch import Engine
from tests.benchscripts import bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_query.py"


@pytest.fixture(scope="module")
def bench():
    with bench_script("bench_query") as module:
        yield module


def test_filled_index_searches_the_vectors_the_naive_baseline_reads(bench, tmp_path, tiny_checkpoint):
    model = bench.model_identity(tiny_checkpoint)
    folder, info = bench.cached_index(tmp_path, 300, model)
    assert (info["kind"], info["cached"]) == ("flat", False)
    ids = np.load(tmp_path / f"{folder.name}-ids.npy")
    vectors = np.load(tmp_path / f"{folder.name}-vectors.npy")
    assert vectors.shape == (300, 24) and vectors.dtype == np.float32
    with Engine.open(folder, model=str(tiny_checkpoint), device="cpu", create=False) as engine:
        assert engine.stats()["vectors"] == 300
        hits = engine.search("sunset over the sea", k=5)
        q = engine.model.encode_text(["sunset over the sea"])[0]
    assert [h.id for h in hits] == ids[np.argsort(-(vectors @ q))[:5]].tolist()
    assert hits[0].path.startswith("/bench/photos/")
    assert bench.cached_index(tmp_path, 300, model)[1]["cached"]  # reused, not refilled


def test_catch_up_leaves_the_cached_folder_as_it_was(bench, tmp_path, tiny_checkpoint, monkeypatch):
    import argparse

    from altsearch import vectors
    from altsearch.catalog import Catalog
    from altsearch.vectors import VectorIndex

    monkeypatch.setattr(vectors, "EXACT_MAX", 1000)  # an ivfpq folder, whose file must end current
    model = bench.model_identity(tiny_checkpoint)
    folder, info = bench.cached_index(tmp_path, 1200, model)
    assert info["kind"] == "ivfpq"
    with Catalog(folder / "catalog.sqlite", readonly=True) as cat:
        ids = cat.vector_ids()
    args = argparse.Namespace(catch_up_rounds=2, k=5, device="cpu")
    out = bench.measure_catch_up(folder, model, args)
    assert out["rounds"] == 2 and out["ours_p50_ms"] > 0 and out["listing_p50_ms"] > 0
    assert out["ratio"] == pytest.approx(out["listing_p50_ms"] / out["ours_p50_ms"])
    with Catalog(folder / "catalog.sqlite", readonly=True) as cat:
        np.testing.assert_array_equal(cat.vector_ids(), ids)  # the 5 chunks removed again
        saved = VectorIndex.load(folder / "vectors.faiss")
        assert saved.header.generation == cat.generation and len(saved) == 1200  # no catch-up on the next open


def test_the_whole_tokenizer_baseline_turns_the_piece_table_off(bench, tmp_path):
    import argparse

    from altsearch.model.tokenizer import PIECES_ENV

    assert bench.PIECES_ENV == PIECES_ENV  # spelled out in the script, which must not import torch early
    args = argparse.Namespace(k=3, device="cpu", skip_naive=True)
    cmds = bench.cold_commands(tmp_path, tmp_path, "sea", args)
    assert cmds["whole"] == ["env", f"{PIECES_ENV}=0", *cmds["ours"]]


def test_import_summary_counts_top_level_imports_once_and_groups_by_package(bench):
    stderr = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       100 |        100 |     torch._C",
        "import time:        50 |        150 |   torch.nn",
        "import time:       200 |        400 | torch",
        "import time:        30 |         30 | faiss",
        "some other line",
    ])
    summary = bench.parse_importtime(stderr)
    assert summary["total_s"] == pytest.approx(430e-6)
    assert summary["packages"] == pytest.approx({"torch": 350e-6, "faiss": 30e-6})
    assert list(summary["packages"]) == ["torch", "faiss"]  # slowest first


def test_tiny_run_prints_warm_and_cold_tables_against_their_baselines(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "200", "--queries", "3", "--cold-repeats", "1",
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for needle in ("machine:", "load average", "encoder p50", "ratio", "`import torch`", "naive / ours",
                   "load the tokenizer", "import torch", "-X importtime", "summary: 200 vectors", "baseline: every id listed"):
        assert needle in proc.stdout, needle
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    warm, cold, steps = row["warm"], row["cold"], row["breakdown"]
    assert row["catch_up"]["rounds"] == 5 and row["catch_up"]["ours_p50_ms"] > 0
    filtered = {f["share"]: f for f in row["filtered"]}
    assert {s: f["matched"] for s, f in filtered.items()} == {0.01: 2, 0.5: 100, 0.9: 180, 1.0: 200}  # of the 200 images
    for f in filtered.values():
        assert f["repeated_ratio"] == pytest.approx(f["repeated_p50_ms"] / f["unfiltered_p50_ms"])
        assert f["first_ratio"] == pytest.approx(f["first_p50_ms"] / f["unfiltered_p50_ms"])
        assert f["first_recall"] == f["ids_read_recall"] == 1.0  # an exact index: the brute force agrees
    assert "| 200 | flat | 100 (50%) |" in proc.stdout
    assert warm["ratio"] == pytest.approx(warm["search_p50_ms"] / warm["encoder_p50_ms"])
    assert 0 < warm["encoder_p50_ms"] and warm["search_p50_ms"] <= warm["search_p95_ms"]
    assert warm["towers_loaded"] == steps["towers_loaded"] == ["text"]  # a text query never reads the vision tower
    assert warm["searched_on"] == "cpu" and "| flat, on cpu |" in proc.stdout
    assert "steady state:" in proc.stdout
    if warm["packed_layers"]:  # oneDNN runs here (x86-64): the warm queries ran on packed text weights
        assert warm["packed_layers"]["text"] > 0 and warm["pack_s"] > 0 and "weights packed in" in proc.stdout
    assert cold["ratio"] == pytest.approx(cold["naive_s"] / cold["ours_s"])
    assert cold["whole_ratio"] == pytest.approx(cold["whole_s"] / cold["ours_s"]) and cold["first_s"] > 0
    assert "whole tokenizer model" in proc.stdout and "writes the table" in proc.stdout
    assert cold["overlap"] >= 0.9  # both answer from the same vectors with the same weights
    assert all(cold[f"{name}_s"] > 0 for name in ("torch", "ours", "help", "naive"))
    assert set(steps["steps"]) >= {"load the text tower", "load the tokenizer", "open the catalogue"}
    assert steps["rss_file_mib"] > 0 and steps["vmhwm_mib"] >= steps["rss_anon_mib"] > 0
    assert "torch" in report["imports"]["packages"] and report["imports"]["total_s"] > 0
