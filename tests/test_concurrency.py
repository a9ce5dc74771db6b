"""Readers never fail while a writer works; one writer at a time; engines are shared across threads."""

from __future__ import annotations

import json
import os
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
    photos = slow_folder
    index = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-m", "altsearch", "index", str(photos), "--index", str(index),
                               "--model", str(tiny_checkpoint), *SLOW_INDEX_ARGS, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    refused = 0
    try:
        while not (index / "catalog.sqlite").exists() and writer.poll() is None:
            time.sleep(0.1)
        while writer.poll() is None:
            with Engine.open(index, model=str(tiny_checkpoint), device="cpu", create=False) as reader:
                n = reader.stats()["images"]
                if n:
                    hits = reader.search("sunset over the sea", k=200)
                    # the reader sees a committed state: every hit is a catalogued image
                    assert len(hits) >= min(n, 1) and len({h.id for h in hits}) == len(hits)
                    seen.append(len(hits))
                    try:
                        reader.index(photos, workers=0)
                    except IndexLockedError as e:
                        assert f"being updated by process {writer.pid}" in str(e)
                        refused += 1
                    else:
                        break  # the writer had finished its run (it releases the lock before exiting)
    finally:
        out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    assert json.loads(out)["added"] == 100
    assert seen and seen == sorted(seen), "a reader saw the index shrink"
    assert len(set(seen)) > 1, "the reads did not overlap the indexing"
    assert refused > 0


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
