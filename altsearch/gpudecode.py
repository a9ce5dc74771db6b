"""JPEG decoding on the GPU (nvImageCodec, or torchvision's nvJPEG) for ingestion beside a model on CUDA.

On a GPU the model embeds ViT-L/14 crops faster than a whole server's CPU cores can decode
camera JPEGs (an H100 in bf16: ~2,300 images/s; a 16-core host with reduced-size decoding: ~140
12 Mpx JPEGs/s). :class:`GpuDecoder` moves the decoding itself to the GPU:

- reader threads read each file once, hash it (:func:`altsearch.decode.hash_bytes`) and parse its
  header and EXIF with Pillow (no pixels): the same metadata and the same size limit as on the CPU;
- baseline and progressive JPEGs in RGB or greyscale, ending with their end-of-image marker, are
  decoded in groups by a JPEG library (:func:`jpeg_library`: nvImageCodec, which uses the GPU's
  hardware JPEG decoders, when it is installed, else torchvision's ``decode_jpeg``), turned as their
  EXIF orientation says, reduced by whole-pixel averaging to the scale a CPU draft decode would use,
  then resized (bicubic, antialiased) and centre-cropped on the GPU (:func:`resize_crop_tensor`),
  in a decoding thread with a CUDA stream of its own while the caller takes earlier results;
- everything else (PNG, HEIC, CMYK JPEGs, JPEGs with data after their end marker, and any JPEG the
  library refuses) is decoded on the CPU by the same code as :mod:`altsearch.decode`, so a corrupt
  file gets the same one-line reason either way.

The crops come back as uint8 CUDA tensors ``(H, W, 3)`` in :class:`~altsearch.decode.Decoded`, ready
for :meth:`altsearch.Model.encode_pixels`. The libraries are optional (``pip install
"altsearch[gpu]"`` for torchvision, ``"altsearch[nvimgcodec-cu13]"`` or ``-cu12`` for nvImageCodec):
without either, or without CUDA, ingestion decodes on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from altsearch.decode import (
    DECODE_CHOICES,
    DEFAULT_HASH,
    DRAFT_SCALE,
    Decoded,
    ImageMeta,
    available_cores,
    check_hash_kind,
    decode_data,
    hash_bytes,
    image_meta,
    orientation_code,
    read_file,
)
from altsearch.errors import ImageError
from altsearch.model.preprocess import (
    DEFAULT_MAX_PIXELS,
    MAX_RESIZE_AREA,
    DecodedImage,
    PreprocessConfig,
    open_header,
    read_exif,
    resized_size,
)

log = logging.getLogger(__name__)

GROUP = 32
"""JPEGs per decoding call with one decoding thread. On an H100 the whole GPU decoder (readers, decoding,
resizing) went through 950 12 Mpx JPEGs/s in groups of 32 with nvImageCodec's hardware decoding, and
790/s in groups of 64, where the hardware decoder took fewer of them; with torchvision about 700/s
either way."""
GROUP_SHARED = 16
"""JPEGs per decoding call with several decoding threads: smaller groups share the photos out more evenly
between the hardware decoders' thread and the slower CUDA-and-CPU one, each taking the next group
when it is free."""
_GPU_MODES = frozenset({"RGB", "L"})  # what nvJPEG decodes to RGB; CMYK and YCCK JPEGs go to the CPU
_EOI = b"\xff\xd9"  # JPEG end-of-image marker
_DRAFT_STEPS = (8, 4, 2)  # libjpeg's reduced DCT scales
_MAX_READERS = 8
_RESIZE_CHUNK = 16  # images resized at once: 16 12-Mpx images as float32 take 2.3 GB of device memory

LIBRARY_ENV = "ALTSEARCH_GPU_JPEG"
"""Environment variable naming the library that decodes JPEGs on the GPU: "nvimgcodec" or "torchvision".
Unset: nvImageCodec when it is installed, else torchvision."""
THREADS_ENV = "ALTSEARCH_GPU_DECODING_THREADS"
"""Environment variable giving the GPU decoder's decoding threads (1 to 8; unset: 1). With nvImageCodec a
second thread decodes on CUDA and CPU threads beside the hardware decoders' (:class:`GpuDecoder`)."""
LIBRARIES = ("nvimgcodec", "torchvision")
_MODULES = {"nvimgcodec": "nvidia.nvimgcodec", "torchvision": "torchvision"}
INSTALL_HINT = 'pip install "altsearch[gpu]" (torchvision) or "altsearch[nvimgcodec-cu13]" (nvImageCodec; -cu12 for CUDA 12)'


JpegDecoder = Callable[[list[bytes], torch.device], list["torch.Tensor | None"]]
"""Encoded JPEGs -> RGB uint8 (3, H, W) images (or greyscale (1, H, W)) on the device, None for each
file that could not be decoded."""


@dataclass(frozen=True)
class JpegLibrary:
    """A library that decodes JPEGs on the GPU: its name, its :data:`JpegDecoder`, and decoders for more
    decoding threads, which work beside the first on other parts of the machine."""

    name: str
    decode: JpegDecoder
    beside: tuple[JpegDecoder, ...] = ()
    """nvImageCodec: nvJPEG's CUDA decoding with Huffman decoding on CPU threads, beside the hardware
    JPEG decoders (which bound an H100 host at ~950 12 Mpx photos/s); asked for with :data:`THREADS_ENV`."""

    @property
    def lanes(self) -> tuple[JpegDecoder, ...]:
        """One decoder per decoding thread, the first thread's first."""
        return (self.decode, *self.beside)


def _libraries() -> tuple[str, ...]:
    """The libraries to try, in order: the one :data:`LIBRARY_ENV` names, or all of them."""
    chosen = os.environ.get(LIBRARY_ENV, "").strip().lower()
    if not chosen:
        return LIBRARIES
    if chosen not in LIBRARIES:
        raise ValueError(f"{LIBRARY_ENV} must be one of {', '.join(LIBRARIES)}, got {chosen!r}")
    return (chosen,)


def _decoding_threads() -> int:
    """The decoding threads :data:`THREADS_ENV` asks for (1 when it is unset)."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return 1
    if not text.isdigit() or not 1 <= int(text) <= 8:
        raise ValueError(f"{THREADS_ENV} must be a whole number from 1 to 8, got {text!r}")
    return int(text)


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(_MODULES[name]) is not None
    except (ImportError, ValueError):  # the parent package of a dotted name is absent
        return False


@functools.cache
def jpeg_library(name: str) -> JpegLibrary | None:
    """The library ``name`` (one of :data:`LIBRARIES`), imported once per process; None when it does not
    load."""
    lanes = _load_nvimgcodec() if name == "nvimgcodec" else _load_torchvision()
    return None if not lanes else JpegLibrary(name, lanes[0], tuple(lanes[1:]))


def _gpu_jpeg() -> JpegLibrary | None:
    """The first library of :func:`_libraries` that loads, else None."""
    return next((lib for name in _libraries() if (lib := jpeg_library(name)) is not None), None)


def one_by_one_on_failure(decode_group: Callable[[list[bytes], torch.device], list[torch.Tensor]]) -> JpegDecoder:
    """A :data:`JpegDecoder` from a call that decodes a whole group or raises RuntimeError when any file
    in it fails (torchvision's): after a failure, each file of the group is tried alone."""

    def decode(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
        try:
            return list(decode_group(datas, device))
        except RuntimeError as exc:
            log.debug("a group of %d JPEGs was refused (%s); decoding them one by one", len(datas), exc)
        out: list[torch.Tensor | None] = []
        for data in datas:
            try:
                out.append(decode_group([data], device)[0])
            except RuntimeError:
                out.append(None)
        return out

    return decode


def as_tensors(datas: list[bytes]) -> list[torch.Tensor]:
    """1-D uint8 tensors over the files' bytes, without a copy: a copy of each 2.4 MB photo cost 1.4 ms
    in the thread that feeds the GPU (45 ms per group of 32 on a 2-core machine, mostly page faults).
    Nothing writes to these bytes, so torch's warning that it cannot protect them is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return [torch.frombuffer(d, dtype=torch.uint8) for d in datas]


def _load_torchvision() -> list[JpegDecoder]:
    """torchvision's nvJPEG decoding (one decoder), or none when torchvision does not import."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, RuntimeError, OSError) as exc:  # absent, or built for another torch
        log.debug("torchvision unavailable: %s", exc)
        return []

    def decode_group(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
        return decode_jpeg(as_tensors(datas), mode=ImageReadMode.RGB, device=device)

    return [one_by_one_on_failure(decode_group)]


@contextlib.contextmanager
def _stderr_to_log(what: str) -> Iterator[list[str]]:
    """Send what native code writes to file descriptor 2 meanwhile to the debug log; the lines come
    back in the yielded list. nvImageCodec prints a paragraph for every optional codec library it does
    not find (JPEG 2000, TIFF), which says nothing about JPEGs."""
    lines: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (an embedded interpreter): leave it be
        yield lines
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())
            for line in lines:
                log.debug("%s: %s", what, line)


def _load_nvimgcodec() -> list[JpegDecoder]:
    """nvImageCodec's decoders, or none when it does not import or finds no nvJPEG: the first sends
    a group to the GPU's hardware JPEG decoders (A100, H100 and others have them), then what they cannot
    take (progressive JPEGs; everything on GPUs without them) to nvJPEG's CUDA decoding with Huffman
    decoding on the CPU; the second decodes on CUDA and CPU threads alone, for a thread beside the first."""
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")  # errors go to the log below, not the terminal
    try:
        with _stderr_to_log("nvImageCodec") as said:
            from nvidia import nvimgcodec
    except (ImportError, OSError, RuntimeError) as exc:
        log.debug("nvImageCodec unavailable: %s", exc)
        return []
    if any("Failed to load nvjpeg library" in line for line in said):
        log.warning("nvImageCodec is installed but finds no nvJPEG: install nvidia-nvjpeg (CUDA 13) or "
                    "nvidia-nvjpeg-cu12 (CUDA 12), or the CUDA toolkit")
        return []
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                     sample_format=nvimgcodec.SampleFormat.P_RGB)
    hardware, hybrid = nvimgcodec.Backend(nvimgcodec.HW_GPU_ONLY), nvimgcodec.Backend(nvimgcodec.HYBRID_CPU_GPU)
    lock = threading.Lock()  # also keeps two threads from swapping file descriptor 2 at once

    def decoder_of(backends: list) -> JpegDecoder:
        idle: dict[int, list] = {}  # device index -> decoders no thread is using (kept for the next run)

        def decode(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
            on_cuda = device.type == "cuda"
            index = device.index if device.index is not None else torch.cuda.current_device() if on_cuda else 0
            with lock:  # a decoder serves one thread at a time
                free = idle.setdefault(index, [])
                if free:
                    decoder = free.pop()
                else:
                    with _stderr_to_log("nvImageCodec"):
                        decoder = nvimgcodec.Decoder(device_id=index, backends=backends)
            try:
                streams = [nvimgcodec.CodeStream(d) for d in datas]  # no copy: the streams read the bytes
                stream = torch.cuda.current_stream(device).cuda_stream if on_cuda else 0  # results ready on it
                images = decoder.decode(streams, params=params, cuda_stream=stream)
                return [None if im is None else torch.from_dlpack(im) for im in images]
            finally:
                with lock:
                    idle[index].append(decoder)

        return decode

    return [decoder_of([hardware, hybrid]), decoder_of([hybrid])]


def gpu_decode_unavailable(device: torch.device, cfg: PreprocessConfig, *, load: bool = True) -> str | None:
    """Why JPEGs cannot be decoded on ``device`` for ``cfg`` (None: they can). With ``load=False``
    the libraries are only looked for, not imported (importing one takes seconds)."""
    if device.type != "cuda":
        return f"the model runs on {device.type}, not CUDA"
    _decoding_threads()  # a bad setting fails before the scan, not when the decoder starts
    if not any(_installed(name) for name in _libraries()) or (load and _gpu_jpeg() is None):
        return f"no library for it is installed ({INSTALL_HINT})"
    if cfg.resample != Image.Resampling.BICUBIC or not (cfg.do_resize and cfg.do_center_crop):
        return "the preprocessing is not a bicubic resize and centre crop"
    return None


def choose_decoder(choice: str, device: torch.device, cfg: PreprocessConfig) -> str:
    """ "cpu" or "gpu" for an ``--decode`` choice; "gpu" that cannot be honoured raises ValueError.
    "auto" does not import torchvision yet: a run that decodes few files never needs it."""
    if choice not in DECODE_CHOICES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {choice!r}")
    reason = gpu_decode_unavailable(device, cfg, load=choice == "gpu") if choice != "cpu" else "cpu asked for"
    if choice == "gpu" and reason is not None:
        raise ValueError(f"cannot decode on the GPU: {reason}")
    return "cpu" if reason is not None else "gpu"


# --- geometry on tensors ---------------------------------------------------------------------


def orient(image: torch.Tensor, code: int | None) -> torch.Tensor:
    """``image`` (C, H, W) turned as EXIF orientation ``code`` says, as ``PIL.ImageOps.exif_transpose``."""
    if code == 2:
        return image.flip(-1)
    if code == 3:
        return image.flip(-2, -1)
    if code == 4:
        return image.flip(-2)
    if code == 5:
        return image.transpose(-2, -1)
    if code == 6:
        return image.rot90(-1, (-2, -1))
    if code == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if code == 8:
        return image.rot90(1, (-2, -1))
    return image


def draft_step(width: int, height: int, shortest_edge: int) -> int:
    """The reduction a CPU draft decode makes (1, 2, 4 or 8): the largest whose shortest edge stays >=
    ``DRAFT_SCALE x shortest_edge``."""
    target = DRAFT_SCALE * shortest_edge
    return next((s for s in _DRAFT_STEPS if min(width, height) // s >= target), 1)


def resize_crop_tensor(images: torch.Tensor, cfg: PreprocessConfig, *, reduce: bool = True) -> torch.Tensor | None:
    """uint8 ``(N, crop_h, crop_w, 3)`` from uint8 images (N, 3, H, W), as :func:`resize_crop` does each on
    the CPU: averaged down by :func:`draft_step` (with ``reduce``: a CPU draft decode's scale), shortest
    edge resized (bicubic, antialiased), centre crop, zero padding where an image is smaller than the
    crop. None for shapes :func:`resize_crop` handles by windowing (extreme aspect ratios).

    A whole batch is a handful of GPU operations: one call per image costs far more in launches and in
    waits for Python's GIL (which reader threads hold) than in arithmetic.
    """
    height, width = images.shape[-2:]
    x = images.float()
    step = draft_step(width, height, cfg.shortest_edge) if reduce else 1
    if step > 1:
        x = F.avg_pool2d(x, step, step, ceil_mode=True)
        height, width = x.shape[-2:]
    new_w, new_h = resized_size(width, height, cfg.shortest_edge)
    if new_w * new_h > MAX_RESIZE_AREA * cfg.crop_width * cfg.crop_height:
        return None
    left, top = (new_w - cfg.crop_width) // 2, (new_h - cfg.crop_height) // 2
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + cfg.crop_width, new_w), min(top + cfg.crop_height, new_h)
    if (new_w, new_h) != (width, height):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    x = x[:, :, y0:y1, x0:x1].round_().clamp_(0, 255).to(torch.uint8)
    if (x1 - x0, y1 - y0) == (cfg.crop_width, cfg.crop_height):
        return x.permute(0, 2, 3, 1)
    out = x.new_zeros((x.shape[0], 3, cfg.crop_height, cfg.crop_width))
    out[:, :, y0 - top:y1 - top, x0 - left:x1 - left] = x
    return out.permute(0, 2, 3, 1)


# --- the decoder --------------------------------------------------------------------------------


@dataclass
class _Jpeg:
    """A file read and checked, waiting for nvJPEG."""

    path: str
    content_hash: str
    data: bytes
    meta: ImageMeta
    orientation: int | None


def _default_readers() -> int:
    return max(1, min(_MAX_READERS, available_cores() - 1))


class GpuDecoder:
    """Decode files for ingestion on the GPU ``device`` (see the module docstring). Use as a context
    manager; :meth:`imap` has :class:`altsearch.decode.DecodePool`'s contract: one
    :class:`~altsearch.decode.Decoded` per path, bad files with ``error`` set, never raising for one.

    ``library`` replaces :func:`_gpu_jpeg`'s choice; ``decoding_threads``: threads that decode groups
    at once, each on a CUDA stream of its own and with a decoder of the library's
    :attr:`JpegLibrary.lanes` (the last one for threads beyond them; default: :data:`THREADS_ENV`,
    else 1); ``group``: JPEGs per decoding call (default :data:`GROUP` with one decoding thread, else
    :data:`GROUP_SHARED`); ``groups_ahead``: groups decoded, or decoding, per decoding thread while
    the caller still works on earlier ones.

    Which thread decodes a group depends on timing, and the hardware decoders and nvJPEG's CUDA decoding
    round some pixels differently, so the vectors of two runs can differ in their last digits;
    ``decoding_threads=1`` makes every run decode alike."""

    def __init__(self, cfg: PreprocessConfig, device: torch.device | str, *, readers: int | None = None,
                 group: int | None = None, draft: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 hash_kind: str = DEFAULT_HASH, library: JpegLibrary | None = None,
                 decoding_threads: int | None = None, groups_ahead: int = 2):
        self.cfg = cfg
        self.device = torch.device(device)
        self.readers = readers or _default_readers()
        self.draft = draft  # for the files decoded on the CPU
        self.max_pixels = max_pixels
        self.hash_kind = check_hash_kind(hash_kind)  # an unknown kind fails here, not in every reader
        if library is None:
            library = _gpu_jpeg()
            if library is None:
                raise RuntimeError(f"decoding JPEGs on the GPU needs nvImageCodec or torchvision: {INSTALL_HINT}")
        self.library, self._lanes = library.name, library.lanes
        if decoding_threads is None:
            decoding_threads = _decoding_threads()
        if decoding_threads < 1:
            raise ValueError(f"decoding_threads must be at least 1, got {decoding_threads}")
        self.decoding_threads = decoding_threads
        self.group = group or (GROUP if decoding_threads == 1 else GROUP_SHARED)
        self.groups_ahead = groups_ahead * self.decoding_threads
        log.debug("decoding JPEGs on %s with %s, %d decoding threads", self.device, self.library,
                  self.decoding_threads)
        self.stats = {"gpu": 0, "cpu": 0}  # files decoded each way (for tests and diagnostics)
        self.waited = {"read": 0.0, "gpu": 0.0}  # seconds imap's caller waited for the readers, for groups
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # reader threads
        self._gpu: ThreadPoolExecutor | None = None  # the threads that decode groups and resize them
        self._local = threading.local()  # each decoding thread's decoder and CUDA stream
        self._lanes_taken = 0

    def __enter__(self) -> GpuDecoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for pool in (self._pool, self._gpu):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._gpu = None

    def imap(self, paths: Iterable[str | os.PathLike[str]]) -> Iterator[Decoded]:
        """Decoded files in a fixed order (for the same paths and files, always the same): a file the
        CPU decodes as soon as it is read, a JPEG with the rest of its group. Reader threads read,
        hash and probe ahead; the decoding threads (one by default) decode and resize groups while
        the caller takes the results of earlier ones."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.readers, thread_name_prefix="altsearch-read")
        if self._gpu is None:
            self._gpu = ThreadPoolExecutor(self.decoding_threads, thread_name_prefix="altsearch-gpu-decode")
        source = iter(paths)
        ahead = (1 + self.decoding_threads) * self.group + self.readers  # read and waiting: a group per
        # decoding thread and one more, and a file per reader
        pending: deque[Future] = deque()  # reads, in input order
        out: deque[Decoded | Future] = deque()  # what to yield next, in order: a file, or a group's future
        group: list[_Jpeg] = []
        try:
            while True:
                while len(pending) < ahead and (path := next(source, None)) is not None:
                    pending.append(self._pool.submit(self._read, os.fspath(path)))
                if not pending:
                    break
                t0 = time.perf_counter()
                item = pending.popleft().result()
                self.waited["read"] += time.perf_counter() - t0
                if isinstance(item, Decoded):
                    out.append(item)
                else:
                    group.append(item)
                    if len(group) >= self.group:
                        out.append(self._gpu.submit(self._decode_group, group))
                        group = []
                yield from self._take_ready(out, self.groups_ahead)
            if group:
                out.append(self._gpu.submit(self._decode_group, group))
            yield from self._take_ready(out, 0)
        finally:
            for future in [*pending, *out]:
                if isinstance(future, Future):
                    future.cancel()

    # -- in reader threads ---------------------------------------------------------------------

    def _read(self, path: str) -> Decoded | _Jpeg:
        data = read_file(path)
        if isinstance(data, Decoded):
            return data
        content_hash = hash_bytes(data, self.hash_kind)
        try:
            jpeg = self._probe(path, content_hash, data)
        except ImageError as exc:
            return Decoded(path, content_hash, None, None, str(exc))
        return jpeg if jpeg is not None else self._on_cpu(path, content_hash, data)

    def _probe(self, path: str, content_hash: str, data: bytes) -> _Jpeg | None:
        """The file as a JPEG for the GPU, from its header alone; None when the CPU should decode it."""
        if not data.startswith(b"\xff\xd8") or not data.endswith(_EOI):
            return None
        try:
            with open_header(io.BytesIO(data), self.max_pixels, formats=("JPEG",)) as im:  # size: as on the CPU
                if im.format != "JPEG" or im.mode not in _GPU_MODES:  # MPO, CMYK, YCCK
                    return None
                exif = read_exif(im)
                meta = image_meta(DecodedImage(None, im.size, im.format, exif))
        except ImageError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever Pillow makes of a bad header: the CPU path decides
            log.debug("%s: header not understood (%s); decoding on the CPU", path, exc)
            return None
        return _Jpeg(path, content_hash, data, meta, orientation_code(exif))

    def _on_cpu(self, path: str, content_hash: str, data: bytes) -> Decoded:
        """What :func:`altsearch.decode.decode_one` makes of these bytes."""
        with self._lock:
            self.stats["cpu"] += 1
        return decode_data(path, content_hash, data, self.cfg, self.draft, max_pixels=self.max_pixels)

    def _take_ready(self, out: deque, keep: int) -> Iterator[Decoded]:
        """Yield from the head of ``out`` what is ready: files, and groups whose decoding is done; wait for
        the head group while more than ``keep`` groups are in ``out`` (counted in ``waited["gpu"]``).

        A group's crops were made on its decoding thread's stream: the caller's stream waits for them
        there (an event, no stall of this thread), and they are recorded as used on it, so that their
        memory is not handed to the next group before the caller's work on them has run."""
        while out:
            head = out[0]
            if isinstance(head, Future):
                if not head.done() and sum(isinstance(e, Future) for e in out) <= keep:
                    return
                out.popleft()
                t0 = time.perf_counter()
                decoded, ready = head.result()
                self.waited["gpu"] += time.perf_counter() - t0
                if ready is not None:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(ready)
                    for d in decoded:
                        if isinstance(d.pixels, torch.Tensor) and d.pixels.is_cuda:
                            d.pixels.record_stream(stream)
                yield from decoded
            else:
                out.popleft()
                yield head

    # -- in decoding threads -------------------------------------------------------------------

    def _thread_setup(self) -> tuple[JpegDecoder, torch.cuda.Stream | None]:
        """This decoding thread's decoder (the next lane of the library) and CUDA stream (None off CUDA):
        its decoding and resizing do not queue behind the model's work on the default stream, nor the
        model's behind them."""
        setup = getattr(self._local, "setup", None)
        if setup is None:
            with self._lock:
                lane = self._lanes[min(self._lanes_taken, len(self._lanes) - 1)]
                self._lanes_taken += 1
            stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            setup = self._local.setup = (lane, stream)
        return setup

    def _decode_group(self, group: list[_Jpeg]) -> tuple[list[Decoded], torch.cuda.Event | None]:
        """The group decoded by this thread's decoder on its stream, and an event recorded there once
        its crops are made (None off CUDA)."""
        decode_jpeg, stream = self._thread_setup()
        with torch.cuda.stream(stream):  # a no-op for None
            decoded = self._decode_on_stream(group, decode_jpeg)
            if stream is None:
                return decoded, None
            ready = torch.cuda.Event()
            ready.record(stream)
        return decoded, ready

    def _decode_on_stream(self, group: list[_Jpeg], decode_jpeg: JpegDecoder) -> list[Decoded]:
        """The group's files decoded: on the GPU, and on the CPU those the library refused or whose shape
        the CPU path windows."""
        images = list(decode_jpeg([j.data for j in group], self.device))
        if len(images) != len(group):  # a file left out would be lost without a trace
            raise RuntimeError(f"the {self.library} JPEG decoder gave {len(images)} images for {len(group)} files")
        images = [x.expand(3, -1, -1) if x is not None and x.shape[0] == 1 else x for x in images]
        crops: list[torch.Tensor | None] = [None] * len(group)
        alike: dict[tuple, list[int]] = {}  # the same size and orientation: resized together
        for n, (jpeg, image) in enumerate(zip(group, images)):
            if image is not None:
                alike.setdefault((tuple(image.shape), jpeg.orientation), []).append(n)
        for (_, orientation), members in alike.items():
            for start in range(0, len(members), _RESIZE_CHUNK):
                part = members[start:start + _RESIZE_CHUNK]
                batch = orient(torch.stack([images[n] for n in part]), orientation)
                out = resize_crop_tensor(batch, self.cfg, reduce=self.draft is not None)
                for k, n in enumerate(part):
                    crops[n] = out[k] if out is not None else None
        del images
        decoded = []
        for jpeg, crop in zip(group, crops):
            if crop is None:  # the library refused it, or a shape the CPU path windows
                decoded.append(self._on_cpu(jpeg.path, jpeg.content_hash, jpeg.data))
            else:
                with self._lock:
                    self.stats["gpu"] += 1
                decoded.append(Decoded(jpeg.path, jpeg.content_hash, crop, jpeg.meta, None))
        return decoded

