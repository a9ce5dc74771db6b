"""Fault injection for tests: named points on the write path that can kill the process or fail
like a full disk.

The write path calls :func:`point` at a few named places (see :data:`POINTS`). Nothing happens
unless the environment variable ``ALTSEARCH_FAULTS`` arms that point::

    ALTSEARCH_FAULTS="commit:3=kill"             SIGKILL this process the 3rd time "commit" is hit
    ALTSEARCH_FAULTS="save-temp=raise"           raise OSError(ENOSPC) the 1st time "save-temp" is hit
    ALTSEARCH_FAULTS="decoded:20=stop"           SIGSTOP this process at the 20th decoded image, so a
                                                 test can signal it at a known point, then SIGCONT it
    ALTSEARCH_FAULTS="decoded:40=kill,commit:2=raise"   several faults, comma-separated

The variable is read once, on the first call; after that an unarmed :func:`point` is one dict
lookup. Tests that change the variable in-process call :func:`reset`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV = "ALTSEARCH_FAULTS"
POINTS = {
    "commit": "inside the catalogue transaction of IndexStore.commit, before it commits",
    "committed": "after the catalogue commit, before the in-memory vector index follows it",
    "save-temp": "in VectorIndex.save, temp files written and fsynced, before the first rename",
    "save-replace": "in VectorIndex.save, between renaming the FAISS file and renaming its header",
    "decoded": "in the ingest loop, once per decoded image (good or bad)",
    "embedding": "in an indexing run with files to embed, once it has found the first and loaded the model",
}
ACTIONS = ("kill", "raise", "stop")


@dataclass(frozen=True)
class Fault:
    """Do ``action`` the ``count``-th time ``point`` is hit."""

    point: str
    count: int
    action: str


def parse(spec: str) -> tuple[Fault, ...]:
    """``"commit:3=kill,save-temp=raise"`` -> faults; raises ValueError for anything unknown."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        where, sep, action = item.partition("=")
        name, _, count = where.partition(":")
        if not sep or action not in ACTIONS:
            raise ValueError(f"{ENV}: {item!r} needs an action, one of {ACTIONS} (e.g. commit:3=kill)")
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown fault point {name!r} (one of {sorted(POINTS)})")
        if count and not (count.isdigit() and int(count) > 0):
            raise ValueError(f"{ENV}: the count in {item!r} must be a positive integer")
        faults.append(Fault(name, int(count or 1), action))
    return tuple(faults)


class _Plan:
    """The armed faults and how often each point was hit (in this process)."""

    def __init__(self, faults: tuple[Fault, ...]) -> None:
        self.armed = {f.point: {g.count: g.action for g in faults if g.point == f.point} for f in faults}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    def hit(self, name: str) -> str | None:
        with self.lock:
            self.hits[name] += 1
            return self.armed[name].get(self.hits[name])


_plan: _Plan | None = None


def reset() -> None:
    """Forget the hit counts and read ``ALTSEARCH_FAULTS`` again on the next call."""
    global _plan
    _plan = None


def point(name: str) -> None:
    """A fault point: nothing, unless ``ALTSEARCH_FAULTS`` arms ``name`` for this hit."""
    global _plan
    if _plan is None:
        _plan = _Plan(parse(os.environ.get(ENV, "")))
    if name not in _plan.armed:
        return
    action = _plan.hit(name)
    if action == "kill":
        log.warning("fault point %s: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise OSError(errno.ENOSPC, f"No space left on device (fault injected at {name})")
    elif action == "stop":
        log.warning("fault point %s: stopping this process until it is sent SIGCONT", name)
        os.kill(os.getpid(), signal.SIGSTOP)
