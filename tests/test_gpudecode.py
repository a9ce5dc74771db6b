"""GPU JPEG decoding (altsearch.gpudecode) without a GPU.

The JPEG libraries (nvImageCodec, torchvision's nvJPEG) need CUDA; these tests stand in for them with
a Pillow decode to tensors on the CPU that, like them, ignores EXIF orientation and gives None for a
file it cannot decode (torchvision's whole-group refusal is tested on its adapter). Everything around
it is the real code: reading and hashing, the header probe that routes files to the GPU or the CPU,
the decoding thread and the order of the results, EXIF orientation, the reduction, resize and crop on
tensors, the per-file fallback, the choice of library, and ingestion with tensor crops.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps

from altsearch import Engine, gpudecode
from altsearch.decode import HASH_KINDS, DecodePool, decode_one, hash_file
from altsearch.errors import AltsearchError
from altsearch.gpudecode import (
    GpuDecoder,
    JpegLibrary,
    as_tensors,
    choose_decoder,
    draft_step,
    one_by_one_on_failure,
    orient,
    resize_crop_tensor,
)
from altsearch.model.preprocess import PreprocessConfig, resize_crop
from tests.photos import photo

CFG = PreprocessConfig()


def pillow_as_nvjpeg(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """What a GPU JPEG library returns, made with Pillow: RGB (3, H, W) uint8, EXIF orientation not
    applied, None for a file that does not decode."""
    out: list[torch.Tensor | None] = []
    for data in datas:
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = np.asarray(im.convert("RGB"))
        except OSError:
            out.append(None)
            continue
        out.append(torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(device))
    return out


STAND_IN = JpegLibrary("stand-in", pillow_as_nvjpeg)


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
    with GpuDecoder(CFG, "cpu", library=STAND_IN, group=4, draft=448, **kw) as dec:
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


def test_the_library_is_handed_the_bytes_read_without_a_copy(folder, monkeypatch):
    """A copy of each 2.4 MB photo cost 1.4 ms in the thread that feeds the GPU."""
    read, handed = [], []
    real_read = gpudecode.read_file

    def read_file(path):
        data = real_read(path)
        read.append(data)
        return data

    def decode(datas, device):
        handed.extend(datas)
        return pillow_as_nvjpeg(datas, device)

    monkeypatch.setattr(gpudecode, "read_file", read_file)
    with GpuDecoder(CFG, "cpu", library=JpegLibrary("stand-in", decode), group=4, draft=448) as dec:
        assert all(d.ok for d in dec.imap([str(folder["plain"]), str(folder["rotated"])]))
    assert len(handed) == 2 and all(any(h is r for r in read) for h in handed)


def test_torchvision_gets_tensors_over_the_bytes_without_a_copy_or_a_warning(folder):
    """torch warns about a tensor over read-only memory; the decoder knows nothing writes to it."""
    code = ("import sys, warnings; warnings.simplefilter('error'); import numpy as np; "
            "from altsearch.gpudecode import as_tensors; "
            "datas = [open(p, 'rb').read() for p in sys.argv[1:]]; tensors = as_tensors(datas); "
            "assert [t.data_ptr() for t in tensors] == [np.frombuffer(d, np.uint8).ctypes.data for d in datas]; "
            "assert [t.numpy().tobytes() for t in tensors] == datas")
    done = subprocess.run([sys.executable, "-c", code, str(folder["plain"]), str(folder["rotated"])],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_group_refused_whole_is_retried_file_by_file():
    """torchvision refuses a whole group for one bad file: the others are decoded one by one."""
    calls = []

    def whole_group(datas, device):
        calls.append(len(datas))
        if b"bad" in datas:
            raise RuntimeError("nvjpeg: bad data")
        return [torch.full((3, 2, 2), len(d), dtype=torch.uint8) for d in datas]

    out = one_by_one_on_failure(whole_group)([b"a", b"bad", b"ccc", b"dddd"], torch.device("cpu"))
    assert calls == [4, 1, 1, 1, 1]
    assert [None if t is None else int(t[0, 0, 0]) for t in out] == [1, None, 3, 4]
    assert one_by_one_on_failure(whole_group)([b"a", b"bb"], torch.device("cpu"))[1][0, 0, 0] == 2
    assert calls[-1] == 2  # a good group is one call


def test_a_file_the_library_refuses_is_decoded_on_the_cpu(folder):
    """A JPEG whose header reads well but whose data the library rejects gets the CPU's verdict; the
    rest of its group stays on the GPU."""
    bad = folder["plain"].with_name("bad-data.jpg")
    data = bytearray(folder["plain"].read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\x00" * 64
    bad.write_bytes(bytes(data))

    def refuse_bad(datas, device):
        out = pillow_as_nvjpeg(datas, device)
        return [None if d == bytes(data) else t for d, t in zip(datas, out)]

    paths = [folder["plain"], bad, folder["grey"], folder["rotated"]]
    with GpuDecoder(CFG, "cpu", library=JpegLibrary("stand-in", refuse_bad), group=4, draft=448) as dec:
        got = {Path(d.path).name: d for d in dec.imap(map(str, paths))}
        stats = dict(dec.stats)
    assert all(isinstance(got[n].pixels, torch.Tensor) for n in ("plain.jpg", "grey.jpg", "rotated.jpg"))
    expected = decode_one(bad, CFG)
    assert (got["bad-data.jpg"].error, got["bad-data.jpg"].content_hash) == (expected.error, expected.content_hash)
    assert not isinstance(got["bad-data.jpg"].pixels, torch.Tensor)
    assert stats == {"gpu": 3, "cpu": 1}


def _expected_order(names: list[str], group: int, on_gpu) -> list[str]:
    """The order imap promises: a file for the CPU where it is read, a group where its last file is."""
    order, pending = [], []
    for name in names:
        if on_gpu(name):
            pending.append(name)
            if len(pending) == group:
                order += pending
                pending = []
        else:
            order.append(name)
    return order + pending


def test_results_come_in_a_fixed_order_however_long_groups_take(folder, tmp_path):
    """Groups decode in a thread of their own, ahead of the caller; the order of the results depends on
    the paths alone, never on timing (a model batch is made of them, and its vectors depend on it)."""
    d = tmp_path / "mixed"
    d.mkdir()
    names = []
    for i in range(11):
        if i % 4 == 3:
            photo(i, (96, 64)).save(d / f"{i:02}.png", "PNG")
            names.append(f"{i:02}.png")
        else:
            jpeg(d / f"{i:02}.jpg", (96, 64), seed=i)
            names.append(f"{i:02}.jpg")
    rng = np.random.default_rng(0)

    def slow(datas, device):
        time.sleep(float(rng.uniform(0, 0.05)))
        return pillow_as_nvjpeg(datas, device)

    runs = []
    for readers in (1, 3, 3):
        with GpuDecoder(CFG, "cpu", library=JpegLibrary("stand-in", slow), group=3, readers=readers, draft=448) as dec:
            runs.append([Path(x.path).name for x in dec.imap(str(d / n) for n in names)])
    assert runs[0] == runs[1] == runs[2] == _expected_order(names, 3, lambda n: n.endswith(".jpg"))


def test_groups_are_decoded_while_the_caller_works_on_earlier_ones(tmp_path):
    d = tmp_path / "jpegs"
    d.mkdir()
    paths = [str(jpeg(d / f"{i}.jpg", (96, 64), seed=i)) for i in range(8)]
    calls = []

    def counting(datas, device):
        calls.append(len(datas))
        if len(calls) == 1:
            time.sleep(1.0)  # meanwhile the reads come in, and the next groups are handed over
        return pillow_as_nvjpeg(datas, device)

    library = JpegLibrary("stand-in", counting)
    with GpuDecoder(CFG, "cpu", library=library, group=2, readers=2, draft=448, groups_ahead=2) as dec:
        results = dec.imap(paths)
        first = next(results)  # the caller holds the first group's results ...
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == 3  # ... while the next groups decode, no more than groups_ahead beyond it
        time.sleep(0.1)
        assert len(calls) == 3
        rest = list(results)
    assert [Path(p).name for p in [first.path] + [r.path for r in rest]] == [Path(p).name for p in paths]
    assert calls == [2, 2, 2, 2]


def test_two_lanes_share_the_groups_each_thread_with_its_own_decoder(tmp_path):
    """A library's second lane decodes beside the first: each decoding thread keeps one lane's decoder,
    a slow lane takes fewer groups than a fast one, and the results keep the order of the paths."""
    d = tmp_path / "jpegs"
    d.mkdir()
    paths = [str(jpeg(d / f"{i:02}.jpg", (96, 64), seed=i)) for i in range(24)]
    seen = {"slow": [], "fast": []}

    def lane(name, pause):
        def decode(datas, device):
            seen[name].append((threading.get_ident(), len(datas)))
            time.sleep(pause)
            return pillow_as_nvjpeg(datas, device)
        return decode

    library = JpegLibrary("two lanes", lane("slow", 0.3), (lane("fast", 0.02),))
    with GpuDecoder(CFG, "cpu", library=library, group=2, readers=2, draft=448, decoding_threads=2) as dec:
        out = list(dec.imap(paths))
    assert [x.path for x in out] == paths and all(x.ok for x in out)
    assert sum(n for _, n in seen["slow"] + seen["fast"]) == 24
    assert 1 <= len(seen["slow"]) < len(seen["fast"])
    threads = {name: {t for t, _ in calls} for name, calls in seen.items()}
    assert len(threads["slow"]) == len(threads["fast"]) == 1 and threads["slow"] != threads["fast"]


def test_one_decoding_thread_unless_more_are_asked_for(monkeypatch):
    monkeypatch.delenv(gpudecode.THREADS_ENV, raising=False)
    library = JpegLibrary("two lanes", pillow_as_nvjpeg, (pillow_as_nvjpeg,))
    with GpuDecoder(CFG, "cpu", library=library) as dec:
        assert (dec.decoding_threads, dec.group, dec.groups_ahead) == (1, gpudecode.GROUP, 2)
    with GpuDecoder(CFG, "cpu", library=library, decoding_threads=2) as dec:
        assert (dec.decoding_threads, dec.group, dec.groups_ahead) == (2, gpudecode.GROUP_SHARED, 4)
    with pytest.raises(ValueError, match="at least 1"):
        GpuDecoder(CFG, "cpu", library=library, decoding_threads=0)
    monkeypatch.setenv(gpudecode.THREADS_ENV, " 2 ")  # the setting a user can reach from the CLI
    with GpuDecoder(CFG, "cpu", library=library) as dec:
        assert (dec.decoding_threads, dec.group) == (2, gpudecode.GROUP_SHARED)
    for bad in ("0", "two", "9", "-1"):
        monkeypatch.setenv(gpudecode.THREADS_ENV, bad)
        with pytest.raises(ValueError, match="ALTSEARCH_GPU_DECODING_THREADS must be a whole number from 1 to 8"):
            GpuDecoder(CFG, "cpu", library=library)
        # an index run refuses it before its scan, where the model is on CUDA
        with pytest.raises(ValueError, match="from 1 to 8"):
            gpudecode.gpu_decode_unavailable(torch.device("cuda"), CFG, load=False)
    assert gpudecode.gpu_decode_unavailable(torch.device("cpu"), CFG) == "the model runs on cpu, not CUDA"


def test_a_library_that_loses_files_is_an_error_not_a_silent_loss(folder):
    loses_one = JpegLibrary("stand-in", lambda datas, device: pillow_as_nvjpeg(datas, device)[1:])
    with GpuDecoder(CFG, "cpu", library=loses_one, group=2, draft=448) as dec:
        with pytest.raises(RuntimeError, match="gave 1 images for 2 files"):
            list(dec.imap([str(folder["plain"]), str(folder["rotated"])]))


def test_the_library_is_chosen_by_the_environment_variable(monkeypatch):
    loaded = {"nvimgcodec": None, "torchvision": JpegLibrary("torchvision", pillow_as_nvjpeg)}
    monkeypatch.setattr(gpudecode, "jpeg_library", lambda name: loaded[name])
    monkeypatch.delenv(gpudecode.LIBRARY_ENV, raising=False)
    assert gpudecode._libraries() == ("nvimgcodec", "torchvision")
    assert gpudecode._gpu_jpeg().name == "torchvision"  # nvImageCodec first, when it loads
    loaded["nvimgcodec"] = JpegLibrary("nvimgcodec", pillow_as_nvjpeg)
    assert gpudecode._gpu_jpeg().name == "nvimgcodec"
    monkeypatch.setenv(gpudecode.LIBRARY_ENV, "TorchVision")
    assert gpudecode._gpu_jpeg().name == "torchvision"
    monkeypatch.setenv(gpudecode.LIBRARY_ENV, "nvimgcodec")
    loaded["nvimgcodec"] = None
    assert gpudecode._gpu_jpeg() is None  # the one named, or none
    with pytest.raises(RuntimeError, match="needs nvImageCodec or torchvision"):
        GpuDecoder(CFG, "cpu")
    monkeypatch.setenv(gpudecode.LIBRARY_ENV, "pillow")
    with pytest.raises(ValueError, match="ALTSEARCH_GPU_JPEG must be one of nvimgcodec, torchvision"):
        gpudecode._gpu_jpeg()


FAKE_NVIMGCODEC = """
import os, torch

os.write(2, {said!r})


class DecodeParams:
    def __init__(self, **kw):
        self.kw = kw


class ColorSpec:
    SRGB = "srgb"


class SampleFormat:
    P_RGB = "planar rgb"


HW_GPU_ONLY, HYBRID_CPU_GPU = "hardware", "hybrid"


class Backend:
    def __init__(self, kind):
        self.kind = kind


class CodeStream:
    def __init__(self, data):
        self.data = data


class Decoder:
    made = []

    def __init__(self, device_id, backends):
        Decoder.made.append((device_id, [b.kind for b in backends]))
        self.device_id = device_id

    def decode(self, streams, params, cuda_stream):
        assert params.kw == dict(apply_exif_orientation=False, color_spec="srgb", sample_format="planar rgb")
        return [None if s.data == b"bad" else torch.full((3, 2, 2), len(s.data), dtype=torch.uint8)
                for s in streams]
"""


def _fake_nvimgcodec(tmp_path, monkeypatch, said: bytes) -> None:
    package = tmp_path / "fake" / "nvidia" / "nvimgcodec"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_NVIMGCODEC.format(said=said))
    nvidia = types.ModuleType("nvidia")  # another package may already own the name nvidia
    nvidia.__path__ = [str(package.parent)]
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    monkeypatch.delitem(sys.modules, "nvidia.nvimgcodec", raising=False)


def test_nvimgcodec_adapter_decodes_a_group_and_keeps_its_chatter_off_the_terminal(tmp_path, monkeypatch,
                                                                                  capfd, caplog):
    """nvImageCodec prints a paragraph per optional codec library it lacks; that goes to the debug log."""
    caplog.set_level("DEBUG", logger="altsearch.gpudecode")
    _fake_nvimgcodec(tmp_path, monkeypatch, b"Failed to load nvjpeg2k library! Please install nvJPEG2000\n")
    lanes = gpudecode._load_nvimgcodec()
    assert len(lanes) == 2
    decode, beside = lanes
    out = decode([b"a", b"bad", b"ccc"], torch.device("cpu"))
    assert [None if t is None else int(t[0, 0, 0]) for t in out] == [1, None, 3]
    decode([b"dd"], torch.device("cpu"))
    # one decoder per device, kept; the hardware decoders first, then CUDA with the CPU's Huffman decoding
    made = sys.modules["nvidia.nvimgcodec"].Decoder.made
    assert made == [(0, ["hardware", "hybrid"])]
    # the second lane decodes on CUDA and the CPU alone, with a decoder of its own
    assert [None if t is None else int(t[0, 0, 0]) for t in beside([b"ee", b"bad"], torch.device("cpu"))] == [2, None]
    assert made == [(0, ["hardware", "hybrid"]), (0, ["hybrid"])]
    assert "nvjpeg2k" not in capfd.readouterr().err
    assert "nvImageCodec: Failed to load nvjpeg2k library" in caplog.text


def test_nvimgcodec_without_nvjpeg_is_passed_over_with_a_warning(tmp_path, monkeypatch, caplog):
    _fake_nvimgcodec(tmp_path, monkeypatch, b"Failed to load nvjpeg library! Please install CUDA toolkit\n")
    assert gpudecode._load_nvimgcodec() == []
    assert "finds no nvJPEG" in caplog.text


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
    monkeypatch.setattr(gpudecode, "_gpu_jpeg", lambda: STAND_IN)
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

    monkeypatch.setattr(gpudecode, "_gpu_jpeg", lambda: STAND_IN)
    monkeypatch.setattr(gpudecode, "gpu_decode_unavailable", lambda device, cfg, load=True: None)
    used = []
    for minimum in (len(folder) + 1, len(folder) - 1):
        monkeypatch.setattr(ingest, "GPU_DECODE_MIN", minimum)
        with Engine.open(tmp_path / f"idx-{minimum}", model=str(tiny_checkpoint), device="cpu") as engine:
            report = engine.index(folder["plain"].parent)
            used.append((report.decoder, report.jpeg_library))
    assert used == [("cpu", None), ("gpu", STAND_IN.name)]  # which library did it, for reports and benchmarks


def test_auto_looks_for_torchvision_without_importing_it(monkeypatch):
    """Importing torchvision takes seconds: "auto" only looks for it; "gpu" imports it at once."""
    imported = []
    monkeypatch.setattr(gpudecode.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(gpudecode, "_gpu_jpeg", lambda: imported.append(1) or STAND_IN)
    cuda = torch.device("cuda")
    assert choose_decoder("auto", cuda, CFG) == "gpu" and imported == []
    assert choose_decoder("gpu", cuda, CFG) == "gpu" and imported == [1]
    monkeypatch.setattr(gpudecode.importlib.util, "find_spec", lambda name: None)
    assert choose_decoder("auto", cuda, CFG) == "cpu"


def test_auto_falls_back_to_the_cpu_when_torchvision_does_not_load(tiny_checkpoint, tmp_path, folder,
                                                                   monkeypatch, caplog):
    from altsearch import ingest

    monkeypatch.setattr(gpudecode, "gpu_decode_unavailable", lambda device, cfg, load=True: None)
    monkeypatch.setattr(gpudecode, "_gpu_jpeg", lambda: None)  # found, but its import fails
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

    monkeypatch.setattr(gpudecode, "_gpu_jpeg", lambda: STAND_IN)
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


def test_the_decoder_says_whether_its_caller_waited_for_readers_or_groups(tmp_path, monkeypatch):
    d = tmp_path / "jpegs"
    d.mkdir()
    paths = [str(jpeg(d / f"{i}.jpg", (96, 64), seed=i)) for i in range(6)]

    def slow_groups(datas, device):
        time.sleep(0.2)
        return pillow_as_nvjpeg(datas, device)

    with GpuDecoder(CFG, "cpu", library=JpegLibrary("stand-in", slow_groups), group=2, readers=2, draft=448) as dec:
        assert len(list(dec.imap(paths))) == 6
    assert dec.waited["gpu"] >= 0.45 > dec.waited["read"]
    real_read = gpudecode.read_file

    def slow_read(path):
        time.sleep(0.1)
        return real_read(path)

    monkeypatch.setattr(gpudecode, "read_file", slow_read)
    with GpuDecoder(CFG, "cpu", library=STAND_IN, group=2, readers=1, draft=448) as dec:
        assert len(list(dec.imap(paths))) == 6
    assert dec.waited["read"] >= 0.45 > dec.waited["gpu"]


def test_the_caller_s_stream_waits_for_each_group_and_keeps_its_crops(monkeypatch):
    """The hand-over of a group decoded on a decoding thread's CUDA stream (the rest of this file runs
    with no stream: device "cpu"). Before the first of a group's results reaches the caller, the
    caller's stream waits on the event recorded after the group's crops were made; and every crop
    on the GPU is recorded as used on the caller's stream, so that the decoding stream's allocator
    does not hand its memory to the next group while the caller's work on it is still queued."""
    from collections import deque
    from concurrent.futures import Future

    said = []

    class CallerStream:
        def wait_event(self, event):
            said.append(("wait", event))

    caller = CallerStream()

    class OnTheGpu(torch.Tensor):
        @property
        def is_cuda(self):
            return True

        def record_stream(self, stream):
            said.append(("keep", stream))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    crop = torch.zeros(3).as_subclass(OnTheGpu)
    from altsearch.decode import Decoded

    group = [Decoded("a.jpg", "h", crop, None, None), Decoded("b.jpg", None, None, None, "unreadable"),
             Decoded("c.jpg", "h", np.zeros((2, 2, 3), np.uint8), None, None)]
    done, on_cpu = Future(), Future()
    done.set_result((group, "group's event"))
    on_cpu.set_result(([group[2]], None))  # decoded off CUDA: nothing to hand over
    with GpuDecoder(CFG, "cpu", library=STAND_IN) as dec:
        out = deque([done, on_cpu])
        results = dec._take_ready(out, keep=0)
        assert next(results).path == "a.jpg"
        assert said == [("wait", "group's event"), ("keep", caller)]  # before the caller saw a result
        assert [d.path for d in results] == ["b.jpg", "c.jpg", "c.jpg"] and not out
    assert said == [("wait", "group's event"), ("keep", caller)]  # one wait per group, one keep per crop on the GPU
