"""Keeping a CPU forward pass's large temporaries in the heap, where glibc is the C library.

A forward pass allocates and frees the same large tensors layer after layer: at a batch of 8 the
vision tower's MLP output alone is 34 MB (8 x 257 tokens x 4096 x 4 bytes). glibc's malloc serves
blocks above its mmap threshold (32 MB at most) with fresh ``mmap`` calls and gives the top of its
heap back to the kernel once more than its trim threshold is free there, so each layer faults its
activations in again, page by page: on the project's 2-core VM 450,000 to 700,000 page faults per
batch of 8 images; without them the pass ran 9 % (float32) to 13 % (int8) faster there
(docs/model.md, "CPU memory reuse").

While a pass runs, :func:`reuse_heap` has malloc serve every block from its heap and keep what is
freed (``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` at its maximum), so the second layer on reuses the
first one's pages. When the last pass running ends it puts back glibc's default values and hands
the free memory back (``malloc_trim``): between calls the process holds no more than before. (Once
``mallopt`` has been called, glibc no longer raises its thresholds by itself as large blocks are
freed; its starting values apply.) Elsewhere (macOS, musl, Windows) it does nothing.

``ALTSEARCH_HEAP_REUSE=0`` turns it off. It changes where a pass's tensors land, not what they
hold: a batch's vectors are the same bits with it and without it, whatever other threads allocate
meanwhile (tests/model/test_heap.py).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "ALTSEARCH_HEAP_REUSE"  # "0" turns it off

# mallopt parameters and glibc's defaults (malloc/malloc.c)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
_KEEP_ALL = 2**31 - 1  # the largest value mallopt takes (an int)


def _glibc():
    """The process's C library when it is glibc with mallopt and malloc_trim, else None."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
    except (AttributeError, ValueError, OSError):  # no confstr, or no such name: not glibc
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


class HeapReuse:
    """Counts the passes running (threads may overlap): the first one in changes malloc's settings,
    the last one out puts them back. ``libc`` is glibc's, or a stand-in in tests."""

    def __init__(self, libc=None):
        self.libc = libc
        self._lock = threading.Lock()
        self._depth = 0

    @property
    def active(self) -> bool:
        """Whether malloc keeps freed memory now (a pass is running)."""
        return self._depth > 0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        libc = self.libc
        if libc is None or os.environ.get(ENV) == "0":
            yield
            return
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                libc.mallopt(M_MMAP_MAX, 0)
                libc.mallopt(M_TRIM_THRESHOLD, _KEEP_ALL)
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                    libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                    libc.malloc_trim(0)


reuse_heap = HeapReuse(_glibc())
