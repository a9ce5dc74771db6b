"""benchmarks/bench_rescan.py keeps working: its library matches its catalogue, and a tiny run prints
the table with the figures it claims."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.benchscripts import bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_rescan.py"


def test_the_library_is_its_catalogue_and_is_made_once(tmp_path, tiny_checkpoint):
    with bench_script("bench_rescan") as bench:
        folder, index, info = bench.make_library(tmp_path, 1500, tiny_checkpoint)
        from altsearch.catalog import Catalog

        with Catalog(index / "catalog.sqlite", readonly=True) as cat:
            states = cat.file_states()
        files = {str(p): p.stat() for p in folder.rglob("*.jpg")}
        assert len(files) == 1500 and set(states) == set(files)
        assert all((s[1], s[2]) == (files[p].st_size, files[p].st_mtime) for p, s in states.items())
        assert len({p.parent for p in map(Path, files)}) == 2  # a thousand to a folder
        assert info["kind"] == "flat"
        assert bench.make_library(tmp_path, 1500, tiny_checkpoint)[2] == info  # cached, not made again


def test_tiny_run_finds_every_file_unchanged_without_torch(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "300", "--repeats", "1", "--model", "tiny",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| 300 | flat | altsearch |" in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert not row["floor"]["torch"] and not row["altsearch"]["torch"] and row["model up front"]["torch"]
    assert all(row[k]["wall_s"] > 0 and row[k]["rss_mb"] > 0 for k in ("floor", "altsearch", "model up front"))
