"""benchmarks/bench_index.py keeps working: its photos and a tiny run of its indexing table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image
from tests.benchscripts import bench_script


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_index.py"


@pytest.fixture(scope="module")
def bench():
    with bench_script("bench_index") as module:
        yield module


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


def test_tiny_run_prints_the_indexing_table(tmp_path):
    out = tmp_path / "report.json"
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--images", "2", "--size", "320x240", "--workers", "0,1", "--workdir", str(work),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for needle in ("machine:", "torch", "faiss", "reduced-size decoding", "images/s", "summary: best"):
        assert needle in proc.stdout, needle
    report = json.loads(out.read_text())
    rows = {(r["draft"], r["workers"]): r for r in report["indexing"]}
    assert set(rows) == {(False, 0), (False, 1), (True, 0), (True, 1)}
    assert rows[(False, 0)]["vs_base"] == 1.0
    assert all(r["images"] == 2 and r["images_per_s"] > 0 for r in rows.values())
    assert not (work / "scratch").exists()  # per-configuration indexes are removed
