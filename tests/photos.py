"""Generated photo folders for end-to-end tests: distinct, camera-like JPEGs and PNGs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def photo(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A distinct picture per seed: a coloured gradient background with a few shapes."""
    rng = np.random.default_rng(seed)
    w, h = size
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None] if seed % 2 else np.linspace(0, 1, h)[:, None, None]
    arr = (c0 * (1 - t) + c1 * t) * np.ones((h, w, 1))
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return img


def exif_bytes(taken: dt.datetime | None = None, make: str | None = None, model: str | None = None) -> bytes:
    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    if taken:
        exif.get_ifd(0x8769)[0x9003] = taken.strftime("%Y:%m:%d %H:%M:%S")
    return exif.tobytes()


def save_photo(path: Path, seed: int, *, taken: dt.datetime | None = None, size=(320, 240),
               quality: int = 90, camera: tuple[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = photo(seed, size)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        make, model = camera or (None, None)
        img.save(path, quality=quality, exif=exif_bytes(taken, make, model))
    else:
        img.save(path)
    return path


def make_folder(root: Path, n: int = 12, *, start: int = 0) -> list[Path]:
    """``n`` photos in a small tree; every third one is a PNG, the JPEGs carry EXIF dates in 2021-2024."""
    paths = []
    for i in range(start, start + n):
        sub = root / ("trips" if i % 2 else "home") / f"{2021 + i % 4}"
        if i % 3 == 2:
            paths.append(save_photo(sub / f"img_{i:03d}.png", seed=i))
        else:
            taken = dt.datetime(2021 + i % 4, 1 + i % 12, 1 + i % 28, 12, 0, 0)
            paths.append(save_photo(sub / f"img_{i:03d}.jpg", seed=i, taken=taken, camera=("Canon", "EOS R5")))
    return paths


def make_slow_folder(root: Path, n: int = 100) -> Path:
    """Camera-like 1600x1200 JPEGs: with --full-decode and one worker, indexing them takes seconds,
    long enough for tests to interrupt, kill or read alongside a running indexer."""
    for i in range(n):
        save_photo(root / f"{i // 25:02d}" / f"big_{i:03d}.jpg", seed=5000 + i, size=(1600, 1200))
    return root
