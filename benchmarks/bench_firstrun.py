"""A first indexing run over a library of new photos: what `altsearch index` holds in memory as the
library grows, and how fast it goes.

For each size (``--sizes``, default 2,000 and 20,000 photos) a library is made once in ``--workdir``:
that many small distinct JPEGs (24x24, random pixels), a thousand to a folder, and a byte-identical
copy of every 20th photo in a folder the scan reaches last, so that each copy's original is already
committed when the copy is decoded (the run finds its vector in the catalogue instead of running the
model). Each run indexes the library into a fresh index through the CLI (``altsearch index FOLDER
--index INDEX --model CKPT --json --workers 0``) in a fresh process, and gives seconds, photos/s, peak
resident memory (VmHWM) and the vector index it ended with.

The baseline, measured in the same run, is the smallest size: its peak holds what every run holds
(the interpreter, torch, the model, decoding and batch buffers). "per photo" is how much the peak
grew from it, divided by the photos added: what a run holds for each photo it brings in. One float32
vector of 768 dimensions is 3,072 bytes.

``--into N`` measures runs into an index that already holds N other photos (made once, copied for
each run), as when a new batch of photos joins a library: each decoded photo is then looked up in
the catalogue by its content hash. ``--exact-max`` lowers ``vectors.EXACT_MAX`` in the measured
processes (as the tests do), so that a library of thousands shows what a run does beyond exact
search, which takes over 100,000 photos otherwise. ``--scan-ms`` delays each entry of the run's scan (a network disk, where every ``stat`` is a round trip), so
that the time a run waits for its scan shows. ``--resume`` measures runs resumed after a crash: each
starts from an index of the library's first half and of one more photo deleted since (made once,
copied for each run), so the scan never meets every catalogued file. ``--checkout`` measures another checkout of altsearch beside
this one, in the same run (before and after a change: ``git worktree add /tmp/before HEAD~1``).

Run from the repository root (opt-in; tests/test_bench_firstrun.py runs a tiny configuration):

    .venv/bin/python benchmarks/bench_firstrun.py --workdir /tmp/bench-firstrun
    .venv/bin/python benchmarks/bench_firstrun.py --workdir /tmp/bench-firstrun --sizes 2000,20000 --exact-max 1000
    .venv/bin/python benchmarks/bench_firstrun.py --workdir /tmp/bench-firstrun --into 20000
    .venv/bin/python benchmarks/bench_firstrun.py --workdir /tmp/bench-firstrun --scan-ms 2
    .venv/bin/python benchmarks/bench_firstrun.py --workdir /tmp/bench-firstrun --scan-ms 2 --resume
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
COPY_EVERY = 20  # one byte-identical copy per this many photos
SIDE = 24  # pixels: decoding costs little, so the run's own bookkeeping shows
LIBRARY_FORMAT = 1  # bump when the library changes, so cached ones are made again

_RUN = DONE_CODE + """
import altsearch
from altsearch import vectors
if sys.argv[4] != "-":
    vectors.EXACT_MAX = int(sys.argv[4])
from altsearch.store import IndexStore
embedding_mb = []  # the peak before the run's end builds the vector index it has grown into
real_rebuild = IndexStore.maybe_rebuild
def maybe_rebuild(self, *args, **kwargs):
    embedding_mb.append(peak_mb())
    return real_rebuild(self, *args, **kwargs)
IndexStore.maybe_rebuild = maybe_rebuild
first_added = []  # seconds from the start of the command to the first commit of photos
real_commit = IndexStore.commit
def commit(self, fn, *, removed_ids=(), added=None):
    real_commit(self, fn, removed_ids=removed_ids, added=added)
    if added is not None and len(added[0]) and not first_added:
        first_added.append(time.perf_counter() - start)
IndexStore.commit = commit
scan_s = float(sys.argv[5]) / 1000
if scan_s:  # each entry of the scan comes this much later, as over a slow network disk
    from altsearch import ingest
    real_scan = ingest.scan
    def scan(*args, **kwargs):
        items = real_scan(*args, **kwargs)
        def slow():
            for item in items:
                time.sleep(scan_s)
                yield item
        return slow()
    ingest.scan = scan
from typer.testing import CliRunner
from altsearch.cli import app
start = time.perf_counter()
result = CliRunner().invoke(app, ["index", sys.argv[1], "--index", sys.argv[2], "--model", sys.argv[3], "--json",
                                  "--workers", "0", "--device", "cpu"])
assert result.exit_code == 0, result.output
report = json.loads(result.stdout)
done(package=altsearch.__file__, embedding_mb=embedding_mb[0], first_s=first_added[0],
     **{k: report[k] for k in ("added", "embedded", "duplicates", "failed", "removed", "seconds")})
"""


def make_library(work: Path, n: int, name: str = "photos") -> tuple[Path, int]:
    """(photo folder, files in it) for ``n`` photos and their copies, made unless a complete one is cached;
    libraries of other names hold other photos."""
    folder = work / f"{name}-{n}"
    spec_file = work / f"{name}-{n}.json"
    want = {"n": n, "format": LIBRARY_FORMAT}
    copies = n // COPY_EVERY
    if made_before(spec_file, want, folder):
        return folder, n + copies
    import numpy as np
    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)
    print(f"making {folder} ({n:,} photos, {copies:,} copies) ...", flush=True)
    rng = np.random.default_rng(n if name == "photos" else [n, *name.encode()])
    for i in range(n):
        sub = folder / f"{i // PER_FOLDER:05d}"
        if i % PER_FOLDER == 0:
            sub.mkdir(parents=True)
        path = sub / f"IMG_{i:08d}.jpg"
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(path, quality=80)
        if i % COPY_EVERY == 0:
            (folder / "zz-copies").mkdir(exist_ok=True)
            shutil.copyfile(path, folder / "zz-copies" / path.name)
    spec_file.write_text(json.dumps(want))
    return folder, n + copies


def vector_kind(index: Path) -> str:
    """The kind of vector index a run left: an approximate one's header says; without a file, exact."""
    header = index / "vectors.faiss.json"
    return json.loads(header.read_text())["kind"] if header.is_file() else "flat"


def existing_index(work: Path, n: int, ckpt: Path) -> Path:
    """An index of a library of ``n`` other photos (``--into``), made by this checkout unless cached; each
    measured run starts from a copy of it."""
    index = work / f"existing-{n}-index"
    spec_file = work / f"existing-{n}-index.json"
    want = {"n": n, "format": LIBRARY_FORMAT, "model": str(ckpt)}
    if made_before(spec_file, want, index):
        return index
    from altsearch import Engine

    folder, files = make_library(work, n, "existing")
    shutil.rmtree(index, ignore_errors=True)
    print(f"indexing {folder} into {index} ...", flush=True)
    with Engine.open(index, model=str(ckpt), device="cpu") as engine:
        report = engine.index(folder, workers=0)
    if report.added != files:
        raise SystemExit(f"{index}: expected {files:,} files added, got {report}")
    spec_file.write_text(json.dumps(want))
    return index


def resumed_index(work: Path, n: int, ckpt: Path) -> Path:
    """``--resume``: an index of the first ``n // 2`` photos of the library of ``n`` and of one more photo
    deleted since, as a run resumed after a crash finds it when a photo it had committed was deleted
    meanwhile. Made by this checkout unless cached (the library's second half and its copies are moved
    aside while it is indexed, then back, unchanged); each measured run starts from a copy of it."""
    index = work / f"resumed-{n}-index"
    spec_file = work / f"resumed-{n}-index.json"
    want = {"n": n, "format": LIBRARY_FORMAT, "model": str(ckpt)}
    if made_before(spec_file, want, index):
        return index
    import numpy as np
    from PIL import Image

    from altsearch import Engine

    folder, _ = make_library(work, n)
    library_spec = work / f"photos-{n}.json"
    library_want = json.loads(library_spec.read_text())
    library_spec.unlink()  # the library is incomplete until its second half is back
    aside = work / f"resumed-{n}-aside"
    shutil.rmtree(index, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    gone = folder / "00000" / "IMG_gone.jpg"
    for path in sorted(folder.rglob("*.jpg")):
        if path.parent.name == "zz-copies" or int(path.stem.split("_")[1]) >= n // 2:
            (aside / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            path.rename(aside / path.relative_to(folder))
    try:
        Image.fromarray(np.full((SIDE, SIDE, 3), 128, dtype=np.uint8)).save(gone, quality=80)
        print(f"indexing the first half of {folder} into {index} ...", flush=True)
        with Engine.open(index, model=str(ckpt), device="cpu") as engine:
            report = engine.index(folder, workers=0)
    finally:
        gone.unlink(missing_ok=True)
        for path in sorted(aside.rglob("*.jpg")):
            path.rename(folder / path.relative_to(aside))
        shutil.rmtree(aside)
        library_spec.write_text(json.dumps(library_want))
    if report.added != n // 2 + 1:
        raise SystemExit(f"{index}: expected {n // 2 + 1:,} files added, got {report}")
    spec_file.write_text(json.dumps(want))
    return index


def measure(checkout: Path, folder: Path, index: Path, ckpt: Path, exact_max: int | None,
            base: Path | None = None, scan_ms: float = 0.0) -> dict:
    shutil.rmtree(index, ignore_errors=True)
    if base is not None:
        shutil.copytree(base, index)
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_WAIT_POLICY": "PASSIVE"}
    args = [str(folder), str(index), str(ckpt), "-" if exact_max is None else str(exact_max), str(scan_ms)]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUN, *args], capture_output=True, text=True, env=env, cwd=checkout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the run in {checkout} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(result["package"]).resolve().parents[1] != checkout.resolve():
        raise SystemExit(f"{checkout}: the run imported altsearch from {result['package']}")
    return {**result, "wall_s": wall, "kind": vector_kind(index)}


def run(args: argparse.Namespace, work: Path) -> dict:
    ckpt = checkpoint_folder(args.model, work)
    checkouts = [ROOT, *args.checkout]
    report: dict = {"machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
                                "python": platform.python_version(), "loadavg_start": loadavg(),
                                "date": time.strftime("%Y-%m-%d")},
                    "model": args.model, "repeats": args.repeats, "exact_max": args.exact_max, "into": args.into,
                    "scan_ms": args.scan_ms, "resume": args.resume, "rows": []}
    base = existing_index(work, args.into, ckpt) if args.into else None
    for n in sorted(args.sizes):
        if args.resume:
            base = resumed_index(work, n, ckpt)
        folder, files = make_library(work, n)
        committed = n // 2 if args.resume else 0  # the photos the resumed run finds in its index
        runs: dict[Path, list[dict]] = {c: [] for c in checkouts}
        for _ in range(args.repeats):
            for checkout in checkouts:  # interleaved
                print(f"indexing {files:,} files with {checkout} ...", flush=True)
                result = measure(checkout, folder, work / "index", ckpt, args.exact_max, base, args.scan_ms)
                expected = {"added": files - committed, "embedded": n - committed, "duplicates": files - n,
                            "failed": 0, "removed": int(args.resume)}
                if {k: result[k] for k in expected} != expected:
                    raise SystemExit(f"{checkout}: expected {expected}, got {result}")
                runs[checkout].append(result)
        for checkout in checkouts:
            rs = runs[checkout]
            row = {"n": n, "files": files, "added": rs[0]["added"], "checkout": str(checkout), "kind": rs[0]["kind"],
                   **{key: statistics.median(r[key] for r in rs) for key in ("seconds", "wall_s", "first_s", "embedding_mb",
                                                                       "rss_mb")}}
            row["photos_per_s"] = files / row["seconds"]
            report["rows"].append(row)
    for checkout in checkouts:  # the smallest size of the same checkout is the baseline
        rows = [r for r in report["rows"] if r["checkout"] == str(checkout)]
        base = rows[0]
        for r in rows[1:]:
            for peak in ("embedding", "rss"):
                r[f"{peak}_per_photo"] = (r[f"{peak}_mb"] - base[f"{peak}_mb"]) * 2**20 / (r["added"] - base["added"])
    report["machine"]["loadavg_end"] = loadavg()
    print("\n" + render(report))
    return report


def render(report: dict) -> str:
    m = report["machine"]
    switch = "" if report["exact_max"] is None else f"; EXACT_MAX lowered to {report['exact_max']:,}"
    if report["into"]:
        switch += f"; into an index of {report['into']:,} other photos"
    if report["scan_ms"]:
        switch += f"; each scan entry {report['scan_ms']:g} ms late (a slow disk)"
    if report.get("resume"):
        switch += "; resumed: each run starts from an index of the library's first half and a photo deleted since"
    lines = [f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}; load average {m['loadavg_start']} "
             f"at start, {m['loadavg_end']} at end; {m['date']}",
             f"model: {report['model']}; median of {report['repeats']} fresh processes each{switch}",
             "",
             "| photos (+ copies) | checkout | vector index at the end | run s | first photos in, s | files/s | "
             "peak RSS MiB, embedding | per photo, bytes | peak RSS MiB, whole run | per photo, bytes |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        per = {p: f"{r[f'{p}_per_photo']:,.0f}" if f"{p}_per_photo" in r else "(baseline)" for p in ("embedding", "rss")}
        lines.append(f"| {r['n']:,} (+{r['files'] - r['n']:,}) | {r['checkout']} | {r['kind']} | {r['seconds']:.1f} | "
                     f"{r['first_s']:.1f} | {r['photos_per_s']:.0f} | {r['embedding_mb']:.0f} | {per['embedding']} | {r['rss_mb']:.0f} | "
                     f"{per['rss']} |")
    lines.append("")
    lines.append("embedding: the peak before the run's end builds the vector index it has grown into (an approximate "
                 "one, beyond EXACT_MAX); whole run: with that build. per photo: the peak's growth from the smallest "
                 "size's run of the same checkout, divided by the files added (a float32 vector of 768 dimensions "
                 "is 3,072 bytes). first photos in: from the command's start to the first commit of photos (they "
                 "can be searched from then on)")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = library_parser(__doc__)
    p.add_argument("--sizes", type=int_list(1), default=[2_000, 20_000],
                   help="library sizes in photos, the smallest the baseline (default: 2000,20000)")
    p.add_argument("--exact-max", type=int, help="lower vectors.EXACT_MAX in the measured runs to this (at least "
                                                 "256, what an ivfpq needs)")
    p.add_argument("--into", type=int, default=0, help="index into an index that already holds this many other "
                                                      "photos (and their copies), not into a new one")
    p.add_argument("--scan-ms", type=float, default=0.0,
                   help="delay each entry of the run's scan by this many milliseconds, as a network disk's stat "
                        "round trips do (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="start each run from an index of the library's first half and of a photo deleted since "
                        "(a run resumed after a crash), not from a new index")
    p.add_argument("--checkout", type=Path, action="append", default=[],
                   help="another checkout of altsearch to measure beside this one (repeatable)")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes of each checkout (median; default 1)")
    args = p.parse_args(argv)
    if len(args.sizes) < 2:
        p.error("--sizes needs two sizes at least: the smallest is the baseline")
    if args.exact_max is not None and args.exact_max < 256:
        p.error("--exact-max must be at least 256")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.into < 0:
        p.error("--into must be at least 0")
    if args.into and args.resume:
        p.error("--into and --resume are two different starting indexes: give one")
    if args.scan_ms < 0:
        p.error("--scan-ms must be at least 0")
    return args


def main(argv=None) -> None:
    run_in_workdir(parse_args(argv), "bench-firstrun-", run)


if __name__ == "__main__":
    main()
