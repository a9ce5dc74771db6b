"""Real processes, real signals: Ctrl-C stops cleanly with exit code 130; SIGKILL loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SLOW_INDEX_ARGS, catalog_count

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "altsearch", *[str(a) for a in args]]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _start_and_wait_for_progress(cmd, index: Path, min_images: int, timeout: float = 120):
    """Start ``cmd`` and return once the catalogue holds at least ``min_images`` images."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None or catalog_count(index) >= min_images:
            return proc
        time.sleep(0.1)
    proc.kill()
    pytest.fail("indexing made no progress")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGKILL, -signal.SIGKILL)])
def test_stop_then_resume(slow_folder, tmp_path, tiny_checkpoint, sig, code):
    index = tmp_path / "idx"
    cmd = _cli("index", slow_folder, "--index", index, "--model", tiny_checkpoint, *SLOW_INDEX_ARGS)
    proc = _start_and_wait_for_progress(cmd, index, min_images=4)
    assert proc.poll() is None, "finished before it could be stopped: make the folder bigger"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    if sig == signal.SIGINT:
        assert "Interrupted" in out and "Traceback" not in err
    before = json.loads(subprocess.run(_cli("info", "--index", index, "--json"), capture_output=True,
                                       text=True, env=_env()).stdout)["images"]
    assert 0 < before < 100
    resumed = subprocess.run(_cli(*cmd[3:], "--json"), capture_output=True, text=True, env=_env())
    report = json.loads(resumed.stdout)
    assert report["added"] == 100 - before and report["unchanged"] == before
    info = json.loads(subprocess.run(_cli("info", "--index", index, "--json"), capture_output=True, text=True,
                                     env=_env()).stdout)
    assert info["images"] == info["vectors"] == 100
    check = subprocess.run(_cli("check", "--index", index, "--json"), capture_output=True, text=True, env=_env())
    assert json.loads(check.stdout)["problems"] == [], check.stdout
