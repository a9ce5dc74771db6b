"""Readers never fail while a writer works; one writer at a time; engines are shared across threads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from altsearch import Engine
from altsearch.errors import IndexLockedError
from tests.conftest import SLOW_INDEX_ARGS
from tests.photos import make_folder

ROOT = Path(__file__).resolve().parents[1]


def test_searches_in_another_process_during_indexing(tmp_path, tiny_checkpoint, slow_folder):
    """A reader works while the writer is held mid-run (the fault hook stops it at its 40th decoded
    image, holding the index's write lock), and again and again while it runs on."""
    index = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALTSEARCH_FAULTS": "decoded:40=stop"}
    writer = subprocess.Popen([sys.executable, "-m", "altsearch", "index", str(slow_folder), "--index",
                               str(index), "--model", str(tiny_checkpoint), *SLOW_INDEX_ARGS, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []

    def read():
        with Engine.open(index, model=str(tiny_checkpoint), device="cpu", create=False) as reader:
            before = reader.stats()["images"]
            hits = reader.search("sunset over the sea", k=200)
            after = reader.stats()["images"]
            # a committed state, whole: the writer may commit between the reads, never half a chunk
            assert before <= len(hits) <= after and len({h.id for h in hits}) == len(hits)
            seen.extend([before, after])

    try:
        _wait_until_stopped(writer)
        with Engine.open(index, model=str(tiny_checkpoint), device="cpu", create=False) as reader:
            with pytest.raises(IndexLockedError, match=f"being updated by process {writer.pid}"):
                reader.index(slow_folder, workers=0)
        read()
        os.kill(writer.pid, signal.SIGCONT)
        while writer.poll() is None:
            read()
    finally:
        if writer.poll() is None:
            os.kill(writer.pid, signal.SIGCONT)
        out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    assert json.loads(out)["added"] == 100
    read()
    assert seen == sorted(seen), "a reader saw the index shrink"
    assert seen[0] < 100 == seen[-1]


def _wait_until_stopped(proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] != "T":
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the writer never reached its stop point"
        time.sleep(0.02)


def test_engine_is_shared_between_threads(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    make_folder(photos, 10)
    with Engine.open(tmp_path / "idx", model=str(tiny_checkpoint), device="cpu") as engine:
        engine.index(photos, workers=0)
        queries = ["sunset", "海边的日落", "a cat", "beach + sunset - people"] * 6
        alone = {q: [h.id for h in engine.search(q, k=5)] for q in set(queries)}
    with Engine.open(tmp_path / "idx", device="cpu") as engine:  # cold: towers load under concurrency
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda q: (q, [h.id for h in engine.search(q, k=5)]), queries))
    for q, ids in results:
        assert ids == alone[q]
