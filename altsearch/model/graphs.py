"""CUDA graphs of the text tower, for search queries.

A query is one short text. On a GPU the XLM-R-large tower then does almost no arithmetic, and its
time is the launching of ~400 small kernels from Python: about 10 ms on an H100 host. A CUDA graph
records those launches once and replays them in one call.

Batches of short texts (``encode_text`` on a list of queries, 64 at a time) are just as launch-bound:
on an H100 the eager tower took ~13 ms for 32 queries against ~9 ms for one. So graphs cover them too.

A graph has fixed shapes, so a batch of token ids is padded up to a bucket: batch 1, 2, 4, 8, 16, 32
or 64 and length 8, 16, 32, 48, 64 or the tokenizer's maximum, where batches above
``LONG_TEXT_BATCHES`` (8) stop at 64 tokens: a batch of 16 long texts (8,000 tokens and more) keeps
a GPU busy with arithmetic, so replaying its launches would save little, and padding it up would
cost. The padding is invisible to the result: padded positions are masked out of attention, and
their position ids are the pad's, as in a padded batch (tests/model/test_graphs.py checks it against
the eager tower). Each bucket is recorded on its second use, so a one-off query (a cold ``altsearch
search``) never pays for a recording; what no bucket fits runs eagerly.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

BATCHES = (1, 2, 4, 8, 16, 32, 64)
LENGTHS = (8, 16, 32, 48, 64)
LONG_TEXT_BATCHES = 8  # batches above this size have buckets only up to LENGTHS[-1] tokens
WARMUP = 2  # eager runs on a side stream before recording (cuBLAS and SDPA pick their kernels)
RECORD_ON_USE = 2  # a bucket is recorded on its second use


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # static inputs, (batch, length)
    mask: torch.Tensor
    out: torch.Tensor  # static output, (batch, P)


class TextGraphs:
    """``features(ids, mask, padded=True) -> (B, P)`` replayed from CUDA graphs where a bucket fits.

    ``features`` must run the tower without synchronising with the host (no data-dependent Python
    branches): :meth:`AltCLIP.text_features` with ``padded=True``. Thread-safe: one replay at a time.
    """

    def __init__(self, features: Callable[..., torch.Tensor], *, pad_id: int, max_length: int,
                 device: torch.device):
        self.features = features
        self.pad_id = pad_id
        self.lengths = tuple(n for n in LENGTHS if n < max_length) + (max_length,)
        self.device = device
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._uses: Counter[tuple[int, int]] = Counter()
        self._pool = None  # one memory pool shared by every graph
        self._lock = threading.Lock()

    @property
    def recorded(self) -> tuple[tuple[int, int], ...]:
        """The (batch, length) buckets recorded so far."""
        return tuple(sorted(self._graphs))

    def bucket(self, batch: int, length: int) -> tuple[int, int] | None:
        b = next((n for n in BATCHES if n >= batch), None)
        t = next((n for n in self.lengths if n >= length), None)
        if b is None or t is None or (b > LONG_TEXT_BATCHES and t > LENGTHS[-1]):
            return None
        return b, t

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The features of (B, T) ``ids``/``mask`` on the device, or None where the caller should run the
        tower eagerly (no bucket fits, or the bucket's first use)."""
        key = self.bucket(*ids.shape)
        if key is None:
            return None
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None:
                self._uses[key] += 1
                if self._uses[key] != RECORD_ON_USE:  # the first use, or a recording that failed
                    return None
                try:
                    graph = self._graphs[key] = self._record(*key)
                except RuntimeError as exc:  # out of memory, an unsupported kernel: stay eager for good
                    log.warning("text queries of shape %s run without a CUDA graph: %s", key, exc)
                    return None
            batch, length = ids.shape
            graph.ids.fill_(self.pad_id)
            graph.mask.zero_()
            graph.mask[batch:, 0] = 1  # rows that pad the batch attend to their first token: no NaN
            graph.ids[:batch, :length].copy_(ids, non_blocking=True)
            graph.mask[:batch, :length].copy_(mask, non_blocking=True)
            graph.graph.replay()
            return graph.out[:batch].clone()

    def _record(self, batch: int, length: int) -> _Graph:
        ids = torch.full((batch, length), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((batch, length), dtype=torch.long, device=self.device)
        mask[:, 0] = 1
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self.features(ids, mask, padded=True)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work from other threads (an index run embedding images) may go on meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self.features(ids, mask, padded=True)
        self._pool = graph.pool()
        return _Graph(graph, ids, mask, out)
