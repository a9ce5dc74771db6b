"""Decoding files for ingestion: hostile inputs, the worker pool, crashes, metadata."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from altsearch import decode
from altsearch.decode import CRASH_HOOK_ENV, CRASHED, DecodePool, Decoded, decode_one, hash_file
from altsearch.model.preprocess import PreprocessConfig
from tests.hostile import bomb_png

CFG = PreprocessConfig()
REPO = Path(__file__).resolve().parents[1]


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 180, width)[None, :, None] + np.linspace(0, 60, height)[:, None, None]
    return Image.fromarray(np.clip(ramp + rng.integers(-30, 31, (height, width, 3)), 0, 255).astype(np.uint8))


def jpeg_bytes(width: int = 320, height: int = 240, seed: int = 0, **kw) -> bytes:
    buf = io.BytesIO()
    picture(width, height, seed).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def flip_bits(data: bytes, at: int, count: int = 16) -> bytes:
    raw = bytearray(data)
    for i in range(at, at + count):
        raw[i] ^= 0x5A
    return bytes(raw)


@pytest.fixture
def corpus(tmp_path) -> dict[str, Path]:
    """Good and hostile files; the keys say what each is."""
    good = jpeg_bytes()
    one_pixel = io.BytesIO()
    Image.new("RGB", (1, 1), (12, 34, 56)).save(one_pixel, "PNG")
    files = {
        "good": ("good.jpg", good),
        "one_pixel": ("pixel.png", one_pixel.getvalue()),
        "chinese_spaces": ("海边 的 日落 photo.jpg", jpeg_bytes(200, 300, seed=1)),
        "empty": ("empty.jpg", b""),
        "truncated": ("truncated.jpg", good[: len(good) // 2]),
        "flipped_scan": ("flipped-scan.jpg", flip_bits(good, len(good) // 2)),
        "flipped_header": ("flipped-header.jpg", flip_bits(good, 2, 40)),
        "text": ("notes.jpg", "just some text, not a JPEG\n".encode()),
        "bomb": ("bomb.png", bomb_png(100_000, 100_000)),
        "vanished": ("vanished.jpg", good),
    }
    paths = {}
    for key, (name, data) in files.items():
        paths[key] = tmp_path / name
        paths[key].write_bytes(data)
    paths["vanished"].unlink()  # listed, then gone before decoding
    paths["directory"] = tmp_path / "folder.jpg"
    paths["directory"].mkdir()
    return paths


EXPECTED_ERRORS = {
    "empty": "empty file",
    "truncated": "truncated image",
    "text": "not an image (unrecognised format)",
    "vanished": "file vanished",
    "directory": "is a directory",
}


def test_every_hostile_file_gives_a_clear_result(corpus):
    results = {key: decode_one(path, CFG, None) for key, path in corpus.items()}
    for key in ("good", "one_pixel", "chinese_spaces"):
        assert results[key].error is None, key
        assert results[key].pixels.shape == (224, 224, 3) and results[key].pixels.dtype == np.uint8
    for key, error in EXPECTED_ERRORS.items():
        assert results[key].error == error, key
        assert results[key].pixels is None and results[key].meta is None
    assert results["bomb"].error.startswith("image too large")
    for key in ("flipped_scan", "flipped_header"):  # libjpeg may decode garbage or give up
        r = results[key]
        assert (r.error is None) != (r.pixels is None), key
    for r in results.values():
        assert r.error is None or (r.error and "\n" not in r.error)
    assert results["chinese_spaces"].path == str(corpus["chinese_spaces"])
    assert (results["one_pixel"].pixels == (12, 34, 56)).all()


HASHES = {"sha256-128": lambda b: hashlib.sha256(b).hexdigest()[:32],
          "blake2b-128": lambda b: hashlib.blake2b(b, digest_size=16).hexdigest()}


@pytest.mark.parametrize("kind", decode.HASH_KINDS)
def test_content_hash_is_128_bits_of_the_kind_asked_for(corpus, kind):
    expected = HASHES[kind](corpus["good"].read_bytes())
    assert decode_one(corpus["good"], CFG, None, hash_kind=kind).content_hash == hash_file(corpus["good"], kind) == expected
    truncated = decode_one(corpus["truncated"], CFG, None, hash_kind=kind)
    assert truncated.content_hash == hash_file(corpus["truncated"], kind) == HASHES[kind](corpus["truncated"].read_bytes())
    assert decode_one(corpus["vanished"], CFG, None, hash_kind=kind).content_hash is None


def test_the_default_hash_is_sha256_and_an_unknown_one_is_refused(corpus):
    assert decode.DEFAULT_HASH == "sha256-128" and decode.DEFAULT_HASH in decode.HASH_KINDS
    assert decode_one(corpus["good"], CFG, None).content_hash == HASHES["sha256-128"](corpus["good"].read_bytes())
    with pytest.raises(ValueError, match="unknown content hash 'md5'"):
        DecodePool(CFG, workers=0, hash_kind="md5")


def test_worker_processes_hash_with_the_pool_s_kind(corpus):
    with DecodePool(CFG, workers=1, hash_kind="blake2b-128") as pool:
        (result,) = pool.imap([corpus["good"]])
    assert result.content_hash == HASHES["blake2b-128"](corpus["good"].read_bytes())


def test_permission_denied(corpus, monkeypatch):
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(corpus["good"]):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)  # how image files are opened for reading
    assert decode_one(corpus["good"], CFG, None).error == "permission denied"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads mode-000 files anyway")
def test_unreadable_file_on_disk(corpus):
    corpus["good"].chmod(0)
    try:
        assert decode_one(corpus["good"], CFG, None).error == "permission denied"
    finally:
        corpus["good"].chmod(0o644)


def test_pixel_limit_is_applied(corpus):
    result = decode_one(corpus["good"], CFG, None, max_pixels=1000)
    assert result.error == "image too large: 320x240 px (limit 1000 px)"
    assert result.content_hash is not None


@pytest.fixture(scope="module")
def pools():
    """Pools shared by the tests below (starting workers is the slow part). Their workers exit
    abruptly on files whose name contains CRASH-ME (the decode test hook)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CRASH_HOOK_ENV, "CRASH-ME")
        with DecodePool(CFG, workers=1, max_in_flight=2) as one:
            with DecodePool(CFG, workers=2, max_in_flight=4) as two:
                yield {1: one, 2: two}


def _summary(results) -> dict[str, tuple]:
    return {
        r.path: (r.content_hash, r.error, None if r.pixels is None else r.pixels.tobytes(), r.meta)
        for r in results
    }


def test_pool_sizes_agree_and_cover_every_input(corpus, pools):
    paths = [str(p) for p in corpus.values()] * 2  # duplicates are separate inputs
    summaries = []
    with DecodePool(CFG, workers=0) as in_process:
        for pool in (in_process, pools[1], pools[2]):
            results = list(pool.imap(paths))
            assert [r.path for r in results] == paths
            summaries.append(_summary(results))
    assert summaries[0] == summaries[1] == summaries[2]
    for key in ("good", "one_pixel", "chinese_spaces"):
        assert summaries[0][str(corpus[key])][1] is None


def test_pool_decodes_with_the_default_draft(tmp_path, pools):
    big = tmp_path / "big.jpg"
    big.write_bytes(jpeg_bytes(1200, 1000, seed=5))
    (result,) = pools[1].imap([big])
    assert np.array_equal(result.pixels, decode_one(big, CFG, decode.DEFAULT_DRAFT).pixels)
    assert not np.array_equal(result.pixels, decode_one(big, CFG, None).pixels)  # the draft was used
    assert decode.DEFAULT_DRAFT == 2 * CFG.shortest_edge


def test_outcomes_come_in_input_order_whatever_order_the_workers_finish_in(tmp_path, pools):
    """A slow file first: the other worker finishes the small files behind it sooner, yet each outcome
    comes back in its path's place, so an indexing run makes the same batches, and the same vectors,
    whatever the timing."""
    slow = tmp_path / "slow.png"
    noise = np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(slow, compress_level=1)  # noise: about 0.1 s to inflate and resize
    small = []
    for i in range(3):
        small.append(tmp_path / f"small-{i}.jpg")
        small[-1].write_bytes(jpeg_bytes(64, 48, seed=i))
    paths = [str(p) for p in (slow, *small, slow, *small)]
    for workers in (1, 2):
        results = list(pools[workers].imap(paths))
        assert [r.path for r in results] == paths
        assert all(r.error is None for r in results)


def test_in_flight_work_is_bounded(tmp_path, pools):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes(64, 48))
    consumed = 0

    def paths():
        nonlocal consumed
        for _ in range(12):
            consumed += 1
            yield path

    yielded = 0
    for result in pools[1].imap(paths()):  # max_in_flight=2
        yielded += 1
        assert result.error is None
        assert consumed - (yielded - 1) <= 2  # submitted and not yet yielded, counting this one
    assert yielded == consumed == 12


def test_worker_crash_is_contained_and_the_pool_keeps_working(corpus, pools):
    crasher = str(corpus["good"].parent / "CRASH-ME.jpg")
    Path(crasher).write_bytes(jpeg_bytes(64, 48))
    good = [str(corpus["good"]), str(corpus["chinese_spaces"]), str(corpus["one_pixel"])]
    text = str(corpus["text"])
    order = [good[0], crasher, *good[1:], text]
    listed = list(pools[2].imap(order))
    assert [r.path for r in listed] == order  # the retried files keep their places
    results = {r.path: r for r in listed}
    assert results[crasher].error == CRASHED and results[crasher].pixels is None
    assert all(results[p].error is None for p in good)  # in flight with the crash, retried alone
    assert results[text].error == "not an image (unrecognised format)"
    assert [r.error for r in pools[2].imap(good)] == [None, None, None]


def test_the_crash_hook_is_inert_in_process(corpus, monkeypatch):
    monkeypatch.setenv(CRASH_HOOK_ENV, "good")
    with DecodePool(CFG, workers=0) as pool:
        (result,) = pool.imap([corpus["good"]])
    assert result.error is None


def test_decoding_does_not_import_torch():
    """Workers import only what altsearch.decode imports (plus the parent's __main__)."""
    code = "import sys, altsearch.decode; sys.exit(3 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, "importing altsearch.decode pulls in torch" + proc.stderr[-500:]


def _exif(orientation: int | None = None, offset: str | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Canon\x00"
    exif[ExifTags.Base.Model] = " EOS 5D Mark IV "
    exif[ExifTags.Base.DateTime] = "2023:01:01 00:00:00"  # modification time: not the one used
    if orientation:
        exif[ExifTags.Base.Orientation] = orientation
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    sub[ExifTags.Base.DateTimeOriginal] = "2021:07:04 12:34:56"
    if offset:
        sub[ExifTags.Base.OffsetTimeOriginal] = offset
    return exif


def test_exif_metadata(tmp_path):
    path = tmp_path / "camera.jpg"
    path.write_bytes(jpeg_bytes(64, 48, exif=_exif(orientation=6)))
    meta = decode_one(path, CFG, None).meta
    assert (meta.width, meta.height, meta.format) == (48, 64, "JPEG")  # displayed size, rotated
    assert (meta.camera_make, meta.camera_model) == ("Canon", "EOS 5D Mark IV")
    assert meta.taken_at == datetime(2021, 7, 4, 12, 34, 56, tzinfo=timezone.utc).timestamp()

    path.write_bytes(jpeg_bytes(64, 48, exif=_exif(offset="+08:00")))
    meta = decode_one(path, CFG, None).meta
    assert (meta.width, meta.height) == (64, 48)
    assert meta.taken_at == datetime(2021, 7, 4, 12, 34, 56, tzinfo=timezone(timedelta(hours=8))).timestamp()


def test_metadata_without_exif_and_full_size_under_draft(tmp_path):
    path = tmp_path / "plain.jpg"
    path.write_bytes(jpeg_bytes(1000, 900))
    result = decode_one(path, CFG, 224)
    assert result.meta == decode.ImageMeta(1000, 900, "JPEG", None, None, None)


def test_decoded_is_a_plain_record():
    failed = Decoded("x.jpg", None, None, None, "file vanished")
    assert not failed.ok and failed.path == "x.jpg"


@pytest.mark.parametrize("cores, beside_gpu, beside_cpu_model", [(1, 1, 0), (2, 1, 0), (4, 3, 1), (16, 15, 1)])
def test_default_workers_follow_the_cores_and_where_the_model_runs(monkeypatch, cores, beside_gpu,
                                                                   beside_cpu_model):
    monkeypatch.setattr(decode, "available_cores", lambda: cores)
    assert decode.default_workers() == beside_gpu
    assert decode.default_workers(model_on_cpu=True) == beside_cpu_model
