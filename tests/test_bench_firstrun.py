"""benchmarks/bench_firstrun.py keeps working: its library holds the copies it claims, scanned last, and a
tiny run prints the table with the figures it claims."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from altsearch import Engine
from altsearch.scan import scan
from tests.benchscripts import bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_firstrun.py"


def test_the_library_has_a_copy_of_every_20th_photo_scanned_after_it_and_is_made_once(tmp_path):
    with bench_script("bench_firstrun") as bench:
        folder, files = bench.make_library(tmp_path, 1100)
        paths = [e.path for e in scan(str(folder))]
        assert files == len(paths) == 1100 + 55
        assert len({Path(p).parent for p in paths}) == 3  # a thousand photos to a folder, and the copies
        order = {Path(p).relative_to(folder).as_posix(): i for i, p in enumerate(paths)}
        copies = sorted(folder.joinpath("zz-copies").iterdir())
        assert len(copies) == 55
        for copy in copies:
            i = int(copy.stem.split("_")[1])
            original = folder / f"{i // 1000:05d}" / copy.name
            assert i % 20 == 0 and copy.read_bytes() == original.read_bytes()
            assert order[f"zz-copies/{copy.name}"] > order[original.relative_to(folder).as_posix()]
        assert len({Path(p).read_bytes() for p in paths}) == 1100  # the photos differ from each other
        stamp = folder.stat().st_mtime_ns
        assert bench.make_library(tmp_path, 1100) == (folder, files) and folder.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("into, scan_ms", [(0, 0), (100, 2)], ids=["new index", "into an index, slow scan"])
def test_tiny_run_embeds_each_photo_once_and_gives_the_growth_per_photo(tmp_path, into, scan_ms):
    """Into a new index, and into one that holds 100 other photos with the scan slowed: each run must add
    every file, embed each photo once and reuse each copy's vector (the script checks each run's report)."""
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "300,600", "--model", "tiny", "--exact-max", "280",
                           "--into", str(into), "--scan-ms", str(scan_ms), "--workdir", str(tmp_path / "work"),
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "EXACT_MAX lowered to 280" in proc.stdout
    assert ("into an index of 100 other photos" in proc.stdout) == bool(into)
    assert ("each scan entry 2 ms late" in proc.stdout) == bool(scan_ms)
    if into:
        base = tmp_path / "work" / "existing-100-index"
        with Engine.open(base, create=False) as engine:
            assert engine.stats()["images"] == 105  # copied for each run, never written to
    assert f"| 600 (+30) | {ROOT} | ivfpq |" in proc.stdout
    small, large = json.loads(out.read_text())["rows"]
    assert large["seconds"] >= 630 * scan_ms / 1000  # the run waited for its scan's 630 entries at least
    assert 0 < large["first_s"] < large["wall_s"]
    assert (small["files"], large["files"]) == (315, 630)  # the script checks each run embedded n, reused the rest
    assert "rss_per_photo" not in small and "embedding_per_photo" not in small  # the baseline
    assert large["rss_per_photo"] == (large["rss_mb"] - small["rss_mb"]) * 2**20 / 315
    assert large["embedding_per_photo"] == (large["embedding_mb"] - small["embedding_mb"]) * 2**20 / 315
    assert all(0 < r["embedding_mb"] <= r["rss_mb"] and r["photos_per_s"] > 0 for r in (small, large))


def test_resumed_runs_start_from_half_the_library_and_a_photo_deleted_since(tmp_path):
    """--resume: each run starts from a copy of an index of the library's first half and of one photo
    deleted since; the run adds the rest and removes that one (the script checks each run's report), and
    the library is left whole."""
    out = tmp_path / "report.json"
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "300,600", "--model", "tiny", "--resume",
                           "--scan-ms", "2", "--workdir", str(work), "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resumed: each run starts from an index of the library's first half" in proc.stdout
    small, large = json.loads(out.read_text())["rows"]
    assert (small["added"], large["added"]) == (315 - 150, 630 - 300)
    assert large["rss_per_photo"] == (large["rss_mb"] - small["rss_mb"]) * 2**20 / (330 - 165)
    with Engine.open(work / "resumed-600-index", create=False) as engine:
        assert engine.stats()["images"] == 301  # copied for each run, never written to
    folder = work / "photos-600"
    assert len([e for e in scan(str(folder))]) == 630 and not (folder / "00000" / "IMG_gone.jpg").exists()
    assert (work / "photos-600.json").is_file() and not (work / "resumed-600-aside").exists()
