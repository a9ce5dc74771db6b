"""Hostile inputs for end-to-end tests, and the real CLI run as a subprocess.

:func:`make_hostile_folder` writes a folder of files that try to break an indexer (empty, truncated
and bit-flipped images, decompression bombs, FIFOs, device files, symlink loops, non-UTF-8 names,
a 100-megapixel JPEG ...) and returns a manifest: what a correct indexer does with each of them.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tests.photos import photo

ROOT = Path(__file__).resolve().parents[1]

INDEXED = "indexed"  # catalogued, with a vector
FAILED = "failed"  # listed by `altsearch errors` with a reason
EITHER = "indexed or failed"  # damage that a decoder may or may not notice (flipped bits)
IGNORED = "ignored"  # not a candidate (hidden, or named as a non-image): in neither list


@dataclass(frozen=True)
class Case:
    """One hostile file: where it is, what must become of it, and (when failed) words of the reason."""

    path: str
    expect: str
    reason: str | None = None


# --- the CLI in a subprocess -------------------------------------------------------------


# The CLI with `vectors.EXACT_MAX` lowered to argv[1]: a test index of a few hundred images then
# behaves as one beyond EXACT_MAX, whose ivfpq vector index indexing runs keep and save as a file
# (a flat index has none). An ivfpq needs 256 vectors at least.
_LARGE_CLI = ("import sys\n"
              "from altsearch.cli import main\n"
              "from altsearch import vectors\n"
              "vectors.EXACT_MAX = int(sys.argv.pop(1))\n"
              "main()\n")


def cli(*args: object, exact_max: int | None = None) -> list[str]:
    """The argv of ``python -m altsearch ARGS`` (paths may be str, Path or bytes); with ``exact_max``,
    of the CLI run with that `vectors.EXACT_MAX`."""
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    if exact_max is None:
        return [sys.executable, "-m", "altsearch", *argv]
    return [sys.executable, "-c", _LARGE_CLI, str(exact_max), *argv]


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **extra}


def run_cli(*args: object, timeout: float = 300, exact_max: int | None = None, **popen) -> subprocess.CompletedProcess:
    env = popen.pop("env", None) or cli_env()
    return subprocess.run(cli(*args, exact_max=exact_max), capture_output=True, text=True, env=env,
                          timeout=timeout, **popen)


def assert_one_line_error(result, *words: str) -> None:
    """Exit code 1, one line on stderr starting with ``error:``, no traceback, and ``words`` in it."""
    stderr = result.stderr
    assert result.returncode == 1, (result.returncode, stderr[-2000:])
    assert stderr.startswith("error:") and stderr.count("\n") == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    for word in words:
        assert word in stderr, (word, stderr)


# --- image bytes -------------------------------------------------------------------------


def encoded(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims ``width`` x ``height`` RGB pixels (a few bytes of data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def text_bomb_png(good_png: bytes) -> bytes:
    """A good PNG with a zTXt chunk that inflates to 64 MB (Pillow's text limit is 1 MB)."""
    ztxt = b"comment\x00\x00" + zlib.compress(b"A" * (64 << 20), 9)
    return good_png[:33] + png_chunk(b"zTXt", ztxt) + good_png[33:]


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG ``data`` with its SOF0 header rewritten to claim ``width`` x ``height``."""
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


def broken_exif_jpeg(img: Image.Image) -> bytes:
    """A JPEG whose APP1 Exif segment points its IFD far outside the segment."""
    exif = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 0x7FFFFFF0) + b"\xff" * 32
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    data = encoded(img, "JPEG", quality=85)
    return data[:2] + app1 + data[2:]


def flip_bits(data: bytes, at: int, count: int = 16) -> bytes:
    raw = bytearray(data)
    for i in range(at, min(at + count, len(raw))):
        raw[i] ^= 0x5A
    return bytes(raw)


def animated_gif() -> bytes:
    frames = [photo(900 + i, (120, 90)).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def tiff_16bit() -> bytes:
    ramp = (np.linspace(0, 65535, 160 * 120).reshape(120, 160)).astype("<u2")
    img = Image.fromarray(ramp)
    assert img.mode == "I;16", img.mode
    return encoded(img, "TIFF")


# --- the corpus --------------------------------------------------------------------------


def make_hostile_folder(root: Path) -> dict[str, Case]:
    """Write the hostile corpus under ``root``; returns name -> :class:`Case` (paths absolute)."""
    root.mkdir(parents=True, exist_ok=True)
    good = photo(1, (320, 240))
    jpg = encoded(good, "JPEG", quality=90)
    png = encoded(photo(2, (200, 150)), "PNG")
    files: dict[str, tuple[str | bytes, bytes, str, str | None]] = {
        # name: (file name, bytes, expected outcome, words of the reason)
        "good jpeg": ("good.jpg", jpg, INDEXED, None),
        "good png": ("good.png", png, INDEXED, None),
        "duplicate content": ("copy of good.jpg", jpg, INDEXED, None),
        "zero bytes": ("empty.jpg", b"", FAILED, "empty"),
        "truncated jpeg": ("truncated.jpg", jpg[: len(jpg) // 3], FAILED, "truncated"),
        "truncated png": ("truncated.png", png[: len(png) // 2], FAILED, "truncated"),
        "bit-flipped jpeg data": ("flipped-data.jpg", flip_bits(jpg, len(jpg) // 2, 64), EITHER, None),
        "bit-flipped jpeg header": ("flipped-header.jpg", flip_bits(jpg, 2, 64), EITHER, None),
        "bit-flipped png data": ("flipped-data.png", flip_bits(png, len(png) // 2), EITHER, None),
        "png bomb header": ("bomb.png", bomb_png(100_000, 100_000), FAILED, "too large"),
        "jpeg bomb header": ("bomb.jpg", jpeg_with_size(jpg, 65_000, 65_000), FAILED, "too large"),
        "png text bomb": ("text-bomb.png", text_bomb_png(png), EITHER, None),
        "animated gif": ("animated.gif", animated_gif(), INDEXED, None),
        "16-bit tiff": ("sixteen-bit.tif", tiff_16bit(), INDEXED, None),
        "cmyk tiff": ("cmyk.tiff", encoded(photo(3, (160, 120)).convert("CMYK"), "TIFF"), INDEXED, None),
        "cmyk jpeg": ("cmyk.jpg", encoded(photo(4, (160, 120)).convert("CMYK"), "JPEG"), INDEXED, None),
        "broken exif": ("broken-exif.jpg", broken_exif_jpeg(photo(5, (160, 120))), INDEXED, None),
        "png named .jpg": ("really-a-png.jpg", encoded(photo(6, (160, 120)), "PNG"), INDEXED, None),
        "jpeg named .png": ("really-a-jpeg.png", encoded(photo(7, (160, 120)), "JPEG"), INDEXED, None),
        "jpeg without extension": ("IMG_0001", encoded(photo(8, (160, 120)), "JPEG"), INDEXED, None),
        "jpeg named .txt": ("notes.txt", encoded(photo(9, (160, 120)), "JPEG"), IGNORED, None),
        "text named .jpg": ("text.jpg", b"just some text, not a JPEG\n" * 10, FAILED, "not an image"),
        "hidden file": (".hidden.jpg", encoded(photo(10, (160, 120)), "JPEG"), IGNORED, None),
        "non-UTF-8 name": (b"caf\xe9-latin1.jpg", encoded(photo(11, (160, 120)), "JPEG"), INDEXED, None),
        "newline in name": ("new\nline.jpg", encoded(photo(12, (160, 120)), "JPEG"), INDEXED, None),
        "1-pixel png": ("pixel.png", encoded(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"), INDEXED, None),
        "1-pixel jpeg": ("pixel.jpg", encoded(Image.new("RGB", (1, 1), (199, 9, 99)), "JPEG"), INDEXED, None),
        "20000x1 png": ("needle.png", encoded(Image.new("RGB", (20_000, 1), (1, 2, 3)), "PNG"), INDEXED, None),
        "100-megapixel jpeg": ("huge.jpg", encoded(Image.new("RGB", (10_000, 10_000), (200, 120, 40)), "JPEG",
                                                    quality=75), INDEXED, None),
        "webp": ("photo.webp", encoded(photo(13, (160, 120)), "WEBP"), INDEXED, None),
        "bmp": ("photo.bmp", encoded(photo(14, (160, 120)), "BMP"), INDEXED, None),
    }
    cases = {}
    for key, (name, data, expect, reason) in files.items():
        path = os.path.join(os.fsencode(root), name if isinstance(name, bytes) else os.fsencode(name))
        with open(path, "wb") as f:
            f.write(data)
        cases[key] = Case(os.fsdecode(path), expect, reason)
    cases.update(_special_files(root))
    return cases


def _special_files(root: Path) -> dict[str, Case]:
    """Things that are not plain files: a FIFO, a device, links that loop or lead nowhere."""
    cases = {}
    fifo = root / "pipe.jpg"
    os.mkfifo(fifo)
    cases["fifo named .jpg"] = Case(str(fifo), FAILED, "fifo")
    device = root / "zero.jpg"
    device.symlink_to("/dev/zero")
    cases["symlink to /dev/zero"] = Case(str(device), FAILED, "character device")
    dangling = root / "dangling.jpg"
    dangling.symlink_to(root / "no-such-file.jpg")
    cases["dangling symlink"] = Case(str(dangling), FAILED, "broken symlink")
    nested = root / "nested" / "deeper"
    nested.mkdir(parents=True)
    (nested / "inner.png").write_bytes(encoded(photo(15, (160, 120)), "PNG"))  # inside the loop's target
    cases["image beside a loop"] = Case(str(nested / "inner.png"), INDEXED)
    loop = nested / "back-to-nested"
    loop.symlink_to(root / "nested")
    cases["symlink loop"] = Case(str(loop), FAILED, "loop")
    self_link = root / "self.jpg"
    self_link.symlink_to(self_link)
    cases["link to itself"] = Case(str(self_link), FAILED, "loop")
    folder = root / "folder.jpg"
    folder.mkdir()
    cases["folder named .jpg"] = Case(str(folder), IGNORED)
    return cases
