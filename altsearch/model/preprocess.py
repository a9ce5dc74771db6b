"""CLIP image preprocessing, bit-identical to transformers' ``CLIPImageProcessorPil``.

The pipeline (spec §2): any image -> RGB (transparency composited on white) -> resize the shortest
edge with PIL bicubic -> centre crop -> ``float64 * rescale_factor -> float32`` -> ``(x - mean) / std``
in float32 -> ``(B, 3, H, W)``.

It is split where the work is best done: :func:`open_image` and :func:`resize_crop` are Pillow +
numpy only (they run in decode worker processes, which must stay free of torch), while
:class:`Normalizer` turns a uint8 batch into model input on whatever device the batch lives on.

Beyond the reference, :func:`open_image` applies EXIF orientation, reads 16-bit and float images
sensibly (the reference clips them), can decode JPEGs at reduced size (``draft``) and refuses
decompression bombs. Everything else matches the reference exactly.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import re
import stat
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from altsearch.errors import ConfigError, ImageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_MAX_PIXELS = 250_000_000

ImageSource = Union[Image.Image, str, "os.PathLike[str]", bytes, IO[bytes]]

_FLAGS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")
_RESAMPLE_FILTERS = frozenset(int(f) for f in Image.Resampling)
# What open_image decodes. Not EPS (Pillow runs Ghostscript on it), nor Pillow's exotic formats:
# a hostile file should meet as little parsing code as possible.
_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "GIF", "TIFF", "BMP", "DIB", "JPEG2000", "PPM", "ICO")
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_WHITE = (255, 255, 255, 255)
# resize_crop resizes only the crop window when the full resize would exceed this many crop areas
# (aspect ratios beyond 64:1), so a 3 x 100000 px strip cannot blow up into gigabytes.
MAX_RESIZE_AREA = 64

# What Pillow and its plugins raise on malformed input (besides OSError and its subclasses):
# SyntaxError (bad PNG/TIFF structure), ValueError (bad modes, oversized chunks, conversions),
# EOFError/struct.error/IndexError/KeyError (short or inconsistent headers), ZeroDivisionError
# (zero-sized tiles), MemoryError (absurd but under-the-limit allocations).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    ZeroDivisionError,
    MemoryError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
# What ImageOps.exif_transpose / getexif raise on broken EXIF blocks (ignored: no rotation).
_EXIF_ERRORS = (SyntaxError, ValueError, OSError, struct.error, KeyError, IndexError, TypeError)


# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessConfig:
    """What ``preprocessor_config.json`` says; the defaults are OpenAI CLIP's (= BAAI/AltCLIP's).

    ``do_convert_rgb`` is recorded but always honoured as True: the vision tower needs 3 channels.
    """

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    resample: int = 3  # PIL BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        for name in ("shortest_edge", "crop_height", "crop_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.resample not in _RESAMPLE_FILTERS:
            raise ConfigError(f"resample must be one of PIL's filters {sorted(_RESAMPLE_FILTERS)}, "
                              f"got {self.resample!r}")
        if not self.rescale_factor > 0:
            raise ConfigError(f"rescale_factor must be positive, got {self.rescale_factor!r}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"{name} must have 3 values (R, G, B), got {getattr(self, name)!r}")
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"image_std must be positive, got {self.image_std!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        """Read a Hugging Face preprocessor config (current dict form or the legacy int form).

        Missing keys (or ``null``) keep the defaults; unknown keys are ignored.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"preprocessor config must be a JSON object, got {type(d).__name__}")
        kw: dict[str, Any] = {}
        if d.get("size") is not None:
            kw["shortest_edge"] = _shortest_edge(d["size"])
        if d.get("crop_size") is not None:
            kw["crop_height"], kw["crop_width"] = _crop_size(d["crop_size"])
        if d.get("resample") is not None:
            kw["resample"] = _integer("resample", d["resample"])
        for flag in _FLAGS:
            if d.get(flag) is not None:
                kw[flag] = _boolean(flag, d[flag])
        if d.get("rescale_factor") is not None:
            kw["rescale_factor"] = _number("rescale_factor", d["rescale_factor"])
        for name in ("image_mean", "image_std"):
            if d.get(name) is not None:
                kw[name] = _triple(name, d[name])
        return cls(**kw)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike[str]) -> PreprocessConfig:
        """The config in ``folder/preprocessor_config.json``, or the defaults when there is none."""
        path = Path(folder) / PREPROCESSOR_FILE
        if not path.is_file():
            log.debug("no %s in %s: using the CLIP defaults", PREPROCESSOR_FILE, folder)
            return cls()
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ConfigError) as exc:
            raise ConfigError(f"{path}: {_one_line(exc)}") from exc


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return float(value)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"{name} must be a list of 3 numbers, got {value!r}")
    a, b, c = (_number(name, v) for v in value)
    return (a, b, c)


def _shortest_edge(size: Any) -> int:
    if isinstance(size, Mapping):
        if "shortest_edge" not in size or size.get("longest_edge") is not None:
            raise ConfigError(f"size must be {{'shortest_edge': N}} (CLIP resizing), got {dict(size)!r}")
        return _integer("size.shortest_edge", size["shortest_edge"])
    return _integer("size", size)  # legacy form: "size": 224


def _crop_size(crop: Any) -> tuple[int, int]:
    if isinstance(crop, Mapping):
        if "height" not in crop or "width" not in crop:
            raise ConfigError(f"crop_size must have height and width, got {dict(crop)!r}")
        return _integer("crop_size.height", crop["height"]), _integer("crop_size.width", crop["width"])
    side = _integer("crop_size", crop)  # legacy form: "crop_size": 224
    return side, side


# --- decoding ------------------------------------------------------------------------------


def open_image(
    source: ImageSource, *, draft: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """A fully loaded RGB image, EXIF orientation applied, from a path, bytes, file object or image.

    ``draft=N`` decodes JPEGs at a reduced DCT scale whose shortest edge is still >= N (other formats,
    and images passed in as ``PIL.Image``, are unaffected). Images over ``max_pixels`` (by their header)
    are refused before any pixel is decoded; so are those over Pillow's own hard limit
    (``2 * Image.MAX_IMAGE_PIXELS``, about 179 Mpx unless the caller raised it).
    Raises :class:`ImageError` with a one-line reason.
    """
    if isinstance(source, Image.Image):
        with _image_errors():
            _check_size(source.size, max_pixels)
            source.load()
            return to_rgb(_oriented(source))
    if isinstance(source, (str, os.PathLike)):
        try:
            data = read_image_bytes(source)
            return decode_bytes(data, draft=draft, max_pixels=max_pixels).image
        except ImageError as exc:
            raise ImageError(f"{os.fspath(source)}: {exc}") from exc
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(source), draft=draft, max_pixels=max_pixels).image
    with _image_errors(), _opened(source, draft, max_pixels) as (im, _):
        return to_rgb(_oriented(im))


@dataclass(frozen=True)
class DecodedImage:
    """A decoded RGB image (oriented, maybe draft-reduced) and what its file said about itself."""

    image: Image.Image
    header_size: tuple[int, int]  # (width, height) as stored in the file
    format: str | None
    exif: Image.Exif | None


def decode_bytes(
    data: bytes, *, draft: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decode an in-memory image file; raises :class:`ImageError` with a one-line reason."""
    if not data:
        raise ImageError("empty file")
    with _image_errors(), _opened(io.BytesIO(data), draft, max_pixels) as (im, header_size):
        exif = read_exif(im)
        return DecodedImage(to_rgb(_oriented(im)), header_size, im.format, exif)


# Non-blocking: opening a FIFO must not wait for a writer (no effect on regular files).
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def read_image_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an image file; read failures become :class:`ImageError` with a short reason.

    Only a regular file is read, and opening never blocks: a FIFO would wait for a writer, and a
    device such as /dev/zero never ends.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
        with open(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise ImageError("is a directory" if stat.S_ISDIR(mode) else "not a regular file")
            return f.read()
    except OSError as exc:
        raise ImageError(read_error_reason(exc)) from exc


def read_error_reason(exc: OSError) -> str:
    """A one-line reason for a failed file read."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    return f"read error: {exc.strerror or _one_line(exc)}"


@contextlib.contextmanager
def open_header(fp: IO[bytes], max_pixels: int, formats: tuple[str, ...] | None = None) -> Iterator[Image.Image]:
    """Open an image without decoding its pixels (header and metadata only), refusing an oversized one
    by its header (:class:`ImageError`). Pillow's own errors for a file it cannot open pass through."""
    with warnings.catch_warnings():
        # Our own max_pixels check replaces Pillow's warning; EXIF/chunk chatter is not actionable.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        with Image.open(fp, formats=formats or decodable_formats()) as im:
            _check_size(im.size, max_pixels)
            yield im


@contextlib.contextmanager
def _opened(fp: IO[bytes], draft: int | None, max_pixels: int) -> Iterator[tuple[Image.Image, tuple[int, int]]]:
    """Open, refuse oversized images by header, set up draft decoding, load the first frame."""
    with open_header(fp, max_pixels) as im:
        header_size = im.size
        if draft is not None and im.format in _DRAFT_FORMATS:
            im.draft("RGB", (draft, draft))  # DCT scale chosen so both edges stay >= draft
        im.load()
        yield im, header_size


@functools.cache
def decodable_formats() -> tuple[str, ...]:
    """The Pillow formats :func:`open_image` tries, in this order; anything else is "not an image".

    HEIC/HEIF is included when pillow-heif is installed (its opener is added to Pillow's plugin
    registry once per process, which changes nothing for other formats).
    """
    try:
        import pillow_heif
    except ImportError:
        log.debug("pillow-heif not installed: HEIC/HEIF files will not decode")
    else:
        pillow_heif.register_heif_opener()
    Image.init()
    return tuple(f for f in _FORMATS if f in Image.OPEN)


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} px (limit {max_pixels} px)")
    if width <= 0 or height <= 0:
        raise ImageError(f"empty image: {width}x{height} px")


@contextlib.contextmanager
def _image_errors() -> Iterator[None]:
    """Turn whatever Pillow raises on a bad file into an ImageError with a one-line reason."""
    try:
        yield
    except _DECODE_ERRORS as exc:
        raise ImageError(_decode_error_reason(exc)) from exc


def _decode_error_reason(exc: BaseException) -> str:
    text = _one_line(exc)
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        match = re.search(r"\((\d+) pixels\)", text)
        return f"image too large: {match.group(1)} px" if match else "image too large"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (unrecognised format)"
    if isinstance(exc, MemoryError):
        return "out of memory decoding image"
    if isinstance(exc, (EOFError, struct.error)) or "truncated" in text:
        return "truncated image"
    if isinstance(exc, OSError) and exc.errno is not None:
        return read_error_reason(exc)
    return f"corrupt image: {text}" if text else f"corrupt image ({type(exc).__name__})"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


def read_exif(im: Image.Image) -> Image.Exif | None:
    try:
        return im.getexif()
    except _EXIF_ERRORS as exc:
        log.debug("ignoring unreadable EXIF: %s", _one_line(exc))
        return None


def _oriented(im: Image.Image) -> Image.Image:
    """``im`` rotated/flipped as its EXIF orientation says (a new image; broken EXIF: unrotated)."""
    try:
        out = ImageOps.exif_transpose(im)
    except _EXIF_ERRORS as exc:
        log.debug("ignoring unreadable EXIF orientation: %s", _one_line(exc))
        out = None
    return out if out is not None else im.copy()


# --- colour conversion ---------------------------------------------------------------------


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB as the reference converts it: transparency composited on white, else ``convert("RGB")``.

    16-bit and float images are first brought to 8 bits (see :func:`_to_8bit`); the reference
    would clip them, turning most 16-bit photos white.
    """
    if im.mode in _HIGH_BIT_MODES:
        im = _to_8bit(im)
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _to_8bit(im: Image.Image) -> Image.Image:
    """Greyscale ``L`` from I;16*/I/F modes.

    16-bit modes: divide by 257 (0..65535 -> 0..255, rounded). ``I`` (32-bit, what older Pillow
    makes of 16-bit PNGs): kept if it fits 0..255, else clipped to 0..65535 and divided by 257.
    ``F``: values within [0, 1] are scaled by 255, others clipped to 0..255; NaN -> 0.
    """
    values = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
    elif im.mode.startswith("I;16") or (values.size and (values.max() > 255 or values.min() < 0)):
        values = np.clip(values, 0, 65535) / 257.0
    out = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    out.info = {k: v for k, v in im.info.items() if k != "transparency"}
    return out


# --- geometry and normalisation ------------------------------------------------------------


def resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) with the shortest edge scaled to ``shortest_edge``, the other truncated."""
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


def resize_crop(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 ``(crop_h, crop_w, 3)``: shortest-edge resize then centre crop (zero pad if smaller).

    ``img`` must be RGB (as :func:`open_image` returns).
    """
    if img.mode != "RGB":
        raise ValueError(f"resize_crop needs an RGB image, got mode {img.mode}")
    if cfg.do_resize:
        size = resized_size(*img.size, cfg.shortest_edge)
        if cfg.do_center_crop and size[0] * size[1] > MAX_RESIZE_AREA * cfg.crop_width * cfg.crop_height:
            return np.array(_resize_crop_window(img, size, cfg), dtype=np.uint8)
        img = img.resize(size, resample=cfg.resample)
    if cfg.do_center_crop:
        left, top = _crop_origin(img.size, cfg)  # negative when padding, which PIL fills with 0
        img = img.crop((left, top, left + cfg.crop_width, top + cfg.crop_height))
    return np.array(img, dtype=np.uint8)


def _crop_origin(size: tuple[int, int], cfg: PreprocessConfig) -> tuple[int, int]:
    """Top-left corner of the centre crop (floor offsets, as the reference)."""
    return (size[0] - cfg.crop_width) // 2, (size[1] - cfg.crop_height) // 2


def _resize_crop_window(img: Image.Image, size: tuple[int, int], cfg: PreprocessConfig) -> Image.Image:
    """Resize only the source region that lands in the centre crop (for extreme aspect ratios).

    Same geometry and filter as resize-then-crop; pixels may differ by a level or so from the
    reference's rounding order. Avoids materialising e.g. a 224 x 7,000,000 intermediate image.
    """
    (new_w, new_h), (left, top) = size, _crop_origin(size, cfg)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + cfg.crop_width, new_w), min(top + cfg.crop_height, new_h)
    sx, sy = img.width / new_w, img.height / new_h
    window = img.resize((x1 - x0, y1 - y0), resample=cfg.resample, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    out = Image.new("RGB", (cfg.crop_width, cfg.crop_height))
    out.paste(window, (x0 - left, y0 - top))
    return out


def normalize_table(cfg: PreprocessConfig) -> np.ndarray:
    """float32 ``(3, 256)``: the model input for every uint8 value of each channel.

    Computed exactly as the reference computes pixels: ``float64 * rescale_factor -> float32``, then
    ``(x - mean) / std`` in float32, so a lookup is bit-identical to the reference.
    """
    levels = np.arange(256, dtype=np.uint8)
    x = (levels.astype(np.float64) * cfg.rescale_factor if cfg.do_rescale else levels).astype(np.float32)
    if not cfg.do_normalize:
        return np.stack([x, x, x])
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return np.stack([(x - mean[c]) / std[c] for c in range(3)]).astype(np.float32)


class Normalizer:
    """uint8 ``(B, H, W, 3)`` -> ``(B, 3, H, W)`` model input, on the batch's device.

    The output is float32, or ``dtype``: looking values up in a table already rounded to fp16/bf16
    gives exactly the float32 result cast to that dtype, without the float32 intermediate.
    """

    def __init__(self, cfg: PreprocessConfig):
        self._table = normalize_table(cfg).reshape(-1)  # channel c, value v at c * 256 + v
        self._on_device: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, batch: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch

        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected a uint8 (B, H, W, 3) batch, got {batch.dtype} {tuple(batch.shape)}")
        table = self._table_on(batch.device, dtype or torch.float32)
        offsets = torch.arange(0, 768, 256, dtype=torch.int32, device=batch.device).view(1, 3, 1, 1)
        index = batch.permute(0, 3, 1, 2).to(torch.int32) + offsets  # (B, 3, H, W)
        return torch.index_select(table, 0, index.reshape(-1)).view(index.shape)

    def _table_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        import torch

        key = (str(device), str(dtype))
        if key not in self._on_device:
            self._on_device[key] = torch.from_numpy(self._table).to(device=device, dtype=dtype)
        return self._on_device[key]


def preprocess(
    images: Sequence[Image.Image | str | os.PathLike[str] | bytes],
    cfg: PreprocessConfig,
    *,
    draft: int | None = None,
) -> torch.Tensor:
    """float32 ``(B, 3, H, W)`` model input for a batch of images (paths, bytes or PIL images)."""
    import torch

    crops = [resize_crop(open_image(src, draft=draft), cfg) for src in images]
    if not crops:
        return torch.empty((0, 3, cfg.crop_height, cfg.crop_width), dtype=torch.float32)
    return Normalizer(cfg)(torch.from_numpy(np.stack(crops)))
