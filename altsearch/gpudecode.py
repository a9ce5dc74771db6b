"""JPEG decoding on the GPU (nvJPEG, through torchvision) for ingestion beside a model on CUDA.

On a GPU the model embeds ViT-L/14 crops faster than a whole server's CPU cores can decode
camera JPEGs (an H100 in bf16: ~2,300 images/s; a 16-core host with reduced-size decoding: ~140
12 Mpx JPEGs/s). :class:`GpuDecoder` moves the decoding itself to the GPU:

- reader threads read each file once, hash it (:func:`altsearch.decode.hash_bytes`) and parse its
  header and EXIF with Pillow (no pixels): the same metadata and the same size limit as on the CPU;
- baseline and progressive JPEGs in RGB or greyscale, ending with their end-of-image marker, are
  decoded in groups by ``torchvision.io.decode_jpeg(..., device="cuda")``, turned as their EXIF
  orientation says, reduced by whole-pixel averaging to the scale a CPU draft decode would use, then
  resized (bicubic, antialiased) and centre-cropped on the GPU (:func:`resize_crop_tensor`);
- everything else (PNG, HEIC, CMYK JPEGs, JPEGs with data after their end marker, and any JPEG that
  nvJPEG refuses) is decoded on the CPU by the same code as :mod:`altsearch.decode`, in the reader
  thread, so a corrupt file gets the same one-line reason either way.

The crops come back as uint8 CUDA tensors ``(H, W, 3)`` in :class:`~altsearch.decode.Decoded`, ready
for :meth:`altsearch.Model.encode_pixels`. torchvision is optional (``pip install
"altsearch[gpu]"``): without it, or without CUDA, ingestion decodes on the CPU as before.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import os
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from altsearch.decode import (
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

DECODE_CHOICES = ("auto", "cpu", "gpu")
GROUP = 32
"""JPEGs per nvJPEG call: an H100 decoded 12 Mpx JPEGs at 530/s in groups of 8, 750/s in groups of 32 or 64."""
_GPU_MODES = frozenset({"RGB", "L"})  # what nvJPEG decodes to RGB; CMYK and YCCK JPEGs go to the CPU
_EOI = b"\xff\xd9"  # JPEG end-of-image marker
_DRAFT_STEPS = (8, 4, 2)  # libjpeg's reduced DCT scales
_MAX_READERS = 8


JpegDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]
"""Encoded JPEGs (1-D uint8 tensors) -> RGB uint8 (3, H, W) images on the device; raises RuntimeError
when any of them cannot be decoded."""


@functools.cache
def _nvjpeg() -> JpegDecoder | None:
    """torchvision's nvJPEG decoding when torchvision is installed, else None."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, RuntimeError, OSError) as exc:  # absent, or built for another torch
        log.debug("torchvision unavailable: %s", exc)
        return None

    def decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))

    return decode


def gpu_decode_unavailable(device: torch.device, cfg: PreprocessConfig, *, load: bool = True) -> str | None:
    """Why JPEGs cannot be decoded on ``device`` for ``cfg`` (None: they can). With ``load=False``
    torchvision is only looked for, not imported (importing it takes seconds)."""
    if device.type != "cuda":
        return f"the model runs on {device.type}, not CUDA"
    if importlib.util.find_spec("torchvision") is None or (load and _nvjpeg() is None):
        return 'torchvision is not installed (pip install "altsearch[gpu]")'
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
    """Decode files for ingestion with nvJPEG on ``device`` (see the module docstring). Use as a context
    manager; :meth:`imap` has :class:`altsearch.decode.DecodePool`'s contract: one
    :class:`~altsearch.decode.Decoded` per path, bad files with ``error`` set, never raising for one."""

    def __init__(self, cfg: PreprocessConfig, device: torch.device | str, *, readers: int | None = None,
                 group: int = GROUP, draft: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 hash_kind: str = DEFAULT_HASH, decode_jpeg: JpegDecoder | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.readers = readers or _default_readers()
        self.group = group
        self.draft = draft  # for the files decoded on the CPU
        self.max_pixels = max_pixels
        self.hash_kind = check_hash_kind(hash_kind)  # an unknown kind fails here, not in every reader
        self._decode_jpeg = decode_jpeg or _nvjpeg()
        if self._decode_jpeg is None:
            raise RuntimeError('GPU decoding needs torchvision (pip install "altsearch[gpu]")')
        self.stats = {"gpu": 0, "cpu": 0}  # files decoded each way (for tests and diagnostics)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> GpuDecoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def imap(self, paths: Iterable[str | os.PathLike[str]]) -> Iterator[Decoded]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.readers, thread_name_prefix="altsearch-read")
        source = iter(paths)
        ahead = 2 * self.group + self.readers  # read and waiting: two groups, and one per reader
        pending: deque[Future] = deque()
        group: list[_Jpeg] = []
        try:
            while True:
                while len(pending) < ahead and (path := next(source, None)) is not None:
                    pending.append(self._pool.submit(self._read, os.fspath(path)))
                if not pending:
                    break
                item = pending.popleft().result()
                if isinstance(item, Decoded):
                    yield item
                    continue
                group.append(item)
                if len(group) >= self.group:
                    yield from self._decode_group(group)
                    group = []
            yield from self._decode_group(group)
        finally:
            for future in pending:
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
        """The file as a JPEG for nvJPEG, from its header alone; None when the CPU should decode it."""
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

    # -- in the caller's thread ------------------------------------------------------------------

    def _decode_group(self, group: list[_Jpeg]) -> Iterator[Decoded]:
        if not group:
            return
        with warnings.catch_warnings():
            # The tensors share the files' bytes objects, which nothing writes to; torch warns that it
            # cannot protect them. Copying each file into a bytearray instead cost 1.4 ms per 2.4 MB
            # photo in the thread that feeds the GPU (45 ms per group of 32 here, mostly page faults).
            warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
            encoded = [torch.frombuffer(j.data, dtype=torch.uint8) for j in group]
        images = self._decode_many(encoded)
        crops: list[torch.Tensor | None] = [None] * len(group)
        alike: dict[tuple, list[int]] = {}  # the same size and orientation: resized as one batch
        for n, (jpeg, image) in enumerate(zip(group, images)):
            if image is not None:
                alike.setdefault((tuple(image.shape), jpeg.orientation), []).append(n)
        for (_, orientation), members in alike.items():
            batch = orient(torch.stack([images[n] for n in members]), orientation)
            out = resize_crop_tensor(batch, self.cfg, reduce=self.draft is not None)
            for k, n in enumerate(members):
                crops[n] = out[k] if out is not None else None
        for jpeg, crop in zip(group, crops):
            if crop is None:  # nvJPEG refused it, or a shape the CPU path windows
                yield self._on_cpu(jpeg.path, jpeg.content_hash, jpeg.data)
            else:
                self.stats["gpu"] += 1
                yield Decoded(jpeg.path, jpeg.content_hash, crop, jpeg.meta, None)

    def _decode_many(self, tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """RGB (3, H, W) uint8 images on the device; where one file breaks the group, each is tried alone."""
        try:
            images: list[torch.Tensor | None] = list(self._decode_jpeg(tensors, self.device))
        except RuntimeError as exc:
            log.debug("nvJPEG refused a group of %d (%s); decoding them one by one", len(tensors), exc)
            images = []
            for t in tensors:
                try:
                    images.append(self._decode_jpeg([t], self.device)[0])
                except RuntimeError:
                    images.append(None)
        return [x.expand(3, -1, -1) if x is not None and x.shape[0] == 1 else x for x in images]
