"""A sandbox in which the documentation's commands run unmodified.

``BAAI/AltCLIP`` resolves to a tiny random checkpoint placed in a Hugging Face cache layout, ``~`` is a
temporary home with a ``Pictures`` folder of generated photos, and the ``altsearch`` command is on PATH.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tests.checkpoints import write_checkpoint
from tests.photos import make_folder, save_photo


def fake_hub_model(cache: Path, repo_id: str = "BAAI/AltCLIP", **kw) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return write_checkpoint(repo / "snapshots" / rev, **kw)


def make_sandbox(root: Path) -> dict[str, str]:
    """Create the sandbox under ``root``; returns the environment to run commands with."""
    home = root / "home"
    pictures = home / "Pictures"
    make_folder(pictures, 10)
    save_photo(pictures / "beach.jpg", seed=1000)
    make_folder(pictures / "2024", 4, start=20)
    cache = root / "hf-cache"
    fake_hub_model(cache)
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "altsearch"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -m altsearch \"$@\"\n")
    exe.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALTSEARCH_", "HF_"))}
    env.update(HOME=str(home), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", ALTSEARCH_HOME=str(root / "as-home"),
               PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", COLUMNS="120", NO_COLOR="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return env


def as_if_cores(env: dict[str, str], root: Path, cores: int) -> dict[str, str]:
    """``env`` for Python processes that count ``cores`` cores for altsearch's decode workers (which
    ask ``os.sched_getaffinity``): with more than two, indexing on the CPU starts a decode worker, as
    on most users' machines, where a script that does not guard its work with ``if __name__ ==
    "__main__":`` fails. A ``sitecustomize`` module does it at start-up, workers included."""
    site = root / f"site-{cores}-cores"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import os\n"
        f"os.sched_getaffinity = lambda pid: set(range({cores}))\n"
    )
    return {**env, "PYTHONPATH": os.pathsep.join([str(site), env["PYTHONPATH"]])}
