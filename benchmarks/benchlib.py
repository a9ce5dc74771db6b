"""What the benchmark scripts share: their working folder and their integer-list options.

Kept free of heavy imports: scripts that start decode workers with ``spawn`` import it again in
every worker.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def workdir(path: Path | None, prefix: str) -> Iterator[Path]:
    """`path` (created if missing, kept afterwards), or a new temporary folder removed afterwards."""
    work = path or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if path is None:
            shutil.rmtree(work, ignore_errors=True)


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers ("10_000,1000000"), each at least `minimum`."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected integers of at least {minimum}, got {text!r}")
        return values

    return parse
