"""Real processes, real signals: an indexer killed at any point loses nothing; Ctrl-C stops cleanly.

Two lanes run side by side, each on its own photo folder and index, each restarting
``python -m altsearch index`` after every kill and changing the folder between runs (new, deleted,
moved, rewritten and touched files), so there is always work to interrupt:

- fault points: ``ALTSEARCH_FAULTS`` SIGKILLs the indexer inside a catalogue transaction, right
  after a commit, between writing and renaming the vector file, or after the k-th decoded image.
  This lane's index is one beyond EXACT_MAX, whose ivfpq vector index is saved to a file after every
  run (the CLI runs with EXACT_MAX lowered; a flat index has no file to kill a save of);
- random times: SIGKILL (of the indexer alone, as ``kill -9`` does) at a seeded random moment after
  it took the index's write lock. This lane's index is flat, built from the catalogue when opened.

After every kill the index must open consistent (one vector per catalogued image, catalogue
integrity clean) and no decode worker may outlive its parent. After the final, uninterrupted run:
the catalogue holds exactly the folder's readable images, each once and with its current size,
mtime and hash; ``info`` counts one vector per image; ``check`` finds nothing; and ``search
--json`` ranks exactly as an index built in one go.

``ALTSEARCH_LONG_TESTS=1`` runs a bigger version (more kills, more photos).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from altsearch import Engine
from altsearch.catalog import Catalog
from altsearch.decode import hash_file
from altsearch.store import IndexStore
from tests.hostile import cli, cli_env, run_cli
from tests.photos import save_photo

LONG = os.environ.get("ALTSEARCH_LONG_TESTS") == "1"
POINT_KILLS = 40 if LONG else 12
RANDOM_KILLS = 30 if LONG else 8
FIRST_PHOTOS = 400 if LONG else 100
LARGE_PHOTOS = max(FIRST_PHOTOS, 260)  # an ivfpq index is built from 256 vectors at least
QUERIES = ("sunset over the sea", "海边的日落", "a red circle on grey")
SIZE = (96, 72)
BAD = ("bad-truncated.jpg", "bad-text.png")  # unreadable: recorded as failures on every run


@dataclass
class Lane:
    """One photo folder and its index, changed between runs by a seeded RNG."""

    name: str
    folder: Path
    index: Path
    rng: np.random.Generator
    next_seed: int = 0
    kills: Counter = field(default_factory=Counter)
    large: bool = False  # an ivfpq vector index, kept by CLI runs with EXACT_MAX lowered (_make_large)
    runs: int = 0
    finished: int = 0  # runs that ended before their random kill came
    committing: int = 0  # random kills in runs that had committed something (moves, a chunk, failures)

    def images(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file() and p.name not in BAD)

    def add(self, n: int) -> None:
        for _ in range(n):
            seed = self.next_seed
            self.next_seed += 1
            sub = self.folder / f"d{seed % 5}"
            save_photo(sub / (f"p{seed:05d}.jpg" if seed % 3 else f"p{seed:05d}.png"), seed, size=SIZE)

    def mutate(self) -> None:
        """New files, and one each deleted, moved, rewritten with new content, touched."""
        self.add(int(self.rng.integers(3, 8)))
        files = self.images()
        picks = [files[i] for i in self.rng.choice(len(files), size=4, replace=False)]
        deleted, moved, rewritten, touched = picks
        deleted.unlink()
        target = self.folder / f"moved{self.runs % 3}" / moved.name
        target.parent.mkdir(exist_ok=True)
        moved.rename(target)
        seed = self.next_seed
        self.next_seed += 1
        save_photo(rewritten, seed, size=SIZE)
        later = touched.stat().st_mtime + 3600
        os.utime(touched, (later, later))


def _make_lane(root: Path, name: str, seed: int, photos: int = FIRST_PHOTOS) -> Lane:
    lane = Lane(name, root / f"{name}-photos", root / f"{name}-index", np.random.default_rng(seed),
                next_seed=seed * 100_000)
    lane.add(photos)
    (lane.folder / BAD[0]).write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    (lane.folder / BAD[1]).write_bytes(b"not a png at all\n")
    return lane


def _make_large(lane: Lane, checkpoint: Path) -> None:
    """Index the lane's folder and give it the vector index of an index beyond EXACT_MAX: an ivfpq,
    saved to a file, which the lane's CLI runs keep (they run with EXACT_MAX lowered) and save."""
    with Engine.open(lane.index, model=str(checkpoint), device="cpu") as engine:
        engine.index(lane.folder, workers=0)
        assert engine.optimize("ivfpq")["kind"] == "ivfpq"
    lane.large = True


# --- one run -------------------------------------------------------------------------------


def _index_args(lane: Lane, checkpoint: Path, workers: int) -> tuple:
    return "index", lane.folder, "--index", lane.index, "--model", checkpoint, "--workers", workers, "--json"


def _index_cmd(lane: Lane, checkpoint: Path, workers: int) -> list[str]:
    return cli(*_index_args(lane, checkpoint, workers), exact_max=1 if lane.large else None)


def _run_index(lane: Lane, checkpoint: Path, workers: int) -> subprocess.CompletedProcess:
    return run_cli(*_index_args(lane, checkpoint, workers), exact_max=1 if lane.large else None)


def _start(cmd: list[str], **env: str) -> subprocess.Popen:
    # its own session: the group of the indexer and its decode workers can be watched as a whole
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(**env), start_new_session=True)


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    """Wait for the indexer, then for the rest of its process group: no decode worker (nor anything
    else it started) may outlive it, even when it was killed while starting them."""
    try:
        proc.wait(timeout=300)  # its output is a few lines: the pipes cannot fill up meanwhile
        _assert_group_gone(proc.pid)
    finally:
        for pid in _alive_in_group(proc.pid):  # leave no orphans behind a failure
            os.kill(pid, signal.SIGKILL)
    return proc.communicate(timeout=60)


def _alive_in_group(pgid: int) -> list[int]:
    return [pid for pid in _group_members(pgid) if _state(pid) not in ("Z", None)]  # zombies don't count


def _assert_group_gone(pgid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while alive := _alive_in_group(pgid):
        assert time.monotonic() < deadline, f"processes outlived the indexer: {alive}"
        time.sleep(0.1)


def _group_members(pgid: int) -> list[int]:
    if not os.path.isdir("/proc"):
        return []
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except OSError:
                pass
    return members


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def _wait_for_lock(proc: subprocess.Popen, index: Path) -> bool:
    """Wait until ``proc`` holds the index's write lock (it writes its pid there); False if it ended."""
    lock = index / "write.lock"
    while proc.poll() is None:
        try:
            if lock.read_text().strip() == str(proc.pid):
                return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


@contextmanager
def _opened(index: Path) -> Iterator[IndexStore]:
    store = IndexStore(index, create=False, device="cpu")
    try:
        yield store
    finally:
        store.close()


def _wait_until_stopped(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while _state(proc.pid) != "T":
        assert proc.poll() is None, f"ended before its stop point: {proc.returncode}\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "never reached its stop point"
        time.sleep(0.02)


def _assert_consistent(index: Path) -> int:
    """What the next open sees after a kill: a sound catalogue and exactly its vectors. Returns the
    catalogue's generation (how many transactions changed it)."""
    if not (index / "catalog.sqlite").is_file():
        return 0
    with _opened(index) as store:
        assert store.catalog.integrity() == []
        if store.dimension is not None:
            assert np.array_equal(store.vectors.ids(), store.catalog.vector_ids())
            assert len(store.vectors) == store.catalog.count()
        return store.generation


# --- the lanes -------------------------------------------------------------------------------


def _point_specs(rng: np.random.Generator, n: int) -> list[str]:
    """Fault points to kill at, in a seeded order; every point is hit on every run (see Lane.mutate)."""
    fixed = ["commit:1", "committed:1", "commit:2", "committed:2", "save-temp:1", "save-replace:1"]
    specs = [fixed[i // 2 % len(fixed)] if i % 2 == 0 else f"decoded:{int(rng.integers(1, 7))}" for i in range(n)]
    return [f"{spec}=kill" for spec in specs]


def _point_lane(lane: Lane, checkpoint: Path) -> None:
    _make_large(lane, checkpoint)
    for spec in _point_specs(lane.rng, POINT_KILLS):
        lane.mutate()
        lane.runs += 1
        workers = 1 if lane.runs % 4 == 0 else 0
        proc = _start(_index_cmd(lane, checkpoint, workers), ALTSEARCH_FAULTS=spec)
        out, err = _finish(proc)
        assert proc.returncode == -signal.SIGKILL, f"{spec} was not reached: {proc.returncode}\n{err[-3000:]}"
        lane.kills[spec.split(":")[0] if spec.startswith("decoded") else spec[: -len("=kill")]] += 1
        _assert_consistent(lane.index)


def _random_lane(lane: Lane, checkpoint: Path) -> None:
    """Half the kills come at a random moment after the run took the write lock (while it plans,
    commits moves and deletions, and loads the model), half at a random moment after it planned its
    work and loaded the model (while it decodes, embeds, commits and saves): the fault hook holds it
    there (SIGSTOP) so the clock starts at the same point. The
    lane starts from a complete index, so that every run has only a little work, which a kill can
    interrupt at any step."""
    with Engine.open(lane.index, model=str(checkpoint), device="cpu") as engine:
        engine.index(lane.folder, workers=0)
    attempts = 0
    generation = _assert_consistent(lane.index)
    while sum(lane.kills.values()) < RANDOM_KILLS:
        attempts += 1
        assert attempts <= 3 * RANDOM_KILLS, f"runs kept finishing before their kill: {lane.kills}"
        lane.mutate()
        lane.runs += 1
        after_planning = attempts % 2 == 0
        fault = {"ALTSEARCH_FAULTS": "embedding:1=stop"} if after_planning else {}
        proc = _start(_index_cmd(lane, checkpoint, workers=attempts // 2 % 2), **fault)
        if after_planning:
            _wait_until_stopped(proc)
            proc.send_signal(signal.SIGCONT)
            delay = lane.rng.uniform(0.0, 1.0)
        else:
            delay = lane.rng.uniform(0.0, 3.0) if _wait_for_lock(proc, lane.index) else 0.0
        time.sleep(float(delay))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # the indexer only, as `kill -9 PID` does
        out, err = _finish(proc)
        before = generation
        generation = _assert_consistent(lane.index)
        if proc.returncode == -signal.SIGKILL:
            lane.kills["random, after planning" if after_planning else "random, after locking"] += 1
            lane.committing += generation > before
        else:
            assert proc.returncode == 0, err[-3000:]
            lane.finished += 1


# --- after the last run -------------------------------------------------------------------------


def _ranked(hits) -> list[tuple[str, float]]:
    return sorted(((h["path"], round(h["score"], 4)) for h in hits), key=lambda ps: (-ps[1], ps[0]))


def _baseline(lane: Lane, root: Path, checkpoint: Path) -> dict[str, list[tuple[str, float]]]:
    """Search results of an index built from the final folder in one uninterrupted run."""
    with Engine.open(root / f"{lane.name}-baseline", model=str(checkpoint), device="cpu") as engine:
        report = engine.index(lane.folder, workers=0)
        assert report.failed == len(BAD) and not report.interrupted
        return {q: _ranked(h.to_dict() for h in engine.search(q, k=10)) for q in QUERIES}


def _finish_lane(lane: Lane, root: Path, checkpoint: Path) -> dict:
    final = _run_index(lane, checkpoint, workers=1)
    assert final.returncode == 0, final.stderr[-3000:]
    expected = {str(p): p for p in lane.images()}
    with Catalog(lane.index / "catalog.sqlite") as cat:
        states = cat.file_states()
        failures = {p for p, _, _ in cat.failures()}
    # every readable image exactly once (paths are unique in the catalogue), with its current bytes
    assert set(states) == set(expected)
    for path, (_, size, mtime, content_hash) in states.items():
        st = expected[path].stat()
        assert (size, mtime, content_hash) == (st.st_size, st.st_mtime, hash_file(path)), path
    assert failures == {str(lane.folder / name) for name in BAD}
    info = json.loads(run_cli("info", "--index", lane.index, "--json").stdout)
    assert info["images"] == info["vectors"] == len(expected)
    check = run_cli("check", "--index", lane.index, "--json", exact_max=1 if lane.large else None)
    assert check.returncode == 0 and json.loads(check.stdout) == {"problems": [], "repaired": False}
    assert not list(lane.index.glob(".vectors.faiss.*.tmp")), "temp files of killed saves were left behind"
    assert (lane.index / "vectors.faiss").is_file() == lane.large  # a flat index has no file
    if lane.large:  # back to the size it really is: exact search, and no vector file
        optimized = run_cli("optimize", "--index", lane.index, "--json")
        assert json.loads(optimized.stdout) == {"kind": "flat", "vectors": len(expected)}, optimized.stderr
        assert not [p for p in lane.index.iterdir() if "vectors" in p.name]
    baseline = _baseline(lane, root, checkpoint)
    with Engine.open(lane.index, device="cpu", create=False) as engine:
        for q in QUERIES:
            assert _ranked(h.to_dict() for h in engine.search(q, k=10)) == baseline[q], q
    asked = QUERIES[0] if lane.name == "points" else QUERIES[1]  # one each through the CLI: it costs seconds
    hits = json.loads(run_cli("search", asked, "--index", lane.index, "-k", "10", "--json").stdout)
    assert _ranked(hits) == baseline[asked]
    figures = {"images": len(expected), "runs": lane.runs + 1, "kills": dict(lane.kills)}
    if lane.name == "random":
        figures |= {"not killed": lane.finished, "kills after a commit of their run": lane.committing}
    return figures


def test_sigkill_at_fault_points_and_random_times_loses_nothing(tmp_path, tiny_checkpoint):
    lanes = {"points": (_make_lane(tmp_path, "points", 1, photos=LARGE_PHOTOS), _point_lane),
             "random": (_make_lane(tmp_path, "random", 2), _random_lane)}

    def drive(name: str) -> dict:
        lane, kill_loop = lanes[name]
        kill_loop(lane, tiny_checkpoint)
        return _finish_lane(lane, tmp_path, tiny_checkpoint)

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(lanes, pool.map(drive, lanes)))
    kills = sum(sum(r["kills"].values()) for r in results.values())
    print(f"\ncrash figures: {json.dumps(results)}; SIGKILLs survived: {kills}; losses found: 0")
    assert kills >= POINT_KILLS + RANDOM_KILLS


# --- Ctrl-C ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("point, committed", [
    ("decoded:24", "some"),  # mid-run: the finished images are committed, the summary printed
    ("commit:1", "none"),  # inside the first chunk's transaction (a first run commits no bookkeeping): it rolls back
    ("save-temp:1", "all"),  # writing the vector file at the end (an ivfpq's): everything is committed
])
def test_ctrl_c_stops_cleanly_and_the_next_run_resumes(tmp_path, tiny_checkpoint, point, committed):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it (the decode worker included),
    delivered at a known point: the fault hook stops the indexer there (SIGSTOP) until it is sent on.
    The first two runs start from an empty index (flat); the save is one of an index beyond EXACT_MAX,
    indexed before, to which the run adds the changes of one Lane.mutate."""
    saving = point.startswith("save")
    lane = _make_lane(tmp_path, "ctrl-c", 3, photos=LARGE_PHOTOS if saving else FIRST_PHOTOS)
    if saving:
        _make_large(lane, tiny_checkpoint)
        lane.mutate()
    n = len(lane.images())
    proc = _start(_index_cmd(lane, tiny_checkpoint, workers=1)[:-1], ALTSEARCH_FAULTS=f"{point}=stop")
    _wait_until_stopped(proc)
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGCONT)
    out, err = _finish(proc)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    messages = [line for line in err.splitlines() if not line.startswith("fault point")]
    summary = out.startswith("Interrupted ") and "added " in out
    # a Ctrl-C in the run's last steps (the final commit, the final save) ends it with one line instead
    # of the summary
    kept = "interrupted: what was committed is kept; run the same command again to finish"
    assert summary or messages == [kept], (out, err[-3000:])
    assert summary or point != "decoded:24"
    _assert_consistent(lane.index)
    with _opened(lane.index) as store:
        before = store.catalog.count()
    assert {"some": 0 < before < n, "none": before == 0, "all": before == n}[committed], before
    resumed = _run_index(lane, tiny_checkpoint, workers=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout)
    assert (report["added"], report["unchanged"], report["failed"]) == (n - before, before, len(BAD))
    with _opened(lane.index) as store:
        assert store.check() == [] and store.catalog.count() == len(store.vectors) == n
        assert store.vectors.kind == ("ivfpq" if saving else "flat")
    assert not list(lane.index.glob(".vectors.faiss.*.tmp"))
