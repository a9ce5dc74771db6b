"""A re-run over an unchanged library: what `altsearch index` costs when nothing has changed.

A nightly re-run (`altsearch index ~/Pictures` from cron, on a library already indexed) has to look
at every file, and should cost little more than that. For each size (``--sizes``, default 10,000
and 100,000 files), a library is made once in ``--workdir``: that many small files named .jpg, a
thousand to a folder (a file whose size and mtime match its catalogue entry is never read), and an
index whose catalogue holds them with clustered vectors of the model's dimension (768 with the
default ``tiny768``), and the vector index ``optimize("auto")`` picks for the size (exact up to
100,000 images, ivfpq beyond). Then, each in a fresh process, ``--repeats`` rounds (median),
the three kinds interleaved:

- **floor**: ``os.walk`` and ``os.stat`` of every file, what any tool pays to see that nothing changed;
- **altsearch**: the CLI, ``altsearch index FOLDER --index INDEX --json``, which must report every
  file unchanged;
- **model up front**: the same run through the Python API with the model loaded before it
  (``Engine.open(..., model=load_model(...))``): the import of torch and the model's set-up, which
  every run paid before a run that finds nothing to embed left the model alone.

Each row gives seconds (wall, from the process's start to its end), CPU seconds, peak RSS, whether
torch was imported, and the ratio to the floor. Run from the repository root (opt-in;
tests/test_bench_rescan.py runs a tiny configuration):

    .venv/bin/python benchmarks/bench_rescan.py --workdir /tmp/bench-rescan
    .venv/bin/python benchmarks/bench_rescan.py --workdir /tmp/bench-rescan --sizes 1000000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkpoints come from tests/checkpoints.py
sys.path.insert(1, str(ROOT / "benchmarks"))
from benchlib import (DONE_CODE, checkpoint_folder, cpu_name, int_list, library_parser, loadavg,  # noqa: E402
                      made_before, run_in_workdir)

PER_FOLDER = 1000
FILL_ROWS = 50_000  # catalogue rows per transaction
LIBRARY_FORMAT = 1  # bump when the library changes, so cached ones are made again
KINDS = ("floor", "altsearch", "model up front")

_FLOOR = DONE_CODE + """
import os
n = 0
for folder, _, names in os.walk(sys.argv[1]):
    for name in names:
        os.stat(os.path.join(folder, name))
        n += 1
done(files=n, unchanged=n)
"""
_CLI = DONE_CODE + """
from typer.testing import CliRunner
from altsearch.cli import app
result = CliRunner().invoke(app, ["index", sys.argv[1], "--index", sys.argv[2], "--json", "--workers", "0"])
assert result.exit_code == 0, result.output
report = json.loads(result.stdout)
done(unchanged=report["unchanged"], embedded=report["embedded"])
"""
_UP_FRONT = DONE_CODE + """
from altsearch import Engine, load_model
model = load_model(sys.argv[3], device="cpu")
with Engine.open(sys.argv[2], model=model, device="cpu", create=False) as engine:
    report = engine.index(sys.argv[1], workers=0)
done(unchanged=report.unchanged, embedded=report.embedded)
"""


def make_library(work: Path, n: int, ckpt: Path) -> tuple[Path, Path, dict]:
    """(photo folder, index folder, what was built) for ``n`` files, made unless a complete one is cached."""
    folder, index = work / f"library-{n}", work / f"library-{n}-index"
    spec_file = work / f"library-{n}.json"
    want = {"n": n, "format": LIBRARY_FORMAT, "model": str(ckpt)}
    if (info := made_before(spec_file, want, folder, index)) is not None:
        return folder, index, info
    import shutil

    import numpy as np
    from bench_query import CLUSTER_SIZE, ClusteredVectors

    from altsearch import Engine
    from altsearch.catalog import Catalog
    from altsearch.model.files import locate
    from altsearch.store import CATALOG_FILE

    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(index, ignore_errors=True)
    print(f"making {folder} ({n:,} files) ...", flush=True)
    files = locate(ckpt)
    rng = np.random.default_rng(0)
    source = ClusteredVectors(rng, max(1, n // CLUSTER_SIZE), files.dimension)
    t0 = time.perf_counter()
    index.mkdir(parents=True)
    with Catalog(index / CATALOG_FILE) as cat:
        with cat.transaction() as tx:
            tx.set_meta("model_id", files.source)
            tx.set_meta("model_fingerprint", files.fingerprint)
            tx.set_meta("dimension", str(files.dimension))
        for start in range(0, n, FILL_ROWS):
            records = []
            for i in range(start, min(n, start + FILL_ROWS)):
                sub = folder / f"{i // PER_FOLDER:05d}"
                if i % PER_FOLDER == 0:
                    sub.mkdir(parents=True)
                path = sub / f"IMG_{i:08d}.jpg"
                path.write_bytes(b"\xff\xd8\xff\xe0" + i.to_bytes(8, "little"))  # never read: size and mtime match
                st = path.stat()
                records.append({"path": str(path), "size": st.st_size, "mtime": st.st_mtime,
                                "content_hash": f"{i:064x}"})
            with cat.transaction() as tx:
                tx.add(records, source.sample(len(records)))
    fill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Engine.open(index, model=str(ckpt), device="cpu", create=False) as engine:
        kind = engine.optimize("auto")["kind"]
    info = {**want, "fill_s": round(fill_s, 1), "build_s": round(time.perf_counter() - t0, 1), "kind": kind}
    spec_file.write_text(json.dumps(info, indent=1))
    return folder, index, info


def measure(kind: str, folder: Path, index: Path, ckpt: Path) -> dict:
    code = {"floor": _FLOOR, "altsearch": _CLI, "model up front": _UP_FRONT}[kind]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(index), str(ckpt)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def run(args: argparse.Namespace, work: Path) -> dict:
    ckpt = checkpoint_folder(args.model, work)
    report: dict = {"machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
                                "python": platform.python_version(), "loadavg_start": loadavg(),
                                "date": time.strftime("%Y-%m-%d")},
                    "model": args.model, "repeats": args.repeats, "rows": []}
    for n in args.sizes:
        folder, index, built = make_library(work, n, ckpt)
        print(f"measuring {n:,} files ({built['kind']} vector index) ...", flush=True)
        runs: dict[str, list[dict]] = {k: [] for k in KINDS}
        for _ in range(args.repeats):
            for kind in KINDS:
                result = measure(kind, folder, index, ckpt)
                if result["unchanged"] != n or result.get("embedded", 0):
                    raise SystemExit(f"{kind}: expected {n:,} unchanged files and nothing embedded, got {result}")
                runs[kind].append(result)
        row = {"n": n, "kind": built["kind"], "built": built}
        for kind in KINDS:
            row[kind] = {key: statistics.median(r[key] for r in runs[kind]) for key in ("wall_s", "cpu_s", "rss_mb")}
            row[kind]["torch"] = any(r["torch"] for r in runs[kind])
        report["rows"].append(row)
    report["machine"]["loadavg_end"] = loadavg()
    print("\n" + render(report))
    return report


def render(report: dict) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}; load average {m['loadavg_start']} "
             f"at start, {m['loadavg_end']} at end; {m['date']}",
             f"model: {report['model']}; median of {report['repeats']} fresh processes each, interleaved",
             "",
             "| files | vector index | run | wall s | x floor | CPU s | peak RSS MiB | torch imported |",
             "|---:|---|---|---:|---:|---:|---:|---|"]
    for row in report["rows"]:
        floor = row["floor"]["wall_s"]
        for kind in KINDS:
            r = row[kind]
            lines.append(f"| {row['n']:,} | {row['kind']} | {kind} | {r['wall_s']:.2f} | {r['wall_s'] / floor:.2f} | "
                         f"{r['cpu_s']:.2f} | {r['rss_mb']:.0f} | {'yes' if r['torch'] else 'no'} |")
    lines.append("")
    lines.append("floor: os.walk + os.stat of every file; altsearch: `altsearch index` (CLI, in-process runner) "
                 "finding every file unchanged; model up front: the same run with the model loaded before it")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = library_parser(__doc__)
    p.add_argument("--sizes", type=int_list(1), default=[10_000, 100_000],
                   help="library sizes in files (default: 10000,100000)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes of each kind (median; default 3)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv=None) -> None:
    run_in_workdir(parse_args(argv), "bench-rescan-", run)


if __name__ == "__main__":
    main()
