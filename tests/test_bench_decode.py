"""benchmarks/bench_decode.py keeps working: a tiny run of its table of decoding stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_decode.py"


def test_tiny_run_prints_every_cpu_stage_against_the_naive_decode(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--images", "3", "--size", "640x480", "--readers", "2", "--workers", "1",
         "--device", "cuda", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for needle in ("machine:", "| stage | setting | photos/s | x naive | CPU ms/photo |", "2 threads", "1 process"):
        assert needle in proc.stdout, needle
    report = json.loads(out.read_text())
    stages = [r["stage"] for r in report["stages"]]
    cpu_stages = ["naive", "readers, sha256-128", "readers, blake2b-128", "cpu decode"]
    if "no GPU decoding rows" in proc.stdout:
        assert stages == cpu_stages
    else:  # a CUDA machine with torchvision
        assert stages == cpu_stages + ["nvJPEG alone"] * 3 + ["GPU decoder, whole"]
    rows = {r["stage"]: r for r in report["stages"]}
    assert rows["naive"]["x_naive"] == 1.0
    assert all(r["photos"] == 3 and r["photos_per_s"] > 0 and r["cpu_ms_per_photo"] > 0 for r in rows.values())
    # the worker process's CPU time is counted, not only this process's
    assert rows["cpu decode"]["cpu_ms_per_photo"] > 5 * rows["readers, sha256-128"]["cpu_ms_per_photo"]


def test_the_gpu_rows_time_each_library_in_groups_and_the_whole_decoder(tmp_path, monkeypatch):
    """What --device cuda adds, run here with the tests' Pillow stand-in for the libraries on the CPU."""
    import torch

    from altsearch import gpudecode
    from altsearch.model.preprocess import PreprocessConfig
    from tests.benchscripts import bench_script
    from tests.photos import save_photo
    from tests.test_gpudecode import pillow_as_nvjpeg

    calls = {"nvimgcodec": [], "torchvision": []}

    def library(name):
        def decode(datas, device):
            calls[name].append(len(datas))
            return pillow_as_nvjpeg(datas, device)

        return gpudecode.JpegLibrary(name, decode)

    libraries = {name: library(name) for name in calls}
    monkeypatch.setattr(gpudecode, "jpeg_library", libraries.get)
    monkeypatch.setattr(gpudecode, "gpu_decode_unavailable", lambda device, cfg, load=True: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    paths = [str(save_photo(tmp_path / f"p{i}.jpg", i, size=(640, 480))) for i in range(10)]
    with bench_script("bench_decode") as bench:
        rows = bench.gpu_rows(PreprocessConfig(), paths, "cpu")
    readers = gpudecode._default_readers()
    whole = f"{readers} reader thread{'s' if readers > 1 else ''}, 1 decoding thread, groups of {gpudecode.GROUP}"
    expected = []
    for name in ("nvimgcodec", "torchvision"):
        expected += [(f"{name} alone", f"groups of {g}") for g in (64, 32, 1)]
        expected.append((f"GPU decoder, whole, {name}", whole))
    assert [(r["stage"], r["setting"]) for r in rows] == expected
    assert all(r["photos"] == 10 and r["photos_per_s"] > 0 for r in rows)
    assert all(set(r["waited"]) == {"read", "gpu"} for r in rows if "whole" in r["stage"])
    # each row: a warm-up on two photos, then all ten in its groups (64, 32, 1); then the whole decoder
    for name in calls:
        assert calls[name] == [2, 10, 2, 10] + [1] * 12 + [2, 10]
    monkeypatch.setattr(gpudecode, "jpeg_library", {"torchvision": libraries["torchvision"]}.get)
    with bench_script("bench_decode") as bench:
        assert [r["stage"] for r in bench.gpu_rows(PreprocessConfig(), paths, "cpu")][-1] == \
            "GPU decoder, whole, torchvision"  # only the libraries that load
