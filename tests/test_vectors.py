from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest

from altsearch import catalog as catalog_module
from altsearch import vectors as vectors_module
from altsearch.catalog import Catalog
from altsearch.errors import IndexStoreError, IndexTooLargeError
from altsearch.store import IndexStore
from altsearch.vectors import (
    Allowed,
    TorchExact,
    VectorIndex,
    exact_search,
    gpu_for,
    header_path,
    pq_m_for,
    read_header,
    recall_at_k,
    refine_from,
    rerank,
    saved_kind,
    torch_gpu_for,
)
from tests.oldformats import write_old_flat_file

DIM = 32


def unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    vecs = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def brute_force(queries: np.ndarray, ids: np.ndarray, vecs: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """The plainest possible top-k: a full sort per query, padded with (-inf, -1)."""
    scores = queries.astype(np.float64) @ vecs.astype(np.float64).T
    out_s = np.full((len(queries), k), -np.inf)
    out_i = np.full((len(queries), k), -1, dtype=np.int64)
    for row, s in enumerate(scores):
        order = np.argsort(-s)[:k]
        out_s[row, : len(order)] = s[order]
        out_i[row, : len(order)] = ids[order]
    return out_s, out_i


def assert_same_results(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Embedding-like data: unit vectors around random centres on the sphere; returns (vecs, centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vecs = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True), centres


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(1000, dtype=np.int64) * 7 + 3  # sparse, like catalogue ids after deletions
    return ids, unit(1000)


@pytest.fixture
def flat(data) -> VectorIndex:  # noqa: ANN001
    return VectorIndex.build(*data, kind="flat", device="cpu")


@pytest.fixture
def ivf(data) -> VectorIndex:  # noqa: ANN001
    """A kind that is saved to a file (a flat index never is)."""
    return VectorIndex.build(*data, kind="ivf", device="cpu")


# --- numpy helpers -----------------------------------------------------------------------


def test_exact_search_matches_brute_force(data) -> None:  # noqa: ANN001
    ids, vecs = data
    queries = unit(5, seed=1)
    assert_same_results(exact_search(queries, ids, vecs, 10), brute_force(queries, ids, vecs, 10))
    assert_same_results(exact_search(queries, ids[:3], vecs[:3], 5), brute_force(queries, ids[:3], vecs[:3], 5))
    scores, found = exact_search(queries, ids[:0], vecs[:0], 2)
    assert (found == -1).all() and np.isneginf(scores).all()


def test_recall_at_k_against_sets() -> None:
    rng = np.random.default_rng(0)
    exact = np.array([rng.permutation(50)[:10] for _ in range(40)])  # distinct ids per row
    approx = rng.integers(0, 50, (40, 12))
    exact[3, 6:] = -1  # only 6 true neighbours in that row
    approx[3, 6:] = -1
    want = np.mean([len(set(e[e >= 0]) & set(a[:10])) / (e >= 0).sum() for e, a in zip(exact, approx)])
    assert recall_at_k(exact, approx, 10) == pytest.approx(want)
    assert recall_at_k(exact, exact, 10) == 1.0
    assert recall_at_k(exact, approx, 3) == pytest.approx(
        np.mean([len(set(e[:3]) & set(a[:3])) / 3 for e, a in zip(exact, approx)])
    )
    assert recall_at_k(np.full((2, 10), -1), approx[:2], 10) == 1.0


# --- flat --------------------------------------------------------------------------------


def test_flat_search_equals_numpy(data, flat) -> None:  # noqa: ANN001
    ids, vecs = data
    queries = unit(7, seed=2)
    assert len(flat) == 1000 and flat.kind == "flat" and flat.dim == DIM
    assert_same_results(flat.search(queries, 10), brute_force(queries, ids, vecs, 10))


def test_flat_search_k_larger_than_index(data) -> None:  # noqa: ANN001
    ids, vecs = data
    small = VectorIndex.build(ids[:4], vecs[:4], device="cpu")
    queries = unit(3, seed=2)
    scores, found = small.search(queries, 6)
    assert_same_results((scores, found), brute_force(queries, ids[:4], vecs[:4], 6))
    assert (found[:, 4:] == -1).all() and np.isneginf(scores[:, 4:]).all()
    empty = VectorIndex.create(DIM, device="cpu")
    scores, found = empty.search(queries, 3)
    assert found.shape == (3, 3) and (found == -1).all() and np.isneginf(scores).all()


def test_flat_search_allowed(data, flat) -> None:  # noqa: ANN001
    ids, vecs = data
    queries = unit(4, seed=5)
    pick = np.random.default_rng(1).choice(len(ids), 60, replace=False)
    allowed = np.concatenate([ids[pick], [10**9, 5]])  # ids not in the index are ignored
    want = brute_force(queries, ids[pick], vecs[pick], 10)
    assert_same_results(flat.search(queries, 10, allowed=allowed), want)
    few = ids[pick[:3]]
    scores, found = flat.search(queries, 5, allowed=few)
    assert_same_results((scores, found), brute_force(queries, few, vecs[pick[:3]], 5))
    assert (found[:, 3:] == -1).all()
    _, found = flat.search(queries, 5, allowed=np.array([], dtype=np.int64))
    assert (found == -1).all()


def test_add_replaces_and_remove(data) -> None:  # noqa: ANN001
    ids, vecs = data
    index = VectorIndex.create(DIM, device="cpu")
    index.add(ids[:500], vecs[:500])
    index.add(ids[400:], vecs[400:])  # 100 ids already there: replaced, not duplicated
    assert len(index) == 1000
    np.testing.assert_array_equal(index.ids(), np.sort(ids))
    replacement = unit(1, seed=99)
    index.add(ids[7:8], replacement)
    np.testing.assert_array_equal(index.reconstruct(ids[7:8]), replacement)
    _, found = index.search(replacement, 1)
    assert found[0, 0] == ids[7]

    assert index.remove(np.concatenate([ids[:10], [10**9]])) == 10
    assert index.remove(ids[:10]) == 0
    assert len(index) == 990
    np.testing.assert_array_equal(index.ids(), np.sort(ids[10:]))
    queries = unit(3, seed=8)
    assert_same_results(index.search(queries, 10), brute_force(queries, ids[10:], vecs[10:], 10))
    with pytest.raises(KeyError):
        index.reconstruct(ids[:1])


def test_bad_input_is_refused(flat) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="shape"):
        flat.search(unit(2, dim=DIM + 1), 3)
    with pytest.raises(ValueError, match="k must be"):
        flat.search(unit(2), 0)
    with pytest.raises(ValueError, match="repeat"):
        flat.add(np.array([1, 1]), unit(2))
    with pytest.raises(ValueError, match=">= 0"):
        flat.add(np.array([-1]), unit(1))
    nan = unit(1)
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        flat.add(np.array([1]), nan)
    with pytest.raises(ValueError, match="only a flat index"):
        VectorIndex.create(DIM, kind="ivf")


# --- approximate -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clustered_50k() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vecs, centres = clustered(50_000, 64, 200, spread=0.15, seed=0)
    return np.arange(len(vecs), dtype=np.int64) * 2 + 1, vecs, centres


@pytest.fixture(scope="module")
def ivf_50k(clustered_50k) -> VectorIndex:  # noqa: ANN001
    ids, vecs, _ = clustered_50k
    return VectorIndex.build(ids, vecs, kind="ivf", device="cpu")


def held_out_queries(vecs: np.ndarray, centres: np.ndarray, seed: int) -> np.ndarray:
    """Queries the tuning never saw: perturbed stored vectors, and cluster centres shifted by a
    common offset (like the text/image modality gap of CLIP models)."""
    rng = np.random.default_rng(seed)
    dim = vecs.shape[1]
    near = vecs[rng.choice(len(vecs), 200, replace=False)] + 0.1 * rng.standard_normal((200, dim))
    gap = rng.standard_normal(dim)
    gap *= 0.8 / np.linalg.norm(gap)
    shifted = centres[rng.integers(0, len(centres), 200)] + gap + 0.1 * rng.standard_normal((200, dim))
    queries = np.concatenate([near, shifted]).astype(np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def test_ivf_reaches_recall_target(clustered_50k, ivf_50k) -> None:  # noqa: ANN001
    ids, vecs, centres = clustered_50k
    assert ivf_50k.kind == "ivf" and len(ivf_50k) == len(ids)
    assert 1 <= ivf_50k.nprobe < ivf_50k.nlist  # tuned, and cheaper than scanning everything
    queries = held_out_queries(vecs, centres, seed=7)
    _, exact = exact_search(queries, ids, vecs, 10)
    _, approx = ivf_50k.search(queries, 10)
    assert recall_at_k(exact[:200], approx[:200]) >= vectors_module.RECALL_TARGET
    assert recall_at_k(exact[200:], approx[200:]) >= vectors_module.RECALL_TARGET


@pytest.mark.parametrize("ids", [[0], [65, 5, 6, 7, 8, 9, 63, 64], list(range(0, 1000, 3))[::-1], [10**9, 3]])
def test_id_selectors_select_exactly_their_ids(ids: list[int]) -> None:
    ids = np.array(ids, dtype=np.int64)  # in any order: a replacing add passes its ids as they came
    selector, bits = vectors_module.id_selector(ids)
    assert (bits is not None) == (ids.max() < 4 * 8 * len(ids))  # a bitmap while it is small
    probe = np.unique(np.concatenate([ids, ids + 1, np.maximum(ids - 1, 0), np.arange(80)]))
    assert [i for i in probe.tolist() if selector.is_member(i)] == sorted(ids.tolist())


@pytest.mark.parametrize("bitmap_bytes_per_id", [0, 10**6])  # every filter a hash set; a bitmap
def test_a_filter_selects_the_same_as_a_bitmap_or_a_set(data, flat, ivf, bitmap_bytes_per_id, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(vectors_module, "BITMAP_BYTES_PER_ID", bitmap_bytes_per_id)
    ids, vecs = data
    queries = unit(4, seed=6)
    pick = np.sort(np.random.default_rng(2).choice(len(ids), 400, replace=False))
    want = brute_force(queries, ids[pick], vecs[pick], 10)
    assert_same_results(flat.search(queries, 10, allowed=ids[pick][::-1]), want)  # any order
    _, found = ivf.search(queries, 10, allowed=ids[pick])
    assert np.isin(found, ids[pick]).all()
    assert ivf.remove(ids[pick]) == 400 and flat.remove(ids[pick]) == 400  # removal selects the same way
    kept = np.setdiff1d(ids, ids[pick])
    np.testing.assert_array_equal(flat.ids(), kept)
    np.testing.assert_array_equal(ivf.ids(), kept)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("bitmap_bytes_per_id", [0, 10**6])  # sets and binary search; bitmaps and tables
def test_an_allowed_set_is_prepared_once_and_no_filter_while_it_covers_the_index(
    data, flat, ivf, kind, bitmap_bytes_per_id, monkeypatch  # noqa: ANN001
) -> None:
    monkeypatch.setattr(vectors_module, "BITMAP_BYTES_PER_ID", bitmap_bytes_per_id)
    index = {"flat": flat, "ivf": ivf}[kind]
    ids, vecs = data
    queries = unit(4, seed=7)
    built = []  # the selectors of more than one id: the searches' (an add or a remove below makes its own of one)
    real = vectors_module.id_selector
    monkeypatch.setattr(vectors_module, "id_selector", lambda i: (len(i) > 1 and built.append(len(i))) or real(i))

    some = Allowed(ids[::3][::-1])  # any order
    first = index.search(queries, 10, allowed=some)
    assert_same_results(index.search(queries, 10, allowed=some), first)
    assert np.isin(first[1], ids[::3]).all() and built == [len(ids[::3])]  # one selector for both searches
    index.search(queries, 10, allowed=ids[::3])  # an array: prepared for this search alone
    assert len(built) == 2

    unfiltered = index.search(queries, 10)
    everything = Allowed(np.concatenate([ids, [ids.max() + 5]]))  # and an id the index lacks
    assert_same_results(index.search(queries, 10, allowed=everything), unfiltered)
    assert len(built) == 2  # no selector: searched as if unfiltered
    new = ids.max() + 1  # added after: the set no longer covers the index, and does not allow it
    index.add(np.array([new]), queries[:1])
    assert index.search(queries[:1], 1)[1][0, 0] == new
    assert new not in index.search(queries, 10, allowed=everything)[1] and len(built) == 3
    assert index.remove([new]) == 1  # covering again
    assert_same_results(index.search(queries, 10, allowed=everything), unfiltered)
    assert not Allowed(ids[1:]).covers(index) and not Allowed(np.r_[ids[1:], ids.max() + 5]).covers(index)
    assert Allowed([]).covers(VectorIndex.create(DIM)) and len(built) == 3


def test_ivf_allowed_subsets(clustered_50k, ivf_50k) -> None:  # noqa: ANN001
    ids, vecs, centres = clustered_50k
    queries = held_out_queries(vecs, centres, seed=8)[:50]
    rng = np.random.default_rng(3)
    # 1 % allowed: the scaled nprobe reaches every list, so the answer is exact
    small = np.sort(rng.choice(len(ids), 500, replace=False))
    want = exact_search(queries, ids[small], vecs[small], 10)
    assert_same_results(ivf_50k.search(queries, 10, allowed=ids[small]), want)
    # 30 % allowed: approximate, probing about 3x more lists
    large = np.sort(rng.choice(len(ids), 15_000, replace=False))
    _, found = ivf_50k.search(queries, 10, allowed=ids[large])
    assert np.isin(found, ids[large]).all()
    _, exact = exact_search(queries, ids[large], vecs[large], 10)
    assert recall_at_k(exact, found) >= vectors_module.RECALL_TARGET


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_zero_vectors_do_not_spoil_an_ivf_build(clustered_20k, kind) -> None:  # noqa: ANN001
    """The catalogue stores a zero vector as given; the build's tuning queries, made from stored vectors,
    leave them out instead of dividing by their zero norm (NaN queries, NaN recall)."""
    ids, vecs, centres = clustered_20k
    vecs = vecs[:2000].copy()
    vecs[::2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in divide"
        index = VectorIndex.build(ids[:2000], vecs, kind=kind, device="cpu")
    queries = held_out_queries(vecs[1::2], centres, seed=4)[:50]
    _, exact = exact_search(queries, ids[:2000], vecs, 10)
    refine = refine_from(ids[:2000], vecs) if kind == "ivfpq" else None
    assert recall_at_k(exact, index.search(queries, 10, refine=refine)[1]) >= vectors_module.RECALL_TARGET


def add_replace_remove(index: VectorIndex, ids: np.ndarray, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """On an index built from the first 5,000 vectors: add 1,000, give 10 of the first ids new vectors,
    remove 10 others; checks the ids it holds, and returns the (ids, vectors) it should hold."""
    index.add(ids[5000:6000], vecs[5000:6000])
    index.add(ids[:10], vecs[6000:6010])  # replaces
    assert index.remove(ids[10:20]) == 10
    kept_ids = np.concatenate([ids[:10], ids[20:6000]])
    kept_vecs = np.concatenate([vecs[6000:6010], vecs[20:6000]])
    np.testing.assert_array_equal(index.ids(), np.sort(kept_ids))
    return kept_ids, kept_vecs


def test_ivf_add_remove_and_round_trip(clustered_50k, tmp_path: Path) -> None:  # noqa: ANN001
    ids, vecs, centres = clustered_50k
    index = VectorIndex.build(ids[:5000], vecs[:5000], kind="ivf", device="cpu")
    kept_ids, kept_vecs = add_replace_remove(index, ids, vecs)
    np.testing.assert_array_equal(index.reconstruct(ids[:10]), vecs[6000:6010])
    # read from the lists (no direct map), in the order asked, repeats included
    np.testing.assert_array_equal(index.reconstruct(ids[[5999, 3, 5999]]), vecs[[5999, 6003, 5999]])
    assert index.reconstruct(ids[:0]).shape == (0, vecs.shape[1])
    with pytest.raises(KeyError, match=str(ids[15])):
        index.reconstruct(ids[14:16])  # ids[15] was removed

    path = tmp_path / "vectors.faiss"
    index.save(path, generation=3)
    loaded = VectorIndex.load(path, device="cpu")
    assert (loaded.kind, loaded.nlist, loaded.nprobe) == ("ivf", index.nlist, index.nprobe)
    assert loaded.built_count == 5000 and loaded.generation == 3
    queries = held_out_queries(vecs, centres, seed=9)[:30]
    for got, want in zip(loaded.search(queries, 10), index.search(queries, 10)):
        np.testing.assert_array_equal(got, want)
    assert loaded.remove(ids[:5]) == 5  # the id map survived the round trip
    _, exact = exact_search(queries, kept_ids, kept_vecs, 10)
    assert recall_at_k(exact, index.search(queries, 10)[1]) >= vectors_module.RECALL_TARGET


def test_auto_picks_flat_then_ivfpq(monkeypatch: pytest.MonkeyPatch) -> None:
    vecs, _ = clustered(3000, 16, 20, spread=0.2, seed=1)
    ids = np.arange(3000, dtype=np.int64)
    monkeypatch.setattr(vectors_module, "EXACT_MAX", 3000)
    small = VectorIndex.build(ids, vecs, device="cpu")
    assert small.kind == "flat" and not small.needs_rebuild()
    monkeypatch.setattr(vectors_module, "EXACT_MAX", 2999)
    assert small.needs_rebuild()  # it has outgrown exact search
    large = VectorIndex.build(ids, vecs, device="cpu")
    assert large.kind == "ivfpq" and large.nlist == vectors_module.nlist_for(3000)
    assert not large.needs_rebuild()
    chosen = VectorIndex.build(ids, vecs, kind="ivf", device="cpu")
    assert not chosen.needs_rebuild()  # an IVF chosen with optimize is kept while it fits its size
    for index in (large, chosen):
        index.add(np.arange(3000, 12001), np.repeat(vecs, 4, axis=0)[:9001])
        assert index.needs_rebuild()  # 4x its training size
    monkeypatch.setattr(vectors_module, "EXACT_MAX", 10**6)
    small_ivfpq = VectorIndex.build(ids, vecs, kind="ivfpq", device="cpu")
    assert small_ivfpq.needs_rebuild()  # small: exact again
    # a kind chosen with optimize: kept at any size while it fits its training size, else rebuilt as chosen
    assert not small_ivfpq.needs_rebuild("ivfpq") and small_ivfpq.needs_rebuild("flat")
    monkeypatch.setattr(vectors_module, "EXACT_MAX", 2999)
    assert not small.needs_rebuild("flat") and small.needs_rebuild("ivfpq")
    assert large.needs_rebuild("ivfpq") and chosen.needs_rebuild("ivf")  # still 4x their training size


# --- ivfpq: compressed candidates, exact re-rank ------------------------------------------


@pytest.fixture(scope="module")
def clustered_20k() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vecs, centres = clustered(20_000, DIM, 100, spread=0.15, seed=0)
    return np.arange(len(vecs), dtype=np.int64) * 2 + 1, vecs, centres


@pytest.fixture(scope="module")
def ivfpq_20k(clustered_20k) -> VectorIndex:  # noqa: ANN001
    ids, vecs, _ = clustered_20k
    return VectorIndex.build(ids, vecs, kind="ivfpq", device="cpu")


def test_pq_size_rule() -> None:
    assert [pq_m_for(d) for d in (768, 512, 64, 24, 30, 7, 3, 1)] == [96, 64, 16, 12, 15, 7, 3, 1]
    assert all(d % pq_m_for(d) == 0 for d in range(1, 1025))


def test_ivfpq_reaches_recall_target_after_rerank(clustered_20k, ivfpq_20k) -> None:  # noqa: ANN001
    ids, vecs, centres = clustered_20k
    index = ivfpq_20k
    assert index.kind == "ivfpq" and len(index) == len(ids) and 1 <= index.nprobe < index.nlist
    assert index._cpu.pq.M == 16 and index._cpu.by_residual  # 16 bytes a vector, not 128
    queries = held_out_queries(vecs, centres, seed=7)
    _, exact = exact_search(queries, ids, vecs, 10)
    scores, found = index.search(queries, 10, refine=refine_from(ids, vecs))
    assert recall_at_k(exact[:200], found[:200]) >= vectors_module.RECALL_TARGET
    assert recall_at_k(exact[200:], found[200:]) >= vectors_module.RECALL_TARGET
    # the scores are the exact inner products with the true vectors, best first
    rows = np.searchsorted(ids, found)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vecs[rows]), rtol=0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()
    # without the true vectors: PQ estimates, which are not the exact products
    pq_scores, pq_found = index.search(queries, 10)
    pq_exact = np.einsum("qd,qkd->qk", queries, vecs[np.searchsorted(ids, pq_found)])
    assert np.abs(pq_scores - pq_exact).max() > 1e-3


class PlateauIndex:
    """An IVF stand-in whose recall@10 grows with nprobe up to `plateau`, then stays there (PQ codes
    that cannot rank near-twins, whatever the lists probed)."""

    nlist, ntotal = 1024, 10**6

    def __init__(self, exact: np.ndarray, plateau: float) -> None:
        self.exact, self.plateau, self.probed = exact, plateau, []

    def search(self, queries, k, params):  # noqa: ANN001, ANN201
        self.probed.append(params.nprobe)
        found = min(self.plateau, 0.5 + 0.1 * np.log2(params.nprobe))  # 16 lists: 0.9; 23: 0.95, rounded up
        ids = np.full((len(queries), k), -1, np.int64)
        ids[:, : round(found * 10)] = self.exact[:, : round(found * 10)]
        return np.zeros(ids.shape, np.float32), ids


def test_nprobe_stops_where_recall_stops_growing(caplog: pytest.LogCaptureFixture) -> None:
    exact = np.arange(40).reshape(4, 10)
    queries = np.zeros((4, 8), np.float32)
    reachable = PlateauIndex(exact, plateau=1.0)
    assert vectors_module._tune(reachable, exact, queries, None) == (23, 0)  # the first step to reach 0.97
    assert reachable.probed[-1] == 23  # and no further: every step after costs more
    stuck = PlateauIndex(exact, plateau=0.9)
    with caplog.at_level(logging.WARNING, logger="altsearch.vectors"):
        tuned = vectors_module._tune(stuck, exact, queries, None)
    assert tuned == (16, 0) and stuck.probed[-1] == stuck.nlist  # every step tried; the plateau's first kept
    assert "no nprobe reaches recall@10 0.97" in caplog.text and "nprobe 16: 0.900" in caplog.text


class TwinsIndex:
    """An ivfpq stand-in over near-twins: each query's true top 10 (ids q*10000 + 0..9, exact scores
    1.0 down to 0.91) come after `twins(nprobe)` decoys (ids q*10000 + 100 + j, exact score 0.5) that
    the PQ codes rank above them; of the true ten, min(10, nprobe) are in the lists probed."""

    nlist, ntotal = 1024, 10**6

    def __init__(self, twins: Callable[[int], int], queries: int = 4) -> None:
        self.twins, self.probed = twins, []
        self.exact = np.arange(queries)[:, None] * 10_000 + np.arange(10)
        ids = np.concatenate([self.exact, np.arange(queries)[:, None] * 10_000 + 100 + np.arange(2000)], axis=1)
        vecs = np.zeros(ids.shape + (queries,), np.float32)
        for q in range(queries):
            vecs[q, :10, q] = 1.0 - 0.01 * np.arange(10)
            vecs[q, 10:, q] = 0.5
        self.queries = np.eye(queries, dtype=np.float32)
        self.refine = refine_from(ids.reshape(-1), vecs.reshape(-1, queries))
        self.read = 0  # vectors the tuner asked refine for
        inner = self.refine

        def counting(wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            self.read += len(wanted)
            return inner(wanted)

        self.counting_refine = counting

    def search(self, queries, k, params):  # noqa: ANN001, ANN201
        self.probed.append(params.nprobe)
        n, twins = len(queries), self.twins(params.nprobe)
        decoys = np.arange(n)[:, None] * 10_000 + 100 + np.arange(k)
        found = self.exact[:, : min(10, params.nprobe)]
        ids = np.concatenate([decoys[:, :twins], found, decoys[:, twins:]], axis=1)[:, :k]
        return np.zeros(ids.shape, np.float32), ids


def test_the_rerank_width_is_tuned_with_nprobe(caplog: pytest.LogCaptureFixture) -> None:
    widths = vectors_module.RERANK_WIDTHS
    # no near-twins: the narrowest width, at the first nprobe that finds the ten (8 finds 8 of them)
    plain = TwinsIndex(lambda nprobe: 0)
    assert vectors_module._tune(plain, plain.exact, plain.queries, plain.counting_refine) == (11, widths[0])
    # 150 twins ranked above the true ten: only a wider width reaches the target; the next one, not the widest
    twins = TwinsIndex(lambda nprobe: 150)
    assert vectors_module._tune(twins, twins.exact, twins.queries, twins.refine) == (11, widths[1])
    # the narrowest width reaches it too, but only from 512 lists on: 512 x 977 codes cost more
    # than 11 x 977 and 300 candidates re-ranked
    costly = TwinsIndex(lambda nprobe: 150 if nprobe < 512 else 0)
    assert vectors_module._tune(costly, costly.exact, costly.queries, costly.refine) == (11, widths[1])
    # where it is cheap enough, the narrow width wins: 16 lists and 100 candidates cost less than 11
    # lists and 300 candidates
    cheap = TwinsIndex(lambda nprobe: 150 if nprobe < 16 else 0)
    assert vectors_module._tune(cheap, cheap.exact, cheap.queries, cheap.refine) == (16, widths[0])
    # twins no width gets past: the cheapest pair within PLATEAU of the best recall (0.5 at most)
    hopeless = TwinsIndex(lambda nprobe: 5000)
    with caplog.at_level(logging.WARNING, logger="altsearch.vectors"):
        assert vectors_module._tune(hopeless, hopeless.exact, hopeless.queries, hopeless.refine) == (1, widths[0])
    assert "no nprobe reaches recall@10 0.97" in caplog.text


def test_the_tuner_reads_only_the_candidates_that_can_matter() -> None:
    """Each nprobe step is one search with the widest width; the vectors of candidates beyond the
    narrowest width are read only while a wider width could still be the cheapest choice."""
    plain = TwinsIndex(lambda nprobe: 0)
    vectors_module._tune(plain, plain.exact, plain.queries, plain.counting_refine)
    widest = vectors_module.RERANK_WIDTHS[-1]
    steps = plain.probed.index(11) + 1
    assert steps == len(plain.probed)  # no step after the first that reaches the target
    # until then, every width was read at each step; at 11 lists the narrowest reached it
    assert plain.read == 4 * ((steps - 1) * widest + vectors_module.RERANK_WIDTHS[0])


def test_rerank_scores_what_refine_returns() -> None:
    vecs = unit(50, seed=4)
    ids = np.arange(50, dtype=np.int64) * 3
    queries = unit(2, seed=5)
    candidates = np.array([[0, 3, 6, 9, -1], [147, 12, 30, 3, 6]])
    scores, found = rerank(queries, candidates, 3, refine_from(ids, vecs))
    for row in range(2):
        cand = candidates[row][candidates[row] >= 0]
        want = sorted(cand, key=lambda i: -(queries[row] @ vecs[i // 3]))[:3]
        np.testing.assert_array_equal(found[row], want)
        np.testing.assert_allclose(scores[row], vecs[np.asarray(want) // 3] @ queries[row], atol=1e-6)
    gone = refine_from(ids[2:], vecs[2:])  # ids 0 and 3 deleted since the index was searched
    scores, found = rerank(queries[:1], candidates[:1], 4, gone)
    np.testing.assert_array_equal(np.sort(found[0, :2]), [6, 9])
    assert (found[0, 2:] == -1).all() and np.isneginf(scores[0, 2:]).all()
    _, found = rerank(queries, candidates, 2, refine_from(ids[:0], vecs[:0]))
    assert (found == -1).all()


def test_ivfpq_allowed_subsets(clustered_20k, ivfpq_20k) -> None:  # noqa: ANN001
    ids, vecs, centres = clustered_20k
    queries = held_out_queries(vecs, centres, seed=8)[:50]
    truth = refine_from(ids, vecs)
    rng = np.random.default_rng(3)
    small = np.sort(rng.choice(len(ids), 200, replace=False))  # every list probed: exact
    assert_same_results(ivfpq_20k.search(queries, 10, allowed=ids[small], refine=truth),
                        exact_search(queries, ids[small], vecs[small], 10))
    large = np.sort(rng.choice(len(ids), 6_000, replace=False))
    _, found = ivfpq_20k.search(queries, 10, allowed=ids[large], refine=truth)
    assert np.isin(found, ids[large]).all()
    _, exact = exact_search(queries, ids[large], vecs[large], 10)
    assert recall_at_k(exact, found) >= vectors_module.RECALL_TARGET


def test_ivfpq_search_kept_filters_the_candidates_of_an_unfiltered_search(clustered_20k, ivfpq_20k) -> None:  # noqa: ANN001
    """A filter known only by a lookup of ids (the catalogue's, for a filter whose ids were not read):
    the candidates it keeps are re-ranked as an unfiltered search's are; a filter that leaves fewer
    candidates than an unfiltered search re-ranks says so (``complete`` False) for its query."""
    ids, vecs, centres = clustered_20k
    queries = held_out_queries(vecs, centres, seed=10)[:50]
    truth = refine_from(ids, vecs)
    asked = []

    def keep_of(allowed: np.ndarray):
        def keep(candidates: np.ndarray) -> np.ndarray:
            asked.append(candidates)
            return candidates[np.isin(candidates, allowed)]
        return keep

    scores, found, complete = ivfpq_20k.search_kept(queries, 10, keep_of(ids), depth=5, refine=truth)
    assert complete.all()
    assert_same_results((scores, found), ivfpq_20k.search(queries, 10, refine=truth))  # keeping all: as unfiltered
    assert len(asked) == 1 and (np.diff(asked[0]) > 0).all()  # one lookup, of sorted unique ids

    rng = np.random.default_rng(4)
    half = np.sort(rng.choice(ids, len(ids) // 2, replace=False))
    scores, found, complete = ivfpq_20k.search_kept(queries, 10, keep_of(half), depth=5, refine=truth)
    assert complete.all() and np.isin(found, half).all() and (np.diff(scores, axis=1) <= 0).all()
    _, exact = exact_search(queries, half, vecs[np.searchsorted(ids, half)], 10)
    assert recall_at_k(exact, found) >= vectors_module.RECALL_TARGET

    few = np.sort(rng.choice(ids, len(ids) // 100, replace=False))
    asked.clear()
    _, found, complete = ivfpq_20k.search_kept(queries, 10, keep_of(few), depth=5, refine=truth)
    assert not complete.any() and (found == -1).all()
    assert len(asked) == 1  # the best 2 x the candidates kept too few to go on with the rest


def test_ivfpq_add_remove_and_round_trip(clustered_20k, tmp_path: Path) -> None:  # noqa: ANN001
    ids, vecs, centres = clustered_20k
    index = VectorIndex.build(ids[:5000], vecs[:5000], kind="ivfpq", device="cpu")
    kept_ids, kept_vecs = add_replace_remove(index, ids, vecs)
    with pytest.raises(ValueError, match="catalogue"):
        index.reconstruct(ids[:10])  # PQ codes are lossy: exact vectors come from the catalogue

    path = tmp_path / "vectors.faiss"
    header = index.save(path, generation=3)
    assert (header.kind, header.nlist, header.nprobe) == ("ivfpq", index.nlist, index.nprobe)
    assert header.rerank == index.rerank and index.rerank in vectors_module.RERANK_WIDTHS
    loaded = VectorIndex.load(path, device="cpu")
    assert (loaded.kind, loaded.nlist, loaded.nprobe, loaded.rerank, loaded.built_count) == (
        "ivfpq", index.nlist, index.nprobe, index.rerank, 5000)
    truth = refine_from(kept_ids, kept_vecs)
    queries = held_out_queries(vecs, centres, seed=9)[:30]
    for got, want in zip(loaded.search(queries, 10, refine=truth), index.search(queries, 10, refine=truth)):
        np.testing.assert_array_equal(got, want)
    _, exact = exact_search(queries, kept_ids, kept_vecs, 10)
    assert recall_at_k(exact, loaded.search(queries, 10, refine=truth)[1]) >= vectors_module.RECALL_TARGET
    assert loaded.remove(ids[:5]) == 5  # the id map survived the round trip
    assert not np.isin(loaded.search(queries, 10, refine=truth)[1], ids[:5]).any()


def test_an_ivfpq_search_reranks_its_tuned_width(clustered_20k, tmp_path: Path) -> None:  # noqa: ANN001
    """A search reads the vectors of `rerank` candidates for a top 10, and k / 10 times more for a
    larger k; the width is saved with the index and read back; a header from before it (format 1,
    no width) gives the narrowest width."""
    ids, vecs, _ = clustered_20k
    index = VectorIndex.build(ids[:5000], vecs[:5000], kind="ivfpq", device="cpu")
    assert index.rerank in vectors_module.RERANK_WIDTHS
    asked: list[int] = []
    inner = refine_from(ids[:5000], vecs[:5000])

    def spy(wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        asked.append(len(wanted))
        return inner(wanted)

    query = unit(1, seed=3)
    index._cpu.nprobe = index.nlist  # every list probed: there are always as many candidates as asked for
    for width in (100, 300):
        index.rerank = width
        asked.clear()
        index.search(query, 10, refine=spy)
        index.search(query, 25, refine=spy)
        assert asked == [width, width * 25 // 10]

    path = tmp_path / "vectors.faiss"
    header = index.save(path, generation=1)
    assert header.rerank == 300 and header.format == 2
    assert VectorIndex.load(path, device="cpu").rerank == 300
    old = json.loads(header_path(path).read_text())
    del old["rerank"]
    header_path(path).write_text(json.dumps(old | {"format": 1}))
    assert VectorIndex.load(path, device="cpu").rerank == vectors_module.RERANK_WIDTHS[0]


def test_a_header_from_a_newer_altsearch_says_so(ivf, tmp_path: Path) -> None:  # noqa: ANN001
    """Checked before the fields are: a newer format may add fields this version does not know."""
    path = tmp_path / "vectors.faiss"
    ivf.save(path)
    header = json.loads(header_path(path).read_text())
    header_path(path).write_text(json.dumps(header | {"format": vectors_module.HEADER_FORMAT + 1, "shards": 4}))
    with pytest.raises(IndexStoreError, match="newer altsearch; upgrade altsearch"):
        VectorIndex.load(path)
    header_path(path).write_text(json.dumps(header | {"shards": 4}))  # an unknown field in this format
    with pytest.raises(IndexStoreError, match="damaged"):
        VectorIndex.load(path)


def test_ivfpq_reranks_when_k_covers_the_index() -> None:
    ids = np.arange(300, dtype=np.int64) * 5
    vecs, _ = clustered(300, DIM, 10, spread=0.2, seed=4)
    index = VectorIndex.build(ids, vecs, kind="ivfpq", device="cpu")
    queries = unit(3, seed=6)
    scores, found = index.search(queries, 400, refine=refine_from(ids, vecs))  # no room for more candidates
    hit = found >= 0
    exact = np.einsum("qd,qkd->qk", queries, vecs[found // 5])
    np.testing.assert_allclose(scores[hit], exact[hit], rtol=0, atol=1e-5)  # re-ranked all the same
    assert all((np.diff(row[row > -np.inf]) <= 0).all() for row in scores)


def test_ivfpq_needs_enough_vectors() -> None:
    vecs = unit(255)
    with pytest.raises(ValueError, match="at least 256"):
        VectorIndex.build(np.arange(255), vecs, kind="ivfpq", device="cpu")
    with pytest.raises(ValueError, match="unknown index kind"):
        VectorIndex.build(np.arange(255), vecs, kind="hnsw", device="cpu")


def store_add(store: IndexStore, records: list[dict], vecs: np.ndarray) -> None:
    """What ingestion does: catalogue rows and vectors in one commit, then the vectors into FAISS."""
    new_ids: list[int] = []
    store.commit(lambda tx: new_ids.extend(tx.add(records, vecs)), added=(new_ids, vecs))


def test_store_switches_to_ivfpq_and_reranks_from_the_catalogue(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Through IndexStore: auto goes flat -> ivfpq as the index outgrows EXACT_MAX; search scores
    are exact against the catalogue's vectors; the file round-trips and checks clean."""
    monkeypatch.setattr(vectors_module, "EXACT_MAX", 500)
    vecs, centres = clustered(1200, DIM, 30, spread=0.3, seed=2)
    store = IndexStore(tmp_path / "index", device="cpu")
    store.bind_model("m", "fp", DIM)
    records = [{"path": f"/p/{i:05}.jpg", "size": 1, "mtime": 1.0, "content_hash": f"{i}"} for i in range(1200)]
    store_add(store, records[:400], vecs[:400])
    assert store.vectors.kind == "flat" and not store.maybe_rebuild()
    store_add(store, records[400:], vecs[400:])
    assert store.maybe_rebuild() and store.vectors.kind == "ivfpq"
    ids, stored = catalog_vectors(store.catalog)
    queries = held_out_queries(stored, centres, seed=3)
    scores, found = store.search(queries, 10)
    rows = np.searchsorted(ids, found)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, stored[rows]), rtol=0, atol=1e-5)
    assert recall_at_k(exact_search(queries, ids, stored, 10)[1], found) >= vectors_module.RECALL_TARGET
    allowed = ids[::7]
    _, found = store.search(queries, 5, allowed=allowed)
    assert np.isin(found[found >= 0], allowed).all()

    store.save_vectors()
    assert store.check() == []
    store.commit(lambda tx: tx.remove(ids[:3].tolist()), removed_ids=ids[:3])
    assert not np.isin(store.search(queries, 10)[1], ids[:3]).any()
    store.save_vectors()
    store.close()
    again = IndexStore(tmp_path / "index", create=False, device="cpu")
    assert again.vectors.kind == "ivfpq" and again.vectors.header is not None and len(again.vectors) == 1197
    assert again.repair().kind == "ivfpq"

    path = tmp_path / "index" / "vectors.faiss"
    assert again.rebuild("flat").kind == "flat"  # optimize --kind flat: exact, in memory, nothing on disk
    again.save_vectors()
    assert not path.exists() and not header_path(path).exists()
    assert again.check() == ["vectors.faiss is missing: 1197 images call for an approximate index "
                             "(searched exactly, in memory, until it is built)"]
    again.close()
    third = IndexStore(tmp_path / "index", create=False, device="cpu")
    assert third.vectors.kind == "flat" and len(third.vectors) == 1197
    _, exact = third.search(queries, 10)
    np.testing.assert_array_equal(exact, exact_search(queries, *catalog_vectors(third.catalog), 10)[1])
    assert third.maybe_rebuild() and third.vectors.kind == "ivfpq"  # the next indexing run switches back
    third.save_vectors()
    assert path.exists() and third.check() == []
    third.close()


# --- files -------------------------------------------------------------------------------


def test_save_load_round_trip(data, ivf, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "vectors.faiss"
    header = ivf.save(path, generation=12, catalog_id="abc")
    assert (header.kind, header.dim, header.count, header.nlist) == ("ivf", DIM, 1000, ivf.nlist)
    assert (header.generation, header.catalog_id) == (12, "abc")
    assert read_header(path) == header and saved_kind(path) == "ivf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.faiss", "vectors.faiss.json"]  # no temp
    assert faiss.read_index(str(path)).ntotal == 1000  # a plain FAISS file
    loaded = VectorIndex.load(path, device="cpu")
    assert loaded.header == header
    queries = unit(6, seed=3)
    for got, want in zip(loaded.search(queries, 10), ivf.search(queries, 10)):
        np.testing.assert_array_equal(got, want)
    ivf.remove(data[0][:100])
    assert ivf.save(path, generation=13).count == 900  # replaces the old pair
    assert len(VectorIndex.load(path, device="cpu")) == 900 and read_header(path).generation == 13


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_an_ivf_keeps_no_direct_map_and_drops_an_old_files(clustered_20k, tmp_path: Path, kind: str) -> None:  # noqa: ANN001
    """A hashtable direct map costs ~40 bytes per vector in memory and 16 in the file, and rebuilding
    it is much of the time a big file takes to load: altsearch keeps none, and drops the one that
    files saved by an older altsearch hold. Removing and replacing ids works without it."""
    ids, vecs, centres = clustered_20k
    index = VectorIndex.build(ids[:5000], vecs[:5000], kind=kind, device="cpu")
    assert index._cpu.direct_map.type == faiss.DirectMap.NoMap
    new, old = tmp_path / "new.faiss", tmp_path / "old.faiss"
    index.save(new, generation=1)
    assert faiss.read_index(str(new)).direct_map.type == faiss.DirectMap.NoMap
    index._cpu.set_direct_map_type(faiss.DirectMap.Hashtable)  # as an older altsearch built and saved it
    index.save(old, generation=1)
    assert old.stat().st_size >= new.stat().st_size + 16 * 5000

    loaded = VectorIndex.load(old, device="cpu")
    assert loaded._cpu.direct_map.type == faiss.DirectMap.NoMap
    kept_ids, kept_vecs = add_replace_remove(loaded, ids, vecs)
    truth = refine_from(kept_ids, kept_vecs)
    queries = held_out_queries(vecs, centres, seed=9)[:30]
    _, exact = exact_search(queries, kept_ids, kept_vecs, 10)
    assert recall_at_k(exact, loaded.search(queries, 10, refine=truth)[1]) >= vectors_module.RECALL_TARGET
    loaded.save(old, generation=2)  # saved again: without the map
    assert faiss.read_index(str(old)).direct_map.type == faiss.DirectMap.NoMap
    assert len(VectorIndex.load(old, device="cpu")) == len(kept_ids)


def test_a_flat_index_is_never_saved(flat, tmp_path: Path) -> None:  # noqa: ANN001
    """Opening builds it from the catalogue: a float32 copy on disk would cost 3 KB per image."""
    with pytest.raises(ValueError, match="flat index is not saved"):
        flat.save(tmp_path / "vectors.faiss")
    assert list(tmp_path.iterdir()) == [] and saved_kind(tmp_path / "vectors.faiss") is None


def test_failed_save_keeps_the_old_files(ivf, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    path = tmp_path / "vectors.faiss"
    ivf.save(path, generation=1)
    before = path.read_bytes(), header_path(path).read_bytes()

    def disk_full(index, writer) -> None:  # noqa: ANN001
        writer.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vectors_module, "_write_faiss", disk_full)
    with pytest.raises(OSError, match="No space"):
        ivf.save(path, generation=2)
    assert (path.read_bytes(), header_path(path).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.faiss", "vectors.faiss.json"]


def test_damaged_files_are_detected(ivf, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "vectors.faiss"
    ivf.save(path)
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(IndexStoreError, match="truncated"):
        VectorIndex.load(path)

    tampered = bytearray(good)
    tampered[len(good) // 2] ^= 0xFF
    path.write_bytes(bytes(tampered))
    with pytest.raises(IndexStoreError, match="checksum"):
        VectorIndex.load(path)

    path.write_bytes(good)
    header = json.loads(header_path(path).read_text())
    header_path(path).write_text(json.dumps(header | {"count": 5}))
    with pytest.raises(IndexStoreError, match="header says 5 x 32"):
        VectorIndex.load(path)

    header_path(path).write_text("{not json")
    with pytest.raises(IndexStoreError, match="damaged"):
        VectorIndex.load(path)

    header_path(path).unlink()
    with pytest.raises(IndexStoreError, match="no header"):
        VectorIndex.load(path)
    with pytest.raises(IndexStoreError, match="no header"):
        saved_kind(path)


def test_not_a_faiss_file_with_a_matching_header(ivf, tmp_path: Path) -> None:  # noqa: ANN001
    """Bytes that pass the checksum still have to be an inner-product index of the kind the header names."""
    path = tmp_path / "vectors.faiss"
    other = tmp_path / "other.faiss"
    quantizer = faiss.IndexFlatL2(DIM)
    l2 = faiss.IndexIVFFlat(quantizer, DIM, 4, faiss.METRIC_L2)
    l2.train(unit(200, seed=4))
    VectorIndex(l2, "ivf").save(other)
    ivf.save(path)
    path.write_bytes(other.read_bytes())
    header_path(path).write_text(header_path(other).read_text())
    with pytest.raises(IndexStoreError, match="not an inner-product ivf index"):
        VectorIndex.load(path)

    header = json.loads(header_path(path).read_text())
    header_path(path).write_text(json.dumps(header | {"kind": "ivfpq"}))
    with pytest.raises(IndexStoreError, match="holds a IndexIVFFlat, not a ivfpq index"):
        VectorIndex.load(path)

    garbage = b"garbage!" * 64
    path.write_bytes(garbage)
    header |= {"size_bytes": len(garbage), "sha256": hashlib.sha256(garbage).hexdigest()}
    header_path(path).write_text(json.dumps(header))
    with pytest.raises(IndexStoreError, match="not a readable FAISS file"):
        VectorIndex.load(path)


def test_an_old_flat_file_is_refused_by_load(data, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "vectors.faiss"
    write_old_flat_file(path, *data, generation=3, catalog_id="abc")
    assert saved_kind(path) == "flat"
    with pytest.raises(IndexStoreError, match="flat index saved by an older altsearch"):
        VectorIndex.load(path)


# --- devices -----------------------------------------------------------------------------


def test_gpu_selection(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert gpu_for("auto") is None
    with caplog.at_level(logging.WARNING, logger="altsearch.vectors"):
        assert gpu_for("cuda") is None
    assert "sees 0 GPU" in caplog.text

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    assert gpu_for("auto") == 0
    assert gpu_for("cuda") == 0
    assert gpu_for("cuda:1") == 1
    assert gpu_for("cuda:2") is None
    assert gpu_for("cpu") is None and gpu_for("mps") is None
    with pytest.raises(ValueError, match="unknown device"):
        gpu_for("tpu")
    assert VectorIndex.create(DIM, device="cpu").device == "cpu"
    assert VectorIndex.create(DIM, device="auto").device == "cuda:0"

    monkeypatch.delattr(faiss, "StandardGpuResources")  # a CPU-only FAISS build
    assert gpu_for("auto") is None


def test_large_k_searches_on_the_cpu_copy(flat, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Beyond the GPU's k limit, or with an id filter, the CPU master answers (no GPU copy made)."""
    flat._gpu = 0  # as if a GPU had been found; any attempt to use it would fail here
    monkeypatch.setattr(flat, "_to_gpu", lambda: pytest.fail("GPU copy attempted"))
    monkeypatch.setattr(vectors_module, "GPU_MAX_K", 100)
    flat.search(unit(1), 101)
    flat.search(unit(1), 5, allowed=np.array([3, 10]))


def test_one_query_searches_with_one_faiss_thread_in_its_own_thread_only(flat) -> None:  # noqa: ANN001
    before = faiss.omp_get_max_threads()
    if before < 2:
        pytest.skip("FAISS runs one thread here anyway")
    seen: list[tuple[int, int]] = []

    class Spy:  # the CPU index, noting the thread counts while it searches
        def __init__(self, inner) -> None:  # noqa: ANN001
            self.inner = inner

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.inner, name)

        def search(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            elsewhere = []
            other = threading.Thread(target=lambda: elsewhere.append(faiss.omp_get_max_threads()))
            other.start()
            other.join()
            seen.append((faiss.omp_get_max_threads(), elsewhere[0]))
            return self.inner.search(*args, **kwargs)

    flat._cpu = Spy(flat._cpu)
    flat.search(unit(1), 5)
    flat.search(unit(3), 5)
    flat.search(unit(1), 5, allowed=np.array([3, 10]))
    assert seen == [(1, before), (before, before), (1, before)]
    assert faiss.omp_get_max_threads() == before  # given back


# --- exact search in torch, where FAISS has no GPU ------------------------------------------


def test_torch_gpu_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert torch_gpu_for("auto") == torch_gpu_for("cuda") == torch_gpu_for("gpu") == "cuda:0"
    assert torch_gpu_for("cuda:1") == "cuda:1"
    assert torch_gpu_for("cuda:2") is None
    assert torch_gpu_for("cpu") is None and torch_gpu_for("mps") is None
    monkeypatch.delitem(sys.modules, "torch")  # a process that only reads the index: torch not imported for it
    assert torch_gpu_for("auto") is None
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_gpu_for("auto") is None


@pytest.fixture
def torch_gpu(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """torch's CPU stands in for a GPU that torch sees and FAISS does not; counts TorchExact searches."""
    monkeypatch.setattr(vectors_module, "torch_gpu_for", lambda device: None if device == "cpu" else "cpu:0")
    searched: list[int] = []
    real = TorchExact.search

    def search(self, queries, k):  # noqa: ANN001, ANN202
        searched.append(len(queries))
        return real(self, queries, k)

    monkeypatch.setattr(TorchExact, "search", search)
    return searched


def test_an_exact_index_searches_in_torch_where_faiss_has_no_gpu(data, torch_gpu, monkeypatch) -> None:  # noqa: ANN001
    ids, vecs = data
    index = VectorIndex.build(ids, vecs, kind="flat", device="auto")
    queries = unit(70, seed=5)
    monkeypatch.setattr(vectors_module, "_TORCH_SCORES_MAX", 16 * len(ids))  # 16 queries at a time
    assert_same_results(index.search(queries, 10), brute_force(queries, ids, vecs, 10))
    assert torch_gpu == [70] and index.device == "cpu:0"  # the stand-in
    assert_same_results(index.search(queries[:3], 1000), brute_force(queries[:3], ids, vecs, 1000))

    index.add(np.array([5]), queries[:1])  # the copy is remade after an add...
    scores, found = index.search(queries[:1], 2)
    assert found[0, 0] == 5 and scores[0, 0] == pytest.approx(1.0, abs=1e-6)
    index.remove(ids[:500])  # ...and after a remove
    kept_ids, kept_vecs = np.r_[ids[500:], 5], np.r_[vecs[500:], queries[:1]]
    assert_same_results(index.search(queries, 10), brute_force(queries, kept_ids, kept_vecs, 10))
    assert len(torch_gpu) == 4

    index.search(queries, 10, allowed=ids[600:700])  # an id filter: FAISS answers
    VectorIndex.build(ids, vecs, kind="flat", device="cpu").search(queries, 10)  # device="cpu": FAISS
    VectorIndex.build(ids, vecs, kind="ivf", device="auto").search(queries, 10)  # approximate: FAISS
    assert len(torch_gpu) == 4


def test_a_failed_copy_to_torch_leaves_the_search_to_faiss(data, torch_gpu, monkeypatch, caplog) -> None:  # noqa: ANN001
    def out_of_memory(*args):  # noqa: ANN002, ANN202
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(vectors_module, "TorchExact", out_of_memory)
    index = VectorIndex.build(*data, kind="flat", device="auto")
    queries = unit(4, seed=6)
    with caplog.at_level(logging.WARNING, logger="altsearch.vectors"):
        assert_same_results(index.search(queries, 10), brute_force(queries, *data, 10))
        index.search(queries, 10)
    assert caplog.text.count("could not copy the vectors") == 1  # tried once, not at every search
    assert index.device == "cpu" and torch_gpu == []


# --- with the catalogue ------------------------------------------------------------------


def catalog_with(tmp_path: Path, n: int) -> Catalog:
    cat = Catalog(tmp_path / "catalog.sqlite")
    with cat.transaction() as tx:
        records = [{"path": f"/p/{i:04}.jpg", "size": 1, "mtime": 1.0, "content_hash": f"{i}"} for i in range(n)]
        tx.add(records, unit(n, seed=11))
    return cat


def catalog_vectors(cat: Catalog) -> tuple[np.ndarray, np.ndarray]:
    parts = list(cat.iter_vectors())
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_from_catalog_and_reconcile(tmp_path: Path) -> None:
    cat = catalog_with(tmp_path, 300)
    ids, vecs = catalog_vectors(cat)
    flat = VectorIndex.from_catalog(cat, device="cpu")  # auto: exact at this size
    assert (flat.kind, len(flat), flat.built_count, flat.generation) == ("flat", 300, 300, cat.generation)
    np.testing.assert_array_equal(flat.reconstruct(ids), vecs)  # exactly the catalogue's (int8) vectors
    index = VectorIndex.from_catalog(cat, kind="ivf", device="cpu")
    assert index.generation == cat.generation and len(index) == 300
    path = tmp_path / "vectors.faiss"
    index.save(path, catalog_id=cat.catalog_id)
    saved = index.generation

    with cat.transaction() as tx:  # what a crash before the next FAISS save would leave behind
        tx.remove([1, 2, 3])
        tx.add([{"path": "/p/new.jpg", "size": 1, "mtime": 1.0, "content_hash": "n"}], unit(1, seed=12))
        tx.update(10, {"size": 2}, unit(1, seed=13)[0])  # same id, new vector
        tx.move(20, "/q/20.jpg", 1, 1.0)
    stale = VectorIndex.load(path, device="cpu")
    assert stale.reconcile(cat, since_generation=saved) == (2, 3)  # the new image and id 10
    assert stale.generation == cat.generation
    ids, vecs = catalog_vectors(cat)
    np.testing.assert_array_equal(stale.ids(), ids)
    np.testing.assert_array_equal(stale.reconstruct(ids), vecs)  # incl. id 10's new vector
    cat.close()


class ListingSpy:
    """A catalogue that counts the listings of every vector id (what a reconcile needs only where the
    catalogue's removal log does not reach back to the index's generation)."""

    def __init__(self, cat: Catalog) -> None:
        self._cat, self.full_listings = cat, 0

    def vector_ids(self, *, changed_since: int | None = None) -> np.ndarray:
        self.full_listings += changed_since is None
        return self._cat.vector_ids(changed_since=changed_since)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._cat, name)


def assert_holds_the_catalogue(index: VectorIndex, cat: Catalog) -> None:
    ids, vecs = catalog_vectors(cat)
    np.testing.assert_array_equal(index.ids(), ids)
    np.testing.assert_array_equal(index.reconstruct(ids), vecs)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_reconcile_reads_only_what_changed(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cat = catalog_with(tmp_path, 300)
    index = VectorIndex.from_catalog(cat, kind=kind, device="cpu")
    spy = ListingSpy(cat)
    since = index.generation
    with cat.transaction() as tx:  # what another process commits while this one searches
        tx.add([{"path": "/p/new.jpg", "size": 1, "mtime": 1.0, "content_hash": "n"}], unit(1, seed=12))
        tx.update(10, {"size": 2}, unit(1, seed=13)[0])  # same id, new vector
    assert index.reconcile(spy, since_generation=since) == (2, 0)
    assert spy.full_listings == 0 and len(index) == 301
    assert_holds_the_catalogue(index, cat)  # id 10 replaced, not duplicated

    since = index.generation
    with cat.transaction() as tx:  # removed and added in one commit, and removed over two
        tx.remove([3, 301])
        tx.add([{"path": "/p/newer.jpg", "size": 1, "mtime": 1.0, "content_hash": "m"}], unit(1, seed=14))
    with cat.transaction() as tx:
        tx.remove([7])
    assert index.reconcile(spy, since_generation=since) == (1, 3)
    assert spy.full_listings == 0  # the removal log named them
    assert_holds_the_catalogue(index, cat)
    assert not np.isin([3, 7, 301], index.search(unit(5, seed=1), 300)[1]).any()
    assert index.reconcile(spy, since_generation=index.generation) == (0, 0) and spy.full_listings == 0

    since = index.generation  # the log pruned past this index's generation: every id listed, once
    monkeypatch.setattr(catalog_module, "REMOVAL_LOG_MAX", 2)
    for chunk in ([20, 21], [22, 23]):
        with cat.transaction() as tx:
            tx.remove(chunk)
    assert cat.removed_ids(since=since) is None
    assert index.reconcile(spy, since_generation=since) == (0, 4)
    assert spy.full_listings == 1
    assert_holds_the_catalogue(index, cat)
    assert index.reconcile(spy, since_generation=index.generation) == (0, 0) and spy.full_listings == 1
    cat.close()


def test_open_reconciles_a_saved_file_or_builds_a_flat_index(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cat = catalog_with(tmp_path, 200)
    path = tmp_path / "vectors.faiss"
    fresh = VectorIndex.open(path, cat, device="cpu")  # no file: flat, built from the catalogue
    assert (fresh.kind, len(fresh), fresh.header, fresh.generation) == ("flat", 200, None, cat.generation)
    assert not path.exists() and not header_path(path).exists()  # opening writes nothing
    saved = VectorIndex.from_catalog(cat, kind="ivf", device="cpu")
    saved.save(path, catalog_id=cat.catalog_id)
    with cat.transaction() as tx:
        tx.remove([5])
    ids, vecs = catalog_vectors(cat)

    caught_up = VectorIndex.open(path, cat, device="cpu")
    assert caught_up.kind == "ivf" and caught_up.header is not None  # loaded, not rebuilt
    np.testing.assert_array_equal(caught_up.ids(), ids)

    saved.save(path, catalog_id="another catalogue")
    with caplog.at_level(logging.WARNING, logger="altsearch.vectors"):
        rebuilt = VectorIndex.open(path, cat, device="cpu")
    assert (rebuilt.kind, rebuilt.header) == ("flat", None) and "does not match its catalogue" in caplog.text
    np.testing.assert_array_equal(rebuilt.reconstruct(ids), vecs)

    saved.save(path, generation=cat.generation + 5, catalog_id=cat.catalog_id)  # ahead: restored catalogue
    assert VectorIndex.open(path, cat, device="cpu").header is None

    path.write_bytes(b"damaged")
    assert len(VectorIndex.open(path, cat, device="cpu")) == 199
    path.unlink()  # a header without its file
    assert VectorIndex.open(path, cat, device="cpu").kind == "flat"
    cat.close()


def test_an_old_flat_file_is_passed_over_then_deleted_by_a_writer(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """An index folder from before flat indexes were built from the catalogue: its vectors.faiss (here
    with other vectors than the catalogue's, which a reader must not use) is never read, and the first
    writer that saves deletes it, header and all."""
    catalog_with(tmp_path, 200).close()
    store = IndexStore(tmp_path, create=False, device="cpu")
    ids, vecs = catalog_vectors(store.catalog)
    path = tmp_path / "vectors.faiss"
    write_old_flat_file(path, ids, unit(200, seed=99), generation=store.generation, catalog_id=store.catalog.catalog_id)
    with caplog.at_level(logging.INFO, logger="altsearch.vectors"):
        index = store.vectors
    assert (index.kind, index.header) == ("flat", None)
    np.testing.assert_array_equal(index.reconstruct(ids), vecs)
    assert "older altsearch" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert store.check() == []  # stale, not a disagreement: the index never uses it
    assert path.exists() and header_path(path).exists()  # a reader changes nothing on disk
    store.save_vectors()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".vectors", "vectors"))) == []
    store.close()
    again = IndexStore(tmp_path, create=False, device="cpu")
    assert again.vectors.kind == "flat" and len(again.vectors) == 200 and again.check() == []
    again.close()


def test_from_empty_catalog(tmp_path: Path) -> None:
    with Catalog(tmp_path / "catalog.sqlite") as cat:
        with pytest.raises(IndexStoreError, match="no vector dimension"):
            VectorIndex.from_catalog(cat)
        cat.set_meta("dimension", str(DIM))
        index = VectorIndex.from_catalog(cat, device="cpu")
        assert (len(index), index.dim, index.kind) == (0, DIM, "flat")


def _clustered_catalog(tmp_path: Path, n: int, dim: int) -> Catalog:
    cat = Catalog(tmp_path / "catalog.sqlite")
    vecs, _ = clustered(n, dim, clusters=max(1, n // 200), spread=0.3, seed=5)
    for start in range(0, n, 10_000):
        part = range(start, min(n, start + 10_000))
        with cat.transaction() as tx:
            tx.add([{"path": f"/p/{i:06}.jpg", "size": 1, "mtime": 1.0, "content_hash": f"{i}"} for i in part],
                   vecs[part.start : part.stop])
    return cat


@pytest.mark.parametrize("kind", ["ivfpq", "ivf"])
def test_an_ivf_built_from_the_catalogue_is_the_one_built_from_its_vectors(tmp_path: Path, kind: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """from_catalog reads the training sample by id and then the vectors batch by batch; the index it
    makes is byte for byte the one `build` makes from the same vectors held in memory."""
    monkeypatch.setattr(vectors_module, "_READ_BATCH", 1000)  # several batches, and a last short one
    cat = _clustered_catalog(tmp_path, 4321, DIM)
    ids, vecs = catalog_vectors(cat)
    streamed = VectorIndex.from_catalog(cat, kind=kind, device="cpu")
    held = VectorIndex.build(ids, vecs, kind=kind, device="cpu")
    assert (streamed.kind, len(streamed), streamed.built_count, streamed.generation) == (kind, 4321, 4321, cat.generation)
    assert streamed.nprobe == held.nprobe and 1 <= held.nprobe <= held.nlist
    assert bytes(faiss.serialize_index(streamed._cpu)) == bytes(faiss.serialize_index(held._cpu))
    queries = vecs[:20] + 0.05 * unit(20, seed=3)
    truth = brute_force(queries, ids, vecs, 10)[1]
    refine = refine_from(ids, vecs)
    assert recall_at_k(truth, streamed.search(queries, 10, refine=refine)[1]) >= vectors_module.RECALL_TARGET
    cat.close()


def test_building_an_ivf_from_the_catalogue_never_holds_every_vector(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The arrays allocated while an ivfpq index is built from a catalogue peak far below the size of
    its vectors as float32 (what the build needed when it read them all first): the training sample,
    a batch, the probe queries' re-ranking, and the index's own (FAISS) memory, which tracemalloc does
    not see. A smaller sample and fewer probe queries than by default let the difference show at a
    size a test can afford (at 10M x 768 the sample is 3 % of the vectors)."""
    import tracemalloc

    n, dim = 100_000, 64
    cat = _clustered_catalog(tmp_path, n, dim)
    monkeypatch.setattr(vectors_module, "_READ_BATCH", 2048)
    monkeypatch.setattr(vectors_module, "TRAIN_PER_LIST", 10)
    monkeypatch.setattr(vectors_module, "TUNE_QUERIES", 64)
    every = n * dim * 4
    sample = max(vectors_module.nlist_for(n) * 10, vectors_module.PQ_TRAIN) * dim * 4
    assert sample < every / 10  # else this test could not tell the two builds apart
    tracemalloc.start()
    try:
        index = VectorIndex.from_catalog(cat, kind="ivfpq", device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(index) == n and index.nprobe >= 1
    assert peak < every / 3, (peak, every)
    cat.close()


def test_an_ivf_build_skips_vectors_deleted_after_they_were_listed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process may delete images while a writer builds: the ids listed first then have no
    vector to read. The build leaves them out (reconciling from the generation read first removes
    whatever else it kept)."""
    cat = catalog_with(tmp_path, 600)
    ids, vecs = catalog_vectors(cat)
    listed = np.concatenate([ids, ids[-1] + 1 + np.arange(200)])  # listed, then deleted
    monkeypatch.setattr(cat, "vector_ids", lambda **_: listed)
    index = VectorIndex.from_catalog(cat, kind="ivf", device="cpu")
    np.testing.assert_array_equal(index.ids(), ids)
    np.testing.assert_array_equal(index.reconstruct(ids), vecs)
    cat.close()


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_adding_known_ids_in_any_order_replaces_them(data, kind: str) -> None:  # noqa: ANN001
    ids, vecs = data
    index = VectorIndex.build(ids, vecs, kind=kind, device="cpu")
    again = ids[[900, 3, 450, 0]]  # descending and not: the replaced ids form one selector
    new = unit(4, seed=9)
    index.add(again, new)
    assert len(index) == len(ids)
    np.testing.assert_array_equal(index.ids(), ids)
    np.testing.assert_allclose(index.reconstruct(again), new, atol=1e-6)


def test_an_exact_build_stops_at_its_limit_when_the_catalogue_grew_after_the_count(tmp_path: Path) -> None:
    cat = catalog_with(tmp_path, 300)

    class CountedEarly(ListingSpy):  # the listing that sized the build saw 100 vectors; 300 are read
        def vector_ids(self, *, changed_since: int | None = None) -> np.ndarray:
            listed = super().vector_ids(changed_since=changed_since)
            return listed[:100] if self.full_listings == 1 else listed

    limit = 200 * vectors_module.flat_bytes(cat.dimension)
    with pytest.raises(IndexTooLargeError, match=r"its 300 vectors would take"):
        VectorIndex.from_catalog(CountedEarly(cat), kind="flat", device="cpu", max_bytes=limit)
    assert len(VectorIndex.from_catalog(cat, kind="flat", device="cpu", max_bytes=limit * 2)) == 300
    cat.close()
