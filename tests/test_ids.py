"""Id sets by sorting (altsearch.ids): the same answers as NumPy's set functions."""

from __future__ import annotations

import numpy as np
import pytest

from altsearch import ids


@pytest.mark.parametrize("seed", range(5))
def test_unique_difference_and_union_agree_with_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 300, rng.integers(0, 400))  # repeats, unsorted, sometimes empty
    b = rng.integers(100, 500, rng.integers(0, 400))
    for got, want in [(ids.unique(a), np.unique(a)), (ids.difference(a, b), np.setdiff1d(a, b)),
                      (ids.union(a, b), np.union1d(a, b)), (ids.unique([7]), np.array([7]))]:
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


def test_sorted_distinct_ids_are_taken_as_they_are() -> None:
    listed = np.arange(0, 3_000_000, 3, dtype=np.int64)  # as the catalogue lists them
    assert ids.unique(listed) is listed
    repeated = np.array([1, 2, 2, 3], dtype=np.int64)  # sorted, not distinct
    np.testing.assert_array_equal(ids.unique(repeated), [1, 2, 3])
    assert ids.unique([]).shape == (0,) and ids.unique([]).dtype == np.int64
