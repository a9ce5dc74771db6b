from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.checkpoints import write_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_TOKENIZER = SHARED / "data" / "xlm-roberta" / "tokenizer.json"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
    parser.addoption("--long", action="store_true",
                     help="run the long version of the crash tests (same as ALTSEARCH_LONG_TESTS=1)")


def pytest_configure(config):
    if config.getoption("--long"):
        os.environ["ALTSEARCH_LONG_TESTS"] = "1"  # read when tests/test_crash.py is imported
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started in the background by a shell without job control (`cmd &` in a script, nohup),
        # this process and every process it starts inherit an ignored SIGINT, and Python then
        # installs no KeyboardInterrupt handler: the Ctrl-C tests would test nothing. Take the
        # default back, as a process started from a terminal has it.
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Nothing a test does touches ~ or the network: index home and HF cache live in tmp_path."""
    monkeypatch.setenv("ALTSEARCH_HOME", str(tmp_path / "altsearch-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random AltCLIP checkpoint (hub key layout) with the tiny tokenizer."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-altclip"), layout="hub", seed=0)


@pytest.fixture(scope="session")
def slow_folder(tmp_path_factory) -> Path:
    """100 camera-like JPEGs that take a running indexer several seconds (see tests/photos.py)."""
    from tests.photos import make_slow_folder

    return make_slow_folder(tmp_path_factory.mktemp("slow-photos"))


SLOW_INDEX_ARGS = ("--full-decode", "--workers", "1", "--batch-size", "1")


def catalog_count(index: Path) -> int:
    """Images committed to an index folder, read directly (cheap enough to poll)."""
    from altsearch.catalog import Catalog

    db = index / "catalog.sqlite"
    if not db.is_file():
        return 0
    with Catalog(db) as cat:
        return cat.count()


@pytest.fixture(scope="session")
def real_tokenizer_json() -> str:
    if not REAL_TOKENIZER.is_file():
        pytest.skip("../shared/data/xlm-roberta/tokenizer.json not present")
    return REAL_TOKENIZER.read_text(encoding="utf-8")


@pytest.fixture
def armed(monkeypatch):
    """Arm ALTSEARCH_FAULTS for in-process runs (the variable is read once, so re-read it): armed(spec),
    and armed("") to disarm before the test goes on; disarmed at the end in any case."""
    from altsearch import faults

    def arm(spec: str) -> None:
        monkeypatch.setenv(faults.ENV, spec)
        faults.reset()

    yield arm
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reset()
