"""Every benchmark command written in the docs is one its script accepts.

The smoke tests (tests/test_bench_*.py) run each benchmark in a tiny mode; the full-size commands
the docs print take minutes to hours, so here each one is parsed by its own script's
``parse_args``: a renamed or removed option in a script, or a typo in a doc, fails this test.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.benchscripts import bench_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?:bash|console|shell)\n(.*?)^```", re.S | re.M)
COMMAND = re.compile(r"^(?:\$ )?(?:[A-Z_]+=\S+ )*\.venv/bin/python (benchmarks/bench_\w+\.py)(.*)$")


def commands() -> list[tuple[str, str, list[str]]]:
    """(doc name, script, argv) for each benchmark command in a fenced block of the docs."""
    found = []
    for doc in DOCS:
        for body in FENCE.findall(doc.read_text(encoding="utf-8")):
            for line in body.splitlines():
                match = COMMAND.match(line.strip())
                if match:
                    argv = shlex.split(match.group(2), comments=True)
                    found.append((doc.name, match.group(1), argv))
    return found


def test_the_docs_show_every_benchmark():
    shown = {script for _, script, _ in commands()}
    scripts = {f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("bench_*.py")}
    assert scripts - shown == set(), "benchmarks no doc shows how to run"


@pytest.mark.parametrize("doc, script, argv", commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_documented_command_parses(doc, script, argv):
    with bench_script(Path(script).stem) as module:
        try:
            module.parse_args(argv)
        except SystemExit as err:
            pytest.fail(f"{doc}: `{script} {shlex.join(argv)}` is refused by its parser (exit {err.code})")
