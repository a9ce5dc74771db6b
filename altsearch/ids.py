"""Sets of image ids as sorted int64 arrays, found by sorting.

NumPy 2.4's ``np.unique`` finds distinct values with a hash table: on a million distinct int64 ids it
took 0.6 s where ``np.sort`` took 15 ms, on ten million 10.3 s against 0.16 s (Zen 3), and
``np.setdiff1d`` and ``np.union1d`` call it on their arguments unless told they are distinct
already. The id sets altsearch handles at scale (a filter's matches, a removal, what a check
compares) go through these functions instead.
"""

from __future__ import annotations

import numpy as np


def unique(ids: np.ndarray | list[int]) -> np.ndarray:
    """The distinct ids, sorted (int64). Ids already sorted and distinct, as the catalogue lists
    them, cost one comparison pass and come back as they are (the same array, not a copy)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1:
        ids = ids.reshape(-1)
    if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):
        return ids
    ids = np.sort(ids)
    keep = np.empty(len(ids), dtype=bool)
    keep[0] = True
    np.not_equal(ids[1:], ids[:-1], out=keep[1:])
    return ids[keep]


def difference(a: np.ndarray | list[int], b: np.ndarray | list[int]) -> np.ndarray:
    """The distinct ids of `a` that are not in `b`, sorted."""
    a = unique(a)
    return a[~np.isin(a, unique(b), assume_unique=True)]


def union(a: np.ndarray | list[int], b: np.ndarray | list[int]) -> np.ndarray:
    """The distinct ids of `a` and `b`, sorted."""
    return unique(np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1), np.asarray(b, dtype=np.int64).reshape(-1)]))
