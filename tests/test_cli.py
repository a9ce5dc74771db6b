"""The altsearch command driven through typer's CliRunner: exit codes, JSON output, errors."""

from __future__ import annotations

import os
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from altsearch.catalog import Catalog
from altsearch.cli import app
from altsearch.ingest import IndexReport
from tests.checkpoints import write_checkpoint
from tests.oldformats import write_old_flat_file
from tests.photos import make_folder, save_photo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args, code=0):
        result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
        assert result.exit_code == code, (result.output, result.exception)
        return result

    return invoke


@pytest.fixture
def indexed(tmp_path, tiny_checkpoint, run):
    photos = tmp_path / "photos"
    make_folder(photos, 8)
    index = tmp_path / "idx"
    report = json.loads(run("index", photos, "--index", index, "--model", tiny_checkpoint, "--workers", "0",
                            "--json").stdout)
    assert report["added"] == 8 and report["failed"] == 0
    assert set(report["waited"]) == {"decode", "model", "commit"} and report["waited"]["model"] > 0
    return index, photos


def test_index_report_counts_and_reruns(indexed, run):
    index, photos = indexed
    (photos / "home" / "2021" / "img_000.jpg").unlink()
    r = json.loads(run("index", photos, "--index", index, "--workers", "0", "--json").stdout)
    assert {k: r[k] for k in ("added", "updated", "moved", "removed", "unchanged", "failed")} == \
        dict(added=0, updated=0, moved=0, removed=1, unchanged=7, failed=0)
    text = run("index", photos, "--index", index, "--workers", "0").stdout
    assert "added 0, updated 0, moved 0, removed 0, unchanged 7, failed 0" in text


def test_search_json_is_ranked_objects(indexed, run):
    index, _ = indexed
    for query in ("海边的日落", "sunset over the sea"):
        hits = json.loads(run("search", query, "--index", index, "-k", "3", "--json").stdout)
        assert len(hits) == 3
        assert all({"path", "score", "id", "date", "size"} <= set(h) for h in hits)
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_a_search_answers_from_the_tokenizers_piece_table_as_from_the_whole_model(indexed, run, monkeypatch):
    """The first search writes the tokenizer's piece table to the cache; the next ones read it. Every
    answer is the one the whole tokenizer model gives (ALTSEARCH_PIECE_TABLE=0)."""
    from altsearch.home import cache_dir
    from altsearch.model.tokenizer import PIECES_ENV

    index, _ = indexed
    queries = ("海边的日落", "sunset over the sea", "red car 猫 + snow - night")
    answers = [run("search", q, "--index", index, "-k", "5", "--json").stdout for q in queries]
    assert len(list((cache_dir() / "tokenizers").glob("*.pieces"))) == 1
    assert [run("search", q, "--index", index, "-k", "5", "--json").stdout for q in queries] == answers
    monkeypatch.setenv(PIECES_ENV, "0")
    assert [run("search", q, "--index", index, "-k", "5", "--json").stdout for q in queries] == answers


def test_an_older_altsearchs_flat_vector_file_is_passed_over_then_deleted(indexed, run):
    """A flat index has no file: the search builds it from the catalogue beside the model load. A
    vectors.faiss that an older altsearch saved for it (here with other vectors, and a header that
    makes it look current) is never read, is no problem to `check`, and the next `index` deletes it."""
    index, photos = indexed
    args = ("search", "sunset over the sea", "--index", index, "-k", "5", "--json")
    before = json.loads(run(*args).stdout)
    assert sorted(p.name for p in index.iterdir() if "vectors" in p.name) == []
    with Catalog(index / "catalog.sqlite") as cat:
        ids = cat.vector_ids()
        other = np.random.default_rng(7).standard_normal((len(ids), cat.dimension)).astype(np.float32)
        write_old_flat_file(index / "vectors.faiss", ids, other, generation=cat.generation,
                            catalog_id=cat.catalog_id)
    searched = run(*args)
    assert json.loads(searched.stdout) == before and searched.stderr == ""
    assert "consistent" in run("check", "--index", index).stdout
    run("index", photos, "--index", index, "--workers", "0")  # nothing to do, but a writer: it cleans up
    assert sorted(p.name for p in index.iterdir() if "vectors" in p.name) == []
    assert json.loads(run(*args).stdout) == before


def test_help_and_a_mistyped_query_load_no_heavy_library(tmp_path):
    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from altsearch.cli import app\n"
            "for args in (['--help'], ['search', '--help'], ['search', 'beach + +', '--index', sys.argv[1]]):\n"
            "    CliRunner().invoke(app, args)\n"
            "print(sorted({'torch', 'faiss', 'sqlalchemy', 'tokenizers', 'PIL'} & set(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "idx")], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_a_text_search_reads_neither_images_nor_the_vision_tower(indexed):
    """A cold text query imports no Pillow (the model's image settings are read on first image use) and
    no numpy.ma (pulled in by np.unique): each is milliseconds of every `altsearch search`."""
    index, _ = indexed
    code = ("import json, sys\n"
            "from typer.testing import CliRunner\n"
            "from altsearch.cli import app\n"
            "result = CliRunner().invoke(app, ['search', 'sunset over the sea', '--index', sys.argv[1], '--json'])\n"
            "assert result.exit_code == 0, result.output\n"
            "print(json.dumps([len(json.loads(result.stdout)), sorted({'PIL', 'numpy.ma', 'altsearch.model.preprocess',"
            " 'altsearch.decode'} & set(sys.modules))]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(index)], capture_output=True, text=True, cwd=ROOT,
                          check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [8, []], proc.stdout + proc.stderr


def test_a_rerun_with_nothing_to_embed_does_not_import_torch(indexed, run):
    """A nightly re-run over an unchanged library: no torch (about 2 s of a cold start), no model load."""
    index, photos = indexed
    code = ("import json, sys\n"
            "from typer.testing import CliRunner\n"
            "from altsearch.cli import app\n"
            "result = CliRunner().invoke(app, ['index', sys.argv[2], '--index', sys.argv[1], '--json'])\n"
            "assert result.exit_code == 0, result.output\n"
            "report = json.loads(result.stdout)\n"
            "print(json.dumps([report['unchanged'], report['added'], report['removed'], 'torch' in sys.modules]))\n")

    def rerun():
        proc = subprocess.run([sys.executable, "-c", code, str(index), str(photos)], capture_output=True,
                              text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout.splitlines()[-1])

    assert rerun() == [8, 0, 0, False]
    files = sorted(photos.rglob("*.jpg"))
    os.utime(files[0], (1_700_000_000, 1_700_000_000))  # touched: hashed, found the same, not embedded
    files[1].unlink()
    assert rerun() == [7, 0, 1, False]
    save_photo(photos / "new.jpg", seed=123)  # new content: the model runs
    assert rerun() == [7, 1, 0, True]


def test_search_table_and_filters(indexed, run):
    index, photos = indexed
    out = run("search", "a photo", "--index", index, "--under", photos / "trips").stdout
    assert str(photos / "trips") in out and str(photos / "home") not in out
    hits = json.loads(run("search", "a photo", "--index", index, "--from", "2022", "--to", "2022",
                          "--json").stdout)
    assert hits and all(h["date"].startswith("2022") for h in hits)
    assert run("search", "a photo", "--index", index, "--min-score", "1.5").stdout.strip() == "no results"


def test_similar_by_path_and_id(indexed, run):
    index, photos = indexed
    path = photos / "home" / "2021" / "img_000.jpg"
    by_path = json.loads(run("similar", path, "--index", index, "--json", "-k", "3").stdout)
    assert str(path) not in [h["path"] for h in by_path]
    first = by_path[0]["id"]
    by_id = json.loads(run("similar", f"#{first}", "--index", index, "--json").stdout)
    assert first not in [h["id"] for h in by_id]


def test_info_json(indexed, run, tiny_checkpoint):
    index, _ = indexed
    info = json.loads(run("info", "--index", index, "--json").stdout)
    assert {k: info[k] for k in ("images", "vectors", "failures", "dimension")} == \
        dict(images=8, vectors=8, failures=0, dimension=24)
    assert info["model"] == str(tiny_checkpoint.absolute())


def test_errors_lists_failures(indexed, run):
    index, photos = indexed
    (photos / "broken.jpg").write_text("not a jpeg")
    r = json.loads(run("index", photos, "--index", index, "--workers", "0", "--json").stdout)
    assert r["failed"] == 1 and r["failures"][0]["path"].endswith("broken.jpg")
    failures = json.loads(run("errors", "--index", index, "--json").stdout)
    assert [Path(f["path"]).name for f in failures] == ["broken.jpg"] and failures[0]["reason"]
    assert "broken.jpg" in run("errors", "--index", index).stdout
    # an indexed photo rewritten into something unreadable: the summary says it left the index
    indexed_photo = next(p for p in sorted(photos.rglob("*.jpg")) if p.name != "broken.jpg")
    indexed_photo.write_bytes(indexed_photo.read_bytes()[:100])
    os.utime(indexed_photo, (1_700_000_000, 1_700_000_000))
    text = run("index", photos, "--index", index, "--workers", "0").stdout
    assert "failed 2" in text and "1 of them was indexed before" in text and "dropped from the index" in text
    assert json.loads(run("info", "--index", index, "--json").stdout)["images"] == 7
    assert "indexed before" not in run("index", photos, "--index", index, "--workers", "0").stdout


def test_remove_optimize_check(indexed, run):
    index, photos = indexed
    assert json.loads(run("remove", photos / "trips", "--index", index, "--json").stdout) == {"removed": 4}
    assert json.loads(run("optimize", "--index", index, "--json").stdout) == {"kind": "flat", "vectors": 4}
    assert "consistent" in run("check", "--index", index).stdout
    assert not (index / "vectors.faiss").exists()  # a flat index is built from the catalogue when opened
    (index / "vectors.faiss").write_bytes(b"tampered")
    bad = run("check", "--index", index, code=1)
    assert "problem:" in bad.stdout
    run("check", "--index", index, "--repair")
    assert json.loads(run("check", "--index", index, "--json").stdout)["problems"] == []


def test_optimize_kind_flat_beyond_exact_max_sticks(indexed, run, monkeypatch):
    """`optimize --kind flat` on an index beyond EXACT_MAX (lowered so that 8 photos are beyond it):
    `check` accepts the exact index, which has no file, the next `index` keeps it, and a failed
    optimize changes no choice; `--kind auto` lets the size pick again."""
    from altsearch import vectors

    index, photos = indexed
    monkeypatch.setattr(vectors, "EXACT_MAX", 4)
    assert "8 images call for an approximate index" in run("check", "--index", index, code=1).stdout
    assert json.loads(run("optimize", "--index", index, "--kind", "flat", "--json").stdout) == \
        {"kind": "flat", "vectors": 8}
    assert "consistent" in run("check", "--index", index).stdout
    run("index", photos, "--index", index, "--workers", "0")
    assert json.loads(run("info", "--index", index, "--json").stdout)["vector_index"] == "flat"
    assert not [p for p in index.iterdir() if "vectors" in p.name]
    failed = run("optimize", "--index", index, "--json", code=1)  # auto: an ivfpq, which 8 vectors cannot train
    assert "needs at least 256 vectors" in failed.stderr
    assert json.loads(run("check", "--index", index, "--json").stdout) == {"problems": [], "repaired": False}
    monkeypatch.setattr(vectors, "EXACT_MAX", 100)
    assert "flat" in run("optimize", "--index", index, "--kind", "auto").stdout
    monkeypatch.setattr(vectors, "EXACT_MAX", 4)
    assert "approximate index" in run("check", "--index", index, code=1).stdout


def test_a_rebuild_shows_a_progress_bar_on_a_terminal(indexed, run, monkeypatch):
    """optimize (and check --repair, remove) draw what the rebuild is doing on stderr when it is a
    terminal, as indexing does; with --json, or not on a terminal, nothing is drawn."""
    import io

    from rich.console import Console

    from altsearch import cli

    index, _ = indexed
    screen = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=screen, force_terminal=True, width=150))
    assert "vector index: flat, 8 vectors" in run("optimize", "--index", index, "--kind", "flat").stdout
    assert "reading vectors" in screen.getvalue() and "8/8" in screen.getvalue()
    screen.seek(0), screen.truncate()
    run("optimize", "--index", index, "--kind", "flat", "--json")
    assert screen.getvalue() == ""

    # an indexing run's bar names the rebuild's steps too (its "vectors" phase)
    from altsearch.ingest import Progress

    report = IndexReport(folder=str(index))
    for step, done, total, shown in (("train", 0, 1, "training the vector index"), ("add", 6, 8, "6/8"),
                                     ("tune", 3, 3, "tuning the vector index")):
        with cli._progress(True) as update:  # a bar draws its last state as it closes
            update(Progress("vectors", done, total, report, step))
        assert shown in screen.getvalue()

    # while the scan goes on, an indexing run embeds with no total yet: the bar says how many it has found
    for total, shown in ((None, "still scanning: 1,200 found to embed"), (1500, "40/1500")):
        screen.seek(0), screen.truncate()
        with cli._progress(True) as update:
            update(Progress("embed", 40, total, report, found=1200 if total is None else 1500))
        assert shown in screen.getvalue() and ("scanning" in screen.getvalue()) == (total is None)


def test_model_mismatch_is_one_line_error(indexed, run, tmp_path):
    index, _ = indexed
    other = write_checkpoint(tmp_path / "other", seed=5)
    r = run("search", "a cat", "--index", index, "--model", other, code=1)
    assert r.stderr.count("\n") == 1 and "built with model" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["search", "x", "--index", "nowhere"], "no index at"),
    (["search", "x", "--index", "{photos}"], "holds no altsearch catalogue. --index names where an index is stored"),
    (["search", "beach + +", "--index", "nowhere"], "missing term"),  # the query is checked first
    (["search", "   ", "--index", "{index}"], "empty"),
    (["similar", "/no/such/file.jpg", "--index", "{index}"], "file"),
    (["index", "/no/such/folder", "--index", "{index}"], "not found"),
    (["model", "info", "/no/such/model"], "not found"),
])
def test_bad_input_is_one_line_error(indexed, run, args, message):
    index, photos = indexed
    r = run(*[a.replace("{index}", str(index)).replace("{photos}", str(photos)) for a in args], code=1)
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1
    assert message in r.stderr.lower()


def test_interrupted_index_exits_130(indexed, run, monkeypatch):
    index, photos = indexed
    from altsearch import engine as engine_mod

    monkeypatch.setattr(engine_mod.Engine, "index",
                        lambda self, folder, **kw: IndexReport(folder=str(folder), added=2, interrupted=True))
    r = run("index", photos, "--index", index, code=130)
    assert "Interrupted" in r.stdout and "added 2" in r.stdout


def test_model_info_and_convert_bin(tmp_path, tiny_checkpoint, run):
    info = json.loads(run("model", "info", tiny_checkpoint, "--json").stdout)
    assert info["dimension"] == 24 and info["vision"]["patch"] == 32
    assert info["parameters"]["total"] == sum(info["parameters"][k] for k in
                                              ("text", "vision", "projections", "logit_scale"))
    # a checkpoint shipped as pytorch_model.bin is refused at run time and converted on request
    from safetensors.torch import load_file

    src = tmp_path / "bin-model"
    src.mkdir()
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json"):
        (src / name).write_bytes((tiny_checkpoint / name).read_bytes())
    torch.save(load_file(tiny_checkpoint / "model.safetensors"), src / "pytorch_model.bin")
    r = run("model", "info", src, code=1)
    assert "missing model.safetensors (only pytorch_model.bin" in r.stderr and "model convert" in r.stderr
    out = run("model", "convert", src, tmp_path / "converted").stdout
    assert "model.safetensors" in out
    from altsearch import load_model

    a = load_model(tiny_checkpoint, device="cpu").encode_text(["a cat"])
    b = load_model(tmp_path / "converted", device="cpu").encode_text(["a cat"])
    assert (a == b).all()


def test_cli_reference_is_current():
    from altsearch.clidoc import render

    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == render(), \
        "docs/cli.md is stale: run python -m altsearch.clidoc > docs/cli.md"


def test_interrupt_outside_the_run_says_what_was_kept(indexed, run, monkeypatch):
    index, photos = indexed
    from altsearch import engine as engine_mod

    def interrupted(self, folder, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_mod.Engine, "index", interrupted)
    r = run("index", photos, "--index", index, code=130)
    assert "what was committed is kept" in r.stderr


def test_the_summary_names_where_and_with_what_jpegs_were_decoded(monkeypatch):
    import io

    from rich.console import Console

    from altsearch import cli

    printed = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=printed, width=200))
    cli._print_report(IndexReport(folder="/photos", embedded=3, decoder="gpu", jpeg_library="nvimgcodec"))
    cli._print_report(IndexReport(folder="/photos", embedded=3))
    first, _, second, _ = printed.getvalue().splitlines()
    assert "JPEGs decoded on the GPU by nvimgcodec" in first and "GPU" not in second


@pytest.mark.parametrize("command", [["search", "a cat"], ["similar", "#1"], ["index", "{photos}"]])
@pytest.mark.parametrize("device", ["foo", "cuda:01", "gpu"])
def test_a_bad_device_is_one_line_error(indexed, command, device):
    """Refused as the command line is parsed: not by the thread that opens the vector index meanwhile
    (its traceback printed first) nor by the search (a traceback instead of the error). A subprocess,
    as the thread's traceback bypasses CliRunner's stderr."""
    index, photos = indexed
    args = [a.replace("{photos}", str(photos)) for a in command]
    proc = subprocess.run([sys.executable, "-m", "altsearch", *args, "--index", str(index), "--device", device],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr == f"error: unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)\n"


def test_a_gpu_torch_does_not_see_is_one_line_error(indexed, run, monkeypatch):
    index, _ = indexed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    r = run("similar", "#1", "--index", index, "--device", "cuda:1", code=1)
    assert r.stderr == "error: device 'cuda:1' asked for, but torch sees 1 CUDA GPU\n"


def test_the_table_shows_the_ids_a_query_names_images_by(indexed, run):
    """The text table's ids are those of --json (and rank is not written #, which names an id)."""
    index, _ = indexed
    table = run("search", "a photo", "--index", index, "-k", "3").stdout.splitlines()
    assert table[0].split()[:5] == ["rank", "┃", "id", "┃", "score"]
    rows = [line.split() for line in table[2:]]
    hits = json.loads(run("search", "a photo", "--index", index, "-k", "3", "--json").stdout)
    assert [(r[0], r[2]) for r in rows] == [(str(n), f"#{h['id']}") for n, h in enumerate(hits, 1)]
    second = rows[1][2]
    assert json.loads(run("similar", second, "--index", index, "--json", "-k", "1").stdout)[0]["id"] != hits[1]["id"]
    assert json.loads(run("search", second, "--index", index, "--json", "-k", "1").stdout)[0]["id"] != hits[1]["id"]


def test_the_workers_help_states_the_real_default(run):
    """decode.default_workers: cores - 1 beside a CUDA model; with the model on the CPU 1, or 0 on 2 cores or fewer."""
    assert "[default: (cores - 1 with the model on CUDA; on the CPU 1, or 0 on 2 cores or fewer)]" in \
        run("index", "--help").stdout


def test_a_query_that_starts_with_an_operator_goes_after_double_dash(indexed, run, monkeypatch):
    index, _ = indexed
    for query in ("-dog + cat", "- cat + dog"):
        r = run("search", query, "--index", index, code=2)
        assert "No such option" in r.output and f"altsearch search -- '{query}'" in r.output
    mistyped = run("search", "a cat", "--index", index, "--jsn", code=2)  # still an error, with no hint
    assert "No such option: --jsn" in mistyped.output and "goes after --" not in mistyped.output
    # the example in the search command's help, as docs/cli.md shows it
    example = re.search(r'altsearch search -- "[^"]+"', (ROOT / "docs" / "cli.md").read_text(encoding="utf-8"))
    monkeypatch.setenv("ALTSEARCH_INDEX", str(index))
    assert "│" in run(*shlex.split(example.group(0))[1:]).stdout
    hits = json.loads(run("search", "--json", "-k", "3", "--", "-dog + cat").stdout)
    assert len(hits) == 3


def test_one_is_singular(indexed, run, monkeypatch):
    import io

    from rich.console import Console

    from altsearch import cli

    index, photos = indexed
    assert run("remove", photos / "home" / "2021" / "img_000.jpg", "--index", index).stdout == "removed 1 image\n"
    assert run("remove", photos / "trips", "--index", index).stdout == "removed 4 images\n"
    printed = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=printed, width=200))
    cli._print_report(IndexReport(folder="/photos", embedded=3, duplicates=1))
    assert "(1 duplicate reused a stored vector)" in printed.getvalue()


@pytest.mark.parametrize("command", [["index", ""], ["remove", ""], ["remove", "{photos}", ""],
                                     ["search", "a cat", "--under", ""]])
def test_an_empty_path_is_refused(indexed, run, command, tmp_path, monkeypatch):
    """As the shell passes an unset variable: not the current folder."""
    index, photos = indexed
    (tmp_path / "cwd").mkdir()
    make_folder(tmp_path / "cwd", 2, start=50)
    monkeypatch.chdir(tmp_path / "cwd")
    r = run(*[a.replace("{photos}", str(photos)) for a in command], "--index", index, code=1)
    assert r.stderr.startswith("error: an empty path") and r.stderr.count("\n") == 1
    assert json.loads(run("info", "--index", index, "--json").stdout)["images"] == 8


def test_a_path_neither_on_disk_nor_in_the_index_is_warned_of(indexed, run, tmp_path):
    index, photos = indexed
    typo = tmp_path / "phtos"
    r = run("remove", typo, "--index", index)
    assert r.stdout == "removed 0 images\n"
    assert r.stderr == f"warning: {typo}: no such file or folder, on disk or in the index\n"
    # the records of deleted files are what remove is for; a folder that exists is no typo
    (photos / "home" / "2021" / "img_000.jpg").unlink()
    (tmp_path / "empty").mkdir()
    r = run("remove", photos / "home" / "2021" / "img_000.jpg", tmp_path / "empty", "--index", index, "--json")
    assert json.loads(r.stdout) == {"removed": 1} and r.stderr == ""
    # nor is a deleted file whose failure is on record: remove forgets it
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    run("index", photos, "--index", index, "--workers", "0")
    (photos / "broken.jpg").unlink()
    r = run("remove", photos / "broken.jpg", "--index", index)
    assert r.stdout == "removed 0 images\n" and r.stderr == ""
    assert json.loads(run("errors", "--index", index, "--json").stdout) == []
    r = run("search", "a photo", "--index", index, "--under", typo)
    assert r.stdout == "no results\n" and r.stderr == f"warning: --under {typo}: no such folder\n"
