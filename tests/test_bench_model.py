"""benchmarks/bench_model.py keeps working: its checkpoint writer, its ratios, and a --tiny run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.benchscripts import bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_model.py"


@pytest.fixture(scope="module")
def bench():
    with bench_script("bench_model") as module:
        yield module


def test_streamed_checkpoint_is_the_hub_layout_and_loads_strictly(bench, tmp_path):
    from safetensors import safe_open

    from altsearch import load_model

    folder = bench.write_checkpoint(tmp_path / "ckpt", tiny=True)
    cfg = json.loads((folder / "config.json").read_text())
    specs = bench.checkpoint_specs(cfg["text_config"], cfg["vision_config"], cfg["projection_dim"])
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == {s.name for s in specs}
        for s in specs:
            assert f.get_slice(s.name).get_shape() == list(s.shape), s.name
        ln = f.get_tensor("text_model.roberta.encoder.layer.0.output.LayerNorm.weight")
        pos = f.get_tensor("text_model.roberta.embeddings.position_ids")
    assert 0.5 < ln.mean() < 1.5 and ln.std() > 0  # LayerNorm weights near 1, not constant
    np.testing.assert_array_equal(pos[0], np.arange(pos.shape[1]))
    model = load_model(folder, device="cpu", dtype="fp32", towers=["text", "vision"])
    assert model.loaded_towers == ("text", "vision")
    assert math.isclose(float(model.module.logit_scale), 2.6592, rel_tol=1e-6)

    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    bench.write_checkpoint(folder, tiny=True)  # same config: reused, not rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_ratio_above_one_always_means_altsearch_is_better(bench):
    ours = {"images_per_s": 2.0, "texts_per_s": 10.0, "import_s": 0.1, "load_s": 1.0,
            "first_query_s": 0.5, "maxrss_mib": 1000.0, "query_ms": 100.0}
    theirs = {"images_per_s": 1.0, "texts_per_s": 5.0, "import_s": 0.4, "load_s": 3.0,
              "first_query_s": 0.5, "maxrss_mib": 4000.0, "tokens": 12, "query_ms": 250.0, "query_tokens": 5}
    table = bench.rows(ours, ours, theirs, {"image": 1e-6, "text": 2e-6}, batch=8)
    ratios = {metric: f(a, b) for metric, a, b, f, _ in table if f is not None}
    assert ratios["images/s (batch 8, median)"] == 2.0
    assert ratios["peak RSS, text load + 1 query (MiB)"] == 4.0
    assert ratios["load, both towers (s)"] == 3.0
    assert ratios["load + first text query (s)"] == 3.5 / 1.5
    assert ratios["one text query (batch 1 x 5 tokens, median ms)"] == 2.5
    assert not any("packed" in metric for metric in ratios)  # nothing packed: no row
    packed = bench.rows({**ours, "query_packed_ms": 50.0, "pack_s": 1.5}, ours, theirs, {"image": 0, "text": 0}, batch=8)
    assert [f(a, b) for m, a, b, f, _ in packed if "packed" in m] == [5.0]
    assert all(r > 1 for r in ratios.values())


def test_int8_rows_compare_against_fp32_and_report_the_drift(bench):
    int8 = {"images_per_s": 3.0, "texts_per_s": 20.0, "load_s": 2.0, "tokens": 12, "cpu_s_per_image": 1.0,
            "cpu_s_per_text": 0.1, "query_ms": 80.0, "query_tokens": 5}
    fp32 = {"images_per_s": 2.0, "texts_per_s": 10.0, "load_s": 1.0, "cpu_s_per_image": 2.0, "cpu_s_per_text": 0.2,
            "query_ms": 40.0}
    table = bench.int8_rows(int8, fp32, {"image": (0.995, 0.998), "text": (0.99, 0.997)}, batch=8)
    ratios = {metric: f(a, b) for metric, a, b, f, _ in table if f is not None}
    assert ratios["images/s (batch 8, median)"] == 1.5
    assert ratios["CPU seconds per image (median batch)"] == 2.0  # half the CPU time: 2x better
    assert ratios["load, both towers, quantisation included (s)"] == 0.5  # slower load: below 1
    assert ratios["one text query (batch 1 x 5 tokens, median ms)"] == 0.5
    drift = {metric: a for metric, a, b, f, _ in table if f is None}
    assert drift["cosine to fp32, image embeddings: min"] == 0.995


def test_cosines_are_row_wise_and_scale_free(bench):
    a = np.array([[1.0, 0.0], [3.0, 4.0]], np.float32)
    b = np.array([[2.0, 0.0], [4.0, -3.0]], np.float32)
    np.testing.assert_allclose(bench.cosines(a, b), [1.0, 0.0], atol=1e-7)


def test_tiny_run_compares_both_implementations(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--batch", "1", "--repeats", "1", "--threads", "1",
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for needle in ("metric", "altsearch", "transformers", "images/s", "texts/s", "peak RSS",
                   "load, text tower only", "max |ours - theirs|", "machine:", "torch", "one text query",
                   "altsearch's Linear layers:",
                   'quantize="int8"', "altsearch int8", "cosine to fp32"):
        assert needle in proc.stdout, needle
    report = json.loads(out.read_text())
    assert report["machine"]["threads"] == 1
    assert report["max_abs_diff"]["image"] < 1e-4 and report["max_abs_diff"]["text"] < 1e-4
    for row in report["table"]:
        assert row["altsearch"] >= 0 and math.isfinite(row["altsearch"]), row
    drift = report["int8"]["cosine_min_mean"]
    assert drift["image"][0] >= 0.99 and drift["text"][0] >= 0.99  # the int8 path ran and stayed close
    assert report["runs"]["ours_int8"]["images_per_s"] > 0
    assert report["runs"]["ours_both"]["linear"] in ("onednn", "torch")
    if report["runs"]["ours_both"]["linear"] == "onednn":  # then a long-lived process packs: timed too
        assert report["runs"]["ours_both"]["query_packed_ms"] > 0 and "text weights packed" in proc.stdout
    assert report["runs"]["ours_int8"]["linear"] == "int8"
    runs = report["runs"]
    assert runs["ours_text"]["maxrss_mib"] > 0 and runs["theirs"]["images_per_s"] > 0
    assert not (tmp_path / "work" / "checkpoint").exists()  # no --keep: the checkpoint is removed
