"""GPU JPEG decoding (altsearch.gpudecode) without a GPU.

nvJPEG itself needs CUDA and torchvision; these tests stand in for it with a Pillow decode to
tensors on the CPU that, like nvJPEG, ignores EXIF orientation and refuses a group that holds a bad
file. Everything around it is the real code: reading and hashing, the header probe that routes files
to the GPU or the CPU, EXIF orientation, the reduction, resize and crop on tensors, the per-file
fallback, and ingestion with tensor crops.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps

from altsearch import Engine, gpudecode
from altsearch.decode import HASH_KINDS, DecodePool, decode_one, hash_file
from altsearch.errors import AltsearchError
from altsearch.gpudecode import GpuDecoder, choose_decoder, draft_step, orient, resize_crop_tensor
from altsearch.model.preprocess import PreprocessConfig, resize_crop
from tests.photos import photo

CFG = PreprocessConfig()


def pillow_as_nvjpeg(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """What nvJPEG returns, made with Pillow: RGB (3, H, W) uint8, EXIF orientation not applied, and a
    RuntimeError for the whole group when one file does not decode."""
    out = []
    for t in tensors:
        try:
            with Image.open(io.BytesIO(t.numpy().tobytes())) as im:
                rgb = np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise RuntimeError(f"nvjpeg: {exc}") from exc
        out.append(torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(device))
    return out


def jpeg(path: Path, size=(640, 480), seed: int = 0, **save) -> Path:
    photo(seed, size).save(path, "JPEG", quality=92, **save)
    return path


def oriented_exif(code: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = code
    exif[ExifTags.Base.Make] = "Canon"
    return exif


@pytest.mark.parametrize("code", range(1, 9))
def test_orient_turns_as_pillow_exif_transpose(code):
    base = Image.fromarray(np.random.default_rng(code).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    buf = io.BytesIO()
    base.save(buf, "PNG", exif=oriented_exif(code))
    with Image.open(buf) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    tensor = torch.from_numpy(np.asarray(base).copy()).permute(2, 0, 1)
    assert np.array_equal(orient(tensor, code).permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("size", [(4000, 3000), (3000, 4000), (1000, 900), (900, 449), (500, 300)])
def test_draft_step_is_the_scale_libjpeg_decodes_at(size, tmp_path):
    path = jpeg(tmp_path / "p.jpg", size)
    with Image.open(path) as im:
        im.draft("RGB", (448, 448))  # what ingestion's CPU path asks for
        drafted = im.size
    step = draft_step(*size, CFG.shortest_edge)
    assert drafted == (-(-size[0] // step), -(-size[1] // step))


@pytest.mark.parametrize("size", [(1600, 1200), (1200, 1600), (640, 480), (300, 200), (150, 90)])
def test_tensor_crop_matches_the_cpu_crop(size, tmp_path):
    """Same geometry as the CPU path (draft decode, bicubic, centre crop, zero padding); the pixels
    differ by averaging instead of a scaled IDCT, and by rounding."""
    path = jpeg(tmp_path / "p.jpg", size)
    cpu = decode_one(path, CFG).pixels
    with Image.open(path) as im:
        full = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    ours = resize_crop_tensor(full[None], CFG)[0].numpy()
    assert ours.shape == cpu.shape == (224, 224, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - cpu.astype(int))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 12
    padded = (cpu == 0).all(axis=2)
    assert np.array_equal((ours == 0).all(axis=2)[padded], padded[padded])  # the same zero border


def test_tensor_crop_without_reduction_is_the_full_decode_crop(tmp_path):
    path = jpeg(tmp_path / "p.jpg", (1600, 1200))
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        full = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
        cpu = resize_crop(rgb, CFG)
    ours = resize_crop_tensor(full[None], CFG, reduce=False)[0].numpy()
    assert np.abs(ours.astype(int) - cpu.astype(int)).mean() < 1.0  # torch's antialiased bicubic is Pillow's


def test_extreme_aspect_ratios_are_left_to_the_cpu():
    assert resize_crop_tensor(torch.zeros((1, 3, 20, 20000), dtype=torch.uint8), CFG) is None


@pytest.fixture
def folder(tmp_path) -> dict[str, Path]:
    """Files of every kind the decoder routes differently."""
    d = tmp_path / "photos"
    d.mkdir()
    files = {"plain": jpeg(d / "plain.jpg", seed=1), "grey": d / "grey.jpg", "rotated": d / "rotated.jpg",
             "png": d / "pic.png", "cmyk": d / "cmyk.jpg", "truncated": d / "truncated.jpg",
             "trailer": d / "trailer.jpg", "garbage": d / "garbage.jpg", "missing": d / "missing.jpg",
             "bomb": d / "huge.jpg"}
    photo(2, (640, 480)).convert("L").save(files["grey"], "JPEG", quality=90)
    photo(3, (640, 480)).save(files["rotated"], "JPEG", quality=90, exif=oriented_exif(6))
    photo(4, (320, 240)).save(files["png"], "PNG")
    photo(5, (320, 240)).convert("CMYK").save(files["cmyk"], "JPEG", quality=90)
    files["truncated"].write_bytes(jpeg(tmp_path / "t.jpg", seed=6).read_bytes()[:-4000])
    files["trailer"].write_bytes(jpeg(tmp_path / "x.jpg", seed=7).read_bytes() + b"camera maker data")
    files["garbage"].write_bytes(b"\xff\xd8 not really a jpeg \xff\xd9")
    jpeg(files["bomb"], (3000, 2000), seed=8)
    return files


def run_both(paths, **kw):
    with GpuDecoder(CFG, "cpu", decode_jpeg=pillow_as_nvjpeg, group=4, draft=448, **kw) as dec:
        gpu = {d.path: d for d in dec.imap(map(str, paths))}
        stats = dict(dec.stats)
    with DecodePool(CFG, workers=0, **kw) as pool:
        cpu = {d.path: d for d in pool.imap(map(str, paths))}
    return gpu, cpu, stats


@pytest.mark.parametrize("hash_kind", HASH_KINDS)
def test_every_file_gets_the_cpu_path_s_verdict_hash_and_metadata(folder, hash_kind):
    gpu, cpu, stats = run_both(list(folder.values()), max_pixels=5_000_000, hash_kind=hash_kind)
    assert gpu.keys() == cpu.keys() == {str(p) for p in folder.values()}
    assert gpu[str(folder["plain"])].content_hash == hash_file(folder["plain"], hash_kind)
    for name, path in folder.items():
        g, c = gpu[str(path)], cpu[str(path)]
        assert (g.error, g.content_hash, g.meta) == (c.error, c.content_hash, c.meta), name
        if c.ok:
            pixels = g.pixels.numpy() if isinstance(g.pixels, torch.Tensor) else g.pixels
            assert pixels.shape == c.pixels.shape and pixels.dtype == np.uint8
            assert np.abs(pixels.astype(int) - c.pixels.astype(int)).mean() < 2.0, name
    assert gpu[str(folder["bomb"])].error.startswith("image too large")
    assert gpu[str(folder["missing"])].error == "file vanished"
    assert not gpu[str(folder["truncated"])].ok and not gpu[str(folder["garbage"])].ok
    on_gpu = {n for n, p in folder.items() if isinstance(gpu[str(p)].pixels, torch.Tensor)}
    assert on_gpu == {"plain", "grey", "rotated"}  # the rest went to Pillow, as they must
    assert stats == {"gpu": 3, "cpu": 5}  # png, cmyk, truncated, trailer, garbage (its header fails the probe)


def test_nvjpeg_is_handed_the_bytes_read_without_a_copy(folder, monkeypatch):
    """A copy of each 2.4 MB photo cost 1.4 ms in the thread that feeds the GPU."""
    read, handed = [], []
    real_read = gpudecode.read_file

    def read_file(path):
        data = real_read(path)
        read.append(data)
        return data

    def decode(tensors, device):
        handed.extend(t.data_ptr() for t in tensors)
        return pillow_as_nvjpeg(tensors, device)

    monkeypatch.setattr(gpudecode, "read_file", read_file)
    with GpuDecoder(CFG, "cpu", decode_jpeg=decode, group=4, draft=448) as dec:
        assert all(d.ok for d in dec.imap([str(folder["plain"]), str(folder["rotated"])]))
    assert handed and set(handed) <= {np.frombuffer(b, np.uint8).ctypes.data for b in read}


def test_handing_nvjpeg_read_only_bytes_shows_no_warning(folder):
    """torch warns about a tensor over read-only memory; the decoder knows nothing writes to it."""
    code = ("import sys, warnings; warnings.simplefilter('error'); "
            "from tests.test_gpudecode import CFG, GpuDecoder, pillow_as_nvjpeg; "
            "dec = GpuDecoder(CFG, 'cpu', decode_jpeg=pillow_as_nvjpeg, group=2, draft=448); "
            "assert all(d.ok for d in dec.imap(sys.argv[1:])), 'not decoded'")
    done = subprocess.run([sys.executable, "-c", code, str(folder["plain"]), str(folder["rotated"])],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_file_nvjpeg_refuses_is_decoded_alone_on_the_cpu(folder, monkeypatch):
    """A JPEG whose header reads well but whose data nvJPEG rejects breaks its group: the others are
    decoded one by one on the GPU, and that one gets the CPU's verdict."""
    bad = folder["plain"].with_name("bad-data.jpg")
    data = bytearray(folder["plain"].read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\x00" * 64
    bad.write_bytes(bytes(data))
    calls = []

    def refuse_bad(tensors, device):
        calls.append(len(tensors))
        if any(t.numpy().tobytes() == bytes(data) for t in tensors):
            raise RuntimeError("nvjpeg: bad data")
        return pillow_as_nvjpeg(tensors, device)

    paths = [folder["plain"], bad, folder["grey"], folder["rotated"]]
    with GpuDecoder(CFG, "cpu", decode_jpeg=refuse_bad, group=4, draft=448) as dec:
        got = {Path(d.path).name: d for d in dec.imap(map(str, paths))}
    assert calls == [4, 1, 1, 1, 1]
    assert isinstance(got["plain.jpg"].pixels, torch.Tensor) and isinstance(got["rotated.jpg"].pixels, torch.Tensor)
    expected = decode_one(bad, CFG)
    assert (got["bad-data.jpg"].error, got["bad-data.jpg"].content_hash) == (expected.error, expected.content_hash)
    assert not isinstance(got["bad-data.jpg"].pixels, torch.Tensor)


def test_decode_choice():
    cpu = torch.device("cpu")
    assert choose_decoder("auto", cpu, CFG) == "cpu"
    assert choose_decoder("cpu", cpu, CFG) == "cpu"
    with pytest.raises(ValueError, match="not CUDA"):
        choose_decoder("gpu", cpu, CFG)
    with pytest.raises(ValueError, match="decode must be one of"):
        choose_decoder("fast", cpu, CFG)


def test_engine_refuses_gpu_decoding_on_a_cpu_model(tiny_checkpoint, tmp_path, folder):
    with Engine.open(tmp_path / "idx", model=str(tiny_checkpoint), device="cpu") as engine:
        with pytest.raises(AltsearchError, match="cannot decode on the GPU"):
            engine.index(folder["plain"].parent, decode="gpu")


def test_ingestion_with_gpu_decoding_indexes_what_cpu_decoding_does(tiny_checkpoint, tmp_path, folder, monkeypatch):
    """The whole run with the stand-in: the same files indexed and failed, vectors within decoding noise."""
    monkeypatch.setattr(gpudecode, "_nvjpeg", lambda: pillow_as_nvjpeg)
    monkeypatch.setattr(gpudecode, "gpu_decode_unavailable", lambda device, cfg, load=True: None)
    reports, vectors = {}, {}
    for way in ("cpu", "gpu"):
        with Engine.open(tmp_path / way, model=str(tiny_checkpoint), device="cpu") as engine:
            reports[way] = engine.index(folder["plain"].parent, decode=way, batch_size=2)
            cat = engine.store.catalog
            for ids, vecs in cat.iter_vectors():
                vectors[way] = {r.path: v for r, v in zip(cat.get(ids), vecs)}
    g, c = reports["gpu"], reports["cpu"]
    assert (g.decoder, c.decoder) == ("gpu", "cpu")
    assert (g.added, g.failed, sorted(g.failures)) == (c.added, c.failed, sorted(c.failures))
    assert vectors["gpu"].keys() == vectors["cpu"].keys() and len(vectors["gpu"]) == c.added
    for path, v in vectors["cpu"].items():
        w = vectors["gpu"][path]
        assert float(v @ w / np.linalg.norm(v) / np.linalg.norm(w)) > 0.999, path


def test_auto_decodes_on_the_gpu_only_for_enough_files(tiny_checkpoint, tmp_path, folder, monkeypatch):
    """Starting nvJPEG takes seconds: "auto" keeps a small run on the CPU."""
    from altsearch import ingest

    monkeypatch.setattr(gpudecode, "_nvjpeg", lambda: pillow_as_nvjpeg)
    monkeypatch.setattr(gpudecode, "gpu_decode_unavailable", lambda device, cfg, load=True: None)
    used = []
    for minimum in (len(folder) + 1, len(folder) - 1):
        monkeypatch.setattr(ingest, "GPU_DECODE_MIN", minimum)
        with Engine.open(tmp_path / f"idx-{minimum}", model=str(tiny_checkpoint), device="cpu") as engine:
            used.append(engine.index(folder["plain"].parent).decoder)
    assert used == ["cpu", "gpu"]


def test_auto_looks_for_torchvision_without_importing_it(monkeypatch):
    """Importing torchvision takes seconds: "auto" only looks for it; "gpu" imports it at once."""
    imported = []
    monkeypatch.setattr(gpudecode.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(gpudecode, "_nvjpeg", lambda: imported.append(1) or pillow_as_nvjpeg)
    cuda = torch.device("cuda")
    assert choose_decoder("auto", cuda, CFG) == "gpu" and imported == []
    assert choose_decoder("gpu", cuda, CFG) == "gpu" and imported == [1]
    monkeypatch.setattr(gpudecode.importlib.util, "find_spec", lambda name: None)
    assert choose_decoder("auto", cuda, CFG) == "cpu"


def test_auto_falls_back_to_the_cpu_when_torchvision_does_not_load(tiny_checkpoint, tmp_path, folder,
                                                                   monkeypatch, caplog):
    from altsearch import ingest

    monkeypatch.setattr(gpudecode, "gpu_decode_unavailable", lambda device, cfg, load=True: None)
    monkeypatch.setattr(gpudecode, "_nvjpeg", lambda: None)  # found, but its import fails
    monkeypatch.setattr(ingest, "GPU_DECODE_MIN", 1)
    with Engine.open(tmp_path / "idx", model=str(tiny_checkpoint), device="cpu") as engine:
        report = engine.index(folder["plain"].parent)
    existing = [p for p in folder.values() if p.exists()]
    assert report.decoder == "cpu" and "decoding JPEGs on the CPU" in caplog.text
    assert (report.added, report.failed) == (len(existing) - 2, 2)  # the truncated and the garbage file


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), RuntimeError("simulated crash")], ids=["ctrl-c", "crash"])
def test_a_run_stopped_mid_way_resumes_without_duplicates(tiny_checkpoint, tmp_path, monkeypatch, stop):
    """The GPU decoder's reader threads and groups in flight change nothing of what a stopped run keeps."""
    from tests.photos import make_folder

    monkeypatch.setattr(gpudecode, "_nvjpeg", lambda: pillow_as_nvjpeg)
    monkeypatch.setattr(gpudecode, "gpu_decode_unavailable", lambda device, cfg, load=True: None)
    photos = tmp_path / "photos"
    make_folder(photos, 12)
    with Engine.open(tmp_path / "idx", model=str(tiny_checkpoint), device="cpu") as engine:
        real, calls = engine.model.encode_pixels, []

        def failing(pixels):
            calls.append(len(pixels))
            if len(calls) == 3:
                raise stop
            return real(pixels)

        monkeypatch.setattr(engine.model, "encode_pixels", failing)
        if isinstance(stop, KeyboardInterrupt):
            first = engine.index(photos, decode="gpu", batch_size=2)
            assert first.interrupted and first.added == 4
        else:
            with pytest.raises(RuntimeError, match="simulated crash"):
                engine.index(photos, decode="gpu", batch_size=2)
        assert engine.stats()["images"] == 4  # the two batches embedded before the stop
        monkeypatch.setattr(engine.model, "encode_pixels", real)
        second = engine.index(photos, decode="gpu", batch_size=2)
        assert (second.added, second.unchanged, second.decoder) == (8, 4, "gpu")
        assert engine.stats()["images"] == engine.stats()["vectors"] == 12
        assert engine.check() == []
