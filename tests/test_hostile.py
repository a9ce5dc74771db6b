"""Hostile input through the real CLI: a corpus of broken and strange files, hostile queries, and
damaged, tampered or foreign index files. Every case ends indexed, or explained in one line."""

from __future__ import annotations

import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from altsearch import Engine
from altsearch import catalog as catalog_module
from altsearch.catalog import SCHEMA_VERSION, Catalog
from altsearch.cli import app
from tests.hostile import (
    EITHER,
    FAILED,
    IGNORED,
    INDEXED,
    assert_one_line_error,
    bomb_png,
    cli,
    cli_env,
    make_hostile_folder,
    run_cli,
)
from tests.photos import make_folder, save_photo

MAX_RSS_BYTES = 2.5e9
# Runs the CLI as its child and writes the peak RSS of any of its waited-for descendants (the indexer
# and its decode workers), isolated from whatever else this test process ran before.
_RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))\n"
    "sys.exit(rc)\n"
)


# --- the hostile corpus ---------------------------------------------------------------------------


def test_hostile_corpus_is_indexed_or_explained(tmp_path, tiny_checkpoint):
    cases = make_hostile_folder(tmp_path / "hostile")
    index = tmp_path / "idx"
    rss_file = tmp_path / "peak-rss"
    args = ("index", tmp_path / "hostile", "--index", index, "--model", tiny_checkpoint, "--workers", "2", "--json")
    run = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, str(rss_file), *cli(*args)],
                         capture_output=True, text=True, env=cli_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "worker" not in run.stderr, run.stderr[-3000:]  # no pool restart
    peak_rss = int(rss_file.read_text())
    assert peak_rss < MAX_RSS_BYTES, f"indexing the hostile corpus peaked at {peak_rss / 1e9:.2f} GB"

    with Catalog(index / "catalog.sqlite") as cat:
        indexed = set(cat.file_states())
        failed = {path: reason for path, reason, _ in cat.failures()}
        huge = cat.get_by_path(cases["100-megapixel jpeg"].path)
    errors = json.loads(run_cli("errors", "--index", index, "--json").stdout)
    assert {e["path"]: e["reason"] for e in errors} == failed
    outcomes = {}
    for name, case in cases.items():
        outcome = INDEXED if case.path in indexed else FAILED if case.path in failed else IGNORED
        outcomes[name] = outcome if case.expect != EITHER else f"{outcome} ({case.expect})"
        assert case.path not in indexed or case.path not in failed, name
        assert outcome == case.expect or (case.expect == EITHER and outcome != IGNORED), (name, outcome)
        if outcome == FAILED:
            assert failed[case.path], name
            assert case.reason is None or case.reason in failed[case.path], (name, failed[case.path])
    manifest = {c.path for c in cases.values()}
    assert indexed <= manifest and set(failed) <= manifest, "something unexpected was indexed or failed"
    assert (huge.width, huge.height) == (10_000, 10_000)
    print(f"\nhostile outcomes: {json.dumps(outcomes)}; peak RSS {peak_rss / 1e6:.0f} MB")

    report = json.loads(run.stdout)
    assert (report["added"], report["failed"]) == (len(indexed), len(failed))
    info = json.loads(run_cli("info", "--index", index, "--json").stdout)
    assert info["images"] == info["vectors"] == len(indexed)
    assert json.loads(run_cli("check", "--index", index, "--json").stdout)["problems"] == []
    with Engine.open(index, device="cpu", create=False) as engine:  # a second run: same verdicts, no work
        again = engine.index(tmp_path / "hostile", workers=0)
    assert (again.added, again.unchanged, again.failed) == (0, len(indexed), len(failed))
    assert dict(again.failures) == failed


# --- hostile queries -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_checkpoint):
    """A clean six-photo index, and odd files to use as query images."""
    root = tmp_path_factory.mktemp("small")
    make_folder(root / "photos", 6)
    with Engine.open(root / "idx", model=str(tiny_checkpoint), device="cpu") as engine:
        engine.index(root / "photos", workers=0)
    odd = root / "odd"
    odd.mkdir()
    (odd / "text.jpg").write_text("not a picture\n")
    (odd / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    (odd / "folder.jpg").mkdir()
    os.mkfifo(odd / "pipe.jpg")
    (odd / "zero.jpg").symlink_to("/dev/zero")
    return root


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def _one_line_error(result, words: str) -> None:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    assert words in result.stderr, result.stderr


@pytest.mark.parametrize("query, words", [
    ("", "empty query"),
    (" \t\n\u3000 ", "empty query"),
    ("x" * 10_000, "query too long: 10000 characters"),
    ("beach " * 1_700, "query too long"),
    ("\x01\x02\x1b\x7f", "empty query"),
    ("sun\x00set", "NUL"),
    ("caf\udce9", "not valid Unicode"),  # undecodable command-line bytes
    ("#99999999999999999999999", "image id too large"),
    ("#123456", "no image with id 123456"),
    ("beach + + sunset", "missing term"),
    ("{odd}/text.jpg", "not an image"),
    ("{odd}/bomb.png", "image too large"),
    ("{odd}/missing.jpg", "image file not found"),
])
def test_bad_queries_are_one_line_errors(small, query, words):
    _one_line_error(_invoke("search", query.replace("{odd}", str(small / "odd")), "--index", small / "idx"), words)


@pytest.mark.parametrize("query", ["sun\x01set\x1b[31m beach\x7f", "海边的日落\u3000sunset",
                                   "sunset:100 - sunset:1"])
def test_odd_but_valid_queries_give_results(small, query):
    result = _invoke("search", query, "--index", small / "idx", "-k", "3", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(json.loads(result.stdout)) == 3


def test_a_huge_k_gives_every_image(small):
    result = _invoke("search", "sunset", "--index", small / "idx", "-k", "1000000000", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 6


@pytest.mark.parametrize("name, words", [("text.jpg", "not an image"), ("folder.jpg", "is a directory"),
                                         ("bomb.png", "image too large")])
def test_similar_to_a_file_that_is_no_image(small, name, words):
    _one_line_error(_invoke("similar", small / "odd" / name, "--index", small / "idx"), words)


@pytest.mark.parametrize("name", ["pipe.jpg", "zero.jpg"])
def test_similar_to_a_fifo_or_device_neither_hangs_nor_reads_forever(small, name):
    """In a subprocess with a deadline and a memory cap: a FIFO would block an open() for ever, and
    /dev/zero would be read until memory runs out."""

    def capped():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    result = run_cli("similar", small / "odd" / name, "--index", small / "idx", timeout=120, preexec_fn=capped)
    assert_one_line_error(result, "not a regular file")


def test_results_with_a_non_utf8_path_print_as_valid_utf8(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    name = b"caf\xe9.jpg"
    save_photo(photos / "plain.jpg", seed=1)
    save_photo(Path(os.fsdecode(os.path.join(os.fsencode(photos), name))), seed=2)
    index = tmp_path / "idx"
    with Engine.open(index, model=str(tiny_checkpoint), device="cpu") as engine:
        engine.index(photos, workers=0)
    env = cli_env(PYTHONIOENCODING="utf-8:strict")  # what an en_US.UTF-8 desktop gives Python
    table = subprocess.run(cli("search", "cafe", "--index", index), capture_output=True, env=env, timeout=300)
    assert table.returncode == 0, table.stderr[-2000:]
    as_json = subprocess.run(cli("search", "cafe", "--index", index, "--json"), capture_output=True, env=env,
                             timeout=300)
    assert as_json.returncode == 0, as_json.stderr[-2000:]
    paths = {os.fsencode(h["path"]) for h in json.loads(as_json.stdout.decode("utf-8"))}
    assert os.path.join(os.fsencode(photos), name) in paths


# --- damaged and foreign index files ----------------------------------------------------------------


def _answered(index: Path) -> tuple[Path, list[dict]]:
    """The index and its answer to one query."""
    return index, json.loads(_invoke("search", "sunset", "--index", index, "--json").stdout)


def _copied(answered: tuple[Path, list[dict]], tmp_path: Path) -> tuple[Path, list[dict]]:
    """A copy of an index to tamper with, and the answer of the original."""
    source, hits = answered
    shutil.copytree(source, tmp_path / "idx")
    return tmp_path / "idx", hits


@pytest.fixture(scope="module")
def pristine(small):
    """The small index and its answer to one query, before anyone tampers with a copy of it."""
    return _answered(small / "idx")


@pytest.fixture
def index_copy(pristine, tmp_path):
    return _copied(pristine, tmp_path)


@pytest.fixture(scope="module")
def compact(tmp_path_factory, tiny_checkpoint):
    """An index whose vector index is saved to a file (a flat one never is): 48 photos held as an ivf
    (which needs 40), chosen with optimize; and its answer to one query."""
    root = tmp_path_factory.mktemp("compact")
    make_folder(root / "photos", 48)
    with Engine.open(root / "idx", model=str(tiny_checkpoint), device="cpu") as engine:
        engine.index(root / "photos", workers=0)
        assert engine.optimize("ivf") == {"kind": "ivf", "vectors": 48}
    return _answered(root / "idx")


@pytest.fixture
def compact_copy(compact, tmp_path):
    return _copied(compact, tmp_path)


def _assert_same_hits(got: list[dict], want: list[dict]) -> None:
    """The same images in the same order, with the same scores up to float rounding (an ivf of one list
    and a flat index both search exhaustively, in different FAISS code)."""
    assert [h["path"] for h in got] == [h["path"] for h in want]
    np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], rtol=0, atol=1e-5)


def _rewrite_header(index: Path, **changes) -> None:
    path = index / "vectors.faiss.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


TAMPERINGS = {
    "bit flip in the FAISS file": (lambda i: _flip_a_bit(i / "vectors.faiss"), "does not match its checksum"),
    "FAISS file truncated": (lambda i: (i / "vectors.faiss").write_bytes((i / "vectors.faiss").read_bytes()[:100]),
                             "truncated"),
    "FAISS file deleted": (lambda i: (i / "vectors.faiss").unlink(), "missing"),
    "header garbage": (lambda i: (i / "vectors.faiss.json").write_text("{garbage"), "damaged"),
    "header deleted": (lambda i: (i / "vectors.faiss.json").unlink(), "no header"),
    "header ahead of the catalogue": (lambda i: _rewrite_header(i, generation=10**6), "newer than the catalogue"),
    "header of another catalogue": (lambda i: _rewrite_header(i, catalog_id="0" * 32), "another catalogue"),
}


@pytest.mark.parametrize("tampering", TAMPERINGS)
def test_tampered_vector_files_are_explained_and_repaired(compact_copy, tampering):
    index, hits = compact_copy
    damage, words = TAMPERINGS[tampering]
    damage(index)
    checked = _invoke("check", "--index", index)
    assert checked.exit_code == 1 and words in checked.stdout, checked.stdout
    assert "check --repair" in checked.stdout
    searched = _invoke("search", "sunset", "--index", index, "--json")  # a flat index built from the catalogue
    assert searched.exit_code == 0
    _assert_same_hits(json.loads(searched.stdout), hits)
    repaired = _invoke("check", "--index", index, "--repair", "--json")
    assert repaired.exit_code == 0 and json.loads(repaired.stdout)["repaired"] is True
    assert json.loads(_invoke("check", "--index", index, "--json").stdout) == {"problems": [], "repaired": False}
    assert (index / "vectors.faiss").exists()  # repaired as the ivf chosen with optimize, not as 48 images pick
    _assert_same_hits(json.loads(_invoke("search", "sunset", "--index", index, "--json").stdout), hits)


@pytest.mark.parametrize("damage, words", [
    (lambda db: db.write_bytes(db.read_bytes()[:3000]), "malformed"),
    (lambda db: db.write_bytes(db.read_bytes()[: db.stat().st_size // 2]), "malformed"),
    (lambda db: db.write_bytes(b"\x17garbage!" * 2000), "not a database"),
    (lambda db: db.write_bytes(b""), "empty (0 bytes)"),
], ids=["truncated to 3000 bytes", "truncated by half", "garbage", "zero bytes"])
def test_a_damaged_catalogue_is_a_one_line_error(index_copy, damage, words):
    index, _ = index_copy
    damage(index / "catalog.sqlite")
    _one_line_error(_invoke("info", "--index", index), words)
    _one_line_error(_invoke("search", "sunset", "--index", index), words)


def _set_schema_version(db: Path, version: int) -> None:
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    raw.close()


def test_a_catalogue_from_a_newer_altsearch_is_refused(index_copy, small):
    index, _ = index_copy
    _set_schema_version(index / "catalog.sqlite", SCHEMA_VERSION + 1)
    for args in (["info"], ["search", "sunset"], ["index", small / "photos"]):
        _one_line_error(_invoke(*args, "--index", index), f"newer altsearch (schema {SCHEMA_VERSION + 1}")


def test_an_older_catalogue_is_migrated_after_a_backup(index_copy, monkeypatch):
    index, hits = index_copy
    ran = []

    def add_a_column(conn) -> None:  # noqa: ANN001
        ran.append(SCHEMA_VERSION)
        conn.exec_driver_sql("ALTER TABLE images ADD COLUMN rating INTEGER")

    monkeypatch.setattr(catalog_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(catalog_module, "MIGRATIONS", {SCHEMA_VERSION: add_a_column})
    info = _invoke("info", "--index", index, "--json")
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["schema_version"] == str(SCHEMA_VERSION + 1) and ran == [SCHEMA_VERSION]
    backup = index / f"catalog.sqlite.bak-v{SCHEMA_VERSION}"
    with sqlite3.connect(backup) as raw:
        assert raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        assert raw.execute("SELECT count(*) FROM images").fetchone() == (6,)
    raw.close()
    searched = _invoke("search", "sunset", "--index", index, "--json")
    assert searched.exit_code == 0 and json.loads(searched.stdout) == hits and ran == [SCHEMA_VERSION]


def test_a_catalogue_without_a_migration_path_is_refused(index_copy, monkeypatch):
    index, _ = index_copy
    monkeypatch.setattr(catalog_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(catalog_module, "MIGRATIONS", {})
    _one_line_error(_invoke("info", "--index", index), f"no migration from catalogue schema {SCHEMA_VERSION}")
    monkeypatch.setattr(catalog_module, "SCHEMA_VERSION", SCHEMA_VERSION)
    assert _invoke("info", "--index", index).exit_code == 0  # the failed migration changed nothing
