"""The benchmark scripts (benchmarks/*.py, not a package) loaded as modules for their tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def bench_script(name: str) -> Iterator[ModuleType]:
    """benchmarks/<name>.py as the module `name`, registered in sys.modules while in use (dataclasses
    look their module up there while it executes)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
