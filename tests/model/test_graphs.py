"""CUDA graphs of the text tower (altsearch.model.graphs), as far as a machine without a GPU can check.

What a graph replays is the tower run on token ids padded up to a bucket, with the mask always
applied: these tests check on the CPU that this gives the eager features, and that TextGraphs fills
its static buffers, picks buckets and records on the second use as it should (the recording itself,
torch.cuda.CUDAGraph, stands in as a replay of the same function on the same buffers).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from altsearch import load_model
from altsearch.model import graphs
from altsearch.model.graphs import TextGraphs
from tests.checkpoints import write_checkpoint

TEXTS = ["a cat", "海边的日落", "sunset over the sea, with two boats and a lighthouse far away"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model = load_model(write_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=3), device="cpu", dtype="fp32")
    return model.load(["text"])


def eager(model, texts):
    ids, mask = model.tokenizer.encode(texts)
    with torch.inference_mode():
        return model.module.text_features(ids, mask), ids, mask


@pytest.mark.parametrize("texts,bucket", [(TEXTS[:1], (8, 48)), (TEXTS[1:], (8, 48)), (TEXTS, (8, 48)),
                                          (TEXTS * 7, (32, 64))])
def test_padding_up_to_a_bucket_changes_nothing(model, texts, bucket):
    expected, ids, mask = eager(model, texts)
    b, t = ids.shape
    big_ids = torch.full(bucket, model.config.text.pad_token_id, dtype=ids.dtype)
    big_mask = torch.zeros(bucket, dtype=mask.dtype)
    big_mask[b:, 0] = 1
    big_ids[:b, :t], big_mask[:b, :t] = ids, mask
    with torch.inference_mode():
        got = model.module.text_features(big_ids, big_mask, padded=True)[:b]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


class Replay:
    """Stands in for torch.cuda.CUDAGraph: replay() runs the recorded function on the static buffers."""

    def __init__(self, fn, ids, mask, out):
        self.fn, self.ids, self.mask, self.out = fn, ids, mask, out
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.fn(self.ids, self.mask, padded=True))


@pytest.fixture
def cpu_graphs(model, monkeypatch):
    tg = TextGraphs(model.module.text_features, pad_id=model.config.text.pad_token_id,
                    max_length=model.max_length, device=torch.device("cpu"))
    recorded = []

    def record(batch, length):
        ids = torch.full((batch, length), tg.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        out = torch.zeros((batch, model.dimension))
        graph = graphs._Graph(Replay(model.module.text_features, ids, mask, out), ids, mask, out)
        recorded.append((batch, length))
        return graph

    monkeypatch.setattr(tg, "_record", record)
    return tg, recorded


def test_buckets_are_recorded_on_second_use_and_replayed(model, cpu_graphs):
    tg, recorded = cpu_graphs
    replayed = []
    with torch.inference_mode():
        for texts in (TEXTS[:1], TEXTS[:1], TEXTS[:1], TEXTS, TEXTS):
            expected, ids, mask = eager(model, texts)
            got = tg(ids, mask)
            replayed.append(got is not None)
            if got is not None:
                torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    one, three = (tg.bucket(*eager(model, t)[1].shape) for t in (TEXTS[:1], TEXTS))
    assert one[0] == 1 and three[0] == 4 and one[1] < three[1]
    assert replayed == [False, True, True, False, True]
    assert recorded == [one, three] and tg.recorded == tuple(sorted([one, three]))
    assert tg._graphs[one].graph.replays == 2


def test_a_bucket_that_cannot_be_recorded_stays_eager(model, cpu_graphs, monkeypatch, caplog):
    tg, recorded = cpu_graphs
    attempts = []

    def fail(batch, length):
        attempts.append((batch, length))
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(tg, "_record", fail)
    _, ids, mask = eager(model, TEXTS[:1])
    assert [tg(ids, mask) for _ in range(4)] == [None] * 4
    assert len(attempts) == 1 and tg.recorded == ()  # tried once, then left alone
    assert "without a CUDA graph" in caplog.text


def test_what_no_bucket_fits_runs_eagerly(model, cpu_graphs):
    tg, recorded = cpu_graphs
    assert model.max_length > graphs.LENGTHS[-1]  # else long texts could not be told apart here
    ids = torch.ones((65, 4), dtype=torch.long)
    assert tg.bucket(65, 4) is None and tg(ids, torch.ones_like(ids)) is None
    ids = torch.ones((9, graphs.LENGTHS[-1] + 1), dtype=torch.long)  # many long texts: compute-bound
    assert tg.bucket(*ids.shape) is None and tg(ids, torch.ones_like(ids)) is None
    assert tg.bucket(1, model.max_length + 1) is None
    assert recorded == []


def test_buckets_cover_short_batches_up_to_64_and_long_texts_up_to_8(model, cpu_graphs):
    tg, _ = cpu_graphs
    top = graphs.LENGTHS[-1]
    assert tg.bucket(9, 4) == (16, 8) and tg.bucket(33, top) == (64, top) and tg.bucket(64, 17) == (64, 32)
    assert tg.bucket(1, model.max_length) == (1, model.max_length)
    assert tg.bucket(8, top + 1) == (8, tg.lengths[tg.lengths.index(top) + 1])


def test_a_batch_of_queries_replays_from_a_large_bucket(model, cpu_graphs):
    tg, recorded = cpu_graphs
    texts = [f"{t} {n}" for n in range(7) for t in TEXTS]  # 21 queries: the bucket of 32
    expected, ids, mask = eager(model, texts)
    with torch.inference_mode():
        assert tg(ids, mask) is None  # first use: eager
        got = tg(ids, mask)
    assert recorded == [tg.bucket(*ids.shape)] and recorded[0][0] == 32
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_a_cuda_model_encodes_through_the_graphs(model, monkeypatch):
    """Model.encode_text on CUDA goes through TextGraphs, and falls back to the tower where it says None."""
    calls = []

    class Spy:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, ids, mask):
            calls.append(tuple(ids.shape))
            return None if len(calls) == 1 else torch.zeros((ids.shape[0], model.dimension))

    monkeypatch.setattr(graphs, "TextGraphs", Spy)
    monkeypatch.setattr(model, "device", torch.device("cuda"))
    monkeypatch.setattr(model, "_text_graphs", None)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # no GPU here: stay on the CPU
    first = model.encode_text(TEXTS[:1])
    second = model.encode_text(TEXTS[:1])
    assert len(calls) == 2
    assert np.isclose(np.linalg.norm(first), 1.0) and np.isnan(second).all()  # zeros, normalised: graph output used
