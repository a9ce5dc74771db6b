"""CPU forward passes keep their freed blocks in malloc's heap, and give them back afterwards."""

from __future__ import annotations

import resource
import threading

import numpy as np
import pytest
import torch

from altsearch import load_model
from altsearch.model import altclip, heap
from altsearch.model.vision import quick_gelu
from altsearch.model.heap import DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD, ENV, M_MMAP_MAX, M_TRIM_THRESHOLD, HeapReuse

glibc_only = pytest.mark.skipif(heap.reuse_heap.libc is None, reason="the C library is not glibc")
MB = 2**20


def _mlp_stack(layers: int) -> torch.Tensor:
    """``layers`` MLP layers at the vision tower's batch-of-8 shape (2,056 tokens x 4,096 hidden: 34 MB,
    above glibc's largest mmap threshold), narrowed to 256 wide to stay quick."""
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(256, 4096), torch.nn.Linear(4096, 256)
    x = torch.randn(8 * 257, 256)
    with torch.inference_mode():
        for _ in range(layers):
            x = x + fc2(quick_gelu(fc1(x)))
    return x


def _layers(n: int) -> int:
    """Page faults taken by :func:`_mlp_stack` of ``n`` layers."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    _mlp_stack(n)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _allocate(mb: int) -> None:
    t = torch.empty(mb * MB // 4)
    t.fill_(1.0)  # every page touched
    del t


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@glibc_only
def test_a_pass_reuses_its_freed_blocks_instead_of_faulting_them_in_again(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    libc = heap.reuse_heap.libc  # the settings a pass leaves behind (a fresh process's vary with its past)
    libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
    outside = _layers(16)
    with heap.reuse_heap():
        inside = _layers(16)
    assert outside > 16 * 34 * MB // resource.getpagesize()  # every layer's blocks faulted in anew
    assert inside < outside / 3  # mostly the first layer's pages, then the same ones again


@glibc_only
def test_memory_kept_during_a_pass_goes_back_when_it_ends(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    start = _rss()
    with heap.reuse_heap():
        _allocate(256)
        kept = _rss() - start
    assert kept > 200 * MB  # freed, yet held for the next layer
    assert _rss() - start < 64 * MB


class _Recorder:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


KEEP = [("mallopt", M_MMAP_MAX, 0), ("mallopt", M_TRIM_THRESHOLD, 2**31 - 1)]
RESTORE = [("mallopt", M_MMAP_MAX, DEFAULT_MMAP_MAX), ("mallopt", M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD),
           ("malloc_trim", 0)]


def test_overlapping_passes_restore_malloc_once_the_last_one_ends(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    libc = _Recorder()
    reuse = HeapReuse(libc)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def second():
        first_in.wait()
        with reuse():
            second_in.set()
            first_out.wait()
            assert libc.calls == KEEP and reuse.active  # the first pass ended, this one still runs

    thread = threading.Thread(target=second)
    thread.start()
    with reuse():
        first_in.set()
        second_in.wait()
    first_out.set()
    thread.join()
    assert libc.calls == KEEP + RESTORE and not reuse.active
    with pytest.raises(RuntimeError), reuse():  # a pass that fails restores too
        raise RuntimeError("boom")
    assert libc.calls == (KEEP + RESTORE) * 2


def test_it_is_on_unless_turned_off_and_needs_glibc(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with HeapReuse(None)():
        pass
    libc = _Recorder()
    for on in (None, "1", "yes"):
        if on is None:
            monkeypatch.delenv(ENV, raising=False)
        else:
            monkeypatch.setenv(ENV, on)
        with HeapReuse(libc)():
            pass
    assert libc.calls == (KEEP + RESTORE) * 3
    monkeypatch.setenv(ENV, "0")
    with HeapReuse(libc)():
        pass
    assert libc.calls == (KEEP + RESTORE) * 3


@glibc_only
def test_the_reuse_moves_tensors_but_changes_no_bit_of_the_result(monkeypatch):
    """With the reuse, where a pass's blocks land depends on what other threads allocate meanwhile;
    the matrix kernels must give the same bits wherever that is (vectors reproducible run to run)."""
    monkeypatch.setenv(ENV, "0")
    with heap.reuse_heap():
        alone = _mlp_stack(4)
    monkeypatch.setenv(ENV, "1")
    stop = threading.Event()

    def churn():  # blocks of many sizes, a few alive at a time
        rng = np.random.default_rng(2)
        alive = []
        while not stop.is_set():
            alive.append(bytearray(int(rng.integers(1, 48 * MB))))
            if len(alive) > 3:
                alive.pop(int(rng.integers(len(alive))))

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(2):
            with heap.reuse_heap():
                assert torch.equal(_mlp_stack(4), alone)
    finally:
        stop.set()
        thread.join()


def test_a_cpu_model_runs_its_passes_inside_it(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    libc = _Recorder()
    reuse = HeapReuse(libc)
    monkeypatch.setattr(altclip, "reuse_heap", reuse)
    model = load_model(tiny_checkpoint, device="cpu").load()
    seen = []
    for name in ("image_features", "text_features"):
        run = getattr(model.module, name)
        monkeypatch.setattr(model.module, name, lambda *a, _run=run, **k: seen.append(reuse.active) or _run(*a, **k))
    size = model.preprocess_config.crop_height, model.preprocess_config.crop_width
    model.encode_pixels(np.zeros((2, *size, 3), np.uint8))
    model.encode_text(["海边的日落", "sunset over the sea"], batch_size=1)
    assert seen == [True, True, True]  # one image batch, two text batches
    assert libc.calls == (KEEP + RESTORE) * 3
