"""benchmarks/bench_ingest.py keeps working: its vector comparison, and a tiny run of every pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.benchscripts import bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_ingest.py"


@pytest.fixture(scope="module")
def bench():
    with bench_script("bench_ingest") as module:
        yield module


def test_cosines_match_files_by_path_whatever_the_order(bench):
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 8)).astype(np.float32)
    naive = {"paths": ["a", "b", "c"], "vectors": ref}
    ours = {"paths": ["c", "a", "b"], "vectors": 2 * ref[[2, 0, 1]]}  # scale does not matter
    np.testing.assert_allclose(bench.cosines(ours, naive), 1.0, atol=1e-6)
    ours["vectors"][1] *= -1
    assert bench.cosines(ours, naive)[1] == pytest.approx(-1.0)


def test_tiny_run_prints_the_table_and_ratios(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--images", "3", "--naive-images", "2", "--size", "320x240", "--workdir", str(tmp_path / "work"),
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for needle in ("machine:", "load average", "| naive loop", "| altsearch Engine.index |", "x naive", "int8"):
        assert needle in proc.stdout, needle
    rows = {r["pipeline"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"naive", "altsearch", "altsearch-torchvision", "altsearch-cpu-decode", "altsearch-int8"}
    assert rows["naive"]["vs_naive"] == 1.0
    # the altsearch row already decodes on the CPU here
    assert "skipped" in rows["altsearch-cpu-decode"] and "skipped" in rows["altsearch-torchvision"]
    ours = rows["altsearch"]
    assert (ours["images"], rows["naive"]["images"]) == (3, 2) and ours["images_per_s"] > 0
    assert ours["decoder"] == "cpu"
    assert set(ours["waited"]) == {"decode", "model", "commit"} and "waited s: decode / model / commit" in proc.stdout
    # the same weights, the same pictures: reduced-size decoding and float16 storage change little
    assert ours["cosine_min"] > 0.99
    int8 = rows["altsearch-int8"]
    assert "skipped" in int8 or int8["cosine_min"] > 0.9
